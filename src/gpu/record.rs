//! The backend API: a call's passes recorded into the caller's encoder on the caller's
//! buffers. Each call is checked ([`check_request`]), split into chunks that fit one
//! binding, given a workspace and per-chunk `Dims` slots, and turned into dispatches, one
//! small function per stage, whose bind groups follow the stage table. All of that happens
//! inside wgpu error scopes before anything is recorded (ARCHITECTURE.md, "A call").

use super::batch::{BufferRegion, DeviceBatch, GradTarget};
use super::cache::{Bound, Caches};
use super::context::{storage_align, GpuContext};
use super::layout::{self, Dims, FinLayout, DIMS_SLOT};
use super::plan::{self, Region};
use super::readback::{stats_to_rows, Recorded};
use super::stages::{Access, Binding, Kernel, PipelineKey, Variant};
use super::strategy::Strategy;
use super::workspace::{Workspace, WorkspaceKey, SEQ_AT};
use crate::error::{Error, Result};
use crate::input::{GradFormat, LabelFormat, Layout};
use crate::output::Statistics;
use crate::spec::LossSpec;
use std::sync::Arc;

/// One recording's inputs (the public `record*` methods and the host API differ only in
/// these fields).
#[derive(Clone, Copy)]
pub(super) struct Request<'a> {
    pub spec: &'a LossSpec,
    pub batch: &'a DeviceBatch<'a>,
    pub grad: Option<GradTarget<'a>>,
    /// Two-phase API: statistics combined elsewhere; the stats pass is skipped.
    pub given_stats: Option<&'a Statistics>,
    /// Run finalize (and the gradient pass when `grad` is set); false: statistics only.
    pub finalize: bool,
    /// Fill the workspace outputs with NaN first (tests).
    pub poison: bool,
    /// How the kernels run.
    pub strategy: Strategy,
    /// A forward recording: `Dims` slots are reserved for its one backward recording
    /// (backward.rs).
    pub backward_slots: bool,
    /// The caller wants the proportions and the decomposition (and so the per-class sums);
    /// false leaves the sums out for a spec of pixel terms only (`GpuContext::record_loss`).
    pub proportions: bool,
    /// The gradient pass adds to the target (`record_backward`'s choice): the `ACCUMULATE`
    /// override, so the store that is not taken compiles out.
    pub accumulate: bool,
}

impl<'a> Request<'a> {
    /// Statistics, finalize and (with `grad`) the gradient, with the context's strategy.
    pub fn full(
        ctx: &GpuContext,
        spec: &'a LossSpec,
        batch: &'a DeviceBatch<'a>,
        grad: Option<GradTarget<'a>>,
    ) -> Self {
        Request {
            spec,
            batch,
            grad,
            given_stats: None,
            finalize: true,
            poison: false,
            strategy: ctx.strategy(),
            backward_slots: false,
            proportions: true,
            accumulate: false,
        }
    }

    /// Whether the stats stage sums each class (`CLASS_SUMS`): wanted, or needed by a
    /// statistic term.
    pub fn class_sums(&self) -> bool {
        self.proportions || !self.spec.pixel_terms_only()
    }
}

/// One dispatch: pipeline, bind group, workgroups.
pub(super) type Dispatch = (wgpu::ComputePipeline, wgpu::BindGroup, usize);

/// A checked request: its dispatches, ready to be recorded, and the handle to its results.
pub(super) struct Prepared {
    pub(super) dispatches: Vec<Dispatch>,
    /// A shard's stats pass writes only its own images' partial rows, while the tile sums
    /// cover the global batch: the rows of the other images, left from an earlier call on
    /// this workspace, are zeroed first.
    pub(super) clear_partial: bool,
    pub(super) recorded: Recorded,
}

/// What the checks establish about a call.
pub(super) struct Checked {
    pub(super) batch: usize,
    pub(super) classes: usize,
    pub(super) pixels: usize,
    /// Images of the global batch.
    pub(super) total: usize,
    /// Element and pixel index of the call's first image in the global batch.
    pub(super) first_elem: u64,
    pub(super) first_pixel: u64,
    /// A 16-bit gradient: computed in f32 scratch, converted by the narrow stage.
    pub(super) narrow: bool,
    /// The gradient shares a buffer with the logits or labels (`Kernel::GradShared`).
    pub(super) grad_shares_input: bool,
}

/// Refuses what no kernel can run: a bad shape or spec, images outside the global batch,
/// sigmoid without soft labels, misaligned offsets, ranges outside their buffers or
/// overlapping each other, a label format too small for C.
pub(super) fn check_request(req: &Request<'_>) -> Result<Checked> {
    let (spec, batch, grad) = (req.spec, req.batch, req.grad);
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
    if plan::sigmoid(spec) && batch.label_format != LabelFormat::Soft {
        return Err(Error::Input(
            "sigmoid mode needs soft (f32) labels of the logits' shape".into(),
        ));
    }
    let mut offsets = vec![
        ("logits", batch.logits.offset),
        ("labels", batch.labels.offset),
    ];
    if let Some(g) = &grad {
        offsets.push(("gradient", g.region.offset));
    }
    for (what, offset) in offsets {
        if offset % 4 != 0 {
            return Err(Error::Input(format!(
                "the {what} offset {offset} is not a multiple of 4 bytes"
            )));
        }
    }
    check_ranges(batch, grad)?;
    batch.label_format.check_classes(c_n)?;
    check_signed_labels(spec, batch)?;
    Ok(Checked {
        batch: b_n,
        classes: c_n,
        pixels: s,
        total,
        first_elem: (batch.image_offset * c_n * s) as u64,
        first_pixel: (batch.image_offset * s) as u64,
        narrow: grad.is_some_and(|g| g.format != GradFormat::F32),
        // Non-overlapping ranges of one buffer (burn packs tensors into shared pages):
        // wgpu refuses a buffer bound read-only and read-write in one dispatch, so the
        // gradient pass then binds the inputs read-write too.
        grad_shares_input: grad.is_some_and(|g| {
            g.format == GradFormat::F32
                && (*g.region.buffer == *batch.logits.buffer
                    || *g.region.buffer == *batch.labels.buffer)
        }),
    })
}

/// I32 and I64 labels compare with ignore_index as an i32, and I64 labels are read as word
/// pairs from an 8-byte boundary.
fn check_signed_labels(spec: &LossSpec, batch: &DeviceBatch<'_>) -> Result<()> {
    let format = batch.label_format;
    if !matches!(format, LabelFormat::I32 | LabelFormat::I64) {
        return Ok(());
    }
    if spec.ignore_index > i32::MAX as i64 {
        return Err(Error::Input(format!(
            "{format:?} labels need an ignore_index below 2^31 (negative labels are always \
             ignored), got {}",
            spec.ignore_index
        )));
    }
    if format == LabelFormat::I64 && !batch.labels.offset.is_multiple_of(8) {
        return Err(Error::Input(format!(
            "I64 labels start at byte offset {}, not a multiple of 8",
            batch.labels.offset
        )));
    }
    Ok(())
}

/// Each array a call binds: its name, region and bytes.
pub(super) fn bound_ranges<'a>(
    batch: &DeviceBatch<'a>,
    grad: Option<GradTarget<'a>>,
) -> Vec<(&'static str, BufferRegion<'a>, u64)> {
    let shape = batch.shape;
    let n = shape.len() as u64;
    let label_elems = if batch.label_format == LabelFormat::Soft {
        n
    } else {
        (shape.batch * shape.pixels()) as u64
    };
    let bytes = |elems: u64, per_word: u64| elems.div_ceil(per_word) * 4;
    let mut ranges = vec![
        (
            "logits",
            batch.logits,
            bytes(n, batch.logit_format.per_word()),
        ),
        (
            "labels",
            batch.labels,
            batch.label_format.bytes(label_elems),
        ),
    ];
    if let Some(g) = grad {
        ranges.push(("gradient", g.region, bytes(n, g.format.per_word())));
    }
    ranges
}

/// Bytes of each bound array: inside its buffer, and not overlapping another.
fn check_ranges(batch: &DeviceBatch<'_>, grad: Option<GradTarget<'_>>) -> Result<()> {
    let ranges = bound_ranges(batch, grad);
    for (what, r, len) in &ranges {
        let end = r.offset + len;
        if end > r.buffer.size() {
            return Err(Error::Input(format!(
                "the {what} buffer holds {} bytes, the call needs {end}",
                r.buffer.size()
            )));
        }
    }
    check_disjoint(&ranges)
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

/// One chunk of images: its bound ranges, its `Dims` slot and its workgroups.
pub(super) struct ChunkPlan {
    /// Byte offset of its `Dims` slot.
    pub(super) slot: u64,
    stats_groups: usize,
    grad_groups: usize,
    logits: Region,
    labels: Region,
    grad: Option<Region>,
    narrow_words: usize,
}

/// The chunks' bound ranges and `Dims` slots (slot 0, the whole global batch, comes first).
pub(super) fn plan_chunks(
    req: &Request<'_>,
    call: &Checked,
    chunks: &[(usize, usize)],
    base: Dims,
    align: u64,
) -> (Vec<Dims>, Vec<ChunkPlan>) {
    let batch = req.batch;
    let (c_n, s) = (call.classes, call.pixels);
    let soft = batch.label_format == LabelFormat::Soft;
    let mut slots = vec![Dims {
        batch: call.total as u32,
        total_batch: call.total as u32,
        ..base
    }];
    let mut plans = vec![];
    for (k, &(first, count)) in chunks.iter().enumerate() {
        // Element indices relative to the caller's arrays, whose element 0 is the call's
        // first image.
        let first_elem = (first * c_n * s) as u64;
        let elems = (count * c_n * s) as u64;
        let lr = plan::region(
            batch.logits.offset,
            first_elem,
            elems,
            batch.logit_format.per_word(),
            align,
        );
        let (lab_first, lab_count) = if soft {
            (first_elem, elems)
        } else {
            ((first * s) as u64, (count * s) as u64)
        };
        // I64 labels are indexed by word (two a label): the region and shift in words.
        let (per_word, words) = (
            batch.label_format.per_word(),
            batch.label_format.words_per_value(),
        );
        let yr = plan::region(
            batch.labels.offset,
            lab_first * words,
            lab_count * words,
            per_word,
            align,
        );
        let gr = req.grad.map(|g| {
            let per_word = g.format.per_word();
            plan::region(g.region.offset, first_elem, elems, per_word, align)
        });
        // Shifts turn a global index (the kernels index the global batch) into one within
        // the bound range.
        let label_origin = if soft {
            call.first_elem
        } else {
            call.first_pixel
        };
        let global_first = (call.first_elem + first_elem) as u32;
        let mut d = Dims {
            batch: count as u32,
            image_offset: (batch.image_offset + first) as u32,
            total_batch: call.total as u32,
            logit_shift: lr.shift.wrapping_sub(call.first_elem as u32),
            label_shift: yr.shift.wrapping_sub((label_origin * words) as u32),
            grad_shift: match (call.narrow, gr) {
                (true, _) => global_first.wrapping_neg(), // f32 scratch from element 0
                (false, Some(r)) => r.shift.wrapping_sub(call.first_elem as u32),
                (false, None) => 0,
            },
            ..base
        };
        let mut narrow_words = 0;
        if let (true, Some(r)) = (call.narrow, gr) {
            d.narrow_count = elems as u32;
            d.narrow_shift = r.shift.wrapping_add(first_elem as u32);
            let (first_word, last_word) = (
                d.narrow_shift as u64 / 2,
                (d.narrow_shift as u64 + elems - 1) / 2,
            );
            narrow_words = (last_word - first_word + 1) as usize;
        }
        slots.push(d);
        plans.push(ChunkPlan {
            slot: (k as u64 + 1) * DIMS_SLOT,
            stats_groups: count * s.div_ceil(req.strategy.stats_tile()),
            grad_groups: count * s.div_ceil(req.strategy.grad_tile()),
            logits: lr,
            labels: yr,
            grad: gr,
            narrow_words,
        });
    }
    (slots, plans)
}

/// Whether a call takes the one-pass path: loss and gradient of a spec of pixel terms only
/// (their normalisers depend on the labels alone), large enough for the labels-only pass and
/// the extra finalize to cost less than a second read of the logits
/// (`Strategy::one_pass_min_elements`), with inputs the stats stage may bind read-only.
fn one_pass(req: &Request<'_>, call: &Checked) -> bool {
    let elements = (call.batch * call.classes * call.pixels) as u64;
    req.grad.is_some()
        && req.finalize
        && req.given_stats.is_none()
        && !req.backward_slots
        && !call.grad_shares_input
        && req.spec.pixel_terms_only()
        && elements >= req.strategy.one_pass_min_elements
}

/// Whether finalize adds the stats stage's partial rows itself (`Dims::fin_sums_partial`):
/// a call that finalizes statistics it computed, with few partial rows
/// (`Strategy::finalize_sums_max_floats`). The two summing dispatches it saves are most of a
/// small call's cost on lavapipe (ARCHITECTURE.md, "Small calls").
fn finalize_sums(req: &Request<'_>, total: usize, base: &Dims) -> bool {
    let floats = total as u64
        * base.tiles_per_image as u64
        * base.rows_per_tile as u64
        * base.row_width as u64;
    let max = req
        .strategy
        .finalize_sums_max_floats
        .min(super::strategy::FINALIZE_SUMS_CAP);
    req.finalize && req.given_stats.is_none() && floats <= max
}

/// Records prepared dispatches as one compute pass (timestamps 0 and 1 of `timestamps`
/// at its start and end).
pub(super) fn encode_dispatches(
    encoder: &mut wgpu::CommandEncoder,
    label: &str,
    dispatches: &[Dispatch],
    timestamps: Option<&wgpu::QuerySet>,
) {
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(label),
        timestamp_writes: timestamps.map(|q| wgpu::ComputePassTimestampWrites {
            query_set: q,
            beginning_of_pass_write_index: Some(0),
            end_of_pass_write_index: Some(1),
        }),
    });
    for (p, bg, groups) in dispatches {
        let (x, y) = plan::dispatch_2d(*groups);
        pass.set_pipeline(p);
        pass.set_bind_group(0, bg, &[]);
        pass.dispatch_workgroups(x, y, 1);
    }
}

/// Everything the stage functions need to build a dispatch.
pub(super) struct Encoding<'a, 'c> {
    pub(super) ctx: &'c GpuContext,
    pub(super) caches: &'c mut Caches,
    pub(super) req: &'c Request<'a>,
    pub(super) call: &'c Checked,
    pub(super) ws: &'c Workspace,
    pub(super) variant: Variant,
    pub(super) dispatches: Vec<Dispatch>,
    /// The kernel of each dispatch.
    pub(super) kernels: Vec<Kernel>,
}

const DIMS_SIZE: u64 = std::mem::size_of::<Dims>() as u64;

impl Encoding<'_, '_> {
    /// A dispatch of `kernel` over `groups` workgroups, binding for each entry of its
    /// table row the range `bind` gives.
    fn add<'b>(
        &mut self,
        kernel: Kernel,
        groups: usize,
        bind: impl Fn(Binding) -> (&'b wgpu::Buffer, u64, u64),
    ) {
        let key = PipelineKey::new(kernel, &self.variant);
        let entries: Vec<Bound<'b>> = kernel
            .info()
            .bindings
            .iter()
            .map(|(b, _)| {
                let (buffer, offset, size) = bind(*b);
                (b.slot(), buffer, offset, size)
            })
            .collect();
        let pipeline = self.ctx.pipeline(self.caches, key);
        let bind_group = self.ctx.bind_group(self.caches, key, entries);
        self.dispatches.push((pipeline, bind_group, groups));
        self.kernels.push(kernel);
    }

    /// The workspace's binding of `b` covering the whole buffer (`dims`: slot 0).
    fn whole(ws: &Workspace, b: Binding) -> (&wgpu::Buffer, u64, u64) {
        let sz = &ws.sizes;
        match b {
            Binding::Dims => (&ws.dims, 0, DIMS_SIZE),
            Binding::Params => (&ws.params, 0, sz.params),
            Binding::Partial => (&ws.partial, 0, sz.partial),
            Binding::Stats => (&ws.stats, 0, sz.stats),
            Binding::Fin => (&ws.fin, 0, sz.fin),
            Binding::FinCoefs => (&ws.fin, 0, ws.coef_bytes),
            Binding::LossMap => (&ws.map, 0, sz.map),
            Binding::Check => (&ws.check, 0, 16),
            Binding::Pieces => (&ws.pieces, 0, sz.pieces),
            other => unreachable!("{other:?} is not a workspace buffer"),
        }
    }

    /// A pass over the pixels (stats, or grad) per chunk: `kernel` bound to the chunk's
    /// logits, labels and `Dims` slot, and with a gradient `g` to its gradient range, then
    /// stage 4 for a 16-bit gradient.
    fn pixel_pass(
        &mut self,
        kernel: Kernel,
        plans: &[ChunkPlan],
        groups: fn(&ChunkPlan) -> usize,
        g: Option<GradTarget<'_>>,
    ) {
        let (batch, ws) = (self.req.batch, self.ws);
        for p in plans {
            let target = g.map(|g| Self::grad_target(ws, self.call.narrow, p, g));
            // Bound for the chunked grad stage's quads too (unread by the other stages).
            let quads = self.variant.quads || self.variant.chunk_quads;
            let [read_stand_in, write_stand_in] = &ws.quad_stand_ins;
            self.add(kernel, groups(p), |b| match (b, target) {
                (Binding::Logits, _) => (batch.logits.buffer, p.logits.offset, p.logits.size),
                (Binding::Logits4, _) if quads => {
                    (batch.logits.buffer, p.logits.offset, p.logits.size)
                }
                (Binding::Logits4, _) => (read_stand_in, 0, 16),
                (Binding::Grad4, Some(t)) if quads => t,
                (Binding::Grad4, _) => (write_stand_in, 0, 16),
                (Binding::Labels, _) => (batch.labels.buffer, p.labels.offset, p.labels.size),
                (Binding::Dims, _) => (&ws.dims, p.slot, DIMS_SIZE),
                (Binding::Grad, Some(t)) => t,
                (other, _) => Self::whole(ws, other),
            });
            if let Some(g) = g {
                self.narrow(p, g);
            }
        }
    }

    /// Stage 1 per chunk (with `norms_only`, its labels-only form).
    fn stats(&mut self, plans: &[ChunkPlan], norms_only: bool) {
        let [kernel, _] = self.req.strategy.pixel_kernels().0;
        self.variant.norms_only = norms_only;
        // The labels-only form sums no class: one pipeline whatever the call wants.
        let class_sums = self.variant.class_sums;
        self.variant.class_sums |= norms_only;
        self.pixel_pass(kernel, plans, |p| p.stats_groups, None);
        self.variant.norms_only = false;
        self.variant.class_sums = class_sums;
    }

    /// Stage 1 in its one-pass form per chunk: statistics, and the gradient from the pixel
    /// terms' scales that finalize left from the labels-only pass.
    fn stats_with_grad(&mut self, plans: &[ChunkPlan], g: GradTarget<'_>) {
        let [_, kernel] = self.req.strategy.pixel_kernels().0;
        self.pixel_pass(kernel, plans, |p| p.stats_groups, Some(g));
    }

    /// Where a chunk's f32 gradient goes: the caller's range, or the scratch a 16-bit
    /// gradient is computed in first.
    fn grad_target<'b>(
        ws: &'b Workspace,
        narrow: bool,
        p: &ChunkPlan,
        g: GradTarget<'b>,
    ) -> (&'b wgpu::Buffer, u64, u64) {
        let r = p.grad.expect("planned with the gradient");
        match &ws.scratch {
            Some(sc) if narrow => (sc, 0, sc.size()),
            _ => (g.region.buffer, r.offset, r.size),
        }
    }

    /// Stage 4 of a chunk: its f32 scratch into the caller's 16-bit gradient (nothing for an
    /// f32 gradient).
    fn narrow(&mut self, p: &ChunkPlan, g: GradTarget<'_>) {
        if !self.call.narrow {
            return;
        }
        let ws = self.ws;
        let r = p.grad.expect("planned with the gradient");
        let target = Self::grad_target(ws, self.call.narrow, p, g);
        let groups = Kernel::Narrow.info().groups_for(p.narrow_words);
        self.add(Kernel::Narrow, groups, |b| match b {
            Binding::Dims => (&ws.dims, p.slot, DIMS_SIZE),
            Binding::Grad => target,
            Binding::Out16 => (g.region.buffer, r.offset, r.size),
            other => Self::whole(ws, other),
        });
    }

    /// Stage 2a: the partial rows into one statistics row per image (nothing to record when
    /// finalize adds them itself).
    fn sum_tiles(&mut self, base: &Dims) {
        if base.fin_sums_partial != 0 {
            return;
        }
        let ws = self.ws;
        let (total, width) = (self.call.total, base.row_width as usize);
        if base.rows_per_tile > 1 {
            let columns = total * base.tiles_per_image as usize * width;
            let groups = Kernel::SumTileRows.info().groups_for(columns);
            self.add(Kernel::SumTileRows, groups, |b| Self::whole(ws, b));
        }
        let groups = Kernel::SumTiles.info().groups_for(total * width);
        self.add(Kernel::SumTiles, groups, |b| Self::whole(ws, b));
    }

    /// Stage 2b: one workgroup.
    fn finalize(&mut self) {
        let ws = self.ws;
        self.add(Kernel::Finalize, 1, |b| Self::whole(ws, b));
    }

    /// Stage 3 (and 4 for 16-bit gradients) per chunk.
    pub(super) fn grad(&mut self, plans: &[ChunkPlan], g: GradTarget<'_>) {
        let [own, shared] = self.req.strategy.pixel_kernels().1;
        let kernel = if self.call.grad_shares_input {
            shared
        } else {
            own
        };
        self.pixel_pass(kernel, plans, |p| p.grad_groups, Some(g));
    }
}

impl GpuContext {
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
        self.record_request(encoder, Request::full(self, spec, batch, grad), None)
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
        let req = Request::full(self, spec, batch, grad);
        self.record_request(encoder, req, Some(query_set))
    }

    /// [`GpuContext::record`] for a caller that reads the loss, its terms and the gradient
    /// only: for a spec of pixel terms only (cross-entropy, focal, BCE) the stats pass
    /// leaves out the per-class sums behind the proportions and the decomposition (about a
    /// quarter of one-pass cross-entropy at 150 classes on lavapipe; on GPUs also one read
    /// of each class past the register block), and the handle's [`Recorded::read`] returns
    /// them empty ([`Recorded::statistics`] is an error). A spec with a statistic term
    /// needs the sums for its loss, and records exactly as [`GpuContext::record`].
    pub fn record_loss(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &LossSpec,
        batch: &DeviceBatch<'_>,
        grad: Option<GradTarget<'_>>,
    ) -> Result<Recorded> {
        let req = Request {
            proportions: false,
            ..Request::full(self, spec, batch, grad)
        };
        self.record_request(encoder, req, None)
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
            ..Request::full(self, spec, batch, None)
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
            ..Request::full(self, spec, batch, grad)
        };
        self.record_request(encoder, req, None)
    }

    /// Prepares every pipeline, bind group and upload inside error scopes, and only when
    /// all of it is valid records the passes into `encoder`: a wgpu validation error at
    /// this point (a foreign buffer, a bad binding) is this call's `Err`, and the caller's
    /// encoder never holds an invalid command that would fail their `finish()` or submit.
    pub(super) fn record_request(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        req: Request<'_>,
        timestamps: Option<&wgpu::QuerySet>,
    ) -> Result<Recorded> {
        let Prepared {
            dispatches,
            clear_partial,
            recorded,
        } = self.scoped(|| self.prepare(&req))?;
        if clear_partial {
            encoder.clear_buffer(&recorded.ws.partial, 0, None);
        }
        encode_dispatches(encoder, "segloss", &dispatches, timestamps);
        // The last command of the recording: the call's sequence number reaches the status
        // buffer only when this encoder runs, so a read of an unsubmitted recording sees an
        // older number and is refused (see `check_status`).
        let ws = &recorded.ws;
        encoder.copy_buffer_to_buffer(&ws.seq, 0, &ws.check, SEQ_AT, 4);
        Ok(recorded)
    }

    /// The chunks of the call's images: runs whose largest bound array fits one binding.
    pub(super) fn chunk_images(
        &self,
        req: &Request<'_>,
        call: &Checked,
    ) -> Result<Vec<(usize, usize)>> {
        self.chunk_images_with(req, call, req.grad.is_some())
    }

    /// [`Self::chunk_images`] with or without a gradient binding per image.
    fn chunk_images_with(
        &self,
        req: &Request<'_>,
        call: &Checked,
        with_grad: bool,
    ) -> Result<Vec<(usize, usize)>> {
        let limits = self.device.limits();
        let max_binding = match req.strategy.binding_limit {
            0 => limits.max_storage_buffer_binding_size,
            n => n.min(limits.max_storage_buffer_binding_size),
        };
        // Per image: logits, labels, gradient (f32 scratch when 16-bit), each one binding.
        let batch = req.batch;
        let image_elems = (call.classes * call.pixels) as u64;
        let label_bytes = if batch.label_format == LabelFormat::Soft {
            image_elems * 4
        } else {
            batch.label_format.bytes(call.pixels as u64) + 4
        };
        let per_image = [
            image_elems * 4 / batch.logit_format.per_word(),
            label_bytes,
            if with_grad { image_elems * 4 } else { 0 },
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
            + 8;
        let align = storage_align(&self.device);
        let chunks =
            plan::chunks(call.batch, per_image, max_binding, align).map_err(Error::Input)?;
        self.last_chunks
            .store(chunks.len(), std::sync::atomic::Ordering::Relaxed);
        Ok(chunks)
    }

    /// Notes for tests which path a recording's grad stage took: chunked classes, the
    /// stats stage's stored softmax pieces and uniform coefficients (`last_grad_chunks`,
    /// `last_stored_pieces`, `last_uniform_coefs`).
    pub(super) fn note_grad_path(&self, variant: &Variant, kernels: &[Kernel]) {
        use std::sync::atomic::Ordering::Relaxed;
        let grad = kernels
            .iter()
            .any(|k| matches!(k, Kernel::Grad | Kernel::GradShared));
        self.last_grad_chunks.store(variant.grad_chunks, Relaxed);
        self.last_stored_pieces
            .store(variant.stored_pieces && grad, Relaxed);
        let writes_grad = kernels.iter().any(|k| {
            k.info()
                .bindings
                .contains(&(Binding::FinCoefs, Access::Uniform))
        });
        self.last_uniform_coefs
            .store(variant.uniform_coefs && writes_grad, Relaxed);
    }

    /// The call's pipeline configuration (with the kernel, its pipeline key).
    pub(super) fn variant(&self, req: &Request<'_>) -> Variant {
        let (spec, batch) = (req.spec, req.batch);
        Variant {
            classes: batch.shape.classes as u32,
            label_kind: batch.label_format.code(),
            logit_kind: batch.logit_format.code(),
            grad_kind: req.grad.map(|g| g.format.code()).unwrap_or(0),
            sigmoid: plan::sigmoid(spec),
            tempered: spec.tempered(),
            nhwc: batch.layout == Layout::Nhwc,
            n_pix: spec.terms.iter().filter(|t| t.is_pixel_term()).count() as u32,
            pixel_kinds: plan::pixel_kinds(spec),
            pixel_weighted: plan::pixel_weighted(spec),
            pixel_maps: plan::pixel_maps(spec),
            stat_kinds: plan::stat_kinds(spec),
            coefs_used: plan::coefs_used(spec),
            contiguous: req.strategy.contiguous_pixels,
            norms_only: false,
            class_sums: req.class_sums(),
            block: req.strategy.block_for(batch.shape.classes),
            stats_block: req.strategy.stats_block_for(batch.shape.classes),
            pixel_wg: req.strategy.pixel_workgroup,
            stage_pixels: req.strategy.stage_pixels,
            accumulate: req.accumulate,
            // Set from the call's bound ranges once they are planned (`plan::quads`).
            quads: false,
            grad_chunks: self.grad_chunks(req),
            chunk_quads: false,
            index_checks: req.strategy.index_checks,
            stored_pieces: self.pieces_bytes(req) > 0,
            uniform_coefs: self.uniform_coefs(req),
        }
    }

    /// Whether the gradient reads the coefficients through `Binding::FinCoefs`
    /// (`Strategy::uniform_coefs`): where the spec has statistic terms (else there is
    /// nothing to read) and the whole batch's table fits the binding.
    fn uniform_coefs(&self, req: &Request<'_>) -> bool {
        let shape = req.batch.shape;
        let rows = req.batch.total_batch.max(shape.batch) * shape.classes;
        req.strategy.uniform_coefs
            && plan::stat_kinds(req.spec) != 0
            && rows <= self.coef_rows() as usize
    }

    /// Whether the grad stage takes every class in chunks (`Variant::grad_chunks`).
    fn grad_chunks(&self, req: &Request<'_>) -> bool {
        let classes = req.batch.shape.classes;
        req.strategy.grad_chunks && classes > req.strategy.stats_block_for(classes) as usize
    }

    /// Bytes of the workspace's `pieces` buffer, where the stats stage stores each pixel's
    /// softmax pieces for the chunked grad stage (pixels.wgsl `STORED_PIECES`); 0 where it
    /// stores none: no chunked softmax gradient, a call that ends before finalize (the
    /// two-phase API's statistics, whose gradient comes from a call of its own), statistics
    /// given by the caller (no stats pass runs before the grad stage), or more than one
    /// binding can hold (the grad stage then finds the pieces itself).
    fn pieces_bytes(&self, req: &Request<'_>) -> u64 {
        let shape = req.batch.shape;
        let total = req.batch.total_batch.max(shape.batch);
        let bytes = 16 * (total * shape.pixels()) as u64;
        let fits = bytes <= self.device.limits().max_storage_buffer_binding_size;
        let stats_then_grad = req.finalize && req.given_stats.is_none();
        if self.grad_chunks(req) && !plan::sigmoid(req.spec) && stats_then_grad && fits {
            bytes
        } else {
            0
        }
    }

    /// Writes the call's uploads: term records, poison, fresh status words, given statistics.
    fn upload(
        &self,
        req: &Request<'_>,
        call: &Checked,
        ws: &Workspace,
        params: &[f32],
    ) -> Result<()> {
        let q = &self.queue;
        q.write_buffer(&ws.params, 0, bytemuck::cast_slice(params));
        if req.poison {
            let s = &ws.sizes;
            for (b, size) in [
                (&ws.partial, s.partial),
                (&ws.stats, s.stats),
                (&ws.fin, s.fin),
                (&ws.map, s.map),
                (&ws.pieces, s.pieces),
            ] {
                q.write_buffer(b, 0, &vec![0xFFu8; size as usize]);
            }
        }
        // Counters of bad input at 0, their first positions at "none".
        q.write_buffer(
            &ws.check,
            0,
            bytemuck::cast_slice(&[0u32, u32::MAX, 0, u32::MAX]),
        );
        if let Some(st) = req.given_stats {
            let rows = stats_to_rows(st, req.spec, call.total, call.classes)?;
            q.write_buffer(&ws.stats, 0, bytemuck::cast_slice(&rows));
        }
        Ok(())
    }

    /// Checks a request and builds its dispatches (pipelines, bind groups, uploads) without
    /// touching the caller's encoder.
    fn prepare(&self, req: &Request<'_>) -> Result<Prepared> {
        let call = check_request(req)?;
        // The workgroup this image size runs with (larger for very large images).
        let req = &Request {
            strategy: req.strategy.for_call(
                call.pixels,
                call.classes,
                req.batch.label_format == LabelFormat::Soft,
            ),
            ..*req
        };
        req.strategy.validate(&self.device, &self.info)?;
        let cpu = self.info.device_type == wgpu::DeviceType::Cpu;
        if let Some(e) = super::strategy::tile_loop_error(&req.strategy, call.pixels, cpu) {
            return Err(e);
        }
        let (spec, shape) = (req.spec, req.batch.shape);
        let chunks = self.chunk_images(req, &call)?;
        // A forward recording reserves its backward's slots after its own.
        let backward_chunks = if req.backward_slots {
            self.chunk_images_with(req, &call, true)?.len()
        } else {
            0
        };
        let max_chunk = chunks.iter().map(|c| c.1).max().unwrap_or(1) as u64;
        let params = plan::pack_params(spec, shape);
        let rows_per_tile = req.strategy.rows_per_tile(&self.info);
        let map_bytes = if plan::wants_loss_map(spec) {
            4 * layout::MAX_PIXEL_TERMS as u64 * (call.total * call.pixels) as u64
        } else {
            4
        };
        let image_elems = (call.classes * call.pixels) as u64;
        // The one-pass form has no grad stage to read them.
        let stored_pieces = if one_pass(req, &call) {
            0
        } else {
            self.pieces_bytes(req)
        };
        let key = WorkspaceKey {
            total_batch: call.total,
            classes: call.classes,
            spatial: call.pixels,
            terms: spec.terms.len(),
            params_len: params.len(),
            dims_slots: chunks.len() + 1 + backward_chunks,
            scratch: if call.narrow {
                max_chunk * image_elems * 4
            } else {
                0
            },
            map: map_bytes,
            pieces: stored_pieces,
            rows_per_tile,
            stats_tile: req.strategy.stats_tile(),
        };
        let mut caches = self.lock()?;
        let ws = self.workspace(&mut caches, &key);
        self.upload(req, &call, &ws, &params)?;
        let fin = FinLayout::new(call.total, call.classes, spec.terms.len());
        let mut base = plan::dims(spec, shape, &fin, &req.strategy, rows_per_tile);
        base.fin_sums_partial = finalize_sums(req, call.total, &base) as u32;
        let align = storage_align(&self.device);
        let (slots, plans) = plan_chunks(req, &call, &chunks, base, align);
        let mut dims_bytes = vec![0u8; (DIMS_SLOT as usize) * slots.len()];
        // (A forward's backward slots, after these, are written by its backward.)
        for (k, d) in slots.iter().enumerate() {
            let at = k * DIMS_SLOT as usize;
            dims_bytes[at..at + DIMS_SIZE as usize].copy_from_slice(bytemuck::bytes_of(d));
        }
        self.queue.write_buffer(&ws.dims, 0, &dims_bytes);

        let mut enc = Encoding {
            ctx: self,
            caches: &mut caches,
            req,
            call: &call,
            ws: &ws,
            variant: {
                let v = self.variant(req);
                Variant {
                    quads: plan::quads(&req.strategy, &v, call.pixels, &slots[1..]),
                    chunk_quads: plan::chunk_quads(&req.strategy, &v, call.pixels, &slots[1..]),
                    stored_pieces: stored_pieces > 0,
                    ..v
                }
            },
            dispatches: vec![],
            kernels: vec![],
        };
        match req.grad {
            Some(g) if one_pass(req, &call) => {
                // ARCHITECTURE.md, "One pass for pixel terms": the normalisers from the labels,
                // their scales from finalize, then one pass over the logits for statistics
                // and gradient, and finalize again for the values.
                enc.stats(&plans, true);
                enc.sum_tiles(&base);
                enc.finalize();
                enc.stats_with_grad(&plans, g);
                enc.sum_tiles(&base);
                enc.finalize();
            }
            _ => {
                if req.given_stats.is_none() {
                    enc.stats(&plans, false);
                    enc.sum_tiles(&base);
                }
                if req.finalize {
                    enc.finalize();
                    if let Some(g) = req.grad {
                        enc.grad(&plans, g);
                    }
                }
            }
        }
        let dispatches = enc.dispatches;
        self.last_quads.store(
            enc.variant.quads || enc.variant.chunk_quads,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.note_grad_path(&enc.variant, &enc.kernels);
        if let Ok(mut k) = self.last_kernels.lock() {
            *k = enc.kernels;
        }
        drop(caches);
        let mut prepared = self.finish_preparing(req, &call, ws, dispatches);
        if req.backward_slots {
            prepared.recorded.backward = Some(super::backward::BackwardSlots::new(
                chunks.len() + 1,
                backward_chunks,
            ));
        }
        Ok(prepared)
    }

    /// Numbers the recording and wraps its dispatches and results.
    fn finish_preparing(
        &self,
        req: &Request<'_>,
        call: &Checked,
        ws: Arc<Workspace>,
        dispatches: Vec<Dispatch>,
    ) -> Prepared {
        let seq = self
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.queue
            .write_buffer(&ws.seq, 0, bytemuck::bytes_of(&seq));
        Prepared {
            dispatches,
            clear_partial: req.given_stats.is_none()
                && (req.batch.image_offset != 0 || call.batch != call.total),
            recorded: Recorded {
                ws,
                seq,
                spec: req.spec.clone(),
                total_batch: call.total,
                classes: call.classes,
                spatial: call.pixels,
                strategy: req.strategy,
                backward: None,
                class_sums: req.class_sums(),
            },
        }
    }
}
