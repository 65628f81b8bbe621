//! One use of a loss: what its forward and backward operations share (the context, the
//! spec, and the forward's recording, whose coefficients the backward reads).

use segloss::gpu::{GpuContext, Recorded};
use segloss::LossSpec;
use std::sync::{Arc, Mutex};

/// The state of one loss evaluation, passed to the burn operations as an ordinary argument
/// (cloning shares it).
#[derive(Clone)]
pub struct Call(pub(crate) Arc<CallState>);

pub(crate) struct CallState {
    pub(crate) ctx: Arc<GpuContext>,
    pub(crate) spec: LossSpec,
    /// The forward's recording, set when the forward runs (with fusion, later than the call
    /// that created it); the backward and the report read it.
    pub(crate) forward: Mutex<Option<Recorded>>,
    /// The caller may read a report (`forward_with_report`): the forward keeps the
    /// proportions. Without one, a spec of pixel terms only leaves the per-class sums out
    /// (`GpuContext::record_forward_loss`).
    pub(crate) report: bool,
}

impl Call {
    pub(crate) fn new(ctx: Arc<GpuContext>, spec: LossSpec, report: bool) -> Self {
        Call(Arc::new(CallState {
            ctx,
            spec,
            forward: Mutex::new(None),
            report,
        }))
    }
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("terms", &self.0.spec.terms.len())
            .finish()
    }
}
