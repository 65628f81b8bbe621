//! The f64 CPU implementation of every term: the oracle of the GPU tests and the fallback
//! when no adapter exists. It is written for clarity and mirrors the three GPU stages file
//! for file (`stats.rs` ↔ `shaders/stats.wgsl`, and so on), so a reader can hold one
//! beside the other.

mod finalize;
mod grad;
mod stats;

pub use finalize::{finalize, proportions, Finalized};
pub use grad::gradient;
pub use stats::statistics;

use crate::error::Result;
use crate::input::{Labels, Shape};
use crate::output::LossOutput;
use crate::spec::LossSpec;

/// Loss (and, with `want_grad`, gradient) of `spec` on f32 NCHW logits, computed in f64.
pub fn evaluate(
    spec: &LossSpec,
    shape: &Shape,
    logits: &[f32],
    labels: Labels<'_>,
    want_grad: bool,
) -> Result<LossOutput> {
    spec.check_inputs(shape, logits, &labels)?;
    let z: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
    let (stats, maps) = statistics(spec, shape, &z, labels);
    let fin = finalize(spec, &stats);
    let gradient = want_grad.then(|| {
        gradient(spec, shape, &z, labels, &fin)
            .into_iter()
            .map(|g| g as f32)
            .collect()
    });
    Ok(fin.into_output(spec, stats, maps, gradient))
}

/// log-softmax of one pixel's logits, max subtracted first.
pub(crate) fn log_softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    z.iter().map(|v| v - lse).collect()
}

/// log σ(z) = −softplus(−z), never the log of a probability.
pub(crate) fn log_sigmoid(z: f64) -> f64 {
    -softplus(-z)
}

/// softplus(x) = log(1 + eˣ) without overflow.
pub(crate) fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// xʸ with 0⁰ = 1 and 0ʸ = 0 (WGSL's pow leaves both undefined; the shaders use the same rule).
pub(crate) fn safe_pow(x: f64, y: f64) -> f64 {
    if y == 0.0 {
        1.0
    } else if x <= 0.0 {
        0.0
    } else {
        x.powf(y)
    }
}

/// The focal loss's weight on ([c = k] − p_k) for one class c with target mass g:
/// h = α·g·[γ(1−p)^(γ−1)·p·log p − (1−p)^γ], written without dividing by p and finite at
/// p → 1 for any γ ≥ 0 (there (1−p)^(γ−1)·log p → −(1−p)^γ).
pub(crate) fn focal_h(p: f64, one_minus_p: f64, log_p: f64, alpha_g: f64, gamma: f64) -> f64 {
    let q = one_minus_p;
    let qg = safe_pow(q, gamma);
    let first = if q > 0.0 && gamma > 0.0 {
        gamma * p * log_p * qg / q
    } else {
        0.0
    };
    alpha_g * (first - qg)
}

#[cfg(test)]
mod tests;
