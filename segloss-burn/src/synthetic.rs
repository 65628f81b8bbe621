//! Synthetic segmentation scenes, deterministic from a seed (no downloads): a background and
//! discs of three foreground classes whose areas differ by two orders of magnitude, each
//! class with its own intensity, under noise and blur so that boundaries are uncertain.

use segloss::testing::Rng;

/// What scenes look like.
#[derive(Debug, Clone)]
pub struct SceneConfig {
    /// Image side in pixels.
    pub size: usize,
    /// Disc radius per foreground class, as a fraction of the side.
    pub radius: [f64; 3],
    /// Intensity of the background and of each foreground class.
    pub intensity: [f32; 4],
    /// Standard deviation of the additive noise.
    pub noise: f64,
    /// Probability that a foreground class is absent from an image.
    pub absent: f64,
}

impl SceneConfig {
    /// Every class in every image, areas in ratio ~100 : 10 : 1 (medical-like imbalance).
    pub fn imbalanced(size: usize) -> Self {
        SceneConfig {
            size,
            radius: [0.3, 0.095, 0.03],
            intensity: [0.0, 1.0, -1.0, 2.0],
            noise: 0.6,
            absent: 0.0,
        }
    }
}

/// A batch: images (B, 1, H, W) and class indices (B, H, W), row-major.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Pixel intensities.
    pub images: Vec<f32>,
    /// Class per pixel.
    pub labels: Vec<i32>,
}

/// A deterministic stream of scenes.
#[derive(Debug)]
pub struct Scenes {
    config: SceneConfig,
    rng: Rng,
}

impl Scenes {
    /// The scenes of `seed`.
    pub fn new(config: SceneConfig, seed: u64) -> Self {
        Scenes {
            config,
            rng: Rng::new(seed),
        }
    }

    /// The next `n` scenes.
    pub fn batch(&mut self, n: usize) -> Batch {
        let s = self.config.size;
        let mut images = Vec::with_capacity(n * s * s);
        let mut labels = Vec::with_capacity(n * s * s);
        for _ in 0..n {
            let (img, lab) = self.scene();
            images.extend(img);
            labels.extend(lab);
        }
        Batch { images, labels }
    }

    fn scene(&mut self) -> (Vec<f32>, Vec<i32>) {
        let c = self.config.clone();
        let s = c.size;
        let mut lab = vec![0i32; s * s];
        // Largest first, so smaller structures are drawn over it.
        for (k, r) in c.radius.iter().enumerate() {
            if self.rng.uniform() < c.absent {
                continue;
            }
            let r = (r * s as f64 * (0.8 + 0.4 * self.rng.uniform())).max(0.8);
            let cx = r + self.rng.uniform() * (s as f64 - 2.0 * r);
            let cy = r + self.rng.uniform() * (s as f64 - 2.0 * r);
            for y in 0..s {
                for x in 0..s {
                    let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
                    if dx * dx + dy * dy <= r * r {
                        lab[y * s + x] = k as i32 + 1;
                    }
                }
            }
        }
        let raw: Vec<f32> = lab
            .iter()
            .map(|&l| c.intensity[l as usize] + (self.rng.symmetric(1.0) * c.noise * 1.7) as f32)
            .collect();
        // A 3×3 box blur: boundaries become uncertain.
        let mut img = vec![0f32; s * s];
        for y in 0..s {
            for x in 0..s {
                let (mut sum, mut n) = (0.0, 0.0);
                for yy in y.saturating_sub(1)..(y + 2).min(s) {
                    for xx in x.saturating_sub(1)..(x + 2).min(s) {
                        sum += raw[yy * s + xx];
                        n += 1.0;
                    }
                }
                img[y * s + x] = sum / n;
            }
        }
        (img, lab)
    }
}
