//! [`SeglossOps`] on burn's cubecl backend: segloss's passes recorded on the wgpu buffers
//! that burn's tensors live in (burn packs tensors into shared pages; segloss binds
//! distinct ranges of one buffer and refuses overlapping ones).

use crate::call::Call;
use crate::ops::SeglossOps;
use burn::tensor::DType;
use burn_cubecl::cubecl::wgpu::{AutoCompiler, WgpuServer};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use segloss::gpu::{BufferRegion, DeviceBatch, GradTarget};
use segloss::input::{LabelFormat, Layout, LogitFormat, Shape};

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

fn label_format(dtype: DType) -> LabelFormat {
    match dtype {
        DType::I64 => LabelFormat::I64,
        _ => LabelFormat::I32,
    }
}

/// Records the forward and puts the loss into a new one-float tensor.
fn forward(logits: CubeTensor, labels: CubeTensor, soft: bool, call: Call) -> CubeTensor {
    let (z, y, layout) = if soft {
        let (z, g, layout) = layout_of(logits, Some(labels));
        (z, g.expect("targets given"), layout)
    } else {
        let (z, _, layout) = layout_of(logits, None);
        (z, into_contiguous(labels), layout)
    };
    let client = z.client.clone();
    let out = CubeTensor::new_contiguous(
        client.clone(),
        z.device.clone(),
        [1].into(),
        client.empty(4),
        DType::F32,
    );
    client
        .flush()
        .unwrap_or_else(|e| panic!("segloss-burn: flushing burn's work: {e:?}"));
    let (zr, yr, lr) = (resource!(z), resource!(y), resource!(out));
    let (zr, yr, lr) = (zr.resource(), yr.resource(), lr.resource());
    let shape = shape_of(&z);
    let batch = DeviceBatch {
        layout,
        logits: BufferRegion {
            buffer: &zr.buffer,
            offset: zr.offset,
        },
        logit_format: logit_format(z.dtype),
        labels: BufferRegion {
            buffer: &yr.buffer,
            offset: yr.offset,
        },
        label_format: if soft {
            LabelFormat::Soft
        } else {
            label_format(y.dtype)
        },
        ..DeviceBatch::new(&shape, &zr.buffer, &yr.buffer, LabelFormat::I32)
    };
    let state = &call.0;
    let ctx = &state.ctx;
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let loss = BufferRegion {
        buffer: &lr.buffer,
        offset: lr.offset,
    };
    // Every input error was refused by `SeglossLoss::forward` before this op existed; what
    // is left is a broken invariant, reported like burn's own kernel failures.
    let recorded = ctx
        .record_forward(&mut enc, &state.spec, &batch, Some(loss))
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
    let (z, y, layout) = if soft {
        let (z, g, layout) = layout_of(logits, Some(labels));
        (z, g.expect("targets given"), layout)
    } else {
        let (z, _, layout) = layout_of(logits, None);
        (z, into_contiguous(labels), layout)
    };
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
    client
        .flush()
        .unwrap_or_else(|e| panic!("segloss-burn: flushing burn's work: {e:?}"));
    let (zr, yr, ur, gr) = (
        resource!(z),
        resource!(y),
        resource!(upstream),
        resource!(grad),
    );
    let (zr, yr, ur, gr) = (zr.resource(), yr.resource(), ur.resource(), gr.resource());
    let shape = shape_of(&z);
    let batch = DeviceBatch {
        layout,
        logits: BufferRegion {
            buffer: &zr.buffer,
            offset: zr.offset,
        },
        logit_format: logit_format(z.dtype),
        labels: BufferRegion {
            buffer: &yr.buffer,
            offset: yr.offset,
        },
        label_format: if soft {
            LabelFormat::Soft
        } else {
            label_format(y.dtype)
        },
        ..DeviceBatch::new(&shape, &zr.buffer, &yr.buffer, LabelFormat::I32)
    };
    let state = &call.0;
    let ctx = &state.ctx;
    let forward = state.forward.lock().unwrap_or_else(|p| p.into_inner());
    let recorded = forward
        .as_ref()
        .expect("segloss-burn: the backward runs after its forward (stream order)");
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let target = GradTarget {
        region: BufferRegion {
            buffer: &gr.buffer,
            offset: gr.offset,
        },
        format: segloss::input::GradFormat::F32,
    };
    let up = BufferRegion {
        buffer: &ur.buffer,
        offset: ur.offset,
    };
    ctx.record_backward(&mut enc, recorded, &batch, target, Some(up), false)
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
