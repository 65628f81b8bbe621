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

    /// Statistics of `batch` images of `classes` classes and `pixel_terms` per-pixel terms
    /// (cross-entropy, focal, BCE: the spec's terms for which
    /// [`Term::is_pixel_term`](crate::spec::Term::is_pixel_term) holds), all zero.
    pub fn zeros(batch: usize, classes: usize, pixel_terms: usize) -> Statistics {
        Statistics {
            batch,
            classes,
            per_class: vec![[0.0; 6]; batch * classes],
            valid: vec![0.0; batch],
            plain_ce: vec![0.0; batch],
            pixel_sums: vec![[0.0; 2]; batch * pixel_terms],
        }
    }

    /// Per-pixel terms T of these statistics.
    pub fn pixel_terms(&self) -> usize {
        self.pixel_sums.len().checked_div(self.batch).unwrap_or(0)
    }

    /// Values per image in the flat form: 6·C + 2 + 2·T.
    pub fn flat_row(classes: usize, pixel_terms: usize) -> usize {
        6 * classes + 2 + 2 * pixel_terms
    }

    /// Length of the flat form: B·(6·C + 2 + 2·T).
    pub fn flat_len(batch: usize, classes: usize, pixel_terms: usize) -> usize {
        batch * Self::flat_row(classes, pixel_terms)
    }

    /// The statistics as one flat `f64` buffer, the form an all-reduce exchanges (see
    /// [`crate::distributed`]). Image-major: image b's row starts at b·W with
    /// W = 6·C + 2 + 2·T and holds
    ///
    /// - for each class c in order, the six sums of [`Statistics::per_class`]
    ///   `[Σp, Σp², Σp·g, Σg, Σg², Σs]` (offsets 6c … 6c + 5),
    /// - the image's valid pixel count (offset 6C) and its plain CE sum (6C + 1),
    /// - for each per-pixel term t, its loss sum and normaliser sum (6C + 2 + 2t, 6C + 3 + 2t).
    ///
    /// Every value is a sum over pixels, so the element-wise sum of shards' flat buffers is
    /// the flat buffer of the whole batch. The device computes the sums in f32; f64 holds
    /// each exactly, so the round trip through this form changes no bit.
    pub fn to_flat(&self) -> Vec<f64> {
        let (c_n, t_n) = (self.classes, self.pixel_terms());
        let mut flat = Vec::with_capacity(Self::flat_len(self.batch, c_n, t_n));
        for b in 0..self.batch {
            for c in 0..c_n {
                flat.extend_from_slice(&self.per_class[b * c_n + c]);
            }
            flat.push(self.valid[b]);
            flat.push(self.plain_ce[b]);
            for t in 0..t_n {
                flat.extend_from_slice(&self.pixel_sums[b * t_n + t]);
            }
        }
        flat
    }

    /// The inverse of [`Statistics::to_flat`]; an error when `flat` does not hold
    /// B·(6·C + 2 + 2·T) values.
    pub fn from_flat(
        batch: usize,
        classes: usize,
        pixel_terms: usize,
        flat: &[f64],
    ) -> crate::Result<Statistics> {
        let width = Self::flat_row(classes, pixel_terms);
        if flat.len() != batch * width {
            return Err(crate::Error::Input(format!(
                "flat statistics hold {} values, B={batch} C={classes} with {pixel_terms} pixel terms need {}",
                flat.len(),
                batch * width
            )));
        }
        let mut st = Self::zeros(batch, classes, pixel_terms);
        for (b, row) in flat.chunks_exact(width).enumerate() {
            for c in 0..classes {
                st.per_class[b * classes + c].copy_from_slice(&row[6 * c..6 * c + 6]);
            }
            st.valid[b] = row[6 * classes];
            st.plain_ce[b] = row[6 * classes + 1];
            for t in 0..pixel_terms {
                let o = 6 * classes + 2 + 2 * t;
                st.pixel_sums[b * pixel_terms + t] = [row[o], row[o + 1]];
            }
        }
        Ok(st)
    }

    /// Sets every image outside `images` to zero: a shard's statistics then hold its own
    /// images only, whatever the device's buffers held for the others, and a sum over
    /// shards adds each image's values to zeros only (exact, in any order).
    pub fn keep_images(&mut self, images: std::ops::Range<usize>) {
        let t_n = self.pixel_terms();
        for b in (0..self.batch).filter(|b| !images.contains(b)) {
            for v in &mut self.per_class[b * self.classes..(b + 1) * self.classes] {
                *v = [0.0; 6];
            }
            self.valid[b] = 0.0;
            self.plain_ce[b] = 0.0;
            for v in &mut self.pixel_sums[b * t_n..(b + 1) * t_n] {
                *v = [0.0; 2];
            }
        }
    }
}

/// The result of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LossOutput {
    /// Σ_t λ_t · value_t.
    pub loss: f64,
    /// Each term in spec order.
    pub terms: Vec<TermValue>,
    /// û per image and class: (Σp + 1e-10)/(n_b + 1e-10), untempered (empty when the call
    /// left the class sums out: `Options::proportions`, `GpuContext::record_loss`).
    pub predicted_proportions: Vec<Vec<f64>>,
    /// τ per image and class: (Σg + 1e-10)/(n_b + 1e-10) (empty as `predicted_proportions`).
    pub target_proportions: Vec<Vec<f64>>,
    /// Valid (not ignored) pixels per image.
    pub valid_pixels: Vec<u64>,
    /// Per image, softmax mode only (empty in sigmoid mode, and as `predicted_proportions`).
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
