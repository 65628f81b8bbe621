//! Forward and backward as separate recordings, for autodiff frameworks (segloss-burn):
//! the forward records statistics and finalize and can copy the loss into a caller's
//! buffer; the backward records only the gradient pass, from the forward's coefficients,
//! scaled on the device by an upstream gradient read from a caller's buffer and optionally
//! added to the target. Nothing logits-sized lives between the two, and no extra multiply
//! runs (ARCHITECTURE.md, "Forward and backward").
//!
//! The forward reserves `Dims` slots for exactly one backward: a second backward of one
//! forward would rewrite them (through `queue.write_buffer`, which runs before any command
//! of the next submission) under a first one not yet submitted, so it is refused.

use super::batch::{BufferRegion, DeviceBatch, GradTarget};
use super::context::{storage_align, GpuContext};
use super::layout::{Dims, FinLayout, DIMS_SLOT};
use super::plan;
use super::readback::Recorded;
use super::record::{
    bound_ranges, check_request, encode_dispatches, plan_chunks, Encoding, Request,
};
use super::stages::Variant;
use crate::error::{Error, Result};
use crate::input::GradFormat;
use crate::spec::LossSpec;
use std::sync::atomic::{AtomicBool, Ordering};

/// The `Dims` slots a forward recording reserved for its backward.
#[derive(Debug)]
pub(super) struct BackwardSlots {
    /// Index of the first reserved slot.
    first: usize,
    /// Slots reserved (the backward's chunks).
    count: usize,
    /// Whether the backward has been recorded.
    taken: AtomicBool,
}

impl BackwardSlots {
    pub(super) fn new(first: usize, count: usize) -> Self {
        BackwardSlots {
            first,
            count,
            taken: AtomicBool::new(false),
        }
    }
}

/// Checks a caller's 4-byte range the recording copies to or from, against the arrays the
/// call binds.
fn check_scalar_region(
    what: &str,
    r: &BufferRegion<'_>,
    usage: wgpu::BufferUsages,
    bound: &[(&str, BufferRegion<'_>, u64)],
) -> Result<()> {
    if !r.offset.is_multiple_of(4) {
        return Err(Error::Input(format!(
            "the {what} offset {} is not a multiple of 4 bytes",
            r.offset
        )));
    }
    if r.offset + 4 > r.buffer.size() {
        return Err(Error::Input(format!(
            "the {what} buffer holds {} bytes, the call needs {}",
            r.buffer.size(),
            r.offset + 4
        )));
    }
    if !r.buffer.usage().contains(usage) {
        return Err(Error::Input(format!(
            "the {what} buffer needs {usage:?} usage (it has {:?})",
            r.buffer.usage()
        )));
    }
    for (name, b, len) in bound {
        if *b.buffer == *r.buffer && b.offset < r.offset + 4 && r.offset < b.offset + len {
            return Err(Error::Input(format!(
                "the {what} (bytes {}..{}) overlaps the {name} (bytes {}..{})",
                r.offset,
                r.offset + 4,
                b.offset,
                b.offset + len
            )));
        }
    }
    Ok(())
}

impl GpuContext {
    /// Backend API, forward half: records the statistics and finalize passes (no gradient)
    /// and, with `loss`, copies the total loss (one f32) into that range of a caller's
    /// buffer (COPY_DST usage) at the end. Its handle reads like [`GpuContext::record`]'s and
    /// can be passed once to [`GpuContext::record_backward`].
    pub fn record_forward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &LossSpec,
        batch: &DeviceBatch<'_>,
        loss: Option<BufferRegion<'_>>,
    ) -> Result<Recorded> {
        self.forward(encoder, spec, batch, loss, true)
    }

    /// [`GpuContext::record_forward`] for a caller that reads the loss and its terms only:
    /// a spec of pixel terms only leaves the per-class sums out, as
    /// [`GpuContext::record_loss`] does (segloss-burn's loss without a report).
    pub fn record_forward_loss(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &LossSpec,
        batch: &DeviceBatch<'_>,
        loss: Option<BufferRegion<'_>>,
    ) -> Result<Recorded> {
        self.forward(encoder, spec, batch, loss, false)
    }

    fn forward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        spec: &LossSpec,
        batch: &DeviceBatch<'_>,
        loss: Option<BufferRegion<'_>>,
        proportions: bool,
    ) -> Result<Recorded> {
        if let Some(l) = &loss {
            check_scalar_region(
                "loss",
                l,
                wgpu::BufferUsages::COPY_DST,
                &bound_ranges(batch, None),
            )?;
        }
        let req = Request {
            backward_slots: true,
            proportions,
            ..Request::full(self, spec, batch, None)
        };
        let recorded = self.record_request(encoder, req, None)?;
        if let Some(l) = loss {
            let (fin, at) = recorded.loss_location();
            encoder.copy_buffer_to_buffer(fin, at, l.buffer, l.offset, 4);
        }
        Ok(recorded)
    }

    /// Backend API, backward half: records the gradient pass of `forward` (a
    /// [`GpuContext::record_forward`] handle) for the same batch shape, writing
    /// `upstream · ∂loss/∂logits` into `grad` (f32), or adding it to what `grad` holds with
    /// `accumulate`. `upstream` is one f32 in a caller's buffer (COPY_SRC usage), read on the
    /// device when the recording runs (`None`: 1). Record it into the forward's encoder
    /// after the forward, or into one submitted after it; once per forward.
    pub fn record_backward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        forward: &Recorded,
        batch: &DeviceBatch<'_>,
        grad: GradTarget<'_>,
        upstream: Option<BufferRegion<'_>>,
        accumulate: bool,
    ) -> Result<()> {
        let Some(slots) = &forward.backward else {
            return Err(Error::Input(
                "record_backward needs a handle from record_forward".into(),
            ));
        };
        let taken = || {
            Error::Input(
                "this forward's backward has already been recorded: record the forward again \
                 for another gradient"
                    .into(),
            )
        };
        if slots.taken.load(Ordering::Acquire) {
            return Err(taken());
        }
        let shape = batch.shape;
        if (shape.batch, shape.classes, shape.pixels())
            != (forward.total_batch, forward.classes, forward.spatial)
            || batch.image_offset != 0
            || (batch.total_batch != 0 && batch.total_batch != shape.batch)
        {
            return Err(Error::Input(format!(
                "the backward's batch ({} images, C = {}, {} pixels each) is not its forward's \
                 ({} images, C = {}, {} pixels)",
                shape.batch,
                shape.classes,
                shape.pixels(),
                forward.total_batch,
                forward.classes,
                forward.spatial
            )));
        }
        if grad.format != GradFormat::F32 {
            return Err(Error::Input(
                "record_backward writes f32 gradients; for a 16-bit gradient use record()".into(),
            ));
        }
        if let Some(u) = &upstream {
            check_scalar_region(
                "upstream gradient",
                u,
                wgpu::BufferUsages::COPY_SRC,
                &bound_ranges(batch, Some(grad)),
            )?;
        }
        let req = Request {
            strategy: forward.strategy,
            accumulate,
            ..Request::full(self, &forward.spec, batch, Some(grad))
        };
        let dispatches = self.scoped(|| {
            let call = check_request(&req)?;
            let chunks = self.chunk_images(&req, &call)?;
            if chunks.len() > slots.count {
                return Err(Error::Gpu(format!(
                    "the backward needs {} chunks, its forward reserved {}",
                    chunks.len(),
                    slots.count
                )));
            }
            let ws = forward.ws.clone();
            let fin = FinLayout::new(call.total, call.classes, forward.spec.terms.len());
            let rows_per_tile = req.strategy.rows_per_tile(&self.info);
            let base = plan::dims(&forward.spec, shape, &fin, &req.strategy, rows_per_tile);
            let align = storage_align(&self.device);
            let (dims, mut plans) = plan_chunks(&req, &call, &chunks, base, align);
            // The chunk slots (not the header, slot 0) go to the reserved ones.
            let size = std::mem::size_of::<Dims>();
            let mut bytes = vec![0u8; DIMS_SLOT as usize * (dims.len() - 1)];
            for (k, d) in dims[1..].iter().enumerate() {
                let at = k * DIMS_SLOT as usize;
                bytes[at..at + size].copy_from_slice(bytemuck::bytes_of(d));
            }
            let first = slots.first as u64 * DIMS_SLOT;
            self.queue.write_buffer(&ws.dims, first, &bytes);
            for p in &mut plans {
                p.slot = p.slot - DIMS_SLOT + first;
            }
            let mut caches = self.lock()?;
            let mut enc = Encoding {
                ctx: self,
                caches: &mut caches,
                req: &req,
                call: &call,
                ws: &ws,
                variant: {
                    let v = self.variant(&req);
                    Variant {
                        quads: plan::quads(&req.strategy, &v, call.pixels, &dims[1..]),
                        chunk_quads: plan::chunk_quads(&req.strategy, &v, call.pixels, &dims[1..]),
                        ..v
                    }
                },
                dispatches: vec![],
                kernels: vec![],
            };
            enc.grad(&plans, grad);
            self.last_quads.store(
                enc.variant.quads || enc.variant.chunk_quads,
                Ordering::Relaxed,
            );
            self.note_grad_path(&enc.variant, &enc.kernels);
            Ok(enc.dispatches)
        })?;
        if slots.taken.swap(true, Ordering::AcqRel) {
            return Err(taken());
        }
        if let Some(u) = upstream {
            let at = 4 * forward.ws.fin_layout.upstream as u64;
            encoder.copy_buffer_to_buffer(u.buffer, u.offset, &forward.ws.fin, at, 4);
        }
        encode_dispatches(encoder, "segloss backward", &dispatches, None);
        Ok(())
    }
}
