//! Stage 2, finalize: term values, the decomposition and the gradient coefficients from the
//! statistics. CPU port of `shaders/finalize.wgsl`.
//!
//! Every statistic term's gradient reaches the pixels only through four coefficients per
//! (image, class): ∂L/∂P, ∂L/∂Q, ∂L/∂I and ∂L/∂U (ARCHITECTURE.md, "One gradient for every
//! statistic term"). The per-pixel terms reach them through one scale each, λ over the
//! term's normaliser.

use crate::output::{Decomposition, LossOutput, Statistics, TermValue};
use crate::spec::{
    Activation, LossSpec, NamedTarget, Penalty, Reduction, RegionTarget, Term, WeightType,
};

/// Smoothing of the proportions û and τ, as the paper's code.
pub const PROPORTION_EPS: f64 = 1e-10;
/// Floor of every Dice-family denominator and of the log-Dice ratio.
pub const DENOMINATOR_FLOOR: f64 = 1e-7;

/// Output of the finalize stage.
#[derive(Debug, Clone)]
pub struct Finalized {
    /// Index b·C + c: λ-weighted [∂L/∂P, ∂L/∂Q, ∂L/∂I, ∂L/∂U].
    pub coef: Vec<[f64; 4]>,
    /// Per pixel term (spec order among cross_entropy, focal, bce): λ / normaliser.
    pub pixel_scale: Vec<f64>,
    /// Unweighted value of each term.
    pub values: Vec<f64>,
    /// Elements of the statistic terms with reduction none ((B or 1)·C values).
    pub elements: Vec<Option<Vec<f64>>>,
    /// û per (b, c).
    pub predicted: Vec<f64>,
    /// τ per (b, c).
    pub target: Vec<f64>,
    /// Per image (softmax mode).
    pub decomposition: Vec<Decomposition>,
}

/// The images whose sums a batch-pooled or per-image term combines: one group per image, or
/// one group of all images.
fn groups(batch: usize, pooled: bool) -> Vec<Vec<usize>> {
    if pooled {
        vec![(0..batch).collect()]
    } else {
        (0..batch).map(|b| vec![b]).collect()
    }
}

fn pooled(st: &Statistics, group: &[usize], c: usize) -> [f64; 6] {
    let mut s = [0.0; 6];
    for &b in group {
        for (k, v) in st.per_class[b * st.classes + c].iter().enumerate() {
            s[k] += v;
        }
    }
    s
}

/// The untempered proportions û and τ (B·C each, from Σp and ΣG) and, in softmax mode, the
/// decomposition of each image: reporting only, so the GPU path computes them here too,
/// from the statistics it reads back.
pub fn proportions(spec: &LossSpec, st: &Statistics) -> (Vec<f64>, Vec<f64>, Vec<Decomposition>) {
    let (b_n, c_n) = (st.batch, st.classes);
    let mut predicted = vec![0.0; b_n * c_n];
    let mut target = vec![0.0; b_n * c_n];
    let mut decomposition = vec![];
    for b in 0..b_n {
        let n = st.valid[b];
        let mut d = Decomposition::default();
        if n > 0.0 {
            for c in 0..c_n {
                let s = st.per_class[b * c_n + c];
                let u = (s[0] + PROPORTION_EPS) / (n + PROPORTION_EPS);
                let t = (s[3] + PROPORTION_EPS) / (n + PROPORTION_EPS);
                predicted[b * c_n + c] = u;
                target[b * c_n + c] = t;
                d.kl += t * (t / u).ln();
                d.dice_region += (u + t).ln() / c_n as f64;
            }
            d.ce = st.plain_ce[b] / n;
            d.matching = (d.ce - d.kl).max(0.0);
        }
        if spec.activation == Activation::Softmax {
            decomposition.push(d);
        }
    }
    (predicted, target, decomposition)
}

/// Runs the finalize stage: each term's rule, in spec order, adds its share to the
/// coefficients (a pixel term: its scale) and reports its value. Twin: `shaders/finalize.wgsl`
/// `finalize_terms`.
pub fn finalize(spec: &LossSpec, st: &Statistics) -> Finalized {
    let n_pix = spec.terms.iter().filter(|t| t.is_pixel_term()).count();
    let sigmoid = spec.activation == Activation::Sigmoid;
    let mut coef = vec![[0.0; 4]; st.batch * st.classes];
    let mut pixel_scale = vec![];
    let mut values = vec![];
    let mut elements = vec![];
    for term in &spec.terms {
        let lambda = term.weight();
        let mut elems = None;
        let value = match term {
            Term::CrossEntropy { .. } | Term::Focal { .. } | Term::Bce { .. } => {
                let (value, scale) = pixel_term(term, st, n_pix, pixel_scale.len(), lambda);
                pixel_scale.push(scale);
                value
            }
            Term::Dice { .. } => {
                let (value, el) = dice_term(term, st, lambda, &mut coef);
                elems = el;
                value
            }
            Term::Tversky { .. } => tversky_term(term, st, lambda, &mut coef),
            Term::GeneralizedDice { .. } => gdl_term(term, st, lambda, &mut coef),
            Term::Region { .. } => region_term(term, st, sigmoid, lambda, &mut coef),
        };
        values.push(value);
        elements.push(elems);
    }

    let (predicted, target, decomposition) = proportions(spec, st);
    Finalized {
        coef,
        pixel_scale,
        values,
        elements,
        predicted,
        target,
        decomposition,
    }
}

/// Whether no image of the group has a valid pixel: such a group has nothing to score and
/// adds neither value nor gradient (`valid_in(b0, b1) == 0.0` in the shader).
fn empty(st: &Statistics, group: &[usize]) -> bool {
    group.iter().all(|&b| st.valid[b] == 0.0)
}

/// The value and the scale λ / normaliser of the `t`-th of the `n_pix` pixel terms, from
/// the per-image sums of its loss and normaliser. Twin: the pixel-term loop of
/// `shaders/finalize.wgsl` `finalize_terms`.
fn pixel_term(term: &Term, st: &Statistics, n_pix: usize, t: usize, lambda: f64) -> (f64, f64) {
    let b_n = st.batch;
    let loss: f64 = (0..b_n).map(|b| st.pixel_sums[b * n_pix + t][0]).sum();
    let norm: f64 = (0..b_n).map(|b| st.pixel_sums[b * n_pix + t][1]).sum();
    let mean = !matches!(
        term,
        Term::CrossEntropy {
            reduction: Reduction::Sum | Reduction::None,
            ..
        }
    );
    let w = if mean { norm } else { 1.0 };
    if w > 0.0 {
        (loss / w, lambda / w)
    } else {
        (0.0, 0.0)
    }
}

/// A Dice-family term (Dice, Jaccard, squared, log): its value, its elements under
/// reduction none, and its share of ∂L/∂P (∂L/∂Q when squared) and ∂L/∂I. Twin:
/// `shaders/finalize.wgsl` `dice_term`.
fn dice_term(
    term: &Term,
    st: &Statistics,
    lambda: f64,
    coef: &mut [[f64; 4]],
) -> (f64, Option<Vec<f64>>) {
    let Term::Dice {
        include_background,
        squared,
        jaccard,
        log,
        batch,
        smooth_nr,
        smooth_dr,
        skip_empty,
        class_weights,
        reduction,
        ..
    } = term
    else {
        unreachable!("finalize hands dice_term dice terms only")
    };
    let (b_n, c_n) = (st.batch, st.classes);
    let c0 = usize::from(!include_background);
    let gs = groups(b_n, *batch);
    let norm = match reduction {
        Reduction::Mean => (gs.len() * (c_n - c0)) as f64,
        Reduction::Sum | Reduction::None => 1.0,
    };
    let mut el = vec![0.0; gs.len() * c_n];
    let mut total = 0.0;
    for (gi, group) in gs.iter().enumerate() {
        if empty(st, group) {
            continue;
        }
        for c in c0..c_n {
            let s = pooled(st, group, c);
            if *skip_empty && s[3] == 0.0 {
                continue;
            }
            let w = class_weights.as_ref().map_or(1.0, |v| v[c]);
            let (pp, gg) = if *squared { (s[1], s[4]) } else { (s[0], s[3]) };
            let num = 2.0 * s[2] + smooth_nr;
            let den_raw = if *jaccard {
                2.0 * (pp + gg - s[2]) + smooth_dr
            } else {
                pp + gg + smooth_dr
            };
            let clamped = den_raw < DENOMINATOR_FLOOR;
            let den = den_raw.max(DENOMINATOR_FLOOR);
            let r = num / den;
            let (f, df_dr) = if *log {
                (
                    -r.max(DENOMINATOR_FLOOR).ln(),
                    if r > DENOMINATOR_FLOOR { -1.0 / r } else { 0.0 },
                )
            } else {
                (1.0 - r, -1.0)
            };
            let dden_di = if *jaccard { -2.0 } else { 0.0 };
            let dden_dp = if *jaccard { 2.0 } else { 1.0 };
            let (dr_di, dr_dp) = if clamped {
                (2.0 / den, 0.0)
            } else {
                (2.0 / den - r * dden_di / den, -r * dden_dp / den)
            };
            el[gi * c_n + c] = w * f;
            total += w * f;
            let k = lambda * w * df_dr / norm;
            for &b in group {
                let cf = &mut coef[b * c_n + c];
                cf[2] += k * dr_di;
                cf[if *squared { 1 } else { 0 }] += k * dr_dp;
            }
        }
    }
    (total / norm, (*reduction == Reduction::None).then_some(el))
}

/// A (focal) Tversky term: its value and its share of ∂L/∂P and ∂L/∂I. Twin:
/// `shaders/finalize.wgsl` `tversky_term`.
fn tversky_term(term: &Term, st: &Statistics, lambda: f64, coef: &mut [[f64; 4]]) -> f64 {
    let Term::Tversky {
        alpha,
        beta,
        gamma,
        include_background,
        batch,
        smooth_nr,
        smooth_dr,
        ..
    } = term
    else {
        unreachable!("finalize hands tversky_term tversky terms only")
    };
    let (b_n, c_n) = (st.batch, st.classes);
    let c0 = usize::from(!include_background);
    let gs = groups(b_n, *batch);
    let norm = (gs.len() * (c_n - c0)) as f64;
    let mut total = 0.0;
    for group in gs.iter().filter(|g| !empty(st, g)) {
        for c in c0..c_n {
            let s = pooled(st, group, c);
            let (p, i, g) = (s[0], s[2], s[3]);
            let num = i + smooth_nr;
            let den_raw = i + alpha * (p - i) + beta * (g - i) + smooth_dr;
            let clamped = den_raw < DENOMINATOR_FLOOR;
            let den = den_raw.max(DENOMINATOR_FLOOR);
            let ti = num / den;
            let (f, df_dti) = if *gamma == 1.0 {
                (1.0 - ti, -1.0)
            } else {
                let x = (1.0 - ti).max(0.0);
                (
                    x.powf(*gamma),
                    if x > 0.0 {
                        -gamma * x.powf(gamma - 1.0)
                    } else {
                        0.0
                    },
                )
            };
            let (dti_di, dti_dp) = if clamped {
                (1.0 / den, 0.0)
            } else {
                ((1.0 - ti * (1.0 - alpha - beta)) / den, -ti * alpha / den)
            };
            total += f;
            let k = lambda * df_dti / norm;
            for &b in group {
                coef[b * c_n + c][2] += k * dti_di;
                coef[b * c_n + c][0] += k * dti_dp;
            }
        }
    }
    total / norm
}

/// A generalized Dice term: its value and its share of ∂L/∂P and ∂L/∂I. Twin:
/// `shaders/finalize.wgsl` `gdl_term`.
fn gdl_term(term: &Term, st: &Statistics, lambda: f64, coef: &mut [[f64; 4]]) -> f64 {
    let Term::GeneralizedDice {
        w_type,
        include_background,
        batch,
        smooth_nr,
        smooth_dr,
        ..
    } = term
    else {
        unreachable!("finalize hands gdl_term generalized_dice terms only")
    };
    let (b_n, c_n) = (st.batch, st.classes);
    let c0 = usize::from(!include_background);
    let gs = groups(b_n, *batch);
    let norm = gs.len() as f64;
    let mut total = 0.0;
    for group in gs.iter().filter(|g| !empty(st, g)) {
        let sums: Vec<[f64; 6]> = (c0..c_n).map(|c| pooled(st, group, c)).collect();
        let raw: Vec<f64> = sums
            .iter()
            .map(|s| match w_type {
                WeightType::Square => 1.0 / (s[3] * s[3]),
                WeightType::Simple => 1.0 / s[3],
                WeightType::Uniform => 1.0,
            })
            .collect();
        // MONAI: an absent class's infinite weight becomes the largest finite one.
        let max_finite = raw
            .iter()
            .cloned()
            .filter(|w| w.is_finite())
            .fold(0.0, f64::max);
        let w: Vec<f64> = raw
            .iter()
            .map(|&w| if w.is_finite() { w } else { max_finite })
            .collect();
        let num = 2.0 * sums.iter().zip(&w).map(|(s, w)| w * s[2]).sum::<f64>() + smooth_nr;
        let den_raw = sums
            .iter()
            .zip(&w)
            .map(|(s, w)| w * (s[0] + s[3]))
            .sum::<f64>()
            + smooth_dr;
        let clamped = den_raw < DENOMINATOR_FLOOR;
        let den = den_raw.max(DENOMINATOR_FLOOR);
        total += 1.0 - num / den;
        for (k, c) in (c0..c_n).enumerate() {
            let d_di = -2.0 * w[k] / den;
            let d_dp = if clamped {
                0.0
            } else {
                num * w[k] / (den * den)
            };
            for &b in group {
                coef[b * c_n + c][2] += lambda * d_di / norm;
                coef[b * c_n + c][0] += lambda * d_dp / norm;
            }
        }
    }
    total / norm
}

/// A region term R(û, τ): its value and its share of ∂L/∂U. Twin: `shaders/finalize.wgsl`
/// `region_term`.
fn region_term(
    term: &Term,
    st: &Statistics,
    sigmoid: bool,
    lambda: f64,
    coef: &mut [[f64; 4]],
) -> f64 {
    let Term::Region {
        penalty, target, ..
    } = term
    else {
        unreachable!("finalize hands region_term region terms only")
    };
    let (b_n, c_n) = (st.batch, st.classes);
    let eps = PROPORTION_EPS;
    let norm = match penalty {
        Penalty::Kl => b_n as f64,
        _ => (b_n * c_n) as f64,
    };
    let mut total = 0.0;
    for b in (0..b_n).filter(|&b| st.valid[b] > 0.0) {
        let n = st.valid[b];
        for c in 0..c_n {
            let s = st.per_class[b * c_n + c];
            let u = (s[5] + eps) / (n + eps);
            let (tau, one_minus_tau) = match target {
                RegionTarget::Named(NamedTarget::GroundTruth) => {
                    ((s[3] + eps) / (n + eps), (n - s[3] + eps) / (n + eps))
                }
                RegionTarget::Named(NamedTarget::Uniform) => {
                    let t = if sigmoid { 0.5 } else { 1.0 / c_n as f64 };
                    (t, 1.0 - t)
                }
                RegionTarget::Prior(v) => (v[c], 1.0 - v[c]),
            };
            let (f, df_du) = match penalty {
                Penalty::L1 => ((u - tau).abs(), (u - tau).signum() * f64::from(u != tau)),
                Penalty::L2 => ((u - tau).powi(2), 2.0 * (u - tau)),
                Penalty::LogSum => ((u + tau + eps).ln(), 1.0 / (u + tau + eps)),
                Penalty::Kl => {
                    let xlogy = |x: f64, y: f64| if x == 0.0 { 0.0 } else { x * (x / y).ln() };
                    if sigmoid {
                        let one_minus_u = (n - s[5] + eps) / (n + eps);
                        (
                            xlogy(tau, u) + xlogy(one_minus_tau, one_minus_u),
                            -tau / u + one_minus_tau / one_minus_u,
                        )
                    } else {
                        (xlogy(tau, u), -tau / u)
                    }
                }
            };
            total += f;
            coef[b * c_n + c][3] += lambda * df_du / (n + eps) / norm;
        }
    }
    total / norm
}

impl Finalized {
    /// Assembles the caller's output.
    pub(crate) fn into_output(
        self,
        spec: &LossSpec,
        stats: Statistics,
        maps: Vec<Option<Vec<f64>>>,
        gradient: Option<Vec<f32>>,
    ) -> LossOutput {
        let c_n = stats.classes;
        let rows = |v: &[f64]| v.chunks(c_n).map(|r| r.to_vec()).collect();
        let terms = spec
            .terms
            .iter()
            .zip(&self.values)
            .map(|(t, v)| TermValue {
                kind: t.kind().into(),
                weight: t.weight(),
                value: *v,
            })
            .collect::<Vec<_>>();
        let elements: Vec<Option<Vec<f64>>> = self
            .elements
            .into_iter()
            .zip(maps)
            .map(|(e, m)| e.or(m))
            .collect();
        LossOutput {
            loss: terms.iter().map(|t| t.weight * t.value).sum(),
            terms,
            predicted_proportions: rows(&self.predicted),
            target_proportions: rows(&self.target),
            valid_pixels: stats.valid.iter().map(|v| *v as u64).collect(),
            decomposition: self.decomposition,
            elements: if elements.iter().any(Option::is_some) {
                elements
            } else {
                vec![]
            },
            gradient,
            statistics: Some(stats),
        }
    }
}
