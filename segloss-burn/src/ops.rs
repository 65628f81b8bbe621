//! The differentiable operation: a burn backend extension with a forward (loss) and a
//! backward (gradient) per label kind, implemented on burn's cubecl backend by recording
//! segloss's passes on the buffers burn's tensors live in, and on `Autodiff` by hand.
//!
//! The forward records statistics and finalize (`GpuContext::record_forward`), the loss
//! written straight into a one-float burn tensor; the backward records only the gradient
//! pass from the forward's coefficients, scaled on the device by the upstream gradient
//! tensor (`GpuContext::record_backward`). Both run where burn runs its own kernels (with
//! fusion, on its device thread, in stream order), after `client.flush()` has put burn's
//! pending work on the shared queue.

use crate::call::Call;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
#[cfg(feature = "fusion")]
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{backend_extension, Backend};
// The output shapes of the fusion wrapper (`#[fusion(meta = ..)]`, dropped without fusion).
#[cfg(feature = "fusion")]
use burn::tensor::DType;

/// segloss's loss and gradient as burn operations (implemented for burn's cubecl backend,
/// its fusion wrapper and `Autodiff`). Users call [`crate::SeglossLoss`], not these.
#[backend_extension(Autodiff, Cube, Fusion: cfg(feature = "fusion"))]
pub trait SeglossOps: Backend {
    /// The loss (shape `[1]`) of class-index labels.
    #[fusion(meta = |_l, _y, _c| TensorSpec::new([1].into(), DType::F32))]
    fn segloss_loss(
        logits: FloatTensor<Self>,
        labels: IntTensor<Self>,
        call: Call,
    ) -> FloatTensor<Self>;

    /// The loss (shape `[1]`) of soft targets of the logits' shape.
    #[fusion(meta = |_l, _g, _c| TensorSpec::new([1].into(), DType::F32))]
    fn segloss_loss_soft(
        logits: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        call: Call,
    ) -> FloatTensor<Self>;

    /// `upstream · ∂loss/∂logits` of the call's forward (class-index labels).
    #[fusion(meta = |l, _y, _u, _c| TensorSpec::new(l.shape.clone(), DType::F32))]
    fn segloss_grad(
        logits: FloatTensor<Self>,
        labels: IntTensor<Self>,
        upstream: FloatTensor<Self>,
        call: Call,
    ) -> FloatTensor<Self>;

    /// `upstream · ∂loss/∂logits` of the call's forward (soft targets).
    #[fusion(meta = |l, _g, _u, _c| TensorSpec::new(l.shape.clone(), DType::F32))]
    fn segloss_grad_soft(
        logits: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        call: Call,
    ) -> FloatTensor<Self>;
}

/// The backward step of the loss with class-index labels: the gradient of the logits only.
#[derive(Debug)]
struct IndexBackward;

impl<B: SeglossOps> Backward<B, 1> for IndexBackward {
    type State = (FloatTensor<B>, IntTensor<B>, Call);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, labels, call) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |up| {
            B::segloss_grad(logits, labels, up, call)
        });
    }
}

/// The backward step of the loss with soft targets (constants: no gradient of their own).
#[derive(Debug)]
struct SoftBackward;

impl<B: SeglossOps> Backward<B, 1> for SoftBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, Call);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, targets, call) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |up| {
            B::segloss_grad_soft(logits, targets, up, call)
        });
    }
}

impl<B: SeglossOps, C: CheckpointStrategy> SeglossOps for Autodiff<B, C> {
    fn segloss_loss(
        logits: FloatTensor<Self>,
        labels: IntTensor<Self>,
        call: Call,
    ) -> FloatTensor<Self> {
        match IndexBackward
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let z = logits.into_primitive();
                let loss = B::segloss_loss(z.clone(), labels.clone(), call.clone());
                prep.finish((z, labels, call), loss)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::segloss_loss(logits.into_primitive(), labels, call))
            }
        }
    }

    fn segloss_loss_soft(
        logits: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        call: Call,
    ) -> FloatTensor<Self> {
        let g = targets.into_primitive();
        match SoftBackward
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let z = logits.into_primitive();
                let loss = B::segloss_loss_soft(z.clone(), g.clone(), call.clone());
                prep.finish((z, g, call), loss)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::segloss_loss_soft(logits.into_primitive(), g, call))
            }
        }
    }

    fn segloss_grad(
        _logits: FloatTensor<Self>,
        _labels: IntTensor<Self>,
        _upstream: FloatTensor<Self>,
        _call: Call,
    ) -> FloatTensor<Self> {
        unimplemented!("segloss's gradient is not itself differentiable (first order only)")
    }

    fn segloss_grad_soft(
        _logits: FloatTensor<Self>,
        _targets: FloatTensor<Self>,
        _upstream: FloatTensor<Self>,
        _call: Call,
    ) -> FloatTensor<Self> {
        unimplemented!("segloss's gradient is not itself differentiable (first order only)")
    }
}
