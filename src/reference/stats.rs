//! Stage 1, the statistics pass: per-(image, class) sums and per-pixel-term sums.
//! CPU port of `shaders/stats.wgsl`.

use super::{log_sigmoid, log_softmax, safe_pow};
use crate::input::{Labels, Shape};
use crate::output::Statistics;
use crate::spec::{Activation, LossSpec, Reduction, Term};

/// One pixel's inputs, gathered from the NCHW arrays.
pub(crate) struct Pixel {
    /// Logits z_c.
    pub z: Vec<f64>,
    /// Target g_c (one-hot for index labels).
    pub g: Vec<f64>,
    /// The class index, for index labels.
    pub y: Option<usize>,
}

/// Reads pixel i of image b; `None` for an ignored pixel.
pub(crate) fn pixel(
    shape: &Shape,
    logits: &[f64],
    labels: Labels<'_>,
    ignore_index: i64,
    b: usize,
    i: usize,
) -> Option<Pixel> {
    let (c_n, s) = (shape.classes, shape.pixels());
    let at = |c: usize| (b * c_n + c) * s + i;
    let z: Vec<f64> = (0..c_n).map(|c| logits[at(c)]).collect();
    match labels {
        Labels::Index(y) => {
            // Values that are no class index were refused before any work (`check_inputs`).
            let y = y.class_at(b * s + i, ignore_index, c_n)?.ok()?;
            let g = (0..c_n)
                .map(|c| if c as u32 == y { 1.0 } else { 0.0 })
                .collect();
            Some(Pixel {
                z,
                g,
                y: Some(y as usize),
            })
        }
        Labels::Soft(t) => Some(Pixel {
            z,
            g: (0..c_n).map(|c| t[at(c)] as f64).collect(),
            y: None,
        }),
    }
}

/// The per-pixel terms' (loss, normaliser) for one pixel, in spec order.
pub(crate) fn pixel_terms(spec: &LossSpec, px: &Pixel) -> Vec<(f64, f64)> {
    let pixel_terms = spec.terms.iter().filter(|t| t.is_pixel_term());
    match spec.activation {
        Activation::Softmax => {
            let logp = log_softmax(&px.z);
            pixel_terms
                .map(|t| match t {
                    Term::CrossEntropy {
                        class_weights,
                        label_smoothing,
                        ..
                    } => ce_pixel(class_weights.as_deref(), *label_smoothing, &logp, px),
                    Term::Focal { gamma, alpha, .. } => {
                        (focal_pixel(*gamma, alpha.as_deref(), &logp, px), 1.0)
                    }
                    _ => unreachable!("pixel terms are cross_entropy, focal and bce"),
                })
                .collect()
        }
        Activation::Sigmoid => pixel_terms
            .map(|t| {
                let Term::Bce { pos_weight, .. } = t else {
                    unreachable!("validated: sigmoid mode has only bce pixel terms")
                };
                (bce_pixel(pos_weight.as_deref(), px), px.z.len() as f64)
            })
            .collect(),
    }
}

/// A class vector's entry, 1 where the term has none.
fn weight(v: Option<&[f64]>, c: usize) -> f64 {
    v.map_or(1.0, |v| v[c])
}

/// Cross-entropy of one pixel as (loss, normaliser): with class weights w and smoothing ε,
/// (1 − ε)·w_y·(−log p_y) + ε/C·Σ_c w_c·(−log p_c), normalised by w_y (index labels) or 1
/// (soft labels, where the first part is Σ_c w_c g_c (−log p_c)). Twin:
/// `shaders/stats.wgsl` `ce_pixel`.
fn ce_pixel(w: Option<&[f64]>, eps: f64, logp: &[f64], px: &Pixel) -> (f64, f64) {
    let c_n = logp.len() as f64;
    let smooth: f64 = (0..logp.len())
        .map(|k| weight(w, k) * -logp[k])
        .sum::<f64>()
        * eps
        / c_n;
    match px.y {
        Some(y) => ((1.0 - eps) * weight(w, y) * -logp[y] + smooth, weight(w, y)),
        None => {
            let l: f64 = (0..logp.len())
                .map(|k| weight(w, k) * px.g[k] * -logp[k])
                .sum();
            ((1.0 - eps) * l + smooth, 1.0)
        }
    }
}

/// Focal loss of one pixel: Σ_c α_c g_c (1 − p_c)^γ (−log p_c). Twin: `shaders/stats.wgsl`
/// `focal_pixel`.
fn focal_pixel(gamma: f64, alpha: Option<&[f64]>, logp: &[f64], px: &Pixel) -> f64 {
    (0..logp.len())
        .filter(|&k| px.g[k] != 0.0)
        .map(|k| {
            let q = 1.0 - logp[k].exp();
            -weight(alpha, k) * px.g[k] * safe_pow(q, gamma) * logp[k]
        })
        .sum()
}

/// Binary cross-entropy of one pixel, summed over channels:
/// −Σ_c pw_c·g_c·log σ(z_c) + (1 − g_c)·log σ(−z_c). Twin: `shaders/stats.wgsl` `bce_pixel`.
fn bce_pixel(pos_weight: Option<&[f64]>, px: &Pixel) -> f64 {
    (0..px.z.len())
        .map(|c| {
            let pw = weight(pos_weight, c);
            -(pw * px.g[c] * log_sigmoid(px.z[c]) + (1.0 - px.g[c]) * log_sigmoid(-px.z[c]))
        })
        .sum()
}

/// Probabilities p and tempered probabilities s of one pixel.
pub(crate) fn probabilities(spec: &LossSpec, z: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let t = spec.temperature();
    match spec.activation {
        Activation::Softmax => {
            let p = log_softmax(z).iter().map(|v| v.exp()).collect();
            let zt: Vec<f64> = z.iter().map(|v| v * t).collect();
            (p, log_softmax(&zt).iter().map(|v| v.exp()).collect())
        }
        Activation::Sigmoid => {
            let sig = |v: f64| log_sigmoid(v).exp();
            (
                z.iter().map(|&v| sig(v)).collect(),
                z.iter().map(|&v| sig(t * v)).collect(),
            )
        }
    }
}

/// Runs the statistics pass. Also returns, per term, the per-pixel loss map of a
/// cross-entropy term with reduction none (B·S values, 0 at ignored pixels).
pub fn statistics(
    spec: &LossSpec,
    shape: &Shape,
    logits: &[f64],
    labels: Labels<'_>,
) -> (Statistics, Vec<Option<Vec<f64>>>) {
    let (b_n, c_n, s) = (shape.batch, shape.classes, shape.pixels());
    let n_pix = spec.terms.iter().filter(|t| t.is_pixel_term()).count();
    let mut st = Statistics {
        batch: b_n,
        classes: c_n,
        per_class: vec![[0.0; 6]; b_n * c_n],
        valid: vec![0.0; b_n],
        plain_ce: vec![0.0; b_n],
        pixel_sums: vec![[0.0; 2]; b_n * n_pix],
    };
    let mut maps: Vec<Option<Vec<f64>>> = spec
        .terms
        .iter()
        .map(|t| {
            matches!(
                t,
                Term::CrossEntropy {
                    reduction: Reduction::None,
                    ..
                }
            )
            .then(|| vec![0.0; b_n * s])
        })
        .collect();
    for b in 0..b_n {
        for i in 0..s {
            let Some(px) = pixel(shape, logits, labels, spec.ignore_index, b, i) else {
                continue;
            };
            st.valid[b] += 1.0;
            let (p, sp) = probabilities(spec, &px.z);
            for c in 0..c_n {
                let g = px.g[c];
                let acc = &mut st.per_class[b * c_n + c];
                acc[0] += p[c];
                acc[1] += p[c] * p[c];
                acc[2] += p[c] * g;
                acc[3] += g;
                acc[4] += g * g;
                acc[5] += sp[c];
            }
            if spec.activation == Activation::Softmax {
                let logp = log_softmax(&px.z);
                st.plain_ce[b] += -(0..c_n).map(|c| px.g[c] * logp[c]).sum::<f64>();
            }
            let per_term = pixel_terms(spec, &px);
            for (t, (l, n)) in per_term.iter().enumerate() {
                st.pixel_sums[b * n_pix + t][0] += l;
                st.pixel_sums[b * n_pix + t][1] += n;
            }
            let mut t_pix = 0;
            for (k, term) in spec.terms.iter().enumerate() {
                if term.is_pixel_term() {
                    if let Some(m) = maps[k].as_mut() {
                        m[b * s + i] = per_term[t_pix].0;
                    }
                    t_pix += 1;
                }
            }
        }
    }
    (st, maps)
}
