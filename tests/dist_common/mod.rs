//! One rank's side of the data-parallel checks, shared by tests/distributed.rs (threads of
//! one process, `LocalGroup`) and tests/mpi.rs (processes under mpirun, `MpiAllReduce`).
//! Every rank builds the same global batch from a fixed seed, runs its shard through
//! `segloss::distributed`, and compares with one device holding the whole batch and with
//! the f64 reference, with the tolerances of tests/common/mod.rs.
#![allow(dead_code)]

use crate::common::{close, spec, GRAD_ELEM_TOL, GRAD_L2_TOL};
use segloss::distributed::{self, AllReduce, HostShard};
use segloss::gpu::{DeviceBatch, GpuContext, GradTarget, HostLogits, Options};
use segloss::input::{LabelFormat, Labels, Layout, IGNORE};
use segloss::output::LossOutput;
use segloss::testing::{random_labels, random_logits, Rng};
use segloss::{reference, LossSpec, Shape};
use std::ops::Range;
use std::time::{Duration, Instant};
use wgpu::util::DeviceExt;

/// Image size and classes of the global batch.
const HW: [usize; 2] = [24, 20];
const CLASSES: usize = 4;
/// The spec's ignore_index for the u8 labels of the host path.
const IGNORED_U8: u8 = 255;

/// Batch Dice as in the paper's code, CE and the L1 region penalty (device path).
pub const DICE_CE_L1: &str = r#"{"ignore_index": 255, "terms": [
    {"kind": "cross_entropy"},
    {"kind": "dice", "batch": true, "smooth_nr": 0, "smooth_dr": 0, "skip_empty": true},
    {"kind": "region", "weight": 0.1, "penalty": "l1", "temperature": 10}]}"#;

/// Generalized Dice with batch weights, per-image Dice, focal and the KL region penalty
/// (host path, u8 labels with ignore_index 255).
pub const GDICE_FOCAL_KL: &str = r#"{"ignore_index": 255, "terms": [
    {"kind": "focal", "gamma": 2},
    {"kind": "generalized_dice", "batch": true, "w_type": "square"},
    {"kind": "dice", "squared": true},
    {"kind": "region", "weight": 0.5, "penalty": "kl", "temperature": 2}]}"#;

/// How the global batch is split: its size, each rank's images, and the rank whose shard
/// is all ignored pixels. 2 ranks: 5 images as 3 + 2; 3 ranks: 7 images as 3 + 1 + 3 (a
/// rank with one image); neither divides evenly.
pub fn layout(size: usize) -> (usize, Vec<Range<usize>>, Option<usize>) {
    match size {
        1 => (3, std::iter::once(0..3).collect(), None),
        2 => (5, vec![0..3, 3..5], Some(1)),
        3 => (7, vec![0..3, 3..4, 4..7], Some(2)),
        n => {
            let total = 2 * n + 1;
            let shards = (0..n).map(|r| distributed::shard(total, n, r)).collect();
            (total, shards, Some(n - 1))
        }
    }
}

/// The global batch every rank builds: logits, u32 labels (IGNORE) and the same labels as
/// u8 (255 ignored).
pub struct Global {
    pub shape: Shape,
    pub logits: Vec<f32>,
    pub labels: Vec<u32>,
    pub labels_u8: Vec<u8>,
    pub shards: Vec<Range<usize>>,
}

pub fn global(size: usize) -> Global {
    let (total, shards, ignored) = layout(size);
    let shape = Shape::new(total, CLASSES, &HW);
    let mut rng = Rng::new(2024);
    let logits = random_logits(&mut rng, &shape, 3.0);
    let mut labels = random_labels(&mut rng, &shape, 0.05);
    let s = shape.pixels();
    if let Some(r) = ignored {
        for v in &mut labels[shards[r].start * s..shards[r].end * s] {
            *v = IGNORE;
        }
    }
    let labels_u8 = labels
        .iter()
        .map(|&v| if v == IGNORE { IGNORED_U8 } else { v as u8 })
        .collect();
    Global {
        shape,
        logits,
        labels,
        labels_u8,
        shards,
    }
}

/// A shard's device buffers (the device path).
pub struct DeviceShard {
    pub shape: Shape,
    pub images: Range<usize>,
    pub total: usize,
    pub logits: wgpu::Buffer,
    pub labels: wgpu::Buffer,
    pub grad: wgpu::Buffer,
}

impl DeviceShard {
    pub fn new(ctx: &GpuContext, g: &Global, images: Range<usize>, logits: &[f32]) -> Self {
        let (c, s) = (g.shape.classes, g.shape.pixels());
        let dev = ctx.device();
        use wgpu::BufferUsages as U;
        let init = |bytes: &[u8]| {
            dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytes,
                usage: U::STORAGE | U::COPY_DST,
            })
        };
        DeviceShard {
            shape: Shape::new(images.len(), c, &HW),
            total: g.shape.batch,
            logits: init(bytemuck::cast_slice(logits)),
            labels: init(bytemuck::cast_slice(
                &g.labels[images.start * s..images.end * s],
            )),
            grad: dev.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 4 * (images.len() * c * s) as u64,
                usage: U::STORAGE | U::COPY_SRC,
                mapped_at_creation: false,
            }),
            images,
        }
    }

    pub fn batch(&self) -> DeviceBatch<'_> {
        DeviceBatch {
            image_offset: self.images.start,
            total_batch: self.total,
            ..DeviceBatch::new(&self.shape, &self.logits, &self.labels, LabelFormat::U32)
        }
    }

    pub fn step(
        &self,
        ctx: &GpuContext,
        sp: &LossSpec,
        r: &dyn AllReduce,
    ) -> segloss::Result<LossOutput> {
        let mut out =
            distributed::step(ctx, sp, &self.batch(), Some(GradTarget::f32(&self.grad)), r)?;
        out.gradient = Some(ctx.read_f32(&self.grad, 0, (self.grad.size() / 4) as usize)?);
        Ok(out)
    }
}

/// The host path's shard.
pub fn host_step(
    ctx: &GpuContext,
    g: &Global,
    sp: &LossSpec,
    images: Range<usize>,
    labels_u8: &[u8],
    r: &dyn AllReduce,
) -> segloss::Result<LossOutput> {
    let (c, s) = (g.shape.classes, g.shape.pixels());
    let shape = Shape::new(images.len(), c, &HW);
    let shard = HostShard {
        shape: &shape,
        layout: Layout::Nchw,
        logits: HostLogits::F32(&g.logits[images.start * c * s..images.end * c * s]),
        labels: Labels::index(labels_u8),
        image_offset: images.start,
        total_batch: g.shape.batch,
    };
    distributed::step_host(ctx, sp, &shard, true, r)
}

/// Largest |a − b| and whether every element is within the GPU tests' tolerance
/// (element: GRAD_ELEM_TOL·max|b| + 1e-7; whole: GRAD_L2_TOL relative L2).
fn grad_close(a: &[f32], b: &[f32], scale: f64) -> (f64, bool) {
    let (mut worst, mut ok, mut diff, mut norm) = (0.0f64, true, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let d = (*x as f64 - *y as f64).abs();
        worst = worst.max(d);
        ok &= x.is_finite() && d <= GRAD_ELEM_TOL * scale + 1e-7;
        diff += d * d;
        norm += (*y as f64) * (*y as f64);
    }
    (
        worst,
        ok && a.len() == b.len() && diff.sqrt() <= GRAD_L2_TOL * norm.sqrt() + 1e-12,
    )
}

/// Every rank: both specs (device and host path) on this rank's shard, twice, against one
/// device holding the whole batch (on this rank's own context, run first so the context's
/// workspaces hold other images' data) and the f64 reference. Panics on a mismatch; returns
/// one report line per spec.
pub fn check_rank(ctx: &GpuContext, r: &dyn AllReduce) -> Vec<String> {
    let g = global(r.size());
    let images = g.shards[r.rank()].clone();
    let (c, s) = (g.shape.classes, g.shape.pixels());
    let elems = images.start * c * s..images.end * c * s;
    let mut lines = vec![];
    for (name, json, host) in [
        ("dice+ce+l1", DICE_CE_L1, false),
        ("gdice+focal+kl", GDICE_FOCAL_KL, true),
    ] {
        let sp = spec(json);
        let labels = Labels::index(&g.labels_u8);
        let single = ctx
            .evaluate(
                &sp,
                &g.shape,
                &g.logits,
                labels,
                Options {
                    gradient: true,
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("{name}: single-process run: {e}"));
        let want = reference::evaluate(&sp, &g.shape, &g.logits, labels, true).unwrap();
        let run = || {
            if host {
                let s_n = g.shape.pixels();
                host_step(
                    ctx,
                    &g,
                    &sp,
                    images.clone(),
                    &g.labels_u8[images.start * s_n..images.end * s_n],
                    r,
                )
            } else {
                DeviceShard::new(ctx, &g, images.clone(), &g.logits[elems.clone()])
                    .step(ctx, &sp, r)
            }
        };
        let out = run().unwrap_or_else(|e| panic!("{name}: rank {}: {e}", r.rank()));
        let again = run().unwrap_or_else(|e| panic!("{name}: rank {}: {e}", r.rank()));
        let grad = out.gradient.as_ref().expect("gradient");
        // Determinism: a second step gives the same bits.
        assert_eq!(
            out.loss.to_bits(),
            again.loss.to_bits(),
            "{name}: loss differs between two steps"
        );
        assert!(
            grad.iter()
                .zip(again.gradient.as_ref().unwrap())
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}: gradient differs between two steps"
        );
        assert!(
            close(out.loss, single.loss),
            "{name}: loss {} vs single-process {}",
            out.loss,
            single.loss
        );
        assert!(
            close(out.loss, want.loss),
            "{name}: loss {} vs reference {}",
            out.loss,
            want.loss
        );
        for ((a, b), w) in out.terms.iter().zip(&single.terms).zip(&want.terms) {
            assert!(
                close(a.value, b.value) && close(a.value, w.value),
                "{name}: term {} = {} vs single {} / reference {}",
                a.kind,
                a.value,
                b.value,
                w.value
            );
        }
        assert_eq!(out.valid_pixels, want.valid_pixels, "{name}: valid pixels");
        let single_grad = &single.gradient.as_ref().unwrap()[elems.clone()];
        let want_full = want.gradient.as_ref().unwrap();
        let scale = want_full
            .iter()
            .fold(0.0f64, |m, v| m.max((*v as f64).abs()));
        let (d_single, ok_single) = grad_close(grad, single_grad, scale);
        let (d_ref, ok_ref) = grad_close(grad, &want_full[elems.clone()], scale);
        assert!(
            ok_single,
            "{name}: rank {} gradient vs single-process: max |Δ| {d_single:.3e}",
            r.rank()
        );
        assert!(
            ok_ref,
            "{name}: rank {} gradient vs reference: max |Δ| {d_ref:.3e}",
            r.rank()
        );
        // Every rank reports the same loss bits: exchange them.
        let mut losses = vec![0.0; r.size()];
        losses[r.rank()] = out.loss;
        r.all_reduce_sum(&mut losses).unwrap();
        assert!(
            losses.iter().all(|l| l.to_bits() == out.loss.to_bits()),
            "{name}: ranks disagree: {losses:?}"
        );
        let bitwise = out.loss.to_bits() == single.loss.to_bits()
            && grad
                .iter()
                .zip(single_grad)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        lines.push(format!(
            "{name}: rank {}/{} images {images:?} ({} valid pixels) loss {:.9} single {:.9} reference {:.9} bitwise-single {bitwise} grad max|Δ| single {d_single:.2e} reference {d_ref:.2e}",
            r.rank(),
            r.size(),
            out.valid_pixels[images.clone()].iter().sum::<u64>(),
            out.loss,
            single.loss,
            want.loss
        ));
    }
    lines
}

/// Every rank: a rank with bad input (rank 1, or 0 alone) must make every rank's step
/// fail, quickly, on both paths; then a clean step succeeds everywhere. Returns report
/// lines; panics when a rank does not fail, fails for the wrong reason, or takes too long.
pub fn check_failure(ctx: &GpuContext, r: &dyn AllReduce) -> Vec<String> {
    let g = global(r.size());
    let images = g.shards[r.rank()].clone();
    let (c, s) = (g.shape.classes, g.shape.pixels());
    let elems = images.start * c * s..images.end * c * s;
    let bad = if r.size() > 1 { 1 } else { 0 };
    let sp = spec(DICE_CE_L1);
    let mut lines = vec![];
    // Warm-up (pipelines compiled) so the failing steps' times are the steps'.
    let clean = DeviceShard::new(ctx, &g, images.clone(), &g.logits[elems.clone()]);
    clean.step(ctx, &sp, r).expect("clean step");

    // Device path: a NaN logit on the bad rank, found by the statistics pass.
    let mut z = g.logits[elems.clone()].to_vec();
    if r.rank() == bad {
        z[5] = f32::NAN;
    }
    let shard = DeviceShard::new(ctx, &g, images.clone(), &z);
    let t = Instant::now();
    let err = shard
        .step(ctx, &sp, r)
        .expect_err("a step with a NaN logit on one rank must fail on every rank");
    lines.push(failed_everywhere(
        r,
        bad,
        "nan-logit",
        "non-finite",
        &err,
        t.elapsed(),
    ));

    // Host path: a label that is no class on the bad rank, found by host validation.
    let mut y = g.labels_u8[images.start * s..images.end * s].to_vec();
    if r.rank() == bad {
        y[3] = 7;
    }
    let t = Instant::now();
    let err = host_step(ctx, &g, &sp, images.clone(), &y, r)
        .expect_err("a bad label on one rank must fail every rank");
    lines.push(failed_everywhere(
        r,
        bad,
        "bad-label",
        "label 7",
        &err,
        t.elapsed(),
    ));

    // The group is still in step: a clean step succeeds on every rank.
    let out = clean
        .step(ctx, &sp, r)
        .expect("clean step after the failures");
    lines.push(format!(
        "recovered: rank {}/{} loss {:.9}",
        r.rank(),
        r.size(),
        out.loss
    ));
    lines
}

/// Checks one rank's error of a step where rank `bad` failed: that rank its own error
/// (containing `own`), the others the agreement's, all within seconds. The report line.
fn failed_everywhere(
    r: &dyn AllReduce,
    bad: usize,
    what: &str,
    own: &str,
    err: &segloss::Error,
    took: Duration,
) -> String {
    let msg = err.to_string();
    if r.rank() == bad {
        assert!(msg.contains(own), "own error expected: {msg}");
    } else {
        let want = format!("rank {bad} (invalid input) of {} failed", r.size());
        assert!(msg.contains(&want), "{msg}");
    }
    assert!(
        took < Duration::from_secs(20),
        "the failing step took {took:?}"
    );
    format!(
        "{what}: rank {}/{} error after {:.0} ms: {msg}",
        r.rank(),
        r.size(),
        took.as_secs_f64() * 1e3
    )
}
