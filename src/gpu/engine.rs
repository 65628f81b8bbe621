//! The GPU engine: the three stages (and the optional narrow pass) recorded into a command
//! encoder on any buffers, the caller's or pooled ones; the convenient host API on top.

use super::context;
use super::plan::{self, Dims, FinLayout, Region, DIMS_SLOT, GRAD_WG, STATS_TILE};
use super::pool::{BufferKey, Pool};
use crate::error::{Error, Result};
use crate::input::{GradFormat, LabelFormat, Labels, Layout, LogitFormat, Shape};
use crate::output::{LossOutput, Statistics, TermValue};
use crate::spec::{LossSpec, Reduction as SpecReduction, Term};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const COMMON: &str = include_str!("../../shaders/common.wgsl");
const STATS: &str = include_str!("../../shaders/stats.wgsl");
const REDUCE_WORKGROUP: &str = include_str!("../../shaders/reduce_workgroup.wgsl");
const REDUCE_SUBGROUP: &str = include_str!("../../shaders/reduce_subgroup.wgsl");
const REDUCE_INVOCATION: &str = include_str!("../../shaders/reduce_invocation.wgsl");
const FINALIZE: &str = include_str!("../../shaders/finalize.wgsl");
const GRAD: &str = include_str!("../../shaders/grad.wgsl");
const NARROW: &str = include_str!("../../shaders/narrow.wgsl");

/// The WGSL source of each stage as the device compiles it (common helpers first).
/// `stats` sums its workgroups in workgroup memory; `stats_subgroup`, for adapters with
/// subgroup operations, with them; `stats_invocation` not at all (a partial row per
/// invocation, for CPU adapters without subgroups: see [`TileSum`]).
/// `grad_shared` is the gradient stage for a gradient target that shares a buffer with the
/// logits or labels: the inputs are bound read-write there, since wgpu refuses one buffer
/// bound both read-only and read-write in a dispatch.
pub fn shader_sources() -> [(&'static str, String); 7] {
    [
        ("stats", format!("{COMMON}\n{STATS}\n{REDUCE_WORKGROUP}")),
        (
            "stats_subgroup",
            format!("{COMMON}\n{STATS}\n{REDUCE_SUBGROUP}"),
        ),
        (
            "stats_invocation",
            format!("{COMMON}\n{STATS}\n{REDUCE_INVOCATION}"),
        ),
        ("finalize", format!("{COMMON}\n{FINALIZE}")),
        ("grad", format!("{COMMON}\n{GRAD}")),
        (
            "grad_shared",
            format!("{COMMON}\n{GRAD}")
                .replace(
                    "var<storage, read> logits",
                    "var<storage, read_write> logits",
                )
                .replace(
                    "var<storage, read> labels",
                    "var<storage, read_write> labels",
                ),
        ),
        ("narrow", format!("{COMMON}\n{NARROW}")),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Stage {
    Stats,
    ReduceRows,
    Reduce,
    Finalize,
    Grad,
    Narrow,
}

/// Pipelines are compiled once per (stage, override constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PipelineKey {
    stage: Stage,
    pixel_terms: u32,
    classes: u32,
    label_kind: u32,
    logit_kind: u32,
    grad_kind: u32,
    sigmoid: bool,
    tempered: bool,
    nhwc: bool,
    /// Finalize only (0 elsewhere): the statistic-term kinds present (`plan::stat_kinds`).
    stat_kinds: u32,
    /// Stats only (`TileSum::Workgroup` elsewhere): how a tile's sums are combined.
    tile_sum: TileSum,
    /// Stats and grad (0 elsewhere): the pixel-term kinds present (`plan::pixel_kinds`).
    pixel_kinds: u32,
    /// Stats and grad (0 elsewhere): the pixel terms with class vectors
    /// (`plan::pixel_weighted`).
    pixel_weighted: u32,
    /// Stats (0 elsewhere): the pixel terms with loss maps (`plan::pixel_maps`).
    pixel_maps: u32,
    /// Stats and grad: each invocation takes a run of consecutive pixels (CPU adapters).
    contiguous: bool,
    /// Grad only: the gradient target shares a buffer with the inputs (`grad_shared`).
    shared_inputs: bool,
}

/// One recording's inputs (the four public `record*` methods and the host API differ only
/// in these fields).
#[derive(Clone, Copy)]
struct Request<'a> {
    spec: &'a LossSpec,
    batch: &'a DeviceBatch<'a>,
    grad: Option<GradTarget<'a>>,
    /// Two-phase API: statistics combined elsewhere; the stats pass is skipped.
    given_stats: Option<&'a Statistics>,
    /// Run finalize (and the gradient pass when `grad` is set); false: statistics only.
    finalize: bool,
    /// Fill the workspace outputs with NaN first (tests).
    poison: bool,
}

impl<'a> Request<'a> {
    /// Statistics, finalize and (with `grad`) the gradient.
    fn full(spec: &'a LossSpec, batch: &'a DeviceBatch<'a>, grad: Option<GradTarget<'a>>) -> Self {
        Request {
            spec,
            batch,
            grad,
            given_stats: None,
            finalize: true,
            poison: false,
        }
    }
}

/// A checked request: its dispatches, ready to be recorded, and the handle to its results.
struct Prepared {
    dispatches: Vec<(wgpu::ComputePipeline, wgpu::BindGroup, usize)>,
    /// A shard's stats pass writes only its own images' partial rows, while the tile sums
    /// cover the global batch: the rows of the other images, left from an earlier call on
    /// this workspace, are zeroed first.
    clear_partial: bool,
    recorded: Recorded,
}

/// Byte offset, in the status buffer `check`, of the sequence number of the last recording
/// that ran (after the four counters the stats pass writes).
const SEQ_AT: u64 = 16;

/// The small per-call buffers (uniforms, term table, statistics, coefficients, read-back),
/// reused by every call of one shape and spec structure.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct WorkspaceKey {
    total_batch: usize,
    classes: usize,
    spatial: usize,
    terms: usize,
    params_len: usize,
    dims_slots: usize,
    scratch: u64,
    map: u64,
    /// Partial rows per stats tile (`plan::rows_per_tile`).
    rows_per_tile: usize,
}

struct Workspace {
    dims: wgpu::Buffer,
    params: wgpu::Buffer,
    partial: wgpu::Buffer,
    stats: wgpu::Buffer,
    fin: wgpu::Buffer,
    map: wgpu::Buffer,
    check: wgpu::Buffer,
    /// The sequence number of the recording that holds this workspace, copied into `check`
    /// by the recording's last command.
    seq: wgpu::Buffer,
    scratch: Option<wgpu::Buffer>,
    staging: wgpu::Buffer,
    keys: Vec<(BufferKey, wgpu::Buffer)>,
    sizes: Sizes,
    fin_layout: FinLayout,
}

#[derive(Debug, Clone, Copy)]
struct Sizes {
    params: u64,
    partial: u64,
    stats: u64,
    fin: u64,
    map: u64,
}

/// How many idle workspaces stay cached.
const WORKSPACES: usize = 8;
/// Bind groups kept before the cache starts over.
const BIND_GROUPS: usize = 512;

type BindKey = (PipelineKey, Vec<(u32, wgpu::Buffer, u64, u64)>);

struct Inner {
    modules: HashMap<&'static str, wgpu::ShaderModule>,
    pipelines: HashMap<PipelineKey, wgpu::ComputePipeline>,
    bind_groups: HashMap<BindKey, wgpu::BindGroup>,
    pool: Pool<BufferKey, wgpu::Buffer>,
    workspaces: Vec<(WorkspaceKey, Arc<Workspace>)>,
}

/// What to compute beyond the loss (host API).
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Run the gradient pass and return ∂loss/∂logits.
    pub gradient: bool,
    /// Return the raw per-(image, class) statistics.
    pub statistics: bool,
    /// Fill every output buffer with NaN before the run, so an element a kernel fails to
    /// write shows up (for tests).
    pub poison: bool,
}

/// Host inputs in any layout and precision (the convenient API's general form).
#[derive(Debug, Clone, Copy)]
pub struct HostBatch<'a> {
    /// The shape.
    pub shape: &'a Shape,
    /// Layout of logits, soft labels and the gradient.
    pub layout: Layout,
    /// Logits.
    pub logits: HostLogits<'a>,
    /// Labels.
    pub labels: Labels<'a>,
    /// Label storage on the device (index labels; `None`: the most compact that fits).
    pub label_format: Option<LabelFormat>,
    /// Precision of the gradient on the device (returned widened to f32).
    pub grad_format: GradFormat,
}

impl<'a> HostBatch<'a> {
    /// f32 NCHW logits with their labels, the most compact label storage and an f32
    /// gradient; change fields with struct update syntax for other layouts and formats.
    pub fn new(shape: &'a Shape, logits: &'a [f32], labels: Labels<'a>) -> Self {
        HostBatch {
            shape,
            layout: Layout::Nchw,
            logits: HostLogits::F32(logits),
            labels,
            label_format: None,
            grad_format: GradFormat::F32,
        }
    }
}

/// Host logits.
#[derive(Debug, Clone, Copy)]
pub enum HostLogits<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// IEEE half values.
    F16(&'a [half::f16]),
    /// bfloat16 values.
    Bf16(&'a [half::bf16]),
}

impl HostLogits<'_> {
    /// The format on the device.
    pub fn format(&self) -> LogitFormat {
        match self {
            HostLogits::F32(_) => LogitFormat::F32,
            HostLogits::F16(_) => LogitFormat::F16,
            HostLogits::Bf16(_) => LogitFormat::Bf16,
        }
    }

    /// Values widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            HostLogits::F32(v) => v.to_vec(),
            HostLogits::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostLogits::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    fn len(&self) -> usize {
        match self {
            HostLogits::F32(v) => v.len(),
            HostLogits::F16(v) => v.len(),
            HostLogits::Bf16(v) => v.len(),
        }
    }

    /// The bytes as the device reads them (16-bit values two per word, padded to a word).
    /// f32 logits are uploaded as they are: no copy on the hot path.
    pub(crate) fn bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        let mut b: Vec<u8> = match self {
            HostLogits::F32(v) => return std::borrow::Cow::Borrowed(bytemuck::cast_slice(v)),
            HostLogits::F16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            HostLogits::Bf16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        };
        b.resize(b.len().div_ceil(4) * 4, 0);
        std::borrow::Cow::Owned(b)
    }
}

/// A range of a device buffer: the buffer and a byte offset (a multiple of 4).
#[derive(Debug, Clone, Copy)]
pub struct BufferRegion<'a> {
    /// The buffer (STORAGE usage).
    pub buffer: &'a wgpu::Buffer,
    /// Byte offset of the array's first element.
    pub offset: u64,
}

/// Device-resident inputs of the backend API.
#[derive(Debug, Clone, Copy)]
pub struct DeviceBatch<'a> {
    /// The shape of this call's images.
    pub shape: &'a Shape,
    /// Layout of logits, soft labels and the gradient.
    pub layout: Layout,
    /// Logits.
    pub logits: BufferRegion<'a>,
    /// Precision of the logits.
    pub logit_format: LogitFormat,
    /// Labels.
    pub labels: BufferRegion<'a>,
    /// How the labels are stored.
    pub label_format: LabelFormat,
    /// Data parallelism: these images are images `image_offset..image_offset + B` of a
    /// global batch of `total_batch` (0: this call is the whole batch). Statistics of
    /// shards then add up to the statistics of the whole batch.
    pub image_offset: usize,
    /// Images of the global batch (0: `shape.batch`).
    pub total_batch: usize,
}

impl<'a> DeviceBatch<'a> {
    /// The common case: f32 NCHW logits and labels each at offset 0 of their buffers, this
    /// call being the whole batch. Adjust fields with struct update syntax for the rest.
    pub fn new(
        shape: &'a Shape,
        logits: &'a wgpu::Buffer,
        labels: &'a wgpu::Buffer,
        label_format: LabelFormat,
    ) -> Self {
        DeviceBatch {
            shape,
            layout: Layout::Nchw,
            logits: BufferRegion {
                buffer: logits,
                offset: 0,
            },
            logit_format: LogitFormat::F32,
            labels: BufferRegion {
                buffer: labels,
                offset: 0,
            },
            label_format,
            image_offset: 0,
            total_batch: 0,
        }
    }
}

/// Where the backend API writes the gradient.
#[derive(Debug, Clone, Copy)]
pub struct GradTarget<'a> {
    /// The caller's buffer range (STORAGE usage), the logits' shape and layout.
    pub region: BufferRegion<'a>,
    /// f32, or a 16-bit format (offset then a multiple of 4 bytes).
    pub format: GradFormat,
}

impl<'a> GradTarget<'a> {
    /// The common case: an f32 gradient written from the start of `buffer`.
    pub fn f32(buffer: &'a wgpu::Buffer) -> Self {
        GradTarget {
            region: BufferRegion { buffer, offset: 0 },
            format: GradFormat::F32,
        }
    }
}

/// The device-resident results of a recorded call; they stay valid while this handle lives.
pub struct Recorded {
    ws: Arc<Workspace>,
    /// This recording's sequence number (see `Recorded::check_status`).
    seq: u32,
    spec: LossSpec,
    total_batch: usize,
    classes: usize,
    spatial: usize,
}

impl std::fmt::Debug for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorded")
            .field("total_batch", &self.total_batch)
            .field("classes", &self.classes)
            .finish()
    }
}

/// How the stats stage combines the sums of a tile's invocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TileSum {
    /// Subgroup operations, a partial row per subgroup (`reduce_subgroup.wgsl`).
    Subgroup = 0,
    /// Workgroup memory and barriers, a row per tile (`reduce_workgroup.wgsl`).
    Workgroup = 1,
    /// None: a partial row per invocation, no barrier (`reduce_invocation.wgsl`).
    Invocation = 2,
}

impl TileSum {
    /// Subgroups where the device has them (and sizes the shader handles, 4 to 128);
    /// otherwise [`TileSum::without_subgroups`].
    pub fn preferred(device: &wgpu::Device, info: &wgpu::AdapterInfo) -> Self {
        if device.features().contains(wgpu::Features::SUBGROUP)
            && info.subgroup_min_size >= 4
            && info.subgroup_max_size <= 128
        {
            TileSum::Subgroup
        } else {
            Self::without_subgroups(info)
        }
    }

    /// Without subgroups: no barrier on CPU adapters (llvmpipe compiles barriers slowly
    /// and runs them slowly), workgroup memory on GPUs (fewer partial rows to write).
    pub fn without_subgroups(info: &wgpu::AdapterInfo) -> Self {
        if info.device_type == wgpu::DeviceType::Cpu {
            TileSum::Invocation
        } else {
            TileSum::Workgroup
        }
    }
}

/// A GPU device with segloss's pipelines, buffer pool and workspaces. `Send + Sync`: calls
/// from several threads are serialised on the context's lock and the device queue.
pub struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    inner: Mutex<Inner>,
    binding_limit: std::sync::atomic::AtomicU64,
    /// The stats stage's `TileSum`, as its `u8` code.
    tile_sum: std::sync::atomic::AtomicU8,
    /// The subgroup size the stats partial rows are planned for (0: the adapter's smallest).
    planned_subgroup: std::sync::atomic::AtomicU32,
    /// Stats and grad invocations take runs of consecutive pixels (see `CONTIGUOUS` in
    /// common.wgsl): on CPU adapters.
    contiguous: std::sync::atomic::AtomicBool,
    last_chunks: std::sync::atomic::AtomicUsize,
    /// The next recording's sequence number.
    next_seq: std::sync::atomic::AtomicU32,
    created_bytes: std::sync::atomic::AtomicU64,
    lost: Arc<Mutex<Option<String>>>,
    uncaptured: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish()
    }
}

fn storage_align(device: &wgpu::Device) -> u64 {
    device.limits().min_storage_buffer_offset_alignment.max(4) as u64
}

impl GpuContext {
    /// Opens the preferred adapter (see [`context::choose`]) and a device on it.
    pub fn new() -> Result<Self> {
        Self::on_adapter(&context::choose(context::enumerate())?)
    }

    /// Opens a device on a given adapter (data parallelism over several adapters). A lost
    /// device is reported by the next call; build a new context to carry on.
    pub fn on_adapter(adapter: &wgpu::Adapter) -> Result<Self> {
        if adapter.get_info().device_type == wgpu::DeviceType::Cpu {
            context::keep_freed_memory_mapped();
        }
        let (device, queue) = context::open(adapter)?;
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
    /// Open the device with [`context::device_descriptor`] (or add
    /// [`context::wanted_features`] the adapter has, and the adapter's limits, to your own
    /// descriptor): segloss needs no feature, but without `SUBGROUP` its statistics pass
    /// sums in workgroup memory, and with lower limits large batches are split into more
    /// chunks. Every buffer passed to this context must come from this device; wgpu cannot
    /// tell a buffer of another `wgpu::Instance` from one of its own (it looks buffers up by
    /// id), so keep one instance per process ([`context::instance`] is segloss's). On
    /// Mesa's lavapipe also call [`context::keep_freed_memory_mapped`].
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) -> Self {
        // Subgroup reductions need the feature and subgroup sizes reduce_subgroup.wgsl
        // handles (4 to 128).
        let cpu = info.device_type == wgpu::DeviceType::Cpu;
        let tile_sum = TileSum::preferred(&device, &info);
        GpuContext {
            device,
            queue,
            info,
            inner: Mutex::new(Inner {
                modules: HashMap::new(),
                pipelines: HashMap::new(),
                bind_groups: HashMap::new(),
                pool: Pool::default(),
                workspaces: vec![],
            }),
            binding_limit: std::sync::atomic::AtomicU64::new(0),
            tile_sum: std::sync::atomic::AtomicU8::new(tile_sum as u8),
            planned_subgroup: std::sync::atomic::AtomicU32::new(0),
            contiguous: std::sync::atomic::AtomicBool::new(cpu),
            last_chunks: std::sync::atomic::AtomicUsize::new(0),
            next_seq: std::sync::atomic::AtomicU32::new(1),
            created_bytes: std::sync::atomic::AtomicU64::new(0),
            lost: Arc::new(Mutex::new(None)),
            uncaptured: Arc::new(Mutex::new(None)),
        }
    }

    /// How many chunks the last recorded call was split into.
    #[doc(hidden)]
    pub fn last_chunks(&self) -> usize {
        self.last_chunks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the stats stage sums with subgroup operations (the default where the adapter
    /// has them) or without (the adapter's other strategy, see [`TileSum::preferred`]);
    /// tests run every strategy on one device. Turning subgroups on where the device lacks
    /// them is ignored.
    #[doc(hidden)]
    pub fn set_subgroups(&self, on: bool) {
        let r = if on {
            TileSum::Subgroup
        } else {
            TileSum::without_subgroups(&self.info)
        };
        self.set_tile_sum(r);
    }

    /// Chooses the stats stage's reduction strategy (tests, benchmarks); `Subgroup` where
    /// the device cannot use it is ignored.
    #[doc(hidden)]
    pub fn set_tile_sum(&self, r: TileSum) {
        if r == TileSum::Subgroup && TileSum::preferred(&self.device, &self.info) != r {
            return;
        }
        self.tile_sum
            .store(r as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// The stats stage's reduction strategy of the next call.
    pub fn tile_sum(&self) -> TileSum {
        match self.tile_sum.load(std::sync::atomic::Ordering::Relaxed) {
            0 => TileSum::Subgroup,
            1 => TileSum::Workgroup,
            _ => TileSum::Invocation,
        }
    }

    /// Plans the stats stage's partial rows for subgroups of `size` invocations instead of
    /// the adapter's smallest (0 restores that), so tests can make the subgroup strategy
    /// leave rows to `clear_spare_rows`. Sizes above the adapter's smallest would leave
    /// rows unplanned; they are ignored.
    #[doc(hidden)]
    pub fn set_planned_subgroup_size(&self, size: u32) {
        let size = if size > self.info.subgroup_min_size {
            0
        } else {
            size
        };
        self.planned_subgroup
            .store(size, std::sync::atomic::Ordering::Relaxed);
    }

    /// The subgroup size the stats stage's partial rows are planned for.
    fn planned_subgroup_size(&self) -> u32 {
        match self
            .planned_subgroup
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => self.info.subgroup_min_size,
            n => n,
        }
    }

    /// Whether stats and grad invocations take runs of consecutive pixels (the default on
    /// CPU adapters) or neighbouring invocations neighbouring pixels (GPUs); tests run both
    /// on one device.
    #[doc(hidden)]
    pub fn set_contiguous_pixels(&self, on: bool) {
        self.contiguous
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether stats and grad invocations take runs of consecutive pixels.
    pub fn contiguous_pixels(&self) -> bool {
        self.contiguous.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the stats stage uses subgroup operations.
    pub fn uses_subgroups(&self) -> bool {
        self.tile_sum() == TileSum::Subgroup
    }

    /// Lowers the binding size the chunking plans for (0: the adapter's own limit), so tests
    /// exercise chunking on small inputs.
    #[doc(hidden)]
    pub fn set_binding_limit(&self, bytes: u64) {
        self.binding_limit
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
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

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| Error::Gpu("a previous call panicked while holding the context".into()))
    }

    /// Runs `f` inside validation and out-of-memory error scopes, so a wgpu error becomes an
    /// `Err` instead of a panic.
    fn scoped<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
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

    /// Loss (and gradient) of `spec` on f32 NCHW logits.
    pub fn evaluate(
        &self,
        spec: &LossSpec,
        shape: &Shape,
        logits: &[f32],
        labels: Labels<'_>,
        opts: Options,
    ) -> Result<LossOutput> {
        self.evaluate_host(spec, &HostBatch::new(shape, logits, labels), opts)
    }

    /// Loss (and gradient) of `spec` on host data in any layout and precision.
    pub fn evaluate_host(
        &self,
        spec: &LossSpec,
        batch: &HostBatch<'_>,
        opts: Options,
    ) -> Result<LossOutput> {
        self.check_device()?;
        let shape = batch.shape;
        if batch.logits.len() != shape.len() {
            shape.check()?;
            return Err(Error::Input(format!(
                "logits hold {} values, expected B·C·S = {}",
                batch.logits.len(),
                shape.len()
            )));
        }
        // Checked as f32; only 16-bit logits need a widened copy.
        let widened;
        let checked: &[f32] = match batch.logits {
            HostLogits::F32(v) => v,
            other => {
                widened = other.to_f32();
                &widened
            }
        };
        spec.check_inputs(shape, checked, &batch.labels)?;
        let label_format = match (batch.labels, batch.label_format) {
            (Labels::Soft(_), _) => LabelFormat::Soft,
            (Labels::Index(_), None) => LabelFormat::compact(shape.classes),
            (Labels::Index(_), Some(LabelFormat::Soft)) => {
                return Err(Error::Input(
                    "index labels cannot be stored as soft labels".into(),
                ))
            }
            (Labels::Index(_), Some(f)) => f,
        };
        label_format.check_classes(shape.classes)?;
        let logit_bytes = batch.logits.bytes();
        let label_words = label_format.encode(&batch.labels, spec.ignore_index, shape.classes)?;
        let grad_bytes = (shape.len() as u64 * 4 / batch.grad_format.per_word()).div_ceil(4) * 4;
        use wgpu::BufferUsages as U;
        let (logit_key, label_key, grad_key) = (
            BufferKey::new(logit_bytes.len() as u64, (U::STORAGE | U::COPY_DST).bits()),
            BufferKey::new(
                4 * label_words.len() as u64,
                (U::STORAGE | U::COPY_DST).bits(),
            ),
            BufferKey::new(grad_bytes, (U::STORAGE | U::COPY_SRC | U::COPY_DST).bits()),
        );
        let (logit_buf, label_buf, grad_buf) = {
            let mut inner = self.lock()?;
            let mut get = |k: &BufferKey| inner.pool.acquire(k, |k| self.create_buffer(k));
            (get(&logit_key), get(&label_key), get(&grad_key))
        };
        let result = self.scoped(|| {
            self.queue.write_buffer(&logit_buf, 0, &logit_bytes);
            self.queue
                .write_buffer(&label_buf, 0, bytemuck::cast_slice(&label_words));
            if opts.poison {
                self.queue
                    .write_buffer(&grad_buf, 0, &vec![0xFFu8; grad_bytes as usize]);
            }
            let device_batch = DeviceBatch {
                shape,
                layout: batch.layout,
                logits: BufferRegion {
                    buffer: &logit_buf,
                    offset: 0,
                },
                logit_format: batch.logits.format(),
                labels: BufferRegion {
                    buffer: &label_buf,
                    offset: 0,
                },
                label_format,
                image_offset: 0,
                total_batch: 0,
            };
            let grad = opts.gradient.then_some(GradTarget {
                region: BufferRegion {
                    buffer: &grad_buf,
                    offset: 0,
                },
                format: batch.grad_format,
            });
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("segloss"),
                });
            let rec = self.record_request(
                &mut enc,
                Request {
                    poison: opts.poison,
                    ..Request::full(spec, &device_batch, grad)
                },
                None,
            )?;
            self.queue.submit([enc.finish()]);
            let mut out = rec.read(self)?;
            if opts.gradient {
                let words = read_buffer(&self.device, &self.queue, &grad_buf, 0, grad_bytes)?;
                out.gradient = Some(match batch.grad_format {
                    LogitFormat::F32 => {
                        bytemuck::cast_slice::<u32, f32>(&words)[..shape.len()].to_vec()
                    }
                    LogitFormat::F16 => bytemuck::cast_slice::<u32, u16>(&words)[..shape.len()]
                        .iter()
                        .map(|b| half::f16::from_bits(*b).to_f32())
                        .collect(),
                    LogitFormat::Bf16 => bytemuck::cast_slice::<u32, u16>(&words)[..shape.len()]
                        .iter()
                        .map(|b| half::bf16::from_bits(*b).to_f32())
                        .collect(),
                });
            }
            if !opts.statistics {
                out.statistics = None;
            }
            Ok(out)
        });
        let mut inner = self.lock()?;
        inner.pool.release(logit_key, logit_buf);
        inner.pool.release(label_key, label_buf);
        inner.pool.release(grad_key, grad_buf);
        result
    }

    /// Backend API: records loss (and, with `grad`, gradient) passes into the caller's
    /// encoder on the caller's buffers. Nothing is submitted or awaited; the results stay on
    /// the device in the returned handle until read.
    ///
    /// Every check happens before anything is recorded: a call that returns `Err` has left
    /// the encoder untouched, and no error of this call is ever reported by a later one.
    /// Refused with an error: ranges of logits, labels and gradient that overlap (distinct
    /// ranges of one buffer are fine), a buffer of another device, a range outside its
    /// buffer, a label format that cannot hold C classes.
    pub fn record(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &LossSpec,
        batch: &DeviceBatch<'_>,
        grad: Option<GradTarget<'_>>,
    ) -> Result<Recorded> {
        self.record_request(encoder, Request::full(spec, batch, grad), None)
    }

    /// [`GpuContext::record`] with the pass's start and end written to timestamps 0 and 1 of
    /// `query_set` (benchmarks; needs `Features::TIMESTAMP_QUERY`).
    #[doc(hidden)]
    pub fn record_timed(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &LossSpec,
        batch: &DeviceBatch<'_>,
        grad: Option<GradTarget<'_>>,
        query_set: &wgpu::QuerySet,
    ) -> Result<Recorded> {
        self.record_request(encoder, Request::full(spec, batch, grad), Some(query_set))
    }

    /// Two-phase API, phase 1: records only the statistics pass. Submit, then read them with
    /// [`Recorded::statistics`], combine them across devices (a sum), and pass the sum to
    /// [`GpuContext::record_with_statistics`].
    pub fn record_statistics(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &LossSpec,
        batch: &DeviceBatch<'_>,
    ) -> Result<Recorded> {
        let req = Request {
            finalize: false,
            ..Request::full(spec, batch, None)
        };
        self.record_request(encoder, req, None)
    }

    /// Two-phase API, phase 2: records finalize (from `stats`, the combined statistics of the
    /// global batch) and the gradient pass for this call's images.
    pub fn record_with_statistics(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &LossSpec,
        batch: &DeviceBatch<'_>,
        stats: &Statistics,
        grad: Option<GradTarget<'_>>,
    ) -> Result<Recorded> {
        let req = Request {
            given_stats: Some(stats),
            ..Request::full(spec, batch, grad)
        };
        self.record_request(encoder, req, None)
    }

    /// Prepares every pipeline, bind group and upload inside error scopes, and only when
    /// all of it is valid records the passes into `encoder`: a wgpu validation error at
    /// this point (a foreign buffer, a bad binding) is this call's `Err`, and the caller's
    /// encoder never holds an invalid command that would fail their `finish()` or submit.
    fn record_request(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        req: Request<'_>,
        timestamps: Option<&wgpu::QuerySet>,
    ) -> Result<Recorded> {
        let prepared = self.scoped(|| self.prepare(&req))?;
        let Prepared {
            dispatches,
            clear_partial,
            recorded,
        } = prepared;
        if clear_partial {
            encoder.clear_buffer(&recorded.ws.partial, 0, None);
        }
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("segloss"),
                timestamp_writes: timestamps.map(|q| wgpu::ComputePassTimestampWrites {
                    query_set: q,
                    beginning_of_pass_write_index: Some(0),
                    end_of_pass_write_index: Some(1),
                }),
            });
            for (p, bg, groups) in &dispatches {
                let (x, y) = plan::dispatch_2d(*groups);
                pass.set_pipeline(p);
                pass.set_bind_group(0, bg, &[]);
                pass.dispatch_workgroups(x, y, 1);
            }
        }
        // The last command of the recording: the call's sequence number reaches the status
        // buffer only when this encoder runs, so a read of an unsubmitted recording sees an
        // older number and is refused (see `Recorded::check_status`).
        let ws = &recorded.ws;
        encoder.copy_buffer_to_buffer(&ws.seq, 0, &ws.check, SEQ_AT, 4);
        Ok(recorded)
    }

    fn create_buffer(&self, k: &BufferKey) -> wgpu::Buffer {
        self.created_bytes
            .fetch_add(k.size, std::sync::atomic::Ordering::Relaxed);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("segloss pooled"),
            size: k.size,
            usage: wgpu::BufferUsages::from_bits_truncate(k.usage),
            mapped_at_creation: false,
        })
    }

    fn pipeline(&self, inner: &mut Inner, key: PipelineKey) -> wgpu::ComputePipeline {
        if let Some(p) = inner.pipelines.get(&key) {
            return p.clone();
        }
        let (name, entry) = match key.stage {
            Stage::Stats => match key.tile_sum {
                TileSum::Subgroup => ("stats_subgroup", "main"),
                TileSum::Workgroup => ("stats", "main"),
                TileSum::Invocation => ("stats_invocation", "main"),
            },
            Stage::ReduceRows => ("finalize", "reduce_rows"),
            Stage::Reduce => ("finalize", "reduce_tiles"),
            Stage::Finalize => ("finalize", "finalize_terms"),
            Stage::Grad if key.shared_inputs => ("grad_shared", "main"),
            Stage::Grad => ("grad", "main"),
            Stage::Narrow => ("narrow", "main"),
        };
        let module = inner
            .modules
            .entry(name)
            .or_insert_with(|| {
                let src = shader_sources()
                    .into_iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, s)| s)
                    .unwrap_or_default();
                self.device
                    .create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(name),
                        source: wgpu::ShaderSource::Wgsl(src.into()),
                    })
            })
            .clone();
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let mut constants = vec![
            ("C", key.classes as f64),
            ("LABEL_KIND", key.label_kind as f64),
            ("SIGMOID", flag(key.sigmoid)),
            ("TEMPERED", flag(key.tempered)),
            ("NHWC", flag(key.nhwc)),
            ("LOGIT_KIND", key.logit_kind as f64),
            ("N_PIX", key.pixel_terms as f64),
        ];
        if key.stage == Stage::Narrow {
            constants.push(("GRAD_KIND", key.grad_kind as f64));
        }
        if key.stage == Stage::Finalize {
            constants.push(("STAT_KINDS", key.stat_kinds as f64));
        }
        if matches!(key.stage, Stage::Stats | Stage::Grad) {
            constants.push(("PIXEL_KINDS", key.pixel_kinds as f64));
            constants.push(("PIXEL_WEIGHTED", key.pixel_weighted as f64));
        }
        if matches!(key.stage, Stage::Stats | Stage::Grad) {
            constants.push(("CONTIGUOUS", flag(key.contiguous)));
        }
        if key.stage == Stage::Grad {
            let ppt = plan::grad_pixels_per_invocation(key.contiguous);
            constants.push(("PPT", ppt as f64));
        }
        if key.stage == Stage::Stats {
            constants.push(("PIXEL_MAPS", key.pixel_maps as f64));
        }
        let p = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        inner.pipelines.insert(key, p.clone());
        p
    }

    /// A workspace for `key` that no live [`Recorded`] holds.
    fn workspace(&self, inner: &mut Inner, key: &WorkspaceKey) -> Arc<Workspace> {
        if let Some(pos) = inner
            .workspaces
            .iter()
            .position(|(k, w)| k == key && Arc::strong_count(w) == 1)
        {
            let w = inner.workspaces.remove(pos);
            let ws = w.1.clone();
            inner.workspaces.push(w); // most recently used last
            return ws;
        }
        while inner.workspaces.len() >= WORKSPACES {
            let Some(pos) = inner
                .workspaces
                .iter()
                .position(|(_, w)| Arc::strong_count(w) == 1)
            else {
                break;
            };
            let (_, old) = inner.workspaces.remove(pos);
            if let Ok(old) = Arc::try_unwrap(old) {
                inner.bind_groups.clear(); // they reference the released buffers
                for (k, b) in old.keys {
                    inner.pool.release(k, b);
                }
            }
        }
        let fin_layout = FinLayout::new(key.total_batch, key.classes, key.terms);
        let width = plan::row_width(key.classes) as u64;
        let tiles = key.spatial.div_ceil(STATS_TILE) as u64;
        let sizes = Sizes {
            params: 4 * key.params_len as u64,
            partial: 4 * key.total_batch as u64 * tiles * key.rows_per_tile as u64 * width,
            stats: 4 * key.total_batch as u64 * width,
            fin: 4 * fin_layout.len as u64,
            map: key.map.max(4),
        };
        use wgpu::BufferUsages as U;
        let mut keys = vec![];
        let mut make = |size: u64, usage: U| {
            let k = BufferKey::new(size, usage.bits());
            let b = inner.pool.acquire(&k, |k| self.create_buffer(k));
            keys.push((k, b.clone()));
            b
        };
        let out = U::STORAGE | U::COPY_SRC | U::COPY_DST;
        // Storage too: finalize reads it as a storage buffer (see finalize.wgsl).
        let dims = make(
            DIMS_SLOT * key.dims_slots as u64,
            U::UNIFORM | U::STORAGE | U::COPY_DST,
        );
        let params = make(sizes.params, U::STORAGE | U::COPY_DST);
        let partial = make(sizes.partial, U::STORAGE | U::COPY_DST);
        let stats = make(sizes.stats, out);
        let fin = make(sizes.fin, out);
        let map = make(sizes.map, out);
        let check = make(SEQ_AT + 16, out);
        let seq = make(16, U::COPY_SRC | U::COPY_DST);
        let scratch = (key.scratch > 0).then(|| make(key.scratch, U::STORAGE));
        let staging = make(
            sizes.fin + sizes.stats + sizes.map + SEQ_AT + 16,
            U::MAP_READ | U::COPY_DST,
        );
        let ws = Arc::new(Workspace {
            dims,
            params,
            partial,
            stats,
            fin,
            map,
            check,
            seq,
            scratch,
            staging,
            keys,
            sizes,
            fin_layout,
        });
        inner.workspaces.push((key.clone(), ws.clone()));
        ws
    }

    fn bind_group(
        &self,
        inner: &mut Inner,
        pk: PipelineKey,
        entries: Vec<(u32, &wgpu::Buffer, u64, u64)>,
    ) -> wgpu::BindGroup {
        let key: BindKey = (
            pk,
            entries
                .iter()
                .map(|(b, buf, o, s)| (*b, (*buf).clone(), *o, *s))
                .collect(),
        );
        if let Some(bg) = inner.bind_groups.get(&key) {
            return bg.clone();
        }
        if inner.bind_groups.len() >= BIND_GROUPS {
            inner.bind_groups.clear();
        }
        let pipeline = self.pipeline(inner, pk);
        let wgpu_entries: Vec<wgpu::BindGroupEntry> = entries
            .iter()
            .map(|(binding, buffer, offset, size)| wgpu::BindGroupEntry {
                binding: *binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset: *offset,
                    size: std::num::NonZeroU64::new(*size),
                }),
            })
            .collect();
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("segloss"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &wgpu_entries,
        });
        inner.bind_groups.insert(key, bg.clone());
        bg
    }

    /// Checks a request and builds its dispatches (pipelines, bind groups, uploads) without
    /// touching the caller's encoder.
    fn prepare(&self, req: &Request<'_>) -> Result<Prepared> {
        let Request {
            spec,
            batch,
            grad,
            given_stats,
            finalize,
            poison,
        } = *req;
        let shape = batch.shape;
        shape.check()?;
        spec.validate(Some(shape.classes))?;
        let (b_n, c_n, s) = (shape.batch, shape.classes, shape.pixels());
        let total = if batch.total_batch == 0 {
            b_n
        } else {
            batch.total_batch
        };
        if batch.image_offset + b_n > total {
            return Err(Error::Input(format!(
                "images {}..{} do not fit a global batch of {total}",
                batch.image_offset,
                batch.image_offset + b_n
            )));
        }
        let sigmoid = plan::sigmoid(spec);
        if sigmoid && batch.label_format != LabelFormat::Soft {
            return Err(Error::Input(
                "sigmoid mode needs soft (f32) labels of the logits' shape".into(),
            ));
        }
        for (what, offset) in [
            ("logits", batch.logits.offset),
            ("labels", batch.labels.offset),
        ] {
            if offset % 4 != 0 {
                return Err(Error::Input(format!(
                    "the {what} offset {offset} is not a multiple of 4 bytes"
                )));
            }
        }
        if let Some(g) = &grad {
            if g.region.offset % 4 != 0 {
                return Err(Error::Input(format!(
                    "the gradient offset {} is not a multiple of 4 bytes",
                    g.region.offset
                )));
            }
        }
        // Bytes each bound array needs: a call's inputs must lie inside the caller's buffers.
        let n = shape.len() as u64;
        let lf = batch.logit_format;
        let label_elems = if batch.label_format == LabelFormat::Soft {
            n
        } else {
            (b_n * s) as u64
        };
        let global_first_elem = (batch.image_offset * c_n * s) as u64;
        let global_first_pixel = (batch.image_offset * s) as u64;
        let need = |what: &str, r: &BufferRegion, elems: u64, per_word: u64| -> Result<()> {
            let bytes = r.offset + elems.div_ceil(per_word) * 4;
            if bytes > r.buffer.size() {
                return Err(Error::Input(format!(
                    "the {what} buffer holds {} bytes, the call needs {bytes}",
                    r.buffer.size()
                )));
            }
            Ok(())
        };
        need("logits", &batch.logits, n, lf.per_word())?;
        need(
            "labels",
            &batch.labels,
            label_elems,
            batch.label_format.per_word(),
        )?;
        if let Some(g) = &grad {
            need("gradient", &g.region, n, g.format.per_word())?;
        }
        batch.label_format.check_classes(c_n)?;
        let label_bytes = label_elems.div_ceil(batch.label_format.per_word()) * 4;
        let mut ranges = vec![
            ("logits", batch.logits, n.div_ceil(lf.per_word()) * 4),
            ("labels", batch.labels, label_bytes),
        ];
        if let Some(g) = &grad {
            ranges.push(("gradient", g.region, n.div_ceil(g.format.per_word()) * 4));
        }
        check_disjoint(&ranges)?;
        // Non-overlapping ranges of one buffer (burn packs tensors into shared pages): wgpu
        // refuses a buffer bound read-only and read-write in one dispatch, so the gradient
        // pass then binds the inputs read-write too (see `Stage::Grad`'s `shared` variant).
        let grad_shares_input = grad.is_some_and(|g| {
            g.format == GradFormat::F32
                && (*g.region.buffer == *batch.logits.buffer
                    || *g.region.buffer == *batch.labels.buffer)
        });

        let align = storage_align(&self.device);
        let max_binding = match self
            .binding_limit
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => self.device.limits().max_storage_buffer_binding_size,
            n => n.min(self.device.limits().max_storage_buffer_binding_size),
        };
        // Per image: logits, labels, gradient (f32 scratch when 16-bit), each one binding.
        let image_elems = (c_n * s) as u64;
        let per_image = [
            image_elems * 4 / lf.per_word(),
            if batch.label_format == LabelFormat::Soft {
                image_elems * 4
            } else {
                s as u64 * 4 / batch.label_format.per_word() + 4
            },
            if grad.is_some() { image_elems * 4 } else { 0 },
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
            + 8;
        let chunks = plan::chunks(b_n, per_image, max_binding, align).map_err(Error::Input)?;
        self.last_chunks
            .store(chunks.len(), std::sync::atomic::Ordering::Relaxed);
        let narrow = grad.map(|g| g.format != GradFormat::F32).unwrap_or(false);
        let max_chunk = chunks.iter().map(|c| c.1).max().unwrap_or(1) as u64;
        let params = plan::pack_params(spec, shape);
        let map_bytes = if plan::wants_loss_map(spec) {
            4 * crate::spec::MAX_PIXEL_TERMS as u64 * (total * s) as u64
        } else {
            4
        };
        // Each strategy switch read once: pipelines and dispatch sizes of this call follow it.
        let tile_sum = self.tile_sum();
        let rows_per_tile = match tile_sum {
            TileSum::Subgroup => plan::STATS_WG / self.planned_subgroup_size().max(1) as usize,
            TileSum::Invocation => plan::STATS_WG,
            TileSum::Workgroup => 1,
        };
        let contiguous = self.contiguous_pixels();
        let key = WorkspaceKey {
            total_batch: total,
            classes: c_n,
            spatial: s,
            terms: spec.terms.len(),
            params_len: params.len(),
            dims_slots: chunks.len() + 1,
            scratch: if narrow {
                max_chunk * image_elems * 4
            } else {
                0
            },
            map: map_bytes,
            rows_per_tile,
        };
        let mut inner = self.lock()?;
        let ws = self.workspace(&mut inner, &key);
        let base = Dims {
            rows_per_tile: rows_per_tile as u32,
            ..plan::dims(spec, shape)
        };
        // Slot 0: the whole global batch, for reduce and finalize.
        let mut slots = vec![Dims {
            batch: total as u32,
            total_batch: total as u32,
            ..base
        }];
        let pixel_terms = spec.terms.iter().filter(|t| t.is_pixel_term()).count() as u32;
        let pk = |stage| PipelineKey {
            stage,
            pixel_terms,
            classes: c_n as u32,
            label_kind: batch.label_format.code(),
            logit_kind: lf.code(),
            grad_kind: grad.map(|g| g.format.code()).unwrap_or(0),
            sigmoid,
            tempered: spec.tempered(),
            nhwc: batch.layout == Layout::Nhwc,
            stat_kinds: if stage == Stage::Finalize {
                plan::stat_kinds(spec)
            } else {
                0
            },
            tile_sum: if stage == Stage::Stats {
                tile_sum
            } else {
                TileSum::Workgroup
            },
            pixel_kinds: if matches!(stage, Stage::Stats | Stage::Grad) {
                plan::pixel_kinds(spec)
            } else {
                0
            },
            pixel_weighted: if matches!(stage, Stage::Stats | Stage::Grad) {
                plan::pixel_weighted(spec)
            } else {
                0
            },
            pixel_maps: if stage == Stage::Stats {
                plan::pixel_maps(spec)
            } else {
                0
            },
            contiguous: matches!(stage, Stage::Stats | Stage::Grad) && contiguous,
            shared_inputs: stage == Stage::Grad && grad_shares_input,
        };
        let dims_size = std::mem::size_of::<Dims>() as u64;
        let q = &self.queue;
        q.write_buffer(&ws.params, 0, bytemuck::cast_slice(&params));
        if poison {
            for (b, size) in [
                (&ws.partial, ws.sizes.partial),
                (&ws.stats, ws.sizes.stats),
                (&ws.fin, ws.sizes.fin),
                (&ws.map, ws.sizes.map),
            ] {
                q.write_buffer(b, 0, &vec![0xFFu8; size as usize]);
            }
        }
        q.write_buffer(
            &ws.check,
            0,
            bytemuck::cast_slice(&[0u32, u32::MAX, 0, u32::MAX]),
        );
        if let Some(st) = given_stats {
            q.write_buffer(
                &ws.stats,
                0,
                bytemuck::cast_slice(&stats_to_rows(st, spec, total, c_n)?),
            );
        }
        // Per chunk: its bindings and its Dims slot.
        struct ChunkPlan {
            slot: u64,
            groups_stats: usize,
            groups_grad: usize,
            logits: Region,
            labels: Region,
            grad: Option<Region>,
            narrow_words: usize,
        }
        let mut plans = vec![];
        for (k, &(first, count)) in chunks.iter().enumerate() {
            let first_elem = global_first_elem + (first * c_n * s) as u64;
            let elems = (count * c_n * s) as u64;
            let lr = plan::region(
                batch.logits.offset,
                first_elem - global_first_elem,
                elems,
                lf.per_word(),
                align,
            );
            let (lab_first, lab_count) = if batch.label_format == LabelFormat::Soft {
                (first_elem - global_first_elem, elems)
            } else {
                ((first * s) as u64, (count * s) as u64)
            };
            let yr = plan::region(
                batch.labels.offset,
                lab_first,
                lab_count,
                batch.label_format.per_word(),
                align,
            );
            // Shifts are relative to the caller's arrays, whose element 0 is the shard's first.
            let label_origin = if batch.label_format == LabelFormat::Soft {
                global_first_elem
            } else {
                global_first_pixel
            };
            let gr = grad.map(|g| {
                plan::region(
                    g.region.offset,
                    first_elem - global_first_elem,
                    elems,
                    g.format.per_word(),
                    align,
                )
            });
            let scratch_shift = (first_elem as u32).wrapping_neg();
            let mut d = Dims {
                batch: count as u32,
                image_offset: (batch.image_offset + first) as u32,
                total_batch: total as u32,
                logit_shift: lr.shift.wrapping_sub(global_first_elem as u32),
                label_shift: yr.shift.wrapping_sub(label_origin as u32),
                grad_shift: if narrow {
                    scratch_shift
                } else {
                    gr.map(|r| r.shift.wrapping_sub(global_first_elem as u32))
                        .unwrap_or(0)
                },
                ..base
            };
            let mut narrow_words = 0;
            if let (true, Some(r)) = (narrow, gr) {
                d.narrow_count = elems as u32;
                d.narrow_shift = r
                    .shift
                    .wrapping_add((first_elem - global_first_elem) as u32);
                narrow_words = ((d.narrow_shift as u64 + elems - 1) / 2 - d.narrow_shift as u64 / 2
                    + 1) as usize;
            }
            slots.push(d);
            plans.push(ChunkPlan {
                slot: (k as u64 + 1) * DIMS_SLOT,
                groups_stats: count * s.div_ceil(STATS_TILE),
                groups_grad: count
                    * s.div_ceil(GRAD_WG * plan::grad_pixels_per_invocation(contiguous)),
                logits: lr,
                labels: yr,
                grad: gr,
                narrow_words,
            });
        }
        let mut dims_bytes = vec![0u8; (DIMS_SLOT as usize) * slots.len()];
        for (k, d) in slots.iter().enumerate() {
            dims_bytes[k * DIMS_SLOT as usize..k * DIMS_SLOT as usize + dims_size as usize]
                .copy_from_slice(bytemuck::bytes_of(d));
        }
        q.write_buffer(&ws.dims, 0, &dims_bytes);

        let mut dispatches: Vec<(wgpu::ComputePipeline, wgpu::BindGroup, usize)> = vec![];
        let mut add = |inner: &mut Inner,
                       stage: Stage,
                       entries: Vec<(u32, &wgpu::Buffer, u64, u64)>,
                       groups: usize| {
            let key = pk(stage);
            let p = self.pipeline(inner, key);
            let bg = self.bind_group(inner, key, entries);
            dispatches.push((p, bg, groups));
        };
        if given_stats.is_none() {
            for p in &plans {
                add(
                    &mut inner,
                    Stage::Stats,
                    vec![
                        (0, batch.logits.buffer, p.logits.offset, p.logits.size),
                        (1, batch.labels.buffer, p.labels.offset, p.labels.size),
                        (2, &ws.dims, p.slot, dims_size),
                        (3, &ws.params, 0, ws.sizes.params),
                        (4, &ws.partial, 0, ws.sizes.partial),
                        (8, &ws.map, 0, ws.sizes.map),
                        (10, &ws.check, 0, 16),
                    ],
                    p.groups_stats,
                );
            }
            if rows_per_tile > 1 {
                add(
                    &mut inner,
                    Stage::ReduceRows,
                    vec![
                        (2, &ws.dims, 0, dims_size),
                        (4, &ws.partial, 0, ws.sizes.partial),
                    ],
                    (total * base.tiles_per_image as usize * base.row_width as usize).div_ceil(64),
                );
            }
            add(
                &mut inner,
                Stage::Reduce,
                vec![
                    (2, &ws.dims, 0, dims_size),
                    (4, &ws.partial, 0, ws.sizes.partial),
                    (5, &ws.stats, 0, ws.sizes.stats),
                ],
                (total * base.row_width as usize).div_ceil(64),
            );
        }
        if finalize {
            add(
                &mut inner,
                Stage::Finalize,
                vec![
                    (2, &ws.dims, 0, dims_size),
                    (3, &ws.params, 0, ws.sizes.params),
                    (5, &ws.stats, 0, ws.sizes.stats),
                    (6, &ws.fin, 0, ws.sizes.fin),
                ],
                1,
            );
        }
        if let (true, Some(g)) = (finalize, grad) {
            for p in &plans {
                let r = p.grad.expect("planned with the gradient");
                let (gbuf, goff, gsize) = if narrow {
                    let sc = ws
                        .scratch
                        .as_ref()
                        .expect("scratch planned for 16-bit gradients");
                    (sc, 0, key.scratch)
                } else {
                    (g.region.buffer, r.offset, r.size)
                };
                add(
                    &mut inner,
                    Stage::Grad,
                    vec![
                        (0, batch.logits.buffer, p.logits.offset, p.logits.size),
                        (1, batch.labels.buffer, p.labels.offset, p.labels.size),
                        (2, &ws.dims, p.slot, dims_size),
                        (3, &ws.params, 0, ws.sizes.params),
                        (6, &ws.fin, 0, ws.sizes.fin),
                        (7, gbuf, goff, gsize),
                    ],
                    p.groups_grad,
                );
                if narrow {
                    let sc = ws
                        .scratch
                        .as_ref()
                        .expect("scratch planned for 16-bit gradients");
                    add(
                        &mut inner,
                        Stage::Narrow,
                        vec![
                            (2, &ws.dims, p.slot, dims_size),
                            (7, sc, 0, key.scratch),
                            (9, g.region.buffer, r.offset, r.size),
                        ],
                        p.narrow_words.div_ceil(256),
                    );
                }
            }
        }
        drop(inner);
        let seq = self
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        q.write_buffer(&ws.seq, 0, bytemuck::bytes_of(&seq));
        Ok(Prepared {
            dispatches,
            clear_partial: given_stats.is_none() && (batch.image_offset != 0 || b_n != total),
            recorded: Recorded {
                ws,
                seq,
                spec: spec.clone(),
                total_batch: total,
                classes: c_n,
                spatial: s,
            },
        })
    }
}

/// Refuses ranges of one buffer that overlap (each `(what, region, bytes)`).
fn check_disjoint(ranges: &[(&str, BufferRegion<'_>, u64)]) -> Result<()> {
    for (i, (a, ra, na)) in ranges.iter().enumerate() {
        for (b, rb, nb) in &ranges[i + 1..] {
            let overlap = *ra.buffer == *rb.buffer
                && ra.offset < rb.offset + nb
                && rb.offset < ra.offset + na;
            if overlap {
                return Err(Error::Input(format!(
                    "the {a} (bytes {}..{}) and the {b} (bytes {}..{}) overlap in one buffer: \
                     give each its own range (distinct ranges of one buffer are fine)",
                    ra.offset,
                    ra.offset + na,
                    rb.offset,
                    rb.offset + nb
                )));
            }
        }
    }
    Ok(())
}

/// Statistics as the device's rows (the inverse of the read-back in [`Recorded::read`]).
fn stats_to_rows(st: &Statistics, spec: &LossSpec, total: usize, c_n: usize) -> Result<Vec<f32>> {
    let n_pix = spec.terms.iter().filter(|t| t.is_pixel_term()).count();
    if st.batch != total
        || st.classes != c_n
        || st.per_class.len() != total * c_n
        || st.pixel_sums.len() != total * n_pix
    {
        return Err(Error::Input(format!(
            "statistics for B={} C={} do not fit this call (global batch {total}, C = {c_n}, {n_pix} pixel terms)",
            st.batch, st.classes
        )));
    }
    let width = plan::row_width(c_n);
    let mut rows = vec![0.0f32; total * width];
    for b in 0..total {
        for c in 0..c_n {
            for (j, v) in st.per_class[b * c_n + c].iter().enumerate() {
                rows[b * width + c * plan::PER_CLASS + j] = *v as f32;
            }
        }
        let o = b * width + plan::PER_CLASS * c_n;
        rows[o] = st.valid[b] as f32;
        rows[o + 1] = st.plain_ce[b] as f32;
        for t in 0..n_pix {
            rows[o + 4 + t] = st.pixel_sums[b * n_pix + t][0] as f32;
            rows[o + 8 + t] = st.pixel_sums[b * n_pix + t][1] as f32;
        }
    }
    Ok(rows)
}

impl Recorded {
    /// The buffer and byte offset of the total loss (one f32), for a caller that keeps it on
    /// the device.
    pub fn loss_location(&self) -> (&wgpu::Buffer, u64) {
        (&self.ws.fin, 4 * self.ws.fin_layout.report as u64)
    }

    /// The buffer of the statistics rows (per image: 8 floats per class, then 12 scalars).
    pub fn statistics_buffer(&self) -> &wgpu::Buffer {
        &self.ws.stats
    }

    /// Copies the results to the host, waiting for the device: loss, terms, proportions,
    /// decomposition, elements and statistics (not the gradient, which lives in the
    /// caller's buffer). Submit the recording encoder first.
    pub fn read(&self, ctx: &GpuContext) -> Result<LossOutput> {
        let words = self.copy_and_map(ctx)?;
        Ok(self.decode(&words))
    }

    /// Only the statistics (the two-phase API's phase 1 result).
    pub fn statistics(&self, ctx: &GpuContext) -> Result<Statistics> {
        let words = self.copy_and_map(ctx)?;
        let words: &[f32] = bytemuck::cast_slice(&words);
        Ok(self.decode_statistics(
            &words[(self.ws.sizes.fin / 4) as usize - self.ws.fin_layout.report..],
        ))
    }

    /// Asynchronous read-back of the total loss: the copy is submitted now; the future
    /// resolves once the device has finished (drive it with `device.poll`, or let another
    /// thread poll).
    pub fn read_loss_async(
        &self,
        ctx: &GpuContext,
    ) -> impl std::future::Future<Output = Result<f32>> + Send + 'static {
        let ws = self.ws.clone();
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("segloss loss"),
            });
        let off = 4 * ws.fin_layout.report as u64;
        enc.copy_buffer_to_buffer(&ws.fin, off, &ws.staging, 0, 4);
        // The status words after it, checked as `read` checks them.
        enc.copy_buffer_to_buffer(&ws.check, 0, &ws.staging, 8, SEQ_AT + 4);
        ctx.queue.submit([enc.finish()]);
        let seq = self.seq;
        let len = 8 + SEQ_AT + 8;
        let (tx, rx) = futures::channel::oneshot::channel();
        ws.staging
            .slice(0..len)
            .map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r.map_err(|e| Error::Gpu(format!("mapping the loss: {e}"))));
            });
        async move {
            rx.await
                .map_err(|_| Error::Gpu("the loss read-back was dropped by the device".into()))??;
            let words: Vec<u32> = {
                let view = ws
                    .staging
                    .slice(0..len)
                    .get_mapped_range()
                    .map_err(|e| Error::Gpu(format!("{e:?}")))?;
                bytemuck::pod_collect_to_vec(&view)
            };
            ws.staging.unmap();
            check_status(seq, &words[2..])?;
            Ok(f32::from_bits(words[0]))
        }
    }

    fn copy_and_map(&self, ctx: &GpuContext) -> Result<Vec<u32>> {
        let ws = &self.ws;
        let report_off = 4 * ws.fin_layout.report as u64;
        let report_len = ws.sizes.fin - report_off;
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("segloss read"),
            });
        enc.copy_buffer_to_buffer(&ws.fin, report_off, &ws.staging, 0, report_len);
        enc.copy_buffer_to_buffer(&ws.stats, 0, &ws.staging, report_len, ws.sizes.stats);
        let check_at = report_len + ws.sizes.stats + ws.sizes.map;
        enc.copy_buffer_to_buffer(
            &ws.map,
            0,
            &ws.staging,
            report_len + ws.sizes.stats,
            ws.sizes.map,
        );
        enc.copy_buffer_to_buffer(&ws.check, 0, &ws.staging, check_at, SEQ_AT + 4);
        ctx.queue.submit([enc.finish()]);
        let words = map_read(&ctx.device, &ws.staging, check_at + SEQ_AT + 4)?;
        check_status(self.seq, &words[(check_at / 4) as usize..])?;
        Ok(words)
    }

    fn decode_statistics(&self, stats_w: &[f32]) -> Statistics {
        let (b_n, c_n) = (self.total_batch, self.classes);
        let n_pix = self.spec.terms.iter().filter(|t| t.is_pixel_term()).count();
        let width = plan::row_width(c_n);
        Statistics {
            batch: b_n,
            classes: c_n,
            per_class: (0..b_n * c_n)
                .map(|k| {
                    let o = (k / c_n) * width + (k % c_n) * plan::PER_CLASS;
                    std::array::from_fn(|j| stats_w[o + j] as f64)
                })
                .collect(),
            valid: (0..b_n)
                .map(|b| stats_w[b * width + plan::PER_CLASS * c_n] as f64)
                .collect(),
            plain_ce: (0..b_n)
                .map(|b| stats_w[b * width + plan::PER_CLASS * c_n + 1] as f64)
                .collect(),
            pixel_sums: (0..b_n * n_pix)
                .map(|k| {
                    let o = (k / n_pix) * width + plan::PER_CLASS * c_n;
                    [
                        stats_w[o + 4 + k % n_pix] as f64,
                        stats_w[o + 8 + k % n_pix] as f64,
                    ]
                })
                .collect(),
        }
    }

    fn decode(&self, bytes: &[u32]) -> LossOutput {
        let words: &[f32] = bytemuck::cast_slice(bytes);
        let ws = &self.ws;
        let fl = ws.fin_layout;
        let (b_n, c_n, s) = (self.total_batch, self.classes, self.spatial);
        let report_len = (ws.sizes.fin / 4) as usize - fl.report;
        let (report, rest) = words.split_at(report_len);
        let (stats_w, map_w) = rest.split_at((ws.sizes.stats / 4) as usize);
        let at = |abs: usize| report[abs - fl.report] as f64;
        let spec = &self.spec;
        let terms: Vec<TermValue> = spec
            .terms
            .iter()
            .enumerate()
            .map(|(r, t)| TermValue {
                kind: t.kind().into(),
                weight: t.weight(),
                value: at(fl.values + r),
            })
            .collect();
        let mut pix_slot = 0;
        let mut elements = vec![];
        for (r, t) in spec.terms.iter().enumerate() {
            let e = match t {
                Term::CrossEntropy {
                    reduction: SpecReduction::None,
                    ..
                } => Some(
                    map_w[pix_slot * b_n * s..(pix_slot + 1) * b_n * s]
                        .iter()
                        .map(|v| *v as f64)
                        .collect(),
                ),
                Term::Dice {
                    reduction: SpecReduction::None,
                    batch,
                    ..
                } => {
                    let groups = if *batch { 1 } else { b_n };
                    Some(
                        (0..groups * c_n)
                            .map(|k| at(fl.elements + r * b_n * c_n + k))
                            .collect(),
                    )
                }
                _ => None,
            };
            if t.is_pixel_term() {
                pix_slot += 1;
            }
            elements.push(e);
        }
        let statistics = self.decode_statistics(stats_w);
        let (predicted, target, decomposition) = crate::reference::proportions(spec, &statistics);
        let rows = |v: &[f64]| v.chunks(c_n.max(1)).map(|r| r.to_vec()).collect();
        LossOutput {
            loss: at(fl.report),
            terms,
            predicted_proportions: rows(&predicted),
            target_proportions: rows(&target),
            valid_pixels: statistics.valid.iter().map(|v| *v as u64).collect(),
            decomposition,
            elements: if elements.iter().any(Option::is_some) {
                elements
            } else {
                vec![]
            },
            gradient: None,
            statistics: Some(statistics),
        }
    }
}

/// The status words of the call: the recording ran (its sequence number arrived, so
/// nothing read is stale), and the stats pass found no bad input.
fn check_status(seq: u32, check: &[u32]) -> Result<()> {
    let ran = check[(SEQ_AT / 4) as usize];
    if ran != seq {
        return Err(Error::Input(format!(
            "this recording has not run: submit the encoder it was recorded into (queue.submit) \
             before reading its results (recording {}, the device last ran recording {ran} \
             on this workspace)",
            seq
        )));
    }
    if check[0] > 0 {
        return Err(Error::Input(format!(
            "the logits hold {} non-finite values (NaN or infinite); the first at flat position {}",
            check[0], check[1]
        )));
    }
    if check[2] > 0 {
        return Err(Error::Input(format!(
            "the labels hold {} invalid values (a class index ≥ C that is not ignore_index, or a soft label outside [0, 1]); the first at flat position {}",
            check[2], check[3]
        )));
    }
    Ok(())
}

/// Maps `len` bytes of a MAP_READ buffer, waits for the device, copies them out.
fn map_read(device: &wgpu::Device, buffer: &wgpu::Buffer, len: u64) -> Result<Vec<u32>> {
    let slice = buffer.slice(0..len);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| Error::Gpu(format!("waiting for the device: {e}")))?;
    rx.recv()
        .map_err(|_| Error::Gpu("the read-back never completed".into()))?
        .map_err(|e| Error::Gpu(format!("mapping the read-back buffer: {e}")))?;
    let out = {
        let view = slice
            .get_mapped_range()
            .map_err(|e| Error::Gpu(format!("mapped range: {e:?}")))?;
        view.chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect()
    };
    buffer.unmap();
    Ok(out)
}

/// Copies `len` bytes of a COPY_SRC buffer from byte `offset` to the host through a
/// temporary staging buffer, waiting for the device.
fn read_buffer(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    buffer: &wgpu::Buffer,
    offset: u64,
    len: u64,
) -> Result<Vec<u32>> {
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("segloss gradient read"),
        size: len,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
        label: Some("segloss gradient read"),
    });
    enc.copy_buffer_to_buffer(buffer, offset, &staging, 0, len);
    queue.submit([enc.finish()]);
    map_read(device, &staging, len)
}
