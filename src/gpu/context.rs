//! Opening (or wrapping) a wgpu device: adapter choice, features and limits.

use crate::error::{Error, Result};

/// How to install a software Vulkan device when no adapter exists.
pub const NO_ADAPTER_HELP: &str = "no Vulkan, Metal or DX12 adapter was found. On a machine without a GPU install \
Mesa's software Vulkan driver lavapipe (Debian/Ubuntu: `apt-get install mesa-vulkan-drivers`) and set \
WGPU_BACKEND=vulkan";

/// The optional features segloss uses when the adapter has them.
pub fn wanted_features() -> wgpu::Features {
    wgpu::Features::SUBGROUP | wgpu::Features::SHADER_F16 | wgpu::Features::TIMESTAMP_QUERY
}

fn backends() -> wgpu::Backends {
    wgpu::Backends::from_env()
        .unwrap_or(wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12)
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle().with_env();
    desc.backends = backends();
    wgpu::Instance::new(desc)
}

/// Every adapter of the enabled backends (`WGPU_BACKEND` narrows them).
pub fn enumerate() -> Vec<wgpu::Adapter> {
    let inst = instance();
    pollster::block_on(inst.enumerate_adapters(backends()))
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
        return Err(Error::NoAdapter(NO_ADAPTER_HELP.into()));
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

/// Opens a device on `adapter` with the adapter's own limits and the optional features it
/// offers.
pub fn open(adapter: &wgpu::Adapter) -> Result<(wgpu::Device, wgpu::Queue)> {
    let desc = wgpu::DeviceDescriptor {
        label: Some("segloss"),
        required_features: adapter.features() & wanted_features(),
        required_limits: adapter.limits(),
        experimental_features: wgpu::ExperimentalFeatures::default(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    };
    pollster::block_on(adapter.request_device(&desc))
        .map_err(|e| Error::Gpu(format!("request_device: {e}")))
}
