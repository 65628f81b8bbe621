//! The loss a burn user writes like any other: built from a [`LossSpec`] (or a typed
//! builder), `forward(logits, labels) -> Tensor<1>`, differentiable through burn's autodiff.
//! Every input error is an `Err` here, before any operation exists: inside burn an
//! operation cannot fail without a panic that poisons its device.

use crate::call::Call;
use crate::device::SharedDevice;
use crate::ops::SeglossOps;
use burn::backend::Dispatch;
use burn::tensor::{DType, Int, Tensor};
use segloss::output::LossOutput;
use segloss::spec::Activation;
use segloss::{Error, LossSpec, Result};

/// A fused segmentation loss on a [`SharedDevice`]: any weighted sum of segloss's terms,
/// its loss and gradient in segloss's few passes instead of burn's composed tensor ops.
#[derive(Clone, Debug)]
pub struct SeglossLoss {
    spec: LossSpec,
    shared: SharedDevice,
}

/// The loss's report, read after the loss is computed: loss, term values, predicted and
/// target proportions and the region-size decomposition (segloss's [`LossOutput`]).
#[derive(Debug)]
pub struct Report {
    call: Call,
    loss: Tensor<1>,
}

impl Report {
    /// Waits for the loss and reads the report (one small read-back).
    pub fn read(self) -> Result<LossOutput> {
        self.loss
            .clone()
            .try_into_data()
            .map_err(|e| Error::Gpu(format!("computing the loss: {e:?}")))?;
        self.read_recorded()
    }

    /// The same without blocking the caller's thread while burn computes the loss.
    pub async fn read_async(self) -> Result<LossOutput> {
        self.loss
            .clone()
            .into_data_async()
            .await
            .map_err(|e| Error::Gpu(format!("computing the loss: {e:?}")))?;
        self.read_recorded()
    }

    fn read_recorded(&self) -> Result<LossOutput> {
        let state = &self.call.0;
        let forward = state.forward.lock().unwrap_or_else(|p| p.into_inner());
        let recorded = forward
            .as_ref()
            .ok_or_else(|| Error::Gpu("the loss ran but left no recording".into()))?;
        recorded.read(&state.ctx)
    }
}

impl SeglossLoss {
    /// A loss of any spec (checked now; the classes are checked at each call).
    pub fn new(spec: LossSpec, shared: &SharedDevice) -> Result<Self> {
        spec.validate(None)?;
        Ok(SeglossLoss {
            spec,
            shared: shared.clone(),
        })
    }

    fn from_json(json: &str, shared: &SharedDevice) -> Result<Self> {
        Self::new(LossSpec::from_json(json)?, shared)
    }

    /// Softmax cross-entropy (mean over pixels, PyTorch's `F.cross_entropy`).
    pub fn cross_entropy(shared: &SharedDevice) -> Result<Self> {
        Self::from_json(r#"{"terms": [{"kind": "cross_entropy"}]}"#, shared)
    }

    /// Soft Dice (MONAI's `DiceLoss(softmax=True)`).
    pub fn dice(shared: &SharedDevice) -> Result<Self> {
        Self::from_json(r#"{"terms": [{"kind": "dice"}]}"#, shared)
    }

    /// Cross-entropy plus soft Dice (MONAI's `DiceCELoss`).
    pub fn dice_ce(shared: &SharedDevice) -> Result<Self> {
        Self::from_json(
            r#"{"terms": [{"kind": "cross_entropy"}, {"kind": "dice"}]}"#,
            shared,
        )
    }

    /// Focal loss with focusing parameter γ.
    pub fn focal(gamma: f64, shared: &SharedDevice) -> Result<Self> {
        Self::from_json(
            &format!(r#"{{"terms": [{{"kind": "focal", "gamma": {gamma}}}]}}"#),
            shared,
        )
    }

    /// Tversky loss with weights α (false positives) and β (false negatives).
    pub fn tversky(alpha: f64, beta: f64, shared: &SharedDevice) -> Result<Self> {
        Self::from_json(
            &format!(r#"{{"terms": [{{"kind": "tversky", "alpha": {alpha}, "beta": {beta}}}]}}"#),
            shared,
        )
    }

    /// Cross-entropy plus λ·R(û, τ), the region-proportion penalty (`"l1"`, `"l2"`, `"kl"`
    /// or `"log_sum"`) on softmax(T·z) proportions.
    pub fn ce_region(
        lambda: f64,
        penalty: &str,
        temperature: f64,
        shared: &SharedDevice,
    ) -> Result<Self> {
        Self::from_json(
            &format!(
                r#"{{"terms": [{{"kind": "cross_entropy"}}, {{"kind": "region", "weight": {lambda}, "penalty": "{penalty}", "temperature": {temperature}}}]}}"#
            ),
            shared,
        )
    }

    /// The spec.
    pub fn spec(&self) -> &LossSpec {
        &self.spec
    }

    /// The loss of logits (B, C, *spatial) against class indices (B, *spatial), i32 or i64,
    /// negative values and the spec's `ignore_index` ignored. Differentiable in the logits
    /// when they are tracked by burn's autodiff.
    pub fn forward<const D: usize, const L: usize>(
        &self,
        logits: Tensor<D>,
        labels: Tensor<L, Int>,
    ) -> Result<Tensor<1>> {
        Ok(self.forward_labels(logits, labels, false)?.0)
    }

    /// [`SeglossLoss::forward`] and a [`Report`] to read when wanted. Without a report a
    /// spec of pixel terms only (cross-entropy, focal, BCE) leaves out the per-class sums
    /// the proportions come from (`GpuContext::record_forward_loss`); with one it keeps them.
    pub fn forward_with_report<const D: usize, const L: usize>(
        &self,
        logits: Tensor<D>,
        labels: Tensor<L, Int>,
    ) -> Result<(Tensor<1>, Report)> {
        self.forward_labels(logits, labels, true)
    }

    fn forward_labels<const D: usize, const L: usize>(
        &self,
        logits: Tensor<D>,
        labels: Tensor<L, Int>,
        report: bool,
    ) -> Result<(Tensor<1>, Report)> {
        self.check_logits(&logits)?;
        let dims = logits.dims();
        let want: Vec<usize> = std::iter::once(dims[0])
            .chain(dims[2..].iter().copied())
            .collect();
        if labels.dims().as_slice() != want.as_slice() {
            return Err(Error::Input(format!(
                "labels of shape {:?} for logits {:?}: expected {want:?} (B, *spatial)",
                labels.dims(),
                dims
            )));
        }
        if !matches!(labels.dtype(), DType::I32 | DType::I64) {
            return Err(Error::Input(format!(
                "labels are {:?}: segloss reads i32 or i64 class indices",
                labels.dtype()
            )));
        }
        self.check_device("labels", &labels.device())?;
        if self.spec.activation == Activation::Sigmoid {
            return Err(Error::Input(
                "a sigmoid spec needs soft targets of the logits' shape: use forward_soft".into(),
            ));
        }
        if self.spec.ignore_index > i32::MAX as i64 {
            return Err(Error::Input(format!(
                "ignore_index {} does not fit the i32 comparison segloss makes",
                self.spec.ignore_index
            )));
        }
        let (logits, labels) = (logits.into_dispatch(), labels.into_dispatch());
        Ok(self.run(report, |call| Dispatch::segloss_loss(logits, labels, call)))
    }

    /// The loss of logits against soft targets (or sigmoid masks) of the same shape, f32 in
    /// [0, 1]. The targets are constants (no gradient flows to them).
    pub fn forward_soft<const D: usize>(
        &self,
        logits: Tensor<D>,
        targets: Tensor<D>,
    ) -> Result<Tensor<1>> {
        Ok(self.forward_soft_targets(logits, targets, false)?.0)
    }

    /// [`SeglossLoss::forward_soft`] and a [`Report`].
    pub fn forward_soft_with_report<const D: usize>(
        &self,
        logits: Tensor<D>,
        targets: Tensor<D>,
    ) -> Result<(Tensor<1>, Report)> {
        self.forward_soft_targets(logits, targets, true)
    }

    fn forward_soft_targets<const D: usize>(
        &self,
        logits: Tensor<D>,
        targets: Tensor<D>,
        report: bool,
    ) -> Result<(Tensor<1>, Report)> {
        self.check_logits(&logits)?;
        if targets.dims() != logits.dims() {
            return Err(Error::Input(format!(
                "soft targets of shape {:?} for logits {:?}: they must match",
                targets.dims(),
                logits.dims()
            )));
        }
        if targets.dtype() != DType::F32 {
            return Err(Error::Input(format!(
                "soft targets are {:?}: segloss reads f32",
                targets.dtype()
            )));
        }
        self.check_device("targets", &targets.device())?;
        let (logits, targets) = (logits.into_dispatch(), targets.detach().into_dispatch());
        Ok(self.run(report, |call| {
            Dispatch::segloss_loss_soft(logits, targets, call)
        }))
    }

    /// One evaluation: a new [`Call`], the operation `op` on it, and its report.
    fn run(
        &self,
        report: bool,
        op: impl FnOnce(Call) -> burn::backend::tensor::FloatTensor<Dispatch>,
    ) -> (Tensor<1>, Report) {
        let call = Call::new(self.shared.context().clone(), self.spec.clone(), report);
        let loss = Tensor::from_dispatch(op(call.clone()));
        let report = Report {
            call,
            loss: loss.clone(),
        };
        (loss, report)
    }

    fn check_device(&self, what: &str, device: &burn::tensor::Device) -> Result<()> {
        if device != self.shared.device() {
            return Err(Error::Input(format!(
                "the {what} are not on the loss's device (SharedDevice::device)"
            )));
        }
        Ok(())
    }

    fn check_logits<const D: usize>(&self, logits: &Tensor<D>) -> Result<()> {
        if D < 3 {
            return Err(Error::Input(format!(
                "logits need (B, C, *spatial): {D} dimensions given"
            )));
        }
        let dims = logits.dims();
        let shape = segloss::Shape::new(dims[0], dims[1], &dims[2..]);
        shape.check()?;
        self.spec.validate(Some(dims[1]))?;
        if logits.dtype() != DType::F32 {
            return Err(Error::Input(format!(
                "logits are {:?}: segloss-burn takes f32 logits (cast them first)",
                logits.dtype()
            )));
        }
        self.check_device("logits", &logits.device())?;
        Ok(())
    }
}
