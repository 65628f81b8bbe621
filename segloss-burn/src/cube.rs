//! [`SeglossOps`] on burn's cubecl backend: segloss's passes recorded on the wgpu buffers
//! that burn's tensors live in (burn packs tensors into shared pages; segloss binds
//! distinct ranges of one buffer and refuses overlapping ones).

use crate::call::Call;
use crate::ops::SeglossOps;
use burn::tensor::DType;
use burn_cubecl::cubecl::wgpu::{AutoCompiler, WgpuResource, WgpuServer};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use segloss::gpu::{BufferRegion, DeviceBatch, GradTarget};
use segloss::input::{GradFormat, LabelFormat, Layout, LogitFormat, Shape};

/// Where a tensor's elements sit: its wgpu buffer and byte offset. Holding the value pins
/// burn's allocation.
macro_rules! resource {
    ($t:expr) => {
        $t.client
            .get_resource::<WgpuServer<AutoCompiler>>($t.handle.clone())
            .unwrap_or_else(|e| panic!("segloss-burn: the tensor's wgpu buffer: {e:?}"))
    };
}

/// Whether the strides are those of a channels-last tensor permuted to (B, C, *spatial):
/// memory order B, *spatial, C, nothing between.
fn channels_last(t: &CubeTensor) -> bool {
    let (shape, strides) = (t.meta.shape(), t.meta.strides());
    let d = shape.num_dims();
    let c = shape[1];
    let mut expect = c;
    if strides[1] != 1 && c != 1 {
        return false;
    }
    for k in (2..d).rev() {
        if strides[k] != expect && shape[k] != 1 {
            return false;
        }
        expect *= shape[k];
    }
    strides[0] == expect || shape[0] == 1
}

/// The logits (and soft targets) as segloss reads them: contiguous, or channels-last in
/// place (no copy); anything else is made contiguous by burn first. Soft targets must share
/// the logits' layout.
fn layout_of(
    logits: CubeTensor,
    targets: Option<CubeTensor>,
) -> (CubeTensor, Option<CubeTensor>, Layout) {
    let tiled = |t: &CubeTensor| t.meta.is_tiled();
    let nhwc = |t: &CubeTensor| !tiled(t) && !t.is_contiguous() && channels_last(t);
    let logits_nhwc = nhwc(&logits);
    let targets_ok = targets.as_ref().is_none_or(|g| nhwc(g) == logits_nhwc);
    if logits_nhwc && targets_ok {
        return (logits, targets, Layout::Nhwc);
    }
    (
        into_contiguous(logits),
        targets.map(into_contiguous),
        Layout::Nchw,
    )
}

fn shape_of(t: &CubeTensor) -> Shape {
    let dims = t.meta.shape().as_slice().to_vec();
    Shape::new(dims[0], dims[1], &dims[2..])
}

fn logit_format(dtype: DType) -> LogitFormat {
    match dtype {
        DType::F16 => LogitFormat::F16,
        DType::BF16 => LogitFormat::Bf16,
        _ => LogitFormat::F32,
    }
}

/// Soft targets, or the index format of the labels' dtype (`SeglossLoss` admits i32 and
/// i64 only).
fn label_format(dtype: DType, soft: bool) -> LabelFormat {
    match (soft, dtype) {
        (true, _) => LabelFormat::Soft,
        (false, DType::I64) => LabelFormat::I64,
        (false, _) => LabelFormat::I32,
    }
}

/// The logits and labels as segloss reads them (see [`layout_of`]; index labels made
/// contiguous), and the layout.
fn inputs(logits: CubeTensor, labels: CubeTensor, soft: bool) -> (CubeTensor, CubeTensor, Layout) {
    if soft {
        let (z, g, layout) = layout_of(logits, Some(labels));
        (z, g.expect("targets given"), layout)
    } else {
        let (z, _, layout) = layout_of(logits, None);
        (z, into_contiguous(labels), layout)
    }
}

/// Puts burn's pending work on the shared queue, ahead of segloss's submission.
fn flush(t: &CubeTensor) {
    t.client
        .flush()
        .unwrap_or_else(|e| panic!("segloss-burn: flushing burn's work: {e:?}"));
}

fn region(r: &WgpuResource) -> BufferRegion<'_> {
    BufferRegion {
        buffer: &r.buffer,
        offset: r.offset,
    }
}

/// The device batch of logits `z` and labels `y` at their resources.
fn device_batch<'a>(
    shape: &'a Shape,
    layout: Layout,
    (z, zr): (&CubeTensor, &'a WgpuResource),
    (y, yr): (&CubeTensor, &'a WgpuResource),
    soft: bool,
) -> DeviceBatch<'a> {
    DeviceBatch {
        layout,
        logits: region(zr),
        logit_format: logit_format(z.dtype),
        labels: region(yr),
        ..DeviceBatch::new(shape, &zr.buffer, &yr.buffer, label_format(y.dtype, soft))
    }
}

/// Records the forward and puts the loss into a new one-float tensor.
fn forward(logits: CubeTensor, labels: CubeTensor, soft: bool, call: Call) -> CubeTensor {
    let (z, y, layout) = inputs(logits, labels, soft);
    let client = z.client.clone();
    let out = CubeTensor::new_contiguous(
        client.clone(),
        z.device.clone(),
        [1].into(),
        client.empty(4),
        DType::F32,
    );
    flush(&z);
    let (zr, yr, lr) = (resource!(z), resource!(y), resource!(out));
    let shape = shape_of(&z);
    let batch = device_batch(
        &shape,
        layout,
        (&z, zr.resource()),
        (&y, yr.resource()),
        soft,
    );
    let state = &call.0;
    let ctx = &state.ctx;
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    // Every input error was refused by `SeglossLoss::forward` before this op existed; what
    // is left is a broken invariant, reported like burn's own kernel failures.
    let loss = Some(region(lr.resource()));
    let recorded = if state.report {
        ctx.record_forward(&mut enc, &state.spec, &batch, loss)
    } else {
        ctx.record_forward_loss(&mut enc, &state.spec, &batch, loss)
    }
    .unwrap_or_else(|e| panic!("segloss-burn forward: {e}"));
    ctx.queue().submit([enc.finish()]);
    *state.forward.lock().unwrap_or_else(|p| p.into_inner()) = Some(recorded);
    out
}

/// Records the backward of the call's forward into a new tensor of the logits' shape and
/// strides.
fn backward(
    logits: CubeTensor,
    labels: CubeTensor,
    soft: bool,
    upstream: CubeTensor,
    call: Call,
) -> CubeTensor {
    let (z, y, layout) = inputs(logits, labels, soft);
    let upstream = into_contiguous(upstream);
    let client = z.client.clone();
    let n = z.meta.shape().num_elements();
    let grad = CubeTensor::new(
        client.clone(),
        client.empty(4 * n),
        *z.meta.clone(),
        z.device.clone(),
        DType::F32,
    );
    flush(&z);
    let (zr, yr, ur, gr) = (
        resource!(z),
        resource!(y),
        resource!(upstream),
        resource!(grad),
    );
    let shape = shape_of(&z);
    let batch = device_batch(
        &shape,
        layout,
        (&z, zr.resource()),
        (&y, yr.resource()),
        soft,
    );
    let state = &call.0;
    let ctx = &state.ctx;
    let forward = state.forward.lock().unwrap_or_else(|p| p.into_inner());
    let recorded = forward
        .as_ref()
        .expect("segloss-burn: the backward runs after its forward (stream order)");
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let target = GradTarget {
        region: region(gr.resource()),
        format: GradFormat::F32,
    };
    let up = Some(region(ur.resource()));
    ctx.record_backward(&mut enc, recorded, &batch, target, up, false)
        .unwrap_or_else(|e| panic!("segloss-burn backward: {e}"));
    ctx.queue().submit([enc.finish()]);
    grad
}

impl SeglossOps for CubeBackend {
    fn segloss_loss(logits: CubeTensor, labels: CubeTensor, call: Call) -> CubeTensor {
        forward(logits, labels, false, call)
    }

    fn segloss_loss_soft(logits: CubeTensor, targets: CubeTensor, call: Call) -> CubeTensor {
        forward(logits, targets, true, call)
    }

    fn segloss_grad(
        logits: CubeTensor,
        labels: CubeTensor,
        upstream: CubeTensor,
        call: Call,
    ) -> CubeTensor {
        backward(logits, labels, false, upstream, call)
    }

    fn segloss_grad_soft(
        logits: CubeTensor,
        targets: CubeTensor,
        upstream: CubeTensor,
        call: Call,
    ) -> CubeTensor {
        backward(logits, targets, true, upstream, call)
    }
}
