//! segloss's fused segmentation losses as differentiable burn operations.
//!
//! burn and segloss share one wgpu device ([`SharedDevice`]); a [`SeglossLoss`] takes burn
//! tensors, records segloss's passes on the buffers they live in (no host copy, no cast
//! kernel for i32/i64 labels), and registers a backward step with burn's autodiff that runs
//! only segloss's gradient pass, scaled on the device by the upstream gradient.
//!
//! ```no_run
//! use burn::tensor::{Distribution, Int, Tensor};
//! use segloss_burn::{SeglossLoss, SharedDevice};
//!
//! # fn main() -> segloss::Result<()> {
//! let shared = SharedDevice::new()?; // one wgpu device for burn and segloss
//! let device = shared.device().clone().autodiff();
//! let loss_fn = SeglossLoss::dice_ce(&shared)?;
//! let logits = Tensor::<4>::random([2, 4, 32, 32], Distribution::Normal(0.0, 1.0), &device)
//!     .require_grad();
//! let labels = Tensor::<3, Int>::random([2, 32, 32], Distribution::Uniform(0.0, 4.0), &device);
//! let loss = loss_fn.forward(logits.clone(), labels)?;
//! let grads = loss.backward();
//! let dz = logits.grad(&grads).expect("logits are tracked");
//! # Ok(()) }
//! ```
//!
//! Design: ARCHITECTURE.md of the repository, "segloss-burn".

#![warn(missing_docs)]

mod call;
pub mod composed;
mod cube;
mod device;
mod loss;
pub mod ops;
pub mod synthetic;
pub mod unet;

pub use call::Call;
pub use device::{burn_features, SharedDevice};
pub use loss::{Report, SeglossLoss};
pub use segloss;
