//! Batch statistics across processes and nodes: the two-phase API with any engine's
//! all-reduce.
//!
//! Batch Dice, generalized Dice with batch weights and the region penalties' batch
//! proportions are functions of sums over the whole global batch. Under data parallelism
//! each rank holds a shard of that batch, so one step is
//!
//! 1. [`GpuContext::record_statistics`] on the rank's shard and [`Recorded::statistics`]
//!    (B·C·6 sums and a few per image, kilobytes);
//! 2. an all-reduce sum of those statistics across ranks, through [`AllReduce`];
//! 3. [`GpuContext::record_with_statistics`] with the sum: every rank finalizes the same
//!    loss and writes its shard's gradient.
//!
//! [`step`] (device buffers) and [`step_host`] (host slices) run the whole step for one
//! rank; [`all_reduce_statistics`] and [`agree`] are its pieces, for a loop of your own.
//!
//! **What travels.** One flat `f64` buffer per step, the layout of
//! [`Statistics::to_flat`]: B·(6·C + 2 + 2·T) values (T the per-pixel terms), e.g. 1.8 kB
//! for B = 8, C = 4, T = 1 beside 8 MiB of 256×256 f32 logits.
//!
//! **Determinism.** Each rank zeroes the rows of images it does not hold
//! ([`Statistics::keep_images`]) before the sum, so every element of the buffer is nonzero
//! on at most one rank and the sum adds a value to zeros only: exact in any order, on any
//! rank count and whatever reduction tree the engine picks. The result is bitwise the
//! statistics one device computes for the whole batch, so the loss and gradient are too.
//! The device's sums are f32; the wire format is f64 because f64 holds every f32 exactly
//! and keeps the sum exact-to-rounding if several ranks ever contribute to one element
//! (f32 partials would round at every addition, in an order MPI does not fix).
//!
//! **Failure.** A collective that one rank skips hangs the others. So before the
//! statistics sum every rank all-reduces a small status buffer (its error kind or 0, its
//! statistics length and its image range); if any rank failed, or the ranks disagree on
//! the batch, every rank returns an error and none enters the statistics sum. The failing
//! rank returns its own error; the others an error naming the failing ranks. After phase 2
//! the ranks agree once more, so a step ends with `Ok` on every rank or `Err` on every
//! rank, and the next step starts in step on all of them.

use crate::error::{Error, Result};
use crate::gpu::{BufferRegion, DeviceBatch, GpuContext, GradTarget, HostLogits, Recorded};
use crate::input::{LabelFormat, Labels, Layout, LogitFormat, Shape};
use crate::output::{LossOutput, Statistics};
use crate::spec::LossSpec;
use std::ops::Range;
use std::sync::{Arc, Barrier, Mutex};

#[cfg(feature = "mpi")]
pub mod mpi;

/// "Sum these values element-wise across all ranks": the one operation segloss needs from
/// a distributed engine. Implement it over MPI (the `mpi` feature's
/// `mpi::MpiAllReduce`), NCCL, `torch.distributed`, a burn collective or anything else
/// that sums an f64 buffer across the ranks of a group.
///
/// Every rank of the group must call [`AllReduce::all_reduce_sum`] the same number of
/// times, in the same order, with buffers of the same length; [`step`] guarantees that
/// for its own calls even when a rank fails.
pub trait AllReduce {
    /// This rank's index in the group, 0 ≤ rank < size.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Replaces `values` with their element-wise sum over all ranks (the same result on
    /// every rank). A collective: it returns once every rank has contributed.
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()>;
}

impl<T: AllReduce + ?Sized> AllReduce for &T {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn size(&self) -> usize {
        (**self).size()
    }
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()> {
        (**self).all_reduce_sum(values)
    }
}

/// The group of one: the sum is the rank's own values. A single-process run through the
/// same code path as a distributed one.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl AllReduce for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

/// An in-process group: one member per thread (several devices in one process, or tests
/// without MPI). Each member sums the contributions in rank order, so every member gets
/// the same bits.
#[derive(Debug)]
pub struct LocalGroup {
    rank: usize,
    shared: Arc<LocalShared>,
}

#[derive(Debug)]
struct LocalShared {
    slots: Mutex<Vec<Vec<f64>>>,
    barrier: Barrier,
}

impl LocalGroup {
    /// The `size` members of a new group; hand each to its own thread.
    pub fn new(size: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(LocalShared {
            slots: Mutex::new(vec![vec![]; size]),
            barrier: Barrier::new(size),
        });
        (0..size)
            .map(|rank| LocalGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl AllReduce for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()> {
        let sh = &self.shared;
        sh.slots.lock().unwrap_or_else(|e| e.into_inner())[self.rank] = values.to_vec();
        sh.barrier.wait();
        // Every member reads every slot, so a length mismatch is an error on all of them.
        let result = {
            let slots = sh.slots.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(bad) = slots.iter().position(|s| s.len() != values.len()) {
                Err(Error::Input(format!(
                    "all-reduce of {} values on rank {} but {} on rank {bad}",
                    values.len(),
                    self.rank,
                    slots[bad].len()
                )))
            } else {
                for (k, v) in values.iter_mut().enumerate() {
                    *v = slots.iter().map(|s| s[k]).sum();
                }
                Ok(())
            }
        };
        // Nobody may overwrite a slot for the next call before everyone has read this one.
        sh.barrier.wait();
        result
    }
}

/// The images of `rank` when `total` images are split over `size` ranks as evenly as
/// possible, in rank order (the first `total % size` ranks hold one image more).
pub fn shard(total: usize, size: usize, rank: usize) -> Range<usize> {
    let (base, extra) = (total / size, total % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Error kinds as exchanged in the status buffer (0: no error).
fn error_code(e: &Error) -> f64 {
    match e {
        Error::Spec(_) => 1.0,
        Error::Input(_) => 2.0,
        Error::NoAdapter(_) => 3.0,
        Error::Gpu(_) => 4.0,
        Error::Io(_) => 5.0,
        #[allow(unreachable_patterns)]
        _ => 6.0,
    }
}

fn error_of_code(code: f64, message: String) -> Error {
    match code as u32 {
        1 => Error::Spec(message),
        3 => Error::NoAdapter(message),
        4 => Error::Gpu(message),
        5 => Error::Io(message),
        _ => Error::Input(message),
    }
}

fn kind_of_code(code: f64) -> &'static str {
    match code as u32 {
        1 => "invalid spec",
        2 => "invalid input",
        3 => "no GPU adapter",
        4 => "GPU error",
        5 => "I/O error",
        _ => "error",
    }
}

/// Values per rank in the status buffer: error code, statistics length, first image,
/// image count.
const STATUS: usize = 4;

/// All-reduces every rank's status; on this rank's or any other rank's failure, the error
/// this rank returns. `info` is (statistics length, first image, image count).
fn status_round(
    reducer: &dyn AllReduce,
    own: Option<&Error>,
    info: [usize; 3],
    when: &str,
) -> Result<Vec<[f64; STATUS]>> {
    let (rank, size) = (reducer.rank(), reducer.size());
    let mut status = vec![0.0; STATUS * size];
    status[STATUS * rank] = own.map(error_code).unwrap_or(0.0);
    for (k, v) in info.iter().enumerate() {
        status[STATUS * rank + 1 + k] = *v as f64;
    }
    reducer.all_reduce_sum(&mut status)?;
    let rows: Vec<[f64; STATUS]> = status
        .chunks_exact(STATUS)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect();
    let failed: Vec<usize> = (0..size).filter(|&r| rows[r][0] != 0.0).collect();
    if let Some(e) = own {
        return Err(e.clone());
    }
    if let Some(&first) = failed.first() {
        let names = failed
            .iter()
            .map(|r| format!("rank {r} ({})", kind_of_code(rows[*r][0])))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(error_of_code(
            rows[first][0],
            format!(
                "{names} of {size} failed {when} (the failing rank's own error says why); \
                 rank {rank} abandons this step like every rank"
            ),
        ));
    }
    Ok(rows)
}

/// Phase 1's collective: sums this rank's statistics with every other rank's, or returns
/// an error on every rank when any rank's phase 1 failed (`local` is `Err`) or the ranks'
/// shards do not partition one global batch. Call it on every rank, whether its phase 1
/// succeeded or not: that is what keeps a failing rank from hanging the others.
///
/// `images` are this rank's images in the global batch; rows of other images in `local`
/// are set to zero before the sum (see the [module docs](self) on determinism).
pub fn all_reduce_statistics(
    reducer: &dyn AllReduce,
    local: Result<Statistics>,
    images: Range<usize>,
) -> Result<Statistics> {
    let size = reducer.size();
    let local = local.and_then(|st| {
        if images.end > st.batch || images.is_empty() {
            return Err(Error::Input(format!(
                "images {images:?} of rank {} are no non-empty part of a global batch of {}",
                reducer.rank(),
                st.batch
            )));
        }
        Ok(st)
    });
    let info = match &local {
        Ok(st) => [
            Statistics::flat_len(st.batch, st.classes, st.pixel_terms()),
            images.start,
            images.len(),
        ],
        Err(_) => [0; 3],
    };
    let rows = status_round(
        reducer,
        local.as_ref().err(),
        info,
        "before the statistics all-reduce",
    )?;
    let mut st = local?;
    // Every rank sees the same rows, so every rank reaches the same verdict.
    let lens: Vec<f64> = rows.iter().map(|r| r[1]).collect();
    if lens.iter().any(|l| *l != lens[0]) {
        return Err(Error::Input(format!(
            "the ranks' statistics differ in size ({lens:?} values by rank): every rank needs \
             the same global batch (total_batch), class count and spec"
        )));
    }
    let mut shards: Vec<(usize, usize, usize)> = rows
        .iter()
        .enumerate()
        .map(|(r, row)| (row[2] as usize, row[3] as usize, r))
        .collect();
    shards.sort();
    let mut next = 0;
    for &(first, count, r) in &shards {
        if first != next {
            return Err(Error::Input(format!(
                "the ranks' shards do not split the global batch of {} images: rank {r} \
                 starts at image {first}, expected {next} (shards by rank: {:?})",
                st.batch,
                rows.iter()
                    .map(|row| row[2] as usize..(row[2] + row[3]) as usize)
                    .collect::<Vec<_>>()
            )));
        }
        next = first + count;
    }
    if next != st.batch {
        return Err(Error::Input(format!(
            "the {size} ranks' shards cover {next} images of a global batch of {}",
            st.batch
        )));
    }
    st.keep_images(images);
    let (batch, classes, terms) = (st.batch, st.classes, st.pixel_terms());
    let mut flat = st.to_flat();
    reducer.all_reduce_sum(&mut flat)?;
    Statistics::from_flat(batch, classes, terms, &flat)
}

/// Agreement after a local computation: `Ok` on every rank when every rank's `local` is
/// `Ok`, otherwise an error on every rank (the failing ranks keep their own error). A
/// collective: call it on every rank.
pub fn agree<T>(reducer: &dyn AllReduce, local: Result<T>) -> Result<T> {
    status_round(
        reducer,
        local.as_ref().err(),
        [0; 3],
        "after the statistics all-reduce (finalize or gradient)",
    )?;
    local
}

/// One data-parallel step for this rank, on device buffers: statistics of the shard
/// (`batch.image_offset`, `batch.total_batch` place it in the global batch), the
/// all-reduce, finalize, and the shard's gradient into `grad`. Returns the loss of the
/// whole global batch (the same on every rank), its per-image reports and the summed
/// statistics; on any rank's failure, an error on every rank.
///
/// Every rank needs at least one image (use [`shard`] with no more ranks than images). The
/// device waits twice per step (the statistics read-back, then the loss read-back).
pub fn step(
    ctx: &GpuContext,
    spec: &LossSpec,
    batch: &DeviceBatch<'_>,
    grad: Option<GradTarget<'_>>,
    reducer: &dyn AllReduce,
) -> Result<LossOutput> {
    let images = batch.image_offset..batch.image_offset + batch.shape.batch;
    let local = statistics_of(ctx, spec, batch, reducer.size());
    let global = all_reduce_statistics(reducer, local, images)?;
    let out = finish(ctx, spec, batch, &global, grad).map(|(out, _)| out);
    agree(reducer, out)
}

fn statistics_of(
    ctx: &GpuContext,
    spec: &LossSpec,
    batch: &DeviceBatch<'_>,
    ranks: usize,
) -> Result<Statistics> {
    if ranks > 1 && batch.total_batch == 0 {
        return Err(Error::Input(
            "a shard of a distributed batch needs total_batch (the global batch size)".into(),
        ));
    }
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let rec = ctx.record_statistics(&mut enc, spec, batch)?;
    ctx.queue().submit([enc.finish()]);
    rec.statistics(ctx)
}

fn finish(
    ctx: &GpuContext,
    spec: &LossSpec,
    batch: &DeviceBatch<'_>,
    global: &Statistics,
    grad: Option<GradTarget<'_>>,
) -> Result<(LossOutput, Recorded)> {
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let rec = ctx.record_with_statistics(&mut enc, spec, batch, global, grad)?;
    ctx.queue().submit([enc.finish()]);
    let mut out = rec.read(ctx)?;
    out.statistics = Some(global.clone());
    Ok((out, rec))
}

/// One rank's shard as host data, for [`step_host`].
#[derive(Debug, Clone, Copy)]
pub struct HostShard<'a> {
    /// The shard's shape (its own image count B).
    pub shape: &'a Shape,
    /// Layout of logits, soft labels and the gradient.
    pub layout: Layout,
    /// The shard's logits.
    pub logits: HostLogits<'a>,
    /// The shard's labels (index labels are decoded with the spec's `ignore_index`).
    pub labels: Labels<'a>,
    /// Index of the shard's first image in the global batch.
    pub image_offset: usize,
    /// Images in the global batch.
    pub total_batch: usize,
}

/// [`step`] on host data: validates and uploads the shard, runs the step and returns the
/// shard's f32 gradient in `gradient` (when asked). Bad input on any rank is an error on
/// every rank. It creates its buffers at each call: a training loop keeps its data on the
/// device and calls [`step`].
pub fn step_host(
    ctx: &GpuContext,
    spec: &LossSpec,
    shard: &HostShard<'_>,
    gradient: bool,
    reducer: &dyn AllReduce,
) -> Result<LossOutput> {
    let images = shard.image_offset..shard.image_offset + shard.shape.batch;
    let uploaded = upload(ctx, spec, shard);
    let local = uploaded.as_ref().map_err(Clone::clone).and_then(|up| {
        let batch = up.batch(shard);
        statistics_of(ctx, spec, &batch, reducer.size())
    });
    let global = all_reduce_statistics(reducer, local, images)?;
    let up = uploaded?; // Ok here: a failed upload failed the collective on every rank
    let batch = up.batch(shard);
    let out = finish(
        ctx,
        spec,
        &batch,
        &global,
        gradient.then(|| GradTarget::f32(&up.grad)),
    )
    .and_then(|(mut out, _rec)| {
        if gradient {
            let n = shard.shape.len();
            out.gradient = Some(ctx.read_f32(&up.grad, 0, n)?);
        }
        Ok(out)
    });
    agree(reducer, out)
}

struct Uploaded {
    logits: wgpu::Buffer,
    logit_format: LogitFormat,
    labels: wgpu::Buffer,
    label_format: LabelFormat,
    grad: wgpu::Buffer,
}

impl Uploaded {
    fn batch<'a>(&'a self, shard: &HostShard<'a>) -> DeviceBatch<'a> {
        DeviceBatch {
            shape: shard.shape,
            layout: shard.layout,
            logits: BufferRegion {
                buffer: &self.logits,
                offset: 0,
            },
            logit_format: self.logit_format,
            labels: BufferRegion {
                buffer: &self.labels,
                offset: 0,
            },
            label_format: self.label_format,
            image_offset: shard.image_offset,
            total_batch: shard.total_batch,
        }
    }
}

fn upload(ctx: &GpuContext, spec: &LossSpec, shard: &HostShard<'_>) -> Result<Uploaded> {
    use wgpu::util::DeviceExt;
    let shape = shard.shape;
    let logits = shard.logits.to_f32();
    // The same checks as the host API's, here so that bad input fails this rank's phase 1.
    spec.check_inputs(shape, &logits, &shard.labels)?;
    let label_format = match shard.labels {
        Labels::Soft(_) => LabelFormat::Soft,
        Labels::Index(_) => LabelFormat::U32,
    };
    let words = label_format.encode(&shard.labels, spec.ignore_index, shape.classes)?;
    let logit_bytes = shard.logits.bytes(); // the host API's upload form
    let dev = ctx.device();
    use wgpu::BufferUsages as U;
    let init = |contents: &[u8]| {
        dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("segloss shard"),
            contents,
            usage: U::STORAGE | U::COPY_DST,
        })
    };
    Ok(Uploaded {
        logits: init(&logit_bytes),
        logit_format: shard.logits.format(),
        labels: init(bytemuck::cast_slice(&words)),
        label_format,
        grad: dev.create_buffer(&wgpu::BufferDescriptor {
            label: Some("segloss shard gradient"),
            size: 4 * shape.len() as u64,
            usage: U::STORAGE | U::COPY_SRC,
            mapped_at_creation: false,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{random_labels, random_logits, Rng};

    fn stats_of(shape: &Shape, seed: u64) -> Statistics {
        let spec = LossSpec::from_json(
            r#"{"terms": [{"kind": "cross_entropy"}, {"kind": "dice", "batch": true},
                {"kind": "focal"}]}"#,
        )
        .unwrap();
        let mut rng = Rng::new(seed);
        let z = random_logits(&mut rng, shape, 2.0);
        let y = random_labels(&mut rng, shape, 0.1);
        crate::reference::evaluate(&spec, shape, &z, Labels::index(&y), false)
            .unwrap()
            .statistics
            .unwrap()
    }

    #[test]
    fn flat_form_round_trips_and_has_the_documented_layout() {
        let st = stats_of(&Shape::new(3, 4, &[5, 6]), 1);
        assert_eq!(st.pixel_terms(), 2);
        let flat = st.to_flat();
        assert_eq!(flat.len(), Statistics::flat_len(3, 4, 2));
        assert_eq!(flat.len(), 3 * (6 * 4 + 2 + 4));
        let w = Statistics::flat_row(4, 2);
        // Image 2, class 1, Σg (the fourth sum); image 1's valid count; image 2's second
        // pixel term's normaliser.
        assert_eq!(flat[2 * w + 6 + 3], st.per_class[2 * 4 + 1][3]);
        assert_eq!(flat[w + 24], st.valid[1]);
        assert_eq!(flat[2 * w + 24 + 1], st.plain_ce[2]);
        assert_eq!(flat[2 * w + 26 + 3], st.pixel_sums[2 * 2 + 1][1]);
        let back = Statistics::from_flat(3, 4, 2, &flat).unwrap();
        assert_eq!(back, st);
        assert!(Statistics::from_flat(3, 4, 1, &flat).is_err());
    }

    #[test]
    fn shards_cover_the_batch_in_order() {
        for total in 1..20 {
            for size in 1..=total.min(7) {
                let parts: Vec<_> = (0..size).map(|r| shard(total, size, r)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[size - 1].end, total);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() - w[1].len() <= 1);
                }
            }
        }
        assert_eq!(shard(7, 3, 0), 0..3);
        assert_eq!(shard(7, 3, 2), 5..7);
    }

    /// Runs `f(member)` on every member of an in-process group, one thread each.
    fn on_group<T: Send>(size: usize, f: impl Fn(LocalGroup) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let handles: Vec<_> = LocalGroup::new(size)
                .into_iter()
                .map(|m| s.spawn(|| f(m)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn shard_statistics_sum_to_the_whole_batch_bitwise() {
        let whole = stats_of(&Shape::new(5, 3, &[4, 4]), 7);
        let split = [0..2, 2..3, 3..5];
        let results = on_group(3, |m| {
            // Garbage in other images' rows (as a reused device workspace may hold) must
            // not reach the sum.
            let mut local = whole.clone();
            for v in &mut local.valid {
                *v += 1000.0;
            }
            let own = split[m.rank()].clone();
            for b in own.clone() {
                local.valid[b] = whole.valid[b];
            }
            all_reduce_statistics(&m, Ok(local), own).unwrap()
        });
        for r in results {
            assert_eq!(r, whole);
        }
    }

    #[test]
    fn a_failing_rank_fails_every_rank() {
        let whole = stats_of(&Shape::new(4, 3, &[4, 4]), 3);
        let results = on_group(3, |m| {
            let local = if m.rank() == 1 {
                Err(Error::Input("label 9 at flat position 3".into()))
            } else {
                Ok(whole.clone())
            };
            let own = shard(4, 3, m.rank());
            let first = all_reduce_statistics(&m, local, own.clone());
            // The group is still usable: the next step succeeds everywhere.
            let second = all_reduce_statistics(&m, Ok(whole.clone()), own);
            (first, second)
        });
        for (r, (first, second)) in results.into_iter().enumerate() {
            let msg = first.unwrap_err().to_string();
            if r == 1 {
                assert!(msg.contains("label 9"), "{msg}");
            } else {
                assert!(msg.contains("rank 1 (invalid input) of 3 failed"), "{msg}");
            }
            assert_eq!(second.unwrap(), whole);
        }
    }

    #[test]
    fn overlapping_or_mismatched_shards_fail_every_rank() {
        let whole = stats_of(&Shape::new(4, 3, &[4, 4]), 3);
        let other = stats_of(&Shape::new(5, 3, &[4, 4]), 3);
        let results = on_group(2, |m| {
            let overlap = all_reduce_statistics(&m, Ok(whole.clone()), 0..3);
            let sizes = if m.rank() == 0 {
                all_reduce_statistics(&m, Ok(whole.clone()), 0..2)
            } else {
                all_reduce_statistics(&m, Ok(other.clone()), 2..5)
            };
            let after = agree(
                &m,
                if m.rank() == 0 {
                    Ok(1)
                } else {
                    Err(Error::Gpu("lost".into()))
                },
            );
            (overlap, sizes, after)
        });
        for (r, (overlap, sizes, after)) in results.into_iter().enumerate() {
            assert!(overlap.unwrap_err().to_string().contains("do not split"));
            assert!(sizes.unwrap_err().to_string().contains("differ in size"));
            let msg = after.unwrap_err().to_string();
            if r == 0 {
                assert!(
                    msg.starts_with("GPU error: rank 1 (GPU error) of 2 failed after"),
                    "{msg}"
                );
            } else {
                assert_eq!(msg, "GPU error: lost");
            }
        }
    }
}
