//! Opening (or wrapping) a wgpu device: adapter choice, features and limits.

use crate::error::{Error, Result};

/// How to install a software Vulkan device when no adapter exists.
pub const NO_ADAPTER_HELP: &str = "no Vulkan, Metal or DX12 adapter was found. On a machine without a GPU install \
Mesa's software Vulkan driver lavapipe (Debian/Ubuntu: `apt-get install mesa-vulkan-drivers`) and set \
WGPU_BACKEND=vulkan";

/// The optional features segloss uses when the adapter has them. None is required:
/// without `SUBGROUP` the statistics pass sums in workgroup memory instead, without
/// `TIMESTAMP_QUERY` the benchmarks report no device time, and 16-bit logits need no
/// `SHADER_F16` (they are unpacked with core WGSL).
pub fn wanted_features() -> wgpu::Features {
    wgpu::Features::SUBGROUP | wgpu::Features::SHADER_F16 | wgpu::Features::TIMESTAMP_QUERY
}

/// The device segloss opens on `adapter`, for a program that opens the device itself
/// (then [`crate::GpuContext::from_device`]): the adapter's own limits (the largest
/// storage bindings it allows, so big batches need fewer chunks) and every feature of
/// [`wanted_features`] the adapter has. Add your own features to it as you need.
pub fn device_descriptor(adapter: &wgpu::Adapter) -> wgpu::DeviceDescriptor<'static> {
    wgpu::DeviceDescriptor {
        label: Some("segloss"),
        required_features: adapter.features() & wanted_features(),
        required_limits: adapter.limits(),
        experimental_features: wgpu::ExperimentalFeatures::default(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    }
}

/// The names of `features` (for `segloss info`), e.g. `["SUBGROUP", "TIMESTAMP_QUERY"]`.
pub fn feature_names(features: wgpu::Features) -> Vec<String> {
    // Display joins the flag names with " | ".
    features
        .iter()
        .map(|f| f.to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

/// The backends segloss is built with.
const BUILT: wgpu::Backends = wgpu::Backends::VULKAN
    .union(wgpu::Backends::METAL)
    .union(wgpu::Backends::DX12);

fn backends() -> wgpu::Backends {
    wgpu::Backends::from_env().unwrap_or(BUILT)
}

/// The one wgpu instance of the process, shared by every context segloss opens.
///
/// wgpu resolves a buffer inside the *device's* instance by the buffer's id, without
/// checking which instance created it: a buffer of a second instance silently names
/// whatever buffer has the same id in the first. With one instance, wgpu itself refuses a
/// buffer of another device ("belongs to a different device"), and `record` returns that
/// error. It enables every built backend; `WGPU_BACKEND` filters at enumeration.
pub fn instance() -> &'static wgpu::Instance {
    static INSTANCE: std::sync::OnceLock<wgpu::Instance> = std::sync::OnceLock::new();
    INSTANCE.get_or_init(|| {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle().with_env();
        desc.backends = BUILT;
        wgpu::Instance::new(desc)
    })
}

/// Every adapter of the enabled backends (`WGPU_BACKEND` narrows them).
pub fn enumerate() -> Vec<wgpu::Adapter> {
    pollster::block_on(instance().enumerate_adapters(backends() & BUILT))
}

/// The error for an empty adapter list: when `WGPU_BACKEND` selected nothing, that
/// variable and the adapters that do exist; otherwise how to install lavapipe.
fn no_adapter() -> Error {
    if let Ok(value) = std::env::var("WGPU_BACKEND") {
        let all: Vec<String> = pollster::block_on(instance().enumerate_adapters(BUILT))
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("{} ({:?})", i.name, i.backend)
            })
            .collect();
        if !all.is_empty() {
            return Error::NoAdapter(format!(
                "WGPU_BACKEND={value} selects no adapter of the backends segloss is built with \
                 (vulkan, metal, dx12; not gl); the adapters present are: {}. Unset \
                 WGPU_BACKEND or set it to one of their backends",
                all.join(", ")
            ));
        }
        return Error::NoAdapter(format!("WGPU_BACKEND={value}: {NO_ADAPTER_HELP}"));
    }
    Error::NoAdapter(NO_ADAPTER_HELP.into())
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

/// Picks the adapter: the first whose name contains `WGPU_ADAPTER_NAME` (case-insensitive)
/// when set, otherwise a discrete GPU before an integrated, virtual or CPU one.
pub fn choose(mut adapters: Vec<wgpu::Adapter>) -> Result<wgpu::Adapter> {
    if adapters.is_empty() {
        return Err(no_adapter());
    }
    if let Ok(name) = std::env::var("WGPU_ADAPTER_NAME") {
        let want = name.to_lowercase();
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        return adapters
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&want))
            .ok_or_else(|| {
                Error::NoAdapter(format!(
                    "WGPU_ADAPTER_NAME={name} matches none of {names:?}"
                ))
            });
    }
    adapters.sort_by_key(|a| rank(a.get_info().device_type));
    Ok(adapters.remove(0))
}

/// Keeps freed heap memory mapped in this process (glibc on Linux; elsewhere a no-op).
///
/// Mesa's lavapipe allocates about a megabyte per compute workgroup for the shader's
/// per-invocation state and frees it when the workgroup ends; glibc gives that memory back
/// to the kernel each time (heap trimming), so every workgroup pays for fresh pages: 25–30 %
/// of segloss's time on lavapipe, in `perf` as page faults under the JIT code. Raising glibc's
/// trim and mmap thresholds (the same as `GLIBC_TUNABLES=glibc.malloc.trim_threshold=…:
/// glibc.malloc.mmap_threshold=…`) keeps those pages. [`crate::gpu::GpuContext::new`] and
/// [`crate::gpu::GpuContext::on_adapter`] call it for CPU adapters; call it yourself when you
/// hand segloss a lavapipe device of your own. The process keeps up to 256 MiB of freed heap.
pub fn keep_freed_memory_mapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; any value is valid for these two.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}

/// Opens a device on `adapter` as [`device_descriptor`] describes it.
pub fn open(adapter: &wgpu::Adapter) -> Result<(wgpu::Device, wgpu::Queue)> {
    pollster::block_on(adapter.request_device(&device_descriptor(adapter)))
        .map_err(|e| Error::Gpu(format!("request_device: {e}")))
}
