//! Random problems for tests, examples and benchmarks (deterministic from a seed).

use crate::input::{Shape, IGNORE};

/// A small, fast, seedable generator (SplitMix64); tests need reproducible data, not
/// statistical quality.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in lo..hi.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo) as u64) as usize
    }

    /// Uniform in [−scale, scale).
    pub fn symmetric(&mut self, scale: f64) -> f64 {
        (2.0 * self.uniform() - 1.0) * scale
    }
}

/// Logits uniform in [−scale, scale), never all zero.
pub fn random_logits(rng: &mut Rng, shape: &Shape, scale: f64) -> Vec<f32> {
    (0..shape.len())
        .map(|_| rng.symmetric(scale) as f32)
        .collect()
}

/// Class labels; each pixel is ignored with probability `ignored`. Classes are drawn with
/// a skew so that proportions differ between classes and images.
pub fn random_labels(rng: &mut Rng, shape: &Shape, ignored: f64) -> Vec<u32> {
    (0..shape.batch * shape.pixels())
        .map(|_| {
            if rng.uniform() < ignored {
                IGNORE
            } else {
                let u = rng.uniform();
                ((u * u) * shape.classes as f64) as u32
            }
        })
        .collect()
}

/// Probability vectors per pixel (NCHW), each summing to 1.
pub fn random_soft_labels(rng: &mut Rng, shape: &Shape) -> Vec<f32> {
    let (c_n, s) = (shape.classes, shape.pixels());
    let mut out = vec![0.0f32; shape.len()];
    for b in 0..shape.batch {
        for i in 0..s {
            let w: Vec<f64> = (0..c_n).map(|_| rng.uniform() + 0.01).collect();
            let total: f64 = w.iter().sum();
            for c in 0..c_n {
                out[(b * c_n + c) * s + i] = (w[c] / total) as f32;
            }
        }
    }
    out
}

/// 0..1 masks, mostly 0 or 1 with some soft values, as sigmoid-mode targets.
pub fn random_masks(rng: &mut Rng, shape: &Shape) -> Vec<f32> {
    (0..shape.len())
        .map(|_| {
            let u = rng.uniform();
            if u < 0.6 {
                0.0
            } else if u < 0.9 {
                1.0
            } else {
                rng.uniform() as f32
            }
        })
        .collect()
}
