//! Stage 3, the gradient pass: ∂L/∂z per logit from the pixel's own logits and label, the
//! coefficient table and the pixel-term scales. CPU port of `shaders/grad_pixel.wgsl` (and grad.wgsl).

use super::finalize::Finalized;
use super::stats::{pixel, probabilities};
use super::{focal_h, log_sigmoid, log_softmax};
use crate::input::{Labels, Shape};
use crate::spec::{Activation, LossSpec, Term};

/// ∂loss/∂logits in NCHW order (0 at ignored pixels).
pub fn gradient(
    spec: &LossSpec,
    shape: &Shape,
    logits: &[f64],
    labels: Labels<'_>,
    fin: &Finalized,
) -> Vec<f64> {
    let (b_n, c_n, s) = (shape.batch, shape.classes, shape.pixels());
    let t = spec.temperature();
    let mut grad = vec![0.0; shape.len()];
    for b in 0..b_n {
        for i in 0..s {
            let Some(px) = pixel(shape, logits, labels, spec.ignore_index, b, i) else {
                continue;
            };
            let (p, sp) = probabilities(spec, &px.z);
            let coef = |c: usize| fin.coef[b * c_n + c];
            // a_c = ∂L/∂p_c and u_c = ∂L/∂s_c of the statistic terms.
            let a: Vec<f64> = (0..c_n)
                .map(|c| coef(c)[0] + 2.0 * p[c] * coef(c)[1] + px.g[c] * coef(c)[2])
                .collect();
            let u: Vec<f64> = (0..c_n).map(|c| coef(c)[3]).collect();
            let mut dz = vec![0.0; c_n];
            match spec.activation {
                Activation::Softmax => {
                    let ap: f64 = (0..c_n).map(|k| a[k] * p[k]).sum();
                    let us: f64 = (0..c_n).map(|k| u[k] * sp[k]).sum();
                    for c in 0..c_n {
                        dz[c] = p[c] * (a[c] - ap) + t * sp[c] * (u[c] - us);
                    }
                    let logp = log_softmax(&px.z);
                    let pixel_terms = spec.terms.iter().filter(|t| t.is_pixel_term());
                    for (term, scale) in pixel_terms.zip(&fin.pixel_scale) {
                        let h: Vec<f64> = (0..c_n)
                            .map(|c| pixel_h(term, &p, &logp, &px.g, c))
                            .collect();
                        let hs: f64 = h.iter().sum();
                        for c in 0..c_n {
                            dz[c] += scale * (h[c] - p[c] * hs);
                        }
                    }
                }
                Activation::Sigmoid => {
                    for c in 0..c_n {
                        let q = log_sigmoid(-px.z[c]).exp();
                        let qs = log_sigmoid(-t * px.z[c]).exp();
                        dz[c] = a[c] * p[c] * q + t * u[c] * sp[c] * qs;
                    }
                    let pixel_terms = spec.terms.iter().filter(|t| t.is_pixel_term());
                    for (term, scale) in pixel_terms.zip(&fin.pixel_scale) {
                        let Term::Bce { pos_weight, .. } = term else {
                            unreachable!("sigmoid pixel terms are bce")
                        };
                        for c in 0..c_n {
                            let pw = pos_weight.as_ref().map_or(1.0, |v| v[c]);
                            let y = px.g[c];
                            dz[c] += scale * (p[c] * (1.0 - y + pw * y) - pw * y);
                        }
                    }
                }
            }
            for c in 0..c_n {
                grad[(b * c_n + c) * s + i] = dz[c];
            }
        }
    }
    grad
}

/// A softmax pixel term's h_c, its weight on ([c = k] − p_k) in ∂/∂z_k, so that the term's
/// gradient is λ/n·(h_c − p_c·Σ_k h_k): cross-entropy −w_c·((1 − ε)·g_c + ε/C) (the
/// smoothed, weighted target), focal [`focal_h`]. Twin: `shaders/grad_pixel.wgsl` `pixel_h`.
fn pixel_h(term: &Term, p: &[f64], logp: &[f64], g: &[f64], c: usize) -> f64 {
    let c_n = p.len();
    match term {
        Term::CrossEntropy {
            class_weights,
            label_smoothing: eps,
            ..
        } => {
            let w = class_weights.as_ref().map_or(1.0, |v| v[c]);
            -w * ((1.0 - eps) * g[c] + eps / c_n as f64)
        }
        Term::Focal { gamma, alpha, .. } => {
            let a = alpha.as_ref().map_or(1.0, |v| v[c]);
            let one_minus_p: f64 = (0..c_n).filter(|&j| j != c).map(|j| p[j]).sum();
            focal_h(p[c], one_minus_p, logp[c], a * g[c], *gamma)
        }
        _ => unreachable!("softmax pixel terms are cross_entropy and focal"),
    }
}
