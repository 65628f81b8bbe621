//! The loss specification: a weighted list of terms. Its serde form is the JSON of the
//! command-line contract, so one config file serves the library and the `segloss` binary.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// How logits become probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Softmax over the class axis; labels are class indices or probability vectors.
    #[default]
    Softmax,
    /// An independent sigmoid per channel; labels are 0..1 masks of the logits' shape.
    Sigmoid,
}

/// How a term reduces its per-element values to one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Reduction {
    /// Average (the default, as in PyTorch and MONAI).
    #[default]
    Mean,
    /// Plain sum.
    Sum,
    /// Keep the elements (a per-pixel map for cross-entropy, per (image, class) values for
    /// Dice). The term's scalar value and its gradient are then those of the elements' sum,
    /// as `loss.sum().backward()` would give in PyTorch.
    None,
}

/// The region-proportion penalty R(û, τ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Penalty {
    /// Mean over (image, class) of |û − τ|.
    #[default]
    L1,
    /// Mean over images of Σ_c τ log(τ/û) (Bernoulli KL per channel in sigmoid mode).
    Kl,
    /// Mean over (image, class) of (û − τ)².
    L2,
    /// Mean over (image, class) of log(û + τ): Dice's implicit size term, to study it.
    LogSum,
}

/// The target proportions τ of the region term.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RegionTarget {
    /// `"ground_truth"` or `"uniform"`.
    Named(NamedTarget),
    /// A prior: one proportion per class.
    Prior(Vec<f64>),
}

/// The named region targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NamedTarget {
    /// τ = the ground-truth proportions of each image.
    GroundTruth,
    /// τ = 1/C for every class.
    Uniform,
}

impl Default for RegionTarget {
    fn default() -> Self {
        RegionTarget::Named(NamedTarget::GroundTruth)
    }
}

/// Weights of absent classes in the generalized Dice loss, as MONAI's `w_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WeightType {
    /// w = 1/G².
    #[default]
    Square,
    /// w = 1/G.
    Simple,
    /// w = 1.
    Uniform,
}

fn one() -> f64 {
    1.0
}
fn two() -> f64 {
    2.0
}
fn half() -> f64 {
    0.5
}
fn smooth() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

/// One term of the loss, tagged by `kind` in JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Term {
    /// `torch.nn.functional.cross_entropy`.
    CrossEntropy {
        /// λ of this term.
        #[serde(default = "one")]
        weight: f64,
        /// Per-class weights (C values, none negative).
        #[serde(default)]
        class_weights: Option<Vec<f64>>,
        /// Label smoothing ε in [0, 1].
        #[serde(default)]
        label_smoothing: f64,
        /// mean / sum / none.
        #[serde(default)]
        reduction: Reduction,
    },
    /// Softmax focal loss −α_y (1−p_y)^γ log p_y, mean over valid pixels.
    Focal {
        /// λ of this term.
        #[serde(default = "one")]
        weight: f64,
        /// Focusing exponent γ ≥ 0.
        #[serde(default = "two")]
        gamma: f64,
        /// Per-class α (C values), none means 1.
        #[serde(default)]
        alpha: Option<Vec<f64>>,
    },
    /// MONAI `DiceLoss(softmax=True, to_onehot_y=True)` and its variants.
    Dice {
        /// λ of this term.
        #[serde(default = "one")]
        weight: f64,
        /// Keep class 0.
        #[serde(default = "yes")]
        include_background: bool,
        /// Use Σp² and Σg² in the denominator.
        #[serde(default)]
        squared: bool,
        /// Jaccard (IoU) instead of Dice.
        #[serde(default)]
        jaccard: bool,
        /// −log(ratio) instead of 1 − ratio.
        #[serde(default)]
        log: bool,
        /// Pool the sums over the batch before the ratio.
        #[serde(default)]
        batch: bool,
        /// Added to the numerator.
        #[serde(default = "smooth")]
        smooth_nr: f64,
        /// Added to the denominator.
        #[serde(default = "smooth")]
        smooth_dr: f64,
        /// A class absent from the ground truth contributes 0 (still counted in the mean).
        #[serde(default)]
        skip_empty: bool,
        /// Per-class weights multiplying each class's term.
        #[serde(default)]
        class_weights: Option<Vec<f64>>,
        /// mean / sum / none.
        #[serde(default)]
        reduction: Reduction,
    },
    /// MONAI `TverskyLoss`, with a focal exponent.
    Tversky {
        /// λ of this term.
        #[serde(default = "one")]
        weight: f64,
        /// Weight of false positives.
        #[serde(default = "half")]
        alpha: f64,
        /// Weight of false negatives.
        #[serde(default = "half")]
        beta: f64,
        /// Focal-Tversky exponent (1: plain Tversky).
        #[serde(default = "one")]
        gamma: f64,
        /// Keep class 0.
        #[serde(default = "yes")]
        include_background: bool,
        /// Pool the sums over the batch.
        #[serde(default)]
        batch: bool,
        /// Added to the numerator.
        #[serde(default = "smooth")]
        smooth_nr: f64,
        /// Added to the denominator.
        #[serde(default = "smooth")]
        smooth_dr: f64,
    },
    /// MONAI `GeneralizedDiceLoss`.
    GeneralizedDice {
        /// λ of this term.
        #[serde(default = "one")]
        weight: f64,
        /// square / simple / uniform class weights.
        #[serde(default)]
        w_type: WeightType,
        /// Keep class 0.
        #[serde(default = "yes")]
        include_background: bool,
        /// Pool the sums over the batch.
        #[serde(default)]
        batch: bool,
        /// Added to the numerator.
        #[serde(default = "smooth")]
        smooth_nr: f64,
        /// Added to the denominator.
        #[serde(default = "smooth")]
        smooth_dr: f64,
    },
    /// The region-proportion penalty R(û, τ) of "Do We Really Need Dice?".
    Region {
        /// λ of this term.
        #[serde(default = "one")]
        weight: f64,
        /// l1 / kl / l2 / log_sum.
        #[serde(default)]
        penalty: Penalty,
        /// ground_truth / uniform / a prior vector.
        #[serde(default)]
        target: RegionTarget,
        /// T of the predicted proportions û = mean of softmax(T·z) (sigmoid(T·z) in sigmoid
        /// mode): T *multiplies* the logits, so T = 10 (the paper's value) sharpens the
        /// probabilities towards the argmax sizes and T = 1 is the plain softmax. All region
        /// terms of one spec share one T.
        #[serde(default = "one")]
        temperature: f64,
    },
    /// `torch.nn.functional.binary_cross_entropy_with_logits` (sigmoid mode).
    Bce {
        /// λ of this term.
        #[serde(default = "one")]
        weight: f64,
        /// Per-channel positive weight (C values).
        #[serde(default)]
        pos_weight: Option<Vec<f64>>,
    },
}

impl Term {
    /// The `kind` string of the term, as in JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            Term::CrossEntropy { .. } => "cross_entropy",
            Term::Focal { .. } => "focal",
            Term::Dice { .. } => "dice",
            Term::Tversky { .. } => "tversky",
            Term::GeneralizedDice { .. } => "generalized_dice",
            Term::Region { .. } => "region",
            Term::Bce { .. } => "bce",
        }
    }

    /// λ, the weight of the term in the total.
    pub fn weight(&self) -> f64 {
        match self {
            Term::CrossEntropy { weight, .. }
            | Term::Focal { weight, .. }
            | Term::Dice { weight, .. }
            | Term::Tversky { weight, .. }
            | Term::GeneralizedDice { weight, .. }
            | Term::Region { weight, .. }
            | Term::Bce { weight, .. } => *weight,
        }
    }

    /// Whether the term is a sum over pixels (computed in the pixel passes) rather than a
    /// function of the per-(image, class) statistics.
    pub fn is_pixel_term(&self) -> bool {
        matches!(
            self,
            Term::CrossEntropy { .. } | Term::Focal { .. } | Term::Bce { .. }
        )
    }
}

/// The ignore index of PyTorch's `cross_entropy`.
pub const DEFAULT_IGNORE_INDEX: i64 = -100;

fn default_ignore() -> i64 {
    DEFAULT_IGNORE_INDEX
}

/// A loss: L = Σ_t weight_t · term_t, computed in one fused call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossSpec {
    /// softmax (default) or sigmoid.
    #[serde(default)]
    pub activation: Activation,
    /// Label value whose pixels are ignored by every term (default −100, as PyTorch).
    #[serde(default = "default_ignore")]
    pub ignore_index: i64,
    /// The terms, in the order their values are reported.
    pub terms: Vec<Term>,
}

/// At most this many per-pixel terms (cross_entropy, focal, bce) in one spec: the stats
/// kernel keeps one accumulator pair per pixel term.
pub const MAX_PIXEL_TERMS: usize = 4;

/// At most this many terms in one spec.
pub const MAX_TERMS: usize = 16;

impl LossSpec {
    /// Parses the JSON form (the contract's SPEC) and checks what can be checked without
    /// knowing the class count.
    pub fn from_json(text: &str) -> Result<Self> {
        let spec: LossSpec = serde_json::from_str(text).map_err(|e| Error::Spec(e.to_string()))?;
        spec.validate(None)?;
        Ok(spec)
    }

    /// A spec with the given terms, softmax activation and PyTorch's ignore index.
    pub fn new(terms: Vec<Term>) -> Self {
        LossSpec {
            activation: Activation::Softmax,
            ignore_index: DEFAULT_IGNORE_INDEX,
            terms,
        }
    }

    /// Checks every field. With `classes`, also checks per-class vectors and class-count
    /// rules. The error names the offending field as `terms[i].field`.
    pub fn validate(&self, classes: Option<usize>) -> Result<()> {
        if self.terms.is_empty() {
            return Err(Error::Spec("terms: the term list is empty".into()));
        }
        if self.terms.len() > MAX_TERMS {
            return Err(Error::Spec(format!(
                "terms: {} terms, at most {MAX_TERMS} are supported",
                self.terms.len()
            )));
        }
        let pixel_terms = self.terms.iter().filter(|t| t.is_pixel_term()).count();
        if pixel_terms > MAX_PIXEL_TERMS {
            return Err(Error::Spec(format!(
                "terms: {pixel_terms} cross_entropy/focal/bce terms, at most {MAX_PIXEL_TERMS} are supported"
            )));
        }
        let mut temperature: Option<f64> = None;
        for (i, t) in self.terms.iter().enumerate() {
            self.validate_term(i, t, classes, temperature)?;
            if let Term::Region {
                temperature: tt, ..
            } = t
            {
                temperature = Some(*tt);
            }
        }
        if let Some(c) = classes {
            if c == 0 {
                return Err(Error::Input("the class axis has size 0".into()));
            }
            if self.activation == Activation::Softmax && c < 2 {
                return Err(Error::Input(
                    "softmax needs at least 2 classes (C = 1): use activation sigmoid with a bce term".into(),
                ));
            }
        }
        Ok(())
    }

    /// The checks of term `i`; `temperature` is that of the region terms before it, which
    /// this one must share.
    fn validate_term(
        &self,
        i: usize,
        t: &Term,
        classes: Option<usize>,
        temperature: Option<f64>,
    ) -> Result<()> {
        let w = t.weight();
        if !w.is_finite() {
            return bad(i, "weight", format!("must be finite, got {w}"));
        }
        match t {
            Term::CrossEntropy {
                class_weights,
                label_smoothing,
                ..
            } => {
                needs_softmax(i, self.activation, "cross_entropy")?;
                check_vec(i, classes, "class_weights", class_weights.as_deref(), false)?;
                if !(0.0..=1.0).contains(label_smoothing) {
                    return bad(
                        i,
                        "label_smoothing",
                        format!("must lie in [0, 1], got {label_smoothing}"),
                    );
                }
            }
            Term::Focal { gamma, alpha, .. } => {
                needs_softmax(i, self.activation, "focal")?;
                if !gamma.is_finite() || *gamma < 0.0 {
                    return bad(i, "gamma", format!("must be finite and ≥ 0, got {gamma}"));
                }
                check_vec(i, classes, "alpha", alpha.as_deref(), true)?;
            }
            Term::Bce { pos_weight, .. } => {
                if self.activation != Activation::Sigmoid {
                    return bad(i, "kind", "bce needs activation sigmoid".into());
                }
                check_vec(i, classes, "pos_weight", pos_weight.as_deref(), true)?;
            }
            Term::Dice {
                smooth_nr,
                smooth_dr,
                class_weights,
                include_background,
                ..
            } => {
                check_smooth(i, *smooth_nr, *smooth_dr)?;
                check_vec(i, classes, "class_weights", class_weights.as_deref(), true)?;
                check_some_class(i, *include_background, classes)?;
            }
            Term::Tversky {
                alpha,
                beta,
                gamma,
                smooth_nr,
                smooth_dr,
                include_background,
                ..
            } => {
                check_smooth(i, *smooth_nr, *smooth_dr)?;
                for (name, v) in [("alpha", alpha), ("beta", beta)] {
                    if !v.is_finite() || *v < 0.0 {
                        return bad(i, name, format!("must be finite and ≥ 0, got {v}"));
                    }
                }
                if !gamma.is_finite() || *gamma <= 0.0 {
                    return bad(i, "gamma", format!("must be finite and > 0, got {gamma}"));
                }
                check_some_class(i, *include_background, classes)?;
            }
            Term::GeneralizedDice {
                smooth_nr,
                smooth_dr,
                include_background,
                ..
            } => {
                check_smooth(i, *smooth_nr, *smooth_dr)?;
                check_some_class(i, *include_background, classes)?;
            }
            Term::Region {
                target,
                temperature: tt,
                ..
            } => check_region(i, classes, target, *tt, temperature)?,
        }
        Ok(())
    }

    /// Checks that the kind of labels fits the activation: sigmoid mode takes masks of the
    /// logits' shape, softmax mode class indices or probability vectors.
    pub fn check_labels(&self, labels: &crate::input::Labels<'_>) -> Result<()> {
        if self.activation == Activation::Sigmoid
            && matches!(labels, crate::input::Labels::Index(_))
        {
            return Err(Error::Input(
                "sigmoid mode needs float masks of the logits' shape as labels, not class indices"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Every check of a call before any work: logits (shape, finiteness), labels (count,
    /// values), the spec against the class count, and the label kind against the activation.
    pub fn check_inputs(
        &self,
        shape: &crate::input::Shape,
        logits: &[f32],
        labels: &crate::input::Labels<'_>,
    ) -> Result<()> {
        crate::input::check_logits(logits, shape)?;
        labels.check(shape, self.ignore_index)?;
        self.validate(Some(shape.classes))?;
        self.check_labels(labels)
    }

    /// The common temperature of the region terms (1 when there are none).
    pub fn temperature(&self) -> f64 {
        self.terms
            .iter()
            .find_map(|t| match t {
                Term::Region { temperature, .. } => Some(*temperature),
                _ => None,
            })
            .unwrap_or(1.0)
    }

    /// Whether every term is a pixel term (cross-entropy, focal, BCE): the spec needs no
    /// per-class statistic for its loss (the one-pass path, calls without proportions).
    pub fn pixel_terms_only(&self) -> bool {
        self.terms.iter().all(|t| t.is_pixel_term())
    }

    /// Whether the region terms need the tempered softmax s = softmax(T·z) (T ≠ 1).
    pub fn tempered(&self) -> bool {
        self.temperature() != 1.0
    }
}

/// The error of field `field` of term `i`, in the `terms[i].field: why` form every term
/// check reports.
fn bad(i: usize, field: &str, why: String) -> Result<()> {
    Err(Error::Spec(format!("terms[{i}].{field}: {why}")))
}

/// A per-class vector: one value per class (when the class count is known), none negative
/// or non-finite, and, unless `allow_zero_sum`, not all zero.
fn check_vec(
    i: usize,
    classes: Option<usize>,
    field: &str,
    v: Option<&[f64]>,
    allow_zero_sum: bool,
) -> Result<()> {
    let Some(v) = v else {
        return Ok(());
    };
    if let Some(c) = classes {
        if v.len() != c {
            return bad(
                i,
                field,
                format!("has {} values, expected one per class ({c})", v.len()),
            );
        }
    }
    if v.is_empty() {
        return bad(i, field, "is empty".into());
    }
    for (k, x) in v.iter().enumerate() {
        if !x.is_finite() || *x < 0.0 {
            return bad(
                i,
                field,
                format!("value [{k}] = {x} must be finite and ≥ 0"),
            );
        }
    }
    if !allow_zero_sum && v.iter().sum::<f64>() <= 0.0 {
        return bad(i, field, "all values are zero".into());
    }
    Ok(())
}

/// A cross-entropy or focal term in sigmoid mode is a mistake, not a variant.
fn needs_softmax(i: usize, activation: Activation, name: &str) -> Result<()> {
    if activation != Activation::Softmax {
        return bad(
            i,
            "kind",
            format!("{name} needs activation softmax (use bce in sigmoid mode)"),
        );
    }
    Ok(())
}

/// The smoothing constants of a Dice-family term.
fn check_smooth(i: usize, nr: f64, dr: f64) -> Result<()> {
    if !nr.is_finite() || nr < 0.0 {
        return bad(i, "smooth_nr", format!("must be finite and ≥ 0, got {nr}"));
    }
    if !dr.is_finite() || dr < 0.0 {
        return bad(i, "smooth_dr", format!("must be finite and ≥ 0, got {dr}"));
    }
    Ok(())
}

/// A Dice-family term without class 0 needs a second class to score.
fn check_some_class(i: usize, include_background: bool, classes: Option<usize>) -> Result<()> {
    if !include_background && classes == Some(1) {
        return bad(
            i,
            "include_background",
            "false leaves no class when C = 1".into(),
        );
    }
    Ok(())
}

/// A region term's temperature T and prior. `shared` is the T of the region terms before
/// it: the stats pass computes one tempered activation for all of them.
fn check_region(
    i: usize,
    classes: Option<usize>,
    target: &RegionTarget,
    tt: f64,
    shared: Option<f64>,
) -> Result<()> {
    if !tt.is_finite() || tt <= 0.0 {
        return bad(
            i,
            "temperature",
            format!("must be finite and > 0, got {tt}"),
        );
    }
    if let Some(t0) = shared {
        if t0 != tt {
            return bad(
                i,
                "temperature",
                format!("all region terms must share one temperature ({t0} and {tt})"),
            );
        }
    }
    if let RegionTarget::Prior(v) = target {
        check_vec(i, classes, "target", Some(v), false)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_example() {
        let text = r#"{
          "activation": "softmax", "ignore_index": 255,
          "terms": [
            {"kind": "cross_entropy", "weight": 1.0, "class_weights": [1.0, 2.0], "label_smoothing": 0.0, "reduction": "mean"},
            {"kind": "focal", "weight": 1.0, "gamma": 2.0, "alpha": null},
            {"kind": "dice", "weight": 1.0, "include_background": true, "squared": false, "jaccard": false,
             "log": false, "batch": false, "smooth_nr": 1e-5, "smooth_dr": 1e-5, "skip_empty": false,
             "class_weights": null, "reduction": "mean"},
            {"kind": "tversky", "weight": 1.0, "alpha": 0.5, "beta": 0.5, "gamma": 1.0, "include_background": true,
             "batch": false, "smooth_nr": 1e-5, "smooth_dr": 1e-5},
            {"kind": "generalized_dice", "weight": 1.0, "w_type": "square", "include_background": true, "batch": false,
             "smooth_nr": 1e-5, "smooth_dr": 1e-5},
            {"kind": "region", "weight": 0.1, "penalty": "l1", "target": "ground_truth", "temperature": 1.0}
          ]}"#;
        let spec = LossSpec::from_json(text).unwrap();
        assert_eq!(spec.terms.len(), 6);
        assert_eq!(spec.ignore_index, 255);
        spec.validate(Some(2)).unwrap();
        let back = serde_json::to_string(&spec).unwrap();
        assert_eq!(LossSpec::from_json(&back).unwrap(), spec);
    }

    #[test]
    fn defaults_match_the_references() {
        let spec = LossSpec::from_json(
            r#"{"terms":[{"kind":"dice"},{"kind":"focal"},{"kind":"region","target":[0.5,0.5]}]}"#,
        )
        .unwrap();
        assert_eq!(spec.ignore_index, -100);
        match &spec.terms[0] {
            Term::Dice {
                smooth_nr,
                smooth_dr,
                include_background,
                weight,
                ..
            } => {
                assert_eq!(
                    (*smooth_nr, *smooth_dr, *include_background, *weight),
                    (1e-5, 1e-5, true, 1.0)
                );
            }
            _ => panic!("not dice"),
        }
        assert!(matches!(spec.terms[1], Term::Focal { gamma, .. } if gamma == 2.0));
        assert!(
            matches!(&spec.terms[2], Term::Region { target: RegionTarget::Prior(v), .. } if v.len() == 2)
        );
    }

    fn err(text: &str, classes: Option<usize>) -> String {
        match LossSpec::from_json(text).and_then(|s| s.validate(classes)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{text} was accepted"),
        }
    }

    #[test]
    fn floats_survive_a_json_round_trip() {
        // Found by the fuzzer: long mantissas need serde_json's exact float parsing.
        let spec = LossSpec::from_json(r#"{"terms":[{"kind":"cross_entropy","class_weights":[0.0,2.01111111111011111111111111111111111,1.1e20]}]}"#).unwrap();
        let again = LossSpec::from_json(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(again, spec);
    }

    #[test]
    fn mistakes_name_the_field() {
        assert!(err(r#"{"terms":[]}"#, None).contains("terms"));
        assert!(err(r#"{"terms":[{"kind":"softdice"}]}"#, None).contains("softdice"));
        assert!(err(r#"{"terms":[{"kind":"dice","smoth_nr":1}]}"#, None).contains("smoth_nr"));
        assert!(err(
            r#"{"terms":[{"kind":"cross_entropy","class_weights":[1,-2]}]}"#,
            None
        )
        .contains("terms[0].class_weights"));
        assert!(err(
            r#"{"terms":[{"kind":"cross_entropy","class_weights":[1,2]}]}"#,
            Some(3)
        )
        .contains("one per class"));
        assert!(err(
            r#"{"terms":[{"kind":"cross_entropy","label_smoothing":1.5}]}"#,
            None
        )
        .contains("label_smoothing"));
        assert!(err(r#"{"terms":[{"kind":"focal","gamma":-1}]}"#, None).contains("gamma"));
        assert!(err(r#"{"terms":[{"kind":"bce"}]}"#, None).contains("sigmoid"));
        assert!(err(
            r#"{"activation":"sigmoid","terms":[{"kind":"cross_entropy"}]}"#,
            None
        )
        .contains("softmax"));
        assert!(
            err(r#"{"terms":[{"kind":"region","temperature":0}]}"#, None).contains("temperature")
        );
        assert!(err(
            r#"{"terms":[{"kind":"region","temperature":2},{"kind":"region","temperature":3}]}"#,
            None
        )
        .contains("share"));
        assert!(err(r#"{"terms":[{"kind":"cross_entropy"}]}"#, Some(1)).contains("C = 1"));
        assert!(err(r#"{"terms":[{"kind":"dice","smooth_dr":-1}]}"#, None).contains("smooth_dr"));
        assert!(err(
            r#"{"terms":[{"kind":"cross_entropy","reduction":"avg"}]}"#,
            None
        )
        .contains("avg"));
    }
}
