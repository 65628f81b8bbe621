//! The GPU engine: uploads, the three stages recorded into one command encoder, read-back.

use super::context;
use super::plan::{self, dispatch_2d, Dims, FinLayout, GRAD_WG, STATS_TILE};
use super::pool::{BufferKey, Pool};
use crate::error::{Error, Result};
use crate::input::{Labels, Shape, IGNORE};
use crate::output::{Decomposition, LossOutput, Statistics, TermValue};
use crate::spec::LossSpec;
use std::collections::HashMap;
use std::sync::Mutex;

const COMMON: &str = include_str!("../../shaders/common.wgsl");
const STATS: &str = include_str!("../../shaders/stats.wgsl");
const FINALIZE: &str = include_str!("../../shaders/finalize.wgsl");
const GRAD: &str = include_str!("../../shaders/grad.wgsl");

/// The WGSL source of each stage as the device compiles it (common helpers first).
pub fn shader_sources() -> [(&'static str, String); 3] {
    [
        ("stats", format!("{COMMON}\n{STATS}")),
        ("finalize", format!("{COMMON}\n{FINALIZE}")),
        ("grad", format!("{COMMON}\n{GRAD}")),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Stage {
    Stats,
    Reduce,
    Finalize,
    Grad,
}

/// Pipelines are compiled once per (stage, override constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PipelineKey {
    stage: Stage,
    classes: u32,
    label_kind: u32,
    sigmoid: bool,
    tempered: bool,
}

/// Everything a call of one shape and spec structure needs on the device, bind groups
/// included; kept between calls so a steady training loop creates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct WorkspaceKey {
    batch: usize,
    classes: usize,
    spatial: usize,
    label_kind: u32,
    sigmoid: bool,
    tempered: bool,
    terms: usize,
    params_len: usize,
    loss_map: bool,
}

struct Workspace {
    buffers: Vec<(BufferKey, wgpu::Buffer)>,
    bind_groups: HashMap<Stage, wgpu::BindGroup>,
    fin_layout: FinLayout,
    sizes: Sizes,
}

#[derive(Debug, Clone, Copy)]
struct Sizes {
    logits: u64,
    labels: u64,
    params: u64,
    partial: u64,
    stats: u64,
    fin: u64,
    map: u64,
}

// Indices into Workspace::buffers.
const B_LOGITS: usize = 0;
const B_LABELS: usize = 1;
const B_DIMS: usize = 2;
const B_PARAMS: usize = 3;
const B_PARTIAL: usize = 4;
const B_STATS: usize = 5;
const B_FIN: usize = 6;
const B_GRAD: usize = 7;
const B_MAP: usize = 8;
const B_STAGING: usize = 9;

/// How many workspaces (distinct shapes/specs) stay cached.
const WORKSPACES: usize = 4;

struct Inner {
    modules: HashMap<&'static str, wgpu::ShaderModule>,
    pipelines: HashMap<PipelineKey, wgpu::ComputePipeline>,
    pool: Pool<BufferKey, wgpu::Buffer>,
    workspaces: Vec<(WorkspaceKey, Workspace)>,
}

/// What to compute beyond the loss.
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

/// A GPU device with segloss's pipelines, buffer pool and workspaces. `Send + Sync`: calls
/// from several threads are serialised on the device.
pub struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish()
    }
}

fn label_kind(labels: &Labels<'_>, classes: usize) -> u32 {
    match labels {
        // Packed u8 labels read 4× fewer bytes; 255 is the ignore marker.
        Labels::Index(_) if classes < 255 => 1,
        Labels::Index(_) => 0,
        Labels::Soft(_) => 2,
    }
}

/// The label words the device reads.
fn label_words(labels: &Labels<'_>, kind: u32) -> Vec<u32> {
    match (labels, kind) {
        (Labels::Index(y), 1) => y
            .chunks(4)
            .map(|c| {
                c.iter().enumerate().fold(0u32, |w, (k, &v)| {
                    w | ((if v == IGNORE { 255 } else { v }) << (8 * k))
                })
            })
            .collect(),
        (Labels::Index(y), _) => y.to_vec(),
        (Labels::Soft(g), _) => g.iter().map(|v| v.to_bits()).collect(),
    }
}

impl GpuContext {
    /// Opens the preferred adapter (see [`context::choose`]) and a device on it.
    pub fn new() -> Result<Self> {
        let adapter = context::choose(context::enumerate())?;
        let (device, queue) = context::open(&adapter)?;
        Ok(Self::from_device(device, queue, adapter.get_info()))
    }

    /// Wraps a device and queue the caller already owns.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) -> Self {
        GpuContext {
            device,
            queue,
            info,
            inner: Mutex::new(Inner {
                modules: HashMap::new(),
                pipelines: HashMap::new(),
                pool: Pool::default(),
                workspaces: vec![],
            }),
        }
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

    /// Buffers created by the pool so far (a steady workload stops adding to it).
    pub fn buffers_created(&self) -> u64 {
        self.inner.lock().map(|i| i.pool.created()).unwrap_or(0)
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
        spec.check_inputs(shape, logits, &labels)?;
        let max_binding = self.device.limits().max_storage_buffer_binding_size;
        let logits_bytes = 4 * shape.len() as u64;
        if logits_bytes > max_binding {
            return Err(Error::Input(format!(
                "{logits_bytes} bytes of logits exceed this adapter's max_storage_buffer_binding_size ({max_binding})"
            )));
        }
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| Error::Gpu("a previous call panicked while holding the device".into()))?;
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let result = self.run(&mut inner, spec, shape, logits, labels, opts);
        let oom_err = pollster::block_on(oom.pop());
        let val_err = pollster::block_on(validation.pop());
        if let Some(e) = oom_err.or(val_err) {
            return Err(Error::Gpu(e.to_string()));
        }
        result
    }

    fn pipeline(&self, inner: &mut Inner, key: PipelineKey) -> wgpu::ComputePipeline {
        if let Some(p) = inner.pipelines.get(&key) {
            return p.clone();
        }
        let (name, entry) = match key.stage {
            Stage::Stats => ("stats", "main"),
            Stage::Reduce => ("finalize", "reduce_tiles"),
            Stage::Finalize => ("finalize", "finalize_terms"),
            Stage::Grad => ("grad", "main"),
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
        let constants = [
            ("C", key.classes as f64),
            ("LABEL_KIND", key.label_kind as f64),
            ("SIGMOID", if key.sigmoid { 1.0 } else { 0.0 }),
            ("TEMPERED", if key.tempered { 1.0 } else { 0.0 }),
        ];
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

    fn workspace<'a>(&self, inner: &'a mut Inner, key: WorkspaceKey) -> &'a Workspace {
        if let Some(pos) = inner.workspaces.iter().position(|(k, _)| *k == key) {
            // Most recently used last.
            let w = inner.workspaces.remove(pos);
            inner.workspaces.push(w);
            return &inner.workspaces.last().expect("just pushed").1;
        }
        if inner.workspaces.len() >= WORKSPACES {
            let (_, old) = inner.workspaces.remove(0);
            for (k, b) in old.buffers {
                inner.pool.release(k, b);
            }
        }
        let shape = Shape::new(key.batch, key.classes, &[key.spatial]);
        let n = shape.len() as u64;
        let bs = (key.batch * key.spatial) as u64;
        let tiles = key.spatial.div_ceil(STATS_TILE) as u64;
        let width = plan::row_width(key.classes) as u64;
        let fin_layout = FinLayout::new(key.batch, key.classes, key.terms);
        let n_pix_max = crate::spec::MAX_PIXEL_TERMS as u64;
        let sizes = Sizes {
            logits: 4 * n,
            labels: 4 * match key.label_kind {
                1 => bs.div_ceil(4),
                0 => bs,
                _ => n,
            },
            params: 4 * key.params_len as u64,
            partial: 4 * key.batch as u64 * tiles * width,
            stats: 4 * key.batch as u64 * width,
            fin: 4 * fin_layout.len as u64,
            map: if key.loss_map { 4 * n_pix_max * bs } else { 4 },
        };
        use wgpu::BufferUsages as U;
        let storage_in = U::STORAGE | U::COPY_DST;
        let storage_out = U::STORAGE | U::COPY_SRC | U::COPY_DST;
        let specs: [(u64, U); 10] = [
            (sizes.logits, storage_in),
            (sizes.labels, storage_in),
            (std::mem::size_of::<Dims>() as u64, U::UNIFORM | U::COPY_DST),
            (sizes.params, storage_in),
            (sizes.partial, U::STORAGE),
            (sizes.stats, storage_out),
            (sizes.fin, storage_out),
            (sizes.logits, storage_out),
            (sizes.map, storage_out),
            (
                sizes.fin + sizes.logits + sizes.map + sizes.stats,
                U::MAP_READ | U::COPY_DST,
            ),
        ];
        let device = &self.device;
        let buffers: Vec<(BufferKey, wgpu::Buffer)> = specs
            .iter()
            .map(|&(size, usage)| {
                let k = BufferKey::new(size, usage.bits());
                let b = inner.pool.acquire(&k, |k| {
                    device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("segloss pooled"),
                        size: k.size,
                        usage: wgpu::BufferUsages::from_bits_truncate(k.usage),
                        mapped_at_creation: false,
                    })
                });
                (k, b)
            })
            .collect();
        let entry = |binding: u32, idx: usize, size: u64| wgpu::BindGroupEntry {
            binding,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &buffers[idx].1,
                offset: 0,
                size: std::num::NonZeroU64::new(size),
            }),
        };
        let dims_size = std::mem::size_of::<Dims>() as u64;
        let mut bind_groups = HashMap::new();
        for stage in [Stage::Stats, Stage::Reduce, Stage::Finalize, Stage::Grad] {
            let pk = PipelineKey {
                stage,
                classes: key.classes as u32,
                label_kind: key.label_kind,
                sigmoid: key.sigmoid,
                tempered: key.tempered,
            };
            let pipeline = self.pipeline(inner, pk);
            let entries: Vec<wgpu::BindGroupEntry> = match stage {
                Stage::Stats => vec![
                    entry(0, B_LOGITS, sizes.logits),
                    entry(1, B_LABELS, sizes.labels),
                    entry(2, B_DIMS, dims_size),
                    entry(3, B_PARAMS, sizes.params),
                    entry(4, B_PARTIAL, sizes.partial),
                    entry(8, B_MAP, sizes.map),
                ],
                Stage::Reduce => vec![
                    entry(2, B_DIMS, dims_size),
                    entry(4, B_PARTIAL, sizes.partial),
                    entry(5, B_STATS, sizes.stats),
                ],
                Stage::Finalize => vec![
                    entry(2, B_DIMS, dims_size),
                    entry(3, B_PARAMS, sizes.params),
                    entry(5, B_STATS, sizes.stats),
                    entry(6, B_FIN, sizes.fin),
                ],
                Stage::Grad => vec![
                    entry(0, B_LOGITS, sizes.logits),
                    entry(1, B_LABELS, sizes.labels),
                    entry(2, B_DIMS, dims_size),
                    entry(3, B_PARAMS, sizes.params),
                    entry(6, B_FIN, sizes.fin),
                    entry(7, B_GRAD, sizes.logits),
                ],
            };
            let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("segloss"),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
            bind_groups.insert(stage, bg);
        }
        inner.workspaces.push((
            key,
            Workspace {
                buffers,
                bind_groups,
                fin_layout,
                sizes,
            },
        ));
        &inner.workspaces.last().expect("just pushed").1
    }

    fn run(
        &self,
        inner: &mut Inner,
        spec: &LossSpec,
        shape: &Shape,
        logits: &[f32],
        labels: Labels<'_>,
        opts: Options,
    ) -> Result<LossOutput> {
        let kind = label_kind(&labels, shape.classes);
        let params = plan::pack_params(spec, shape);
        let dims = plan::dims(spec, shape);
        let (b_n, c_n, s) = (shape.batch, shape.classes, shape.pixels());
        let key = WorkspaceKey {
            batch: b_n,
            classes: c_n,
            spatial: s,
            label_kind: kind,
            sigmoid: plan::sigmoid(spec),
            tempered: spec.tempered(),
            terms: spec.terms.len(),
            params_len: params.len(),
            loss_map: plan::wants_loss_map(spec),
        };
        let pk = |stage| PipelineKey {
            stage,
            classes: c_n as u32,
            label_kind: kind,
            sigmoid: key.sigmoid,
            tempered: key.tempered,
        };
        let pipelines: HashMap<Stage, wgpu::ComputePipeline> =
            [Stage::Stats, Stage::Reduce, Stage::Finalize, Stage::Grad]
                .into_iter()
                .map(|st| (st, self.pipeline(inner, pk(st))))
                .collect();
        let ws = self.workspace(inner, key.clone());
        let buf = |i: usize| &ws.buffers[i].1;
        let q = &self.queue;
        q.write_buffer(buf(B_LOGITS), 0, bytemuck::cast_slice(logits));
        q.write_buffer(
            buf(B_LABELS),
            0,
            bytemuck::cast_slice(&label_words(&labels, kind)),
        );
        q.write_buffer(buf(B_DIMS), 0, bytemuck::bytes_of(&dims));
        q.write_buffer(buf(B_PARAMS), 0, bytemuck::cast_slice(&params));
        if opts.poison {
            for (i, size) in [
                (B_STATS, ws.sizes.stats),
                (B_FIN, ws.sizes.fin),
                (B_GRAD, ws.sizes.logits),
                (B_MAP, ws.sizes.map),
            ] {
                q.write_buffer(
                    buf(i),
                    0,
                    bytemuck::cast_slice(&vec![f32::NAN; (size / 4) as usize]),
                );
            }
        }
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("segloss"),
            });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("segloss"),
                timestamp_writes: None,
            });
            let mut dispatch = |stage: Stage, groups: usize| {
                let (x, y) = dispatch_2d(groups);
                pass.set_pipeline(&pipelines[&stage]);
                pass.set_bind_group(0, &ws.bind_groups[&stage], &[]);
                pass.dispatch_workgroups(x, y, 1);
            };
            dispatch(Stage::Stats, b_n * dims.tiles_per_image as usize);
            dispatch(Stage::Reduce, (b_n * dims.row_width as usize).div_ceil(64));
            dispatch(Stage::Finalize, 1);
            if opts.gradient {
                dispatch(Stage::Grad, (b_n * s).div_ceil(GRAD_WG));
            }
        }
        let fl = ws.fin_layout;
        let report_off = 4 * fl.report as u64;
        let report_len = ws.sizes.fin - report_off;
        let grad_len = if opts.gradient { ws.sizes.logits } else { 0 };
        let map_len = if key.loss_map { ws.sizes.map } else { 0 };
        let staging = buf(B_STAGING);
        enc.copy_buffer_to_buffer(buf(B_FIN), report_off, staging, 0, report_len);
        enc.copy_buffer_to_buffer(buf(B_STATS), 0, staging, report_len, ws.sizes.stats);
        if grad_len > 0 {
            enc.copy_buffer_to_buffer(
                buf(B_GRAD),
                0,
                staging,
                report_len + ws.sizes.stats,
                grad_len,
            );
        }
        if map_len > 0 {
            enc.copy_buffer_to_buffer(
                buf(B_MAP),
                0,
                staging,
                report_len + ws.sizes.stats + grad_len,
                map_len,
            );
        }
        q.submit([enc.finish()]);
        let total = report_len + ws.sizes.stats + grad_len + map_len;
        let words = read_back(&self.device, staging, total)?;
        let (report, rest) = words.split_at((report_len / 4) as usize);
        let (stats_w, rest) = rest.split_at((ws.sizes.stats / 4) as usize);
        let (grad_w, map_w) = rest.split_at((grad_len / 4) as usize);
        let at = |abs: usize| report[abs - fl.report] as f64;
        let n_pix = dims.n_pixel_terms as usize;
        let width = dims.row_width as usize;
        let statistics = Statistics {
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
        };
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
        let rows = |off: usize| {
            (0..b_n)
                .map(|b| (0..c_n).map(|c| at(off + b * c_n + c)).collect())
                .collect()
        };
        let mut pix_slot = 0;
        let mut elements = vec![];
        for (r, t) in spec.terms.iter().enumerate() {
            let e = match t {
                crate::spec::Term::CrossEntropy {
                    reduction: crate::spec::Reduction::None,
                    ..
                } => Some(
                    map_w[pix_slot * b_n * s..(pix_slot + 1) * b_n * s]
                        .iter()
                        .map(|v| *v as f64)
                        .collect(),
                ),
                crate::spec::Term::Dice {
                    reduction: crate::spec::Reduction::None,
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
        Ok(LossOutput {
            loss: at(fl.report),
            terms,
            predicted_proportions: rows(fl.predicted),
            target_proportions: rows(fl.target),
            valid_pixels: (0..b_n).map(|b| at(fl.valid + b) as u64).collect(),
            decomposition: if key.sigmoid {
                vec![]
            } else {
                (0..b_n)
                    .map(|b| {
                        let o = fl.decomposition + 4 * b;
                        Decomposition {
                            ce: at(o),
                            kl: at(o + 1),
                            matching: at(o + 2),
                            dice_region: at(o + 3),
                        }
                    })
                    .collect()
            },
            elements: if elements.iter().any(Option::is_some) {
                elements
            } else {
                vec![]
            },
            gradient: opts.gradient.then(|| grad_w.to_vec()),
            statistics: opts.statistics.then_some(statistics),
        })
    }
}

/// Maps `len` bytes of a MAP_READ buffer and copies them out as f32.
fn read_back(device: &wgpu::Device, buffer: &wgpu::Buffer, len: u64) -> Result<Vec<f32>> {
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
        bytemuck::cast_slice::<u8, f32>(&view).to_vec()
    };
    buffer.unmap();
    Ok(out)
}
