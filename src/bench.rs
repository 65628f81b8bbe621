//! Timing loss + gradient on the device against a device copy of the same logits, in one
//! run: what `segloss bench` and the criterion benches report.

use crate::error::{Error, Result};
use crate::gpu::{BufferRegion, DeviceBatch, GpuContext, GradTarget};
use crate::input::{LabelFormat, Labels, Layout, LogitFormat, Shape};
use crate::spec::{Activation, LossSpec};
use crate::testing::{random_labels, random_logits, random_masks, Rng};
use serde::Serialize;
use std::time::Instant;
use wgpu::util::DeviceExt;

/// Device buffers holding one random problem, ready to time.
pub struct Problem {
    shape: Shape,
    spec: LossSpec,
    layout: Layout,
    label_format: LabelFormat,
    logits: wgpu::Buffer,
    labels: wgpu::Buffer,
    grad: wgpu::Buffer,
    copy_dst: wgpu::Buffer,
    queries: Option<(wgpu::QuerySet, wgpu::Buffer, wgpu::Buffer)>,
    empty: wgpu::ComputePipeline,
    shader_copy: BenchKernel,
    softmax_floor: Option<BenchKernel>,
}

/// A reference kernel bound to a problem's buffers: pipeline, bind group, workgroups.
type BenchKernel = (wgpu::ComputePipeline, wgpu::BindGroup, usize);

/// The simplest compute kernel that reads every logit and writes it elsewhere, 16 bytes an
/// invocation: the floor of any shader that touches the logits. On GPUs it matches the
/// transfer copy; on lavapipe, which loads and stores lane by lane, it costs far more.
const SHADER_COPY: &str = "
@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if i < arrayLength(&src) {
        dst[i] = src[i];
    }
}";

/// The least work of any softmax loss with its gradient, as plain as it can be written: an
/// invocation takes PPT = 8 pixels in workgroups of 256 (in the pixel order of segloss's own
/// kernels on this adapter; segloss's CPU layout, 32 invocations × 32 pixels, measured
/// slower for this kernel on lavapipe at 1×150×96×96, 5.4–6.1 ms against 4.4–5.1 ms in
/// this session's other runs),
/// keeps each pixel's C logits in invocation memory once read, takes one exponential a
/// logit and writes cross-entropy's gradient p − onehot(y) once an element; the loss is a
/// sum an invocation, no reduction across invocations, no input checks, no statistics.
/// What segloss's kernels cost above it is their own overhead; what it costs above the
/// shader copy is the arithmetic of a softmax on this adapter (BENCHMARKS.md, "The softmax
/// floor"). `{C}`, `{LABEL_BITS}`, `{CONTIGUOUS}` are filled in per problem.
pub const SOFTMAX_FLOOR: &str = "
const C: u32 = {C}u;
const LABEL_BITS: u32 = {LABEL_BITS}u;
const CONTIGUOUS: bool = {CONTIGUOUS};
const WG: u32 = 256u;
const PPT: u32 = 8u;
struct Dims { batch: u32, spatial: u32, scale: f32 }
@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> labels: array<u32>;
@group(0) @binding(2) var<storage, read_write> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> loss: array<f32>;
@group(0) @binding(4) var<uniform> dims: Dims;
fn label(p: u32) -> u32 {
    let per = 32u / LABEL_BITS;
    let mask = (1u << LABEL_BITS) - 1u;
    return (labels[p / per] >> ((p % per) * LABEL_BITS)) & mask;
}
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let group = wid.x + wid.y * nwg.x;
    let tiles = (dims.spatial + WG * PPT - 1u) / (WG * PPT);
    let b = group / tiles;
    if b >= dims.batch {
        return;
    }
    let base = (group % tiles) * WG * PPT;
    var total = 0.0;
    for (var k = 0u; k < PPT; k++) {
        var i = base + k * WG + lid;
        if CONTIGUOUS {
            i = base + lid * PPT + k;
        }
        if i >= dims.spatial {
            continue;
        }
        let y = label(b * dims.spatial + i);
        let o = b * C * dims.spatial + i;
        var z: array<f32, C>;
        var m = -3.4e38;
        for (var c = 0u; c < C; c++) {
            z[c] = logits[o + c * dims.spatial];
            m = max(m, z[c]);
        }
        var s = 0.0;
        for (var c = 0u; c < C; c++) {
            z[c] = exp(z[c] - m);
            s += z[c];
        }
        let r = dims.scale / s;
        for (var c = 0u; c < C; c++) {
            grad[o + c * dims.spatial] = z[c] * r - select(0.0, dims.scale, c == y);
        }
        total += log(s) - log(z[min(y, C - 1u)]);
    }
    loss[group * WG + lid] = total;
}";

/// One benchmark's figures (milliseconds; medians after warm-up).
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// The shape, as B,C,spatial….
    pub shape: String,
    /// Loss + gradient, submit to completion.
    pub median_ms: f64,
    /// A device copy of the logits (read + write of 4·B·C·S bytes), same adapter, same run.
    pub copy_median_ms: f64,
    /// median_ms / copy_median_ms (the floor for loss + gradient is about 1.5).
    pub ratio_to_copy: f64,
    /// One empty dispatch, submit to completion: the latency floor of any call.
    pub empty_dispatch_median_ms: f64,
    /// A compute kernel that reads the logits and writes them to another buffer (16 bytes
    /// an invocation): the floor of any shader pass over the logits on this adapter.
    pub shader_copy_median_ms: f64,
    /// Loss + gradient without the proportions ([`GpuContext::record_loss`]), for specs of
    /// pixel terms only (for the others it is the same recording as `median_ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_only_median_ms: Option<f64>,
    /// [`SOFTMAX_FLOOR`]: the least work of a softmax loss with its gradient, written as
    /// plainly as possible (softmax specs with NCHW f32 logits and u8 or u16 labels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub softmax_floor_median_ms: Option<f64>,
    /// Device time of the passes from timestamp queries, when the adapter has them.
    pub device_median_ms: Option<f64>,
    /// Bytes of logits.
    pub logit_bytes: u64,
    /// Repetitions timed.
    pub reps: usize,
    /// The adapter's name.
    pub adapter: String,
    /// The backend (Vulkan, Metal, Dx12).
    pub backend: String,
}

impl Problem {
    /// Random logits and labels for `shape` on `ctx`'s device.
    pub fn new(
        ctx: &GpuContext,
        spec: &LossSpec,
        shape: &Shape,
        layout: Layout,
        label_format: Option<LabelFormat>,
    ) -> Result<Self> {
        shape.check()?;
        spec.validate(Some(shape.classes))?;
        let device = ctx.device();
        let (z, label_format, words, y) = random_problem(spec, shape, label_format)?;
        let logits = init_buffer(device, "bench logits", bytemuck::cast_slice(&z));
        let labels = init_buffer(device, "bench labels", bytemuck::cast_slice(&words));
        let bytes = 4 * shape.len() as u64;
        let grad = storage_buffer(device, "bench grad", bytes);
        let copy_dst = storage_buffer(device, "bench copy", bytes);
        let queries = timestamp_queries(device);
        let empty = compute_pipeline(
            device,
            "bench empty",
            "@compute @workgroup_size(1) fn main() {}",
        );
        let shader_copy = shader_copy(device, &logits, &copy_dst);
        let softmax_floor = (spec.activation == Activation::Softmax
            && layout == Layout::Nchw
            && matches!(label_format, LabelFormat::U8 | LabelFormat::U16))
        .then(|| softmax_floor(ctx, shape, label_format, &logits, &labels, &copy_dst));
        let problem = Problem {
            softmax_floor,
            empty,
            shader_copy,
            shape: shape.clone(),
            spec: spec.clone(),
            layout,
            label_format,
            logits,
            labels,
            grad,
            copy_dst,
            queries,
        };
        problem.check_softmax_floor(ctx, &z, &y)?;
        Ok(problem)
    }

    fn batch(&self) -> DeviceBatch<'_> {
        DeviceBatch {
            shape: &self.shape,
            layout: self.layout,
            logits: BufferRegion {
                buffer: &self.logits,
                offset: 0,
            },
            logit_format: LogitFormat::F32,
            labels: BufferRegion {
                buffer: &self.labels,
                offset: 0,
            },
            label_format: self.label_format,
            image_offset: 0,
            total_batch: 0,
        }
    }

    /// Whether the spec is of pixel terms only, so that [`GpuContext::record_loss`] records
    /// less than [`GpuContext::record`].
    pub fn has_loss_only(&self) -> bool {
        self.spec.pixel_terms_only()
    }

    /// One loss + gradient call without the proportions ([`GpuContext::record_loss`]),
    /// submit to completion (ms).
    pub fn loss_only_once(&self, ctx: &GpuContext) -> Result<f64> {
        submit_timed(ctx, "bench loss only", |enc| {
            let grad = Some(GradTarget::f32(&self.grad));
            ctx.record_loss(enc, &self.spec, &self.batch(), grad)
        })
    }

    /// One loss + gradient call, submit to completion; returns (wall ms, device ms).
    pub fn run_once(&self, ctx: &GpuContext, timed: bool) -> Result<(f64, Option<f64>)> {
        let device = ctx.device();
        let start = Instant::now();
        let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("bench"),
        });
        let grad = Some(GradTarget::f32(&self.grad));
        let _rec = match (&self.queries, timed) {
            (Some((set, resolve, read)), true) => {
                let rec = ctx.record_timed(&mut enc, &self.spec, &self.batch(), grad, set)?;
                enc.resolve_query_set(set, 0..2, resolve, 0);
                enc.copy_buffer_to_buffer(resolve, 0, read, 0, 16);
                rec
            }
            _ => ctx.record(&mut enc, &self.spec, &self.batch(), grad)?,
        };
        ctx.queue().submit([enc.finish()]);
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(e.to_string()))?;
        let wall = start.elapsed().as_secs_f64() * 1e3;
        let dev = match (&self.queries, timed) {
            (Some((_, _, read)), true) => {
                read.slice(..).map_async(wgpu::MapMode::Read, |_| {});
                device
                    .poll(wgpu::PollType::wait_indefinitely())
                    .map_err(|e| Error::Gpu(e.to_string()))?;
                let t: Vec<u64> = {
                    let view = read
                        .slice(..)
                        .get_mapped_range()
                        .map_err(|e| Error::Gpu(format!("{e:?}")))?;
                    view.chunks_exact(8)
                        .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
                        .collect()
                };
                read.unmap();
                Some(
                    t[1].saturating_sub(t[0]) as f64 * ctx.queue().get_timestamp_period() as f64
                        / 1e6,
                )
            }
            _ => None,
        };
        Ok((wall, dev))
    }

    /// One device copy of the logits, submit to completion (ms).
    pub fn copy_once(&self, ctx: &GpuContext) -> Result<f64> {
        submit_timed(ctx, "bench copy", |enc| {
            enc.copy_buffer_to_buffer(&self.logits, 0, &self.copy_dst, 0, self.logits.size());
            Ok(())
        })
    }

    /// One empty compute dispatch, submit to completion (ms).
    pub fn empty_once(&self, ctx: &GpuContext) -> Result<f64> {
        submit_timed(ctx, "bench empty", |enc| {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.empty);
            pass.dispatch_workgroups(1, 1, 1);
            Ok(())
        })
    }

    /// One shader copy of the logits (see [`BenchResult::shader_copy_median_ms`]), ms.
    pub fn shader_copy_once(&self, ctx: &GpuContext) -> Result<f64> {
        submit_timed(ctx, "bench shader copy", |enc| {
            dispatch(enc, &self.shader_copy);
            Ok(())
        })
    }

    /// One [`SOFTMAX_FLOOR`] pass, submit to completion (ms), when the problem has one.
    pub fn softmax_floor_once(&self, ctx: &GpuContext) -> Result<Option<f64>> {
        let Some(floor) = &self.softmax_floor else {
            return Ok(None);
        };
        submit_timed(ctx, "bench softmax floor", |enc| {
            dispatch(enc, floor);
            Ok(())
        })
        .map(Some)
    }

    /// Runs [`SOFTMAX_FLOOR`] once and compares the gradient it wrote for the first image
    /// (up to 65,536 pixels) with f64 arithmetic, so the floor the benchmarks report is a
    /// kernel that does the work, not one the compiler could have emptied.
    fn check_softmax_floor(&self, ctx: &GpuContext, z: &[f32], y: &[u32]) -> Result<()> {
        if self.softmax_floor_once(ctx)?.is_none() {
            return Ok(());
        }
        let (c_n, s) = (self.shape.classes, self.shape.pixels());
        let got = ctx.read_f32(&self.copy_dst, 0, c_n * s)?;
        let n = (self.shape.batch * s) as f64;
        for i in 0..s.min(1 << 16) {
            let zi = |c: usize| z[c * s + i] as f64;
            let m = (0..c_n).map(zi).fold(f64::NEG_INFINITY, f64::max);
            let se: f64 = (0..c_n).map(|c| (zi(c) - m).exp()).sum();
            for c in 0..c_n {
                let want = (zi(c) - m).exp() / se - (y[i] as usize == c) as u8 as f64;
                let g = got[c * s + i] as f64 * n;
                if (g - want).abs() > 1e-5 {
                    return Err(Error::Gpu(format!(
                        "the softmax floor kernel wrote {g} × 1/(B·S) at class {c}, pixel {i}; \
                         the f64 gradient is {want}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Bytes of logits.
    pub fn logit_bytes(&self) -> u64 {
        self.logits.size()
    }
}

/// Random logits for `shape` and labels for `spec`: soft masks in sigmoid mode, else class
/// indices in `label_format` (the most compact one for the class count by default),
/// returned as the label format, the words the device reads and the class indices.
#[allow(clippy::type_complexity)]
fn random_problem(
    spec: &LossSpec,
    shape: &Shape,
    label_format: Option<LabelFormat>,
) -> Result<(Vec<f32>, LabelFormat, Vec<u32>, Vec<u32>)> {
    let mut rng = Rng::new(7);
    let z = random_logits(&mut rng, shape, 3.0);
    let (label_format, words, y) = if spec.activation == Activation::Sigmoid {
        let m = random_masks(&mut rng, shape);
        (
            LabelFormat::Soft,
            LabelFormat::Soft
                .encode(&Labels::Soft(&m), -100, shape.classes)?
                .into_owned(),
            vec![],
        )
    } else {
        let y = random_labels(&mut rng, shape, 0.0);
        let f = label_format.unwrap_or(LabelFormat::compact(shape.classes));
        f.check_classes(shape.classes)?;
        let words = f.encode(&Labels::index(&y), -100, shape.classes)?;
        (f, words.into_owned(), y)
    };
    Ok((z, label_format, words, y))
}

/// The usages of every buffer of a problem: bound as storage, copied from and to.
const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// A storage buffer holding `contents`.
fn init_buffer(device: &wgpu::Device, label: &str, contents: &[u8]) -> wgpu::Buffer {
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents,
        usage: STORAGE,
    })
}

/// An uninitialised storage buffer of `size` bytes.
fn storage_buffer(device: &wgpu::Device, label: &str, size: u64) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage: STORAGE,
        mapped_at_creation: false,
    })
}

/// Two timestamp queries, their resolve buffer and a buffer to read them back, when the
/// device has timestamp queries.
fn timestamp_queries(
    device: &wgpu::Device,
) -> Option<(wgpu::QuerySet, wgpu::Buffer, wgpu::Buffer)> {
    use wgpu::BufferUsages as U;
    device
        .features()
        .contains(wgpu::Features::TIMESTAMP_QUERY)
        .then(|| {
            let set = device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("bench"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let resolve = device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 16,
                usage: U::QUERY_RESOLVE | U::COPY_SRC,
                mapped_at_creation: false,
            });
            let read = device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 16,
                usage: U::MAP_READ | U::COPY_DST,
                mapped_at_creation: false,
            });
            (set, resolve, read)
        })
}

/// The compute pipeline of the WGSL `source`'s `main`, with its layout derived from it.
fn compute_pipeline(device: &wgpu::Device, label: &str, source: &str) -> wgpu::ComputePipeline {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    })
}

/// The [`SHADER_COPY`] pipeline bound to copy `logits` into `copy_dst`, and its workgroup
/// count.
fn shader_copy(
    device: &wgpu::Device,
    logits: &wgpu::Buffer,
    copy_dst: &wgpu::Buffer,
) -> BenchKernel {
    let pipeline = compute_pipeline(device, "bench shader copy", SHADER_COPY);
    // Whole 16-byte words only (a tail of up to 12 bytes is left out of the floor).
    let words = (logits.size() / 16).max(1);
    let whole_words = |binding, buffer| wgpu::BindGroupEntry {
        binding,
        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer,
            offset: 0,
            size: wgpu::BufferSize::new(words * 16),
        }),
    };
    let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("bench shader copy"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[whole_words(0, logits), whole_words(1, copy_dst)],
    });
    (pipeline, bind, (words as usize).div_ceil(256))
}

/// The [`SOFTMAX_FLOOR`] pipeline for `shape`, bound to the problem's logits and labels,
/// writing its gradient to `grad` (the copy's destination: the loss call's own gradient
/// buffer stays untouched), and its workgroup count.
fn softmax_floor(
    ctx: &GpuContext,
    shape: &Shape,
    labels_format: LabelFormat,
    logits: &wgpu::Buffer,
    labels: &wgpu::Buffer,
    grad: &wgpu::Buffer,
) -> BenchKernel {
    let device = ctx.device();
    let bits = if labels_format == LabelFormat::U8 {
        8
    } else {
        16
    };
    let source = SOFTMAX_FLOOR
        .replace("{C}", &shape.classes.to_string())
        .replace("{LABEL_BITS}", &bits.to_string())
        .replace("{CONTIGUOUS}", &ctx.contiguous_pixels().to_string());
    let pipeline = compute_pipeline(device, "bench softmax floor", &source);
    let spatial = shape.pixels();
    let tiles = spatial.div_ceil(256 * 8);
    let groups = shape.batch * tiles;
    let loss = storage_buffer(device, "bench softmax floor loss", 4 * 256 * groups as u64);
    let mut uniform = [0u8; 16];
    uniform[0..4].copy_from_slice(&(shape.batch as u32).to_le_bytes());
    uniform[4..8].copy_from_slice(&(spatial as u32).to_le_bytes());
    uniform[8..12].copy_from_slice(&(1.0f32 / (shape.batch * spatial) as f32).to_le_bytes());
    let dims = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("bench softmax floor dims"),
        contents: &uniform,
        usage: wgpu::BufferUsages::UNIFORM,
    });
    fn whole(binding: u32, buffer: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
        wgpu::BindGroupEntry {
            binding,
            resource: buffer.as_entire_binding(),
        }
    }
    let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("bench softmax floor"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            whole(0, logits),
            whole(1, labels),
            whole(2, grad),
            whole(3, &loss),
            whole(4, &dims),
        ],
    });
    (pipeline, bind, groups)
}

/// Records with `record` into a new encoder, submits it and waits for the device: the
/// milliseconds from before the encoder to completion. What `record` returns (a recording's
/// handle) is kept until then.
fn submit_timed<R>(
    ctx: &GpuContext,
    label: &str,
    record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<R>,
) -> Result<f64> {
    let device = ctx.device();
    let start = Instant::now();
    let mut enc =
        device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
    let _held = record(&mut enc)?;
    ctx.queue().submit([enc.finish()]);
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| Error::Gpu(e.to_string()))?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

/// One compute pass of a bench kernel: its pipeline, bind group and workgroup count.
fn dispatch(enc: &mut wgpu::CommandEncoder, (pipeline, bind, groups): &BenchKernel) {
    let mut pass = enc.begin_compute_pass(&Default::default());
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, bind, &[]);
    let (x, y) = crate::gpu::plan::dispatch_2d(*groups);
    pass.dispatch_workgroups(x, y, 1);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `reps` loss + gradient calls and `reps` copies, interleaved so both see the same
/// machine state, after `warmup` untimed rounds. `tick` is called once per repetition.
pub fn run(
    ctx: &GpuContext,
    problem: &Problem,
    reps: usize,
    warmup: usize,
    mut tick: impl FnMut(),
) -> Result<BenchResult> {
    for _ in 0..warmup {
        problem.run_once(ctx, true)?;
        problem.copy_once(ctx)?;
        if problem.has_loss_only() {
            problem.loss_only_once(ctx)?;
        }
    }
    let reps = reps.max(1);
    let (mut wall, mut dev, mut copy, mut empty) = (vec![], vec![], vec![], vec![]);
    let (mut shader_copy, mut floor, mut loss_only) = (vec![], vec![], vec![]);
    for _ in 0..reps {
        let (w, _) = problem.run_once(ctx, false)?;
        wall.push(w);
        if let (_, Some(d)) = problem.run_once(ctx, true)? {
            dev.push(d);
        }
        copy.push(problem.copy_once(ctx)?);
        empty.push(problem.empty_once(ctx)?);
        shader_copy.push(problem.shader_copy_once(ctx)?);
        floor.extend(problem.softmax_floor_once(ctx)?);
        if problem.has_loss_only() {
            loss_only.push(problem.loss_only_once(ctx)?);
        }
        tick();
    }
    let info = ctx.adapter_info();
    let (m, c) = (median(wall), median(copy));
    let dims: Vec<String> = std::iter::once(problem.shape.batch)
        .chain(std::iter::once(problem.shape.classes))
        .chain(problem.shape.spatial.iter().cloned())
        .map(|d| d.to_string())
        .collect();
    Ok(BenchResult {
        shape: dims.join(","),
        median_ms: m,
        copy_median_ms: c,
        ratio_to_copy: m / c,
        empty_dispatch_median_ms: median(empty),
        shader_copy_median_ms: median(shader_copy),
        softmax_floor_median_ms: (!floor.is_empty()).then(|| median(floor)),
        loss_only_median_ms: (!loss_only.is_empty()).then(|| median(loss_only)),
        device_median_ms: (!dev.is_empty()).then(|| median(dev)),
        logit_bytes: problem.logit_bytes(),
        reps,
        adapter: info.name.clone(),
        backend: format!("{:?}", info.backend),
    })
}
