//! What a loss evaluation returns, from the GPU or the CPU alike.

use serde::Serialize;

/// One term's contribution: its unweighted value and its weight λ.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TermValue {
    /// The term's `kind`, as in the spec.
    pub kind: String,
    /// λ of the term.
    pub weight: f64,
    /// The unweighted value.
    pub value: f64,
}

/// The per-image decomposition of cross-entropy into its region-size part and the rest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct Decomposition {
    /// Plain mean CE over the image's valid pixels (no class weights, no smoothing).
    pub ce: f64,
    /// KL(τ‖û): the CE's region-size part.
    pub kl: f64,
    /// ce − kl, the matching part (never negative).
    pub matching: f64,
    /// Σ_c log(û_c + τ_c) / C: Dice's region-size part.
    pub dice_region: f64,
}

/// Per-(image, class) sums over valid pixels and per-image sums: everything the finalize
/// step needs. Summing two `Statistics` of disjoint batches' shards is how batch terms
/// work under data parallelism.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Statistics {
    /// B.
    pub batch: usize,
    /// C.
    pub classes: usize,
    /// Index b·C + c: [Σp, Σp², Σp·g, Σg, Σg², Σs] (s the tempered probability).
    pub per_class: Vec<[f64; 6]>,
    /// Valid pixels per image.
    pub valid: Vec<f64>,
    /// Σ −log p_y over each image's valid pixels (the decomposition's CE).
    pub plain_ce: Vec<f64>,
    /// Index b·T + t for the t-th per-pixel term of the spec: [loss sum, normaliser sum].
    pub pixel_sums: Vec<[f64; 2]>,
}

impl Statistics {
    /// Adds another shard's statistics of the same global batch (the combination step of
    /// the two-phase API: each shard's images are zero in the other shards).
    pub fn add(&mut self, other: &Statistics) -> crate::Result<()> {
        if (self.batch, self.classes, self.pixel_sums.len())
            != (other.batch, other.classes, other.pixel_sums.len())
        {
            return Err(crate::Error::Input(format!(
                "statistics of B={} C={} and B={} C={} cannot be added",
                self.batch, self.classes, other.batch, other.classes
            )));
        }
        for (a, b) in self.per_class.iter_mut().zip(&other.per_class) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        for (a, b) in self.valid.iter_mut().zip(&other.valid) {
            *a += b;
        }
        for (a, b) in self.plain_ce.iter_mut().zip(&other.plain_ce) {
            *a += b;
        }
        for (a, b) in self.pixel_sums.iter_mut().zip(&other.pixel_sums) {
            a[0] += b[0];
            a[1] += b[1];
        }
        Ok(())
    }
}

/// The result of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LossOutput {
    /// Σ_t λ_t · value_t.
    pub loss: f64,
    /// Each term in spec order.
    pub terms: Vec<TermValue>,
    /// û per image and class: (Σp + 1e-10)/(n_b + 1e-10), untempered.
    pub predicted_proportions: Vec<Vec<f64>>,
    /// τ per image and class: (Σg + 1e-10)/(n_b + 1e-10).
    pub target_proportions: Vec<Vec<f64>>,
    /// Valid (not ignored) pixels per image.
    pub valid_pixels: Vec<u64>,
    /// Per image, softmax mode only (empty in sigmoid mode).
    pub decomposition: Vec<Decomposition>,
    /// Per term: its elements when its reduction is `none` (a B·S map for cross-entropy,
    /// B·C values for Dice, zeros at dropped classes), otherwise `None`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub elements: Vec<Option<Vec<f64>>>,
    /// ∂loss/∂logits, the logits' shape and layout, when requested.
    #[serde(skip)]
    pub gradient: Option<Vec<f32>>,
    /// The raw statistics, when requested.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statistics: Option<Statistics>,
}
