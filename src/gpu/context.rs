//! Opening (or wrapping) a wgpu device: adapter choice, features and limits; and
//! [`GpuContext`], the device with segloss's caches and its default [`Strategy`].

use super::cache::Caches;
use super::pool::BufferKey;
use super::readback::read_buffer;
use super::strategy::{Strategy, TileSum};
use crate::error::{Error, Result};
use std::sync::{Arc, Mutex};

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

/// A GPU device with segloss's pipelines, buffer pool and workspaces. `Send + Sync`: calls
/// from several threads are serialised on the context's lock and the device queue.
pub struct GpuContext {
    pub(super) device: wgpu::Device,
    pub(super) queue: wgpu::Queue,
    pub(super) info: wgpu::AdapterInfo,
    pub(super) inner: Mutex<Caches>,
    /// The adapter's strategy, chosen once (calls may pass another in `Options`).
    pub(super) strategy: Strategy,
    pub(super) last_chunks: std::sync::atomic::AtomicUsize,
    /// The kernels of the last recorded call's dispatches, in order (tests).
    pub(super) last_kernels: Mutex<Vec<super::stages::Kernel>>,
    /// Whether the last recorded call's pixel stages took quads (tests).
    pub(super) last_quads: std::sync::atomic::AtomicBool,
    /// Whether the last recorded call's grad stage took its classes in chunks (tests).
    pub(super) last_grad_chunks: std::sync::atomic::AtomicBool,
    /// Whether the last recorded call's grad stage read the stats stage's softmax pieces
    /// (tests).
    pub(super) last_stored_pieces: std::sync::atomic::AtomicBool,
    /// Whether the last recorded call's gradient read the coefficients through their
    /// uniform binding (tests).
    pub(super) last_uniform_coefs: std::sync::atomic::AtomicBool,
    /// The next recording's sequence number.
    pub(super) next_seq: std::sync::atomic::AtomicU32,
    pub(super) created_bytes: std::sync::atomic::AtomicU64,
    pub(super) lost: Arc<Mutex<Option<String>>>,
    pub(super) uncaptured: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish()
    }
}

pub(super) fn storage_align(device: &wgpu::Device) -> u64 {
    device.limits().min_storage_buffer_offset_alignment.max(4) as u64
}

impl GpuContext {
    /// Opens the preferred adapter (see [`choose`]) and a device on it.
    pub fn new() -> Result<Self> {
        Self::on_adapter(&choose(enumerate())?)
    }

    /// Opens a device on a given adapter (data parallelism over several adapters). A lost
    /// device is reported by the next call; build a new context to carry on.
    pub fn on_adapter(adapter: &wgpu::Adapter) -> Result<Self> {
        if adapter.get_info().device_type == wgpu::DeviceType::Cpu {
            keep_freed_memory_mapped();
        }
        let (device, queue) = open(adapter)?;
        let ctx = Self::from_device(device, queue, adapter.get_info());
        let flag = ctx.lost.clone();
        ctx.device.set_device_lost_callback(move |reason, message| {
            if let Ok(mut f) = flag.lock() {
                *f = Some(format!("{reason:?}: {message}"));
            }
        });
        // Errors outside segloss's error scopes must not panic the caller's program: keep
        // the last one and report it from the next call.
        let last = ctx.uncaptured.clone();
        ctx.device
            .on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                if let Ok(mut l) = last.lock() {
                    *l = Some(e.to_string().replace('\n', " "));
                }
            }));
        Ok(ctx)
    }

    /// Bytes of device memory the context's pool has created so far (its high-water mark:
    /// pooled buffers are reused, never freed while the context lives).
    pub fn pool_bytes(&self) -> u64 {
        self.created_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// An error when the device was lost (for contexts opened by segloss).
    pub fn check_device(&self) -> Result<()> {
        if let Some(e) = self.uncaptured.lock().ok().and_then(|mut u| u.take()) {
            return Err(Error::Gpu(format!("an earlier device error: {e}")));
        }
        match self.lost.lock().map(|l| l.clone()) {
            Ok(None) => Ok(()),
            Ok(Some(why)) => Err(Error::Gpu(format!(
                "the device was lost ({why}); create a new GpuContext to carry on"
            ))),
            Err(_) => Err(Error::Gpu("the device-lost flag is poisoned".into())),
        }
    }

    /// Wraps a device and queue the caller already owns.
    ///
    /// Open the device with [`device_descriptor`] (or add
    /// [`wanted_features`] the adapter has, and the adapter's limits, to your own
    /// descriptor): segloss needs no feature, but without `SUBGROUP` its statistics pass
    /// sums in workgroup memory, and with lower limits large batches are split into more
    /// chunks. Every buffer passed to this context must come from this device; wgpu cannot
    /// tell a buffer of another `wgpu::Instance` from one of its own (it looks buffers up by
    /// id), so keep one instance per process ([`instance`] is segloss's). On
    /// Mesa's lavapipe also call [`keep_freed_memory_mapped`].
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) -> Self {
        let strategy = Strategy::for_device(&device, &info);
        GpuContext {
            device,
            queue,
            info,
            inner: Mutex::new(Caches::default()),
            strategy,
            last_chunks: std::sync::atomic::AtomicUsize::new(0),
            last_kernels: Mutex::new(vec![]),
            last_quads: std::sync::atomic::AtomicBool::new(false),
            last_grad_chunks: std::sync::atomic::AtomicBool::new(false),
            last_stored_pieces: std::sync::atomic::AtomicBool::new(false),
            last_uniform_coefs: std::sync::atomic::AtomicBool::new(false),
            next_seq: std::sync::atomic::AtomicU32::new(1),
            created_bytes: std::sync::atomic::AtomicU64::new(0),
            lost: Arc::new(Mutex::new(None)),
            uncaptured: Arc::new(Mutex::new(None)),
        }
    }

    /// This context with calls defaulting to `strategy` instead of the one chosen for the
    /// adapter (benchmarks comparing strategies on one device; a caller tuning its own),
    /// refused with an error where the device cannot run it ([`Strategy::validate`]).
    pub fn with_strategy(mut self, strategy: Strategy) -> Result<Self> {
        strategy.validate(&self.device, &self.info)?;
        self.strategy = strategy;
        Ok(self)
    }

    /// How many chunks the last recorded call was split into.
    #[doc(hidden)]
    pub fn last_chunks(&self) -> usize {
        self.last_chunks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The kernels the last recorded call dispatches, in order (tests check which path a
    /// call took).
    #[doc(hidden)]
    pub fn last_kernels(&self) -> Vec<super::stages::Kernel> {
        self.last_kernels
            .lock()
            .map(|k| k.clone())
            .unwrap_or_default()
    }

    /// Whether the last recorded call's pixel stages (or its chunked grad stage) took their
    /// pixels four at a time (pixels.wgsl `QUADS`; tests check which path a call took).
    #[doc(hidden)]
    pub fn last_quads(&self) -> bool {
        self.last_quads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the last recorded call's grad stage (if it had one) took the classes in
    /// chunks (grad.wgsl `GRAD_CHUNKS`; tests check which path a call took).
    #[doc(hidden)]
    pub fn last_grad_chunks(&self) -> bool {
        self.last_grad_chunks
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the last recorded call's chunked grad stage (if it had one) read each
    /// pixel's softmax pieces from its stats stage (pixels.wgsl `STORED_PIECES`) instead of
    /// finding them itself (tests check which path a call took).
    #[doc(hidden)]
    pub fn last_stored_pieces(&self) -> bool {
        self.last_stored_pieces
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the last recorded call's gradient (if it had one) read the coefficient
    /// table through its uniform binding (grad_pixel.wgsl `UNIFORM_COEFS`; tests check
    /// which path a call took).
    #[doc(hidden)]
    pub fn last_uniform_coefs(&self) -> bool {
        self.last_uniform_coefs
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Rows of the coefficient table's uniform view on this device (`layout::coef_rows`):
    /// with `Strategy::uniform_coefs`, calls with statistic terms whose batch has at most
    /// this many images × classes read their coefficients there.
    pub fn coef_rows(&self) -> u32 {
        super::layout::coef_rows(self.device.limits().max_uniform_buffer_binding_size)
    }

    /// How the stats stage sums a tile by default (the default strategy's `tile_sum`).
    pub fn tile_sum(&self) -> TileSum {
        self.strategy.tile_sum
    }

    /// The strategy calls use unless their [`crate::gpu::Options::strategy`] says otherwise, chosen
    /// from the adapter's capabilities when the context was made.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Whether stats and grad invocations take runs of consecutive pixels by default.
    pub fn contiguous_pixels(&self) -> bool {
        self.strategy.contiguous_pixels
    }

    /// Whether the stats stage uses subgroup operations.
    pub fn uses_subgroups(&self) -> bool {
        self.tile_sum() == TileSum::Subgroup
    }

    /// The adapter this context runs on.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Reads `count` f32 values of `buffer` (COPY_SRC usage) from byte `offset` (a multiple
    /// of 4), after everything submitted so far: a gradient the backend API wrote, in
    /// tests and examples. It waits for the device.
    pub fn read_f32(&self, buffer: &wgpu::Buffer, offset: u64, count: usize) -> Result<Vec<f32>> {
        let len = 4 * count as u64;
        if !offset.is_multiple_of(4) || offset + len > buffer.size() {
            return Err(Error::Input(format!(
                "reading {count} f32 values at byte {offset} of a {}-byte buffer",
                buffer.size()
            )));
        }
        let words = self.scoped(|| read_buffer(&self.device, &self.queue, buffer, offset, len))?;
        Ok(bytemuck::cast_slice(&words).to_vec())
    }

    /// Buffers created by the pool so far (a steady workload stops adding to it).
    pub fn buffers_created(&self) -> u64 {
        self.inner.lock().map(|i| i.pool.created()).unwrap_or(0)
    }

    pub(super) fn lock(&self) -> Result<std::sync::MutexGuard<'_, Caches>> {
        self.inner
            .lock()
            .map_err(|_| Error::Gpu("a previous call panicked while holding the context".into()))
    }

    /// Runs `f` inside validation and out-of-memory error scopes, so a wgpu error becomes an
    /// `Err` instead of a panic.
    pub(super) fn scoped<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.check_device()?;
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let result = f();
        let oom_err = pollster::block_on(oom.pop());
        let val_err = pollster::block_on(validation.pop());
        self.check_device()?;
        if let Some(e) = oom_err.or(val_err) {
            return Err(Error::Gpu(e.to_string().replace('\n', " ")));
        }
        result
    }

    pub(super) fn create_buffer(&self, k: &BufferKey) -> wgpu::Buffer {
        self.created_bytes
            .fetch_add(k.size, std::sync::atomic::Ordering::Relaxed);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("segloss pooled"),
            size: k.size,
            usage: wgpu::BufferUsages::from_bits_truncate(k.usage),
            mapped_at_creation: false,
        })
    }
}
