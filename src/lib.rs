//! # segloss
//!
//! Fused segmentation losses and their gradients as WGSL compute kernels on wgpu (Vulkan,
//! Metal, DX12): softmax cross-entropy, focal, soft Dice and its relatives (Jaccard,
//! log-Dice, Tversky, generalized Dice), BCE, and the region-proportion penalties of
//! "Do We Really Need Dice?" (Liu, Dolz, Galdran, Kobbi, Ben Ayed), with the per-image
//! decomposition of CE into its region-size part KL(τ‖û) and the rest.
//!
//! Any weighted sum of terms costs three passes: statistics (one read of logits and
//! labels), finalize (kilobytes) and gradient (one more read, one write). Every term has an
//! f64 CPU implementation in [`mod@reference`], the oracle of the tests and the fallback when no
//! adapter exists.
//!
//! ```
//! use segloss::{input::{Labels, Shape}, spec::LossSpec, Segloss};
//!
//! // CE + 0.1·|û − τ|₁ on a 2-image, 3-class, 4×4 batch.
//! let spec = LossSpec::from_json(r#"{"terms": [
//!     {"kind": "cross_entropy"},
//!     {"kind": "region", "weight": 0.1, "penalty": "l1", "temperature": 10}]}"#)?;
//! let shape = Shape::new(2, 3, &[4, 4]);
//! let logits: Vec<f32> = (0..shape.len()).map(|i| ((i * 7919) % 13) as f32 / 5.0 - 1.2).collect();
//! let labels: Vec<u32> = (0..2 * 16).map(|i| (i % 3) as u32).collect();
//!
//! let engine = Segloss::new(); // the GPU if there is one, the CPU reference otherwise
//! let out = engine.evaluate(&spec, &shape, &logits, Labels::index(&labels), true)?;
//! assert!(out.loss > 0.0);
//! assert_eq!(out.gradient.unwrap().len(), logits.len());
//! println!("loss {:.4}, KL part of image 0: {:.4}", out.loss, out.decomposition[0].kl);
//! # Ok::<(), segloss::Error>(())
//! ```

#![warn(missing_docs)]

pub mod bench;
pub mod distributed;
pub mod error;
pub mod gpu;
pub mod input;
pub mod npy;
pub mod output;
pub mod reference;
pub mod spec;
#[doc(hidden)]
pub mod testing;

pub use error::{Error, Result};
pub use gpu::{GpuContext, Options};
/// The `half` crate of [`gpu::HostLogits`]'s 16-bit variants.
pub use half;
pub use input::{IndexLabels, Labels, Shape};
pub use output::LossOutput;
pub use spec::{LossSpec, Term};
/// The wgpu this crate is built against: a backend user names its types through this, so
/// versions cannot drift apart.
pub use wgpu;

use std::sync::Once;

/// Where the convenient API runs.
#[derive(Debug)]
enum Backend {
    Gpu(Box<GpuContext>),
    Cpu,
}

/// The convenient API: host slices in, loss and gradient out, on the GPU when one exists
/// and on the f64 CPU reference otherwise.
#[derive(Debug)]
pub struct Segloss {
    backend: Backend,
}

impl Default for Segloss {
    fn default() -> Self {
        Self::new()
    }
}

impl Segloss {
    /// The preferred GPU; without one, the CPU reference (said once on stderr).
    pub fn new() -> Self {
        match GpuContext::new() {
            Ok(ctx) => Segloss {
                backend: Backend::Gpu(Box::new(ctx)),
            },
            Err(e) => {
                static WARN: Once = Once::new();
                WARN.call_once(|| eprintln!("segloss: {e}; using the CPU implementation"));
                Segloss {
                    backend: Backend::Cpu,
                }
            }
        }
    }

    /// The preferred GPU, or an error saying how to get one.
    pub fn gpu() -> Result<Self> {
        Ok(Segloss {
            backend: Backend::Gpu(Box::new(GpuContext::new()?)),
        })
    }

    /// The f64 CPU implementation.
    pub fn cpu() -> Self {
        Segloss {
            backend: Backend::Cpu,
        }
    }

    /// Wraps an existing GPU context.
    pub fn with_context(ctx: GpuContext) -> Self {
        Segloss {
            backend: Backend::Gpu(Box::new(ctx)),
        }
    }

    /// The GPU context, when running on one.
    pub fn context(&self) -> Option<&GpuContext> {
        match &self.backend {
            Backend::Gpu(c) => Some(c),
            Backend::Cpu => None,
        }
    }

    /// "gpu: NAME (BACKEND)" or "cpu".
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Gpu(c) => format!(
                "gpu: {} ({:?})",
                c.adapter_info().name,
                c.adapter_info().backend
            ),
            Backend::Cpu => "cpu".into(),
        }
    }

    /// Loss of `spec` on f32 NCHW logits, and ∂loss/∂logits when `gradient` is true.
    pub fn evaluate(
        &self,
        spec: &LossSpec,
        shape: &Shape,
        logits: &[f32],
        labels: Labels<'_>,
        gradient: bool,
    ) -> Result<LossOutput> {
        self.evaluate_host(spec, &gpu::HostBatch::new(shape, logits, labels), gradient)
    }

    /// Loss (and gradient) of host data in any layout and precision. The CPU fallback
    /// widens 16-bit logits and works in f64; a 16-bit `grad_format` then rounds its result.
    pub fn evaluate_host(
        &self,
        spec: &LossSpec,
        batch: &gpu::HostBatch<'_>,
        gradient: bool,
    ) -> Result<LossOutput> {
        match &self.backend {
            Backend::Gpu(ctx) => ctx.evaluate_host(
                spec,
                batch,
                Options {
                    gradient,
                    ..Default::default()
                },
            ),
            Backend::Cpu => {
                let nhwc = batch.layout == input::Layout::Nhwc;
                let z = batch.logits.to_f32();
                let z = if nhwc {
                    input::permute(&z, batch.shape, true)
                } else {
                    z
                };
                let soft;
                let labels = match batch.labels {
                    Labels::Soft(g) if nhwc => {
                        soft = input::permute(g, batch.shape, true);
                        Labels::Soft(&soft)
                    }
                    other => other,
                };
                let mut out = reference::evaluate(spec, batch.shape, &z, labels, gradient)?;
                out.statistics = None;
                if let Some(g) = out.gradient.take() {
                    let g = if nhwc {
                        input::permute(&g, batch.shape, false)
                    } else {
                        g
                    };
                    out.gradient = Some(match batch.grad_format {
                        input::LogitFormat::F32 => g,
                        input::LogitFormat::F16 => {
                            g.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect()
                        }
                        input::LogitFormat::Bf16 => g
                            .iter()
                            .map(|v| half::bf16::from_f32(*v).to_f32())
                            .collect(),
                    });
                }
                Ok(out)
            }
        }
    }
}
