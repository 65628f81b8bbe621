//! Synthetic segmentation scenes, deterministic from a seed (no downloads), made to isolate
//! region size: a background and elliptical structures of three foreground classes, each
//! class with its own intensity, under noise and blur, with annotations whose boundaries are
//! jittered against the image's (boundary uncertainty, where a loss's size preference shows).
//!
//! Two settings (the two regimes of "Do We Really Need Dice?"):
//! - [`SceneConfig::imbalanced`], medical-like: every class in every image, areas in fixed
//!   ranges two orders of magnitude apart (0.2 % to 30 % of the image);
//! - [`SceneConfig::diverse`], natural-image-like: each class present or absent per image,
//!   its area anywhere in the same span, so per-image proportions vary widely.

use segloss::testing::Rng;

/// How one foreground class appears.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassLook {
    /// Area range of its structure as a fraction of the image, drawn log-uniformly.
    pub area: (f64, f64),
    /// Probability that the class is present in an image.
    pub presence: f64,
    /// Mean intensity inside the structure.
    pub intensity: f32,
}

/// What scenes look like.
#[derive(Debug, Clone, PartialEq)]
pub struct SceneConfig {
    /// Image side in pixels.
    pub size: usize,
    /// The three foreground classes (class indices 1, 2, 3).
    pub classes: [ClassLook; 3],
    /// Background intensity.
    pub background: f32,
    /// Standard deviation of the additive (uniform) noise.
    pub noise: f64,
    /// Half-width in pixels of the uniform jitter of each annotated boundary against the
    /// imaged one (0: labels follow the image exactly).
    pub jitter: f64,
}

impl SceneConfig {
    /// Medical-like: every class in every image, areas about 100 : 10 : 1 (20 %, 2 %, 0.3 %).
    pub fn imbalanced(size: usize) -> Self {
        let look = |area, intensity| ClassLook {
            area,
            presence: 1.0,
            intensity,
        };
        SceneConfig {
            size,
            classes: [
                look((0.12, 0.30), 1.0),
                look((0.012, 0.03), -1.0),
                look((0.002, 0.005), 2.0),
            ],
            background: 0.0,
            noise: 0.6,
            jitter: 0.75,
        }
    }

    /// Natural-image-like: each class present in half the images, its area log-uniform over
    /// 0.2 % to 30 % of the image, so the same class is tiny in one image and large in the next.
    pub fn diverse(size: usize) -> Self {
        let mut c = Self::imbalanced(size);
        for look in &mut c.classes {
            look.area = (0.002, 0.30);
            look.presence = 0.5;
        }
        c
    }

    /// Pixels per image.
    pub fn pixels(&self) -> usize {
        self.size * self.size
    }
}

/// A batch: images (B, 1, H, W) and class indices (B, H, W), row-major.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Pixel intensities.
    pub images: Vec<f32>,
    /// Class per pixel (0 background, 1..=3 the foreground classes).
    pub labels: Vec<i32>,
}

/// A deterministic stream of scenes.
#[derive(Debug)]
pub struct Scenes {
    config: SceneConfig,
    rng: Rng,
}

/// One structure: an axis-aligned ellipse.
struct Ellipse {
    class: i32,
    cx: f64,
    cy: f64,
    rx: f64,
    ry: f64,
}

impl Ellipse {
    /// Whether pixel (x, y) lies inside the ellipse grown by `grow` pixels.
    fn covers(&self, x: usize, y: usize, grow: f64) -> bool {
        let (rx, ry) = ((self.rx + grow).max(0.3), (self.ry + grow).max(0.3));
        let (dx, dy) = (
            (x as f64 + 0.5 - self.cx) / rx,
            (y as f64 + 0.5 - self.cy) / ry,
        );
        dx * dx + dy * dy <= 1.0
    }
}

impl Scenes {
    /// The scenes of `seed`.
    pub fn new(config: SceneConfig, seed: u64) -> Self {
        Scenes {
            config,
            rng: Rng::new(seed),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SceneConfig {
        &self.config
    }

    /// The next `n` scenes.
    pub fn batch(&mut self, n: usize) -> Batch {
        let p = self.config.pixels();
        let mut images = Vec::with_capacity(n * p);
        let mut labels = Vec::with_capacity(n * p);
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
        let mut shapes = vec![];
        for (k, look) in c.classes.iter().enumerate() {
            if self.rng.uniform() >= look.presence {
                continue;
            }
            let (lo, hi) = look.area;
            let area = lo * (hi / lo).powf(self.rng.uniform()) * (s * s) as f64;
            let aspect = 0.6f64.powf(self.rng.symmetric(1.0)); // 0.6 to 1.67
            let r = (area / std::f64::consts::PI).sqrt();
            let (rx, ry) = (r * aspect.sqrt(), r / aspect.sqrt());
            let cx = rx + self.rng.uniform() * (s as f64 - 2.0 * rx).max(0.0);
            let cy = ry + self.rng.uniform() * (s as f64 - 2.0 * ry).max(0.0);
            shapes.push(Ellipse {
                class: k as i32 + 1,
                cx,
                cy,
                rx,
                ry,
            });
        }
        // Largest first, so smaller structures are drawn over larger ones.
        shapes.sort_by(|a, b| (b.rx * b.ry).total_cmp(&(a.rx * a.ry)));
        let grow: Vec<f64> = shapes
            .iter()
            .map(|_| self.rng.symmetric(c.jitter))
            .collect();
        let mut truth = vec![0i32; s * s]; // what the image shows
        let mut lab = vec![0i32; s * s]; // what the annotator drew
        for (e, g) in shapes.iter().zip(&grow) {
            for y in 0..s {
                for x in 0..s {
                    if e.covers(x, y, 0.0) {
                        truth[y * s + x] = e.class;
                    }
                    if e.covers(x, y, *g) {
                        lab[y * s + x] = e.class;
                    }
                }
            }
        }
        let intensity = |l: i32| {
            if l == 0 {
                c.background
            } else {
                c.classes[l as usize - 1].intensity
            }
        };
        // Uniform noise of standard deviation `noise` (half-width √3·σ).
        let raw: Vec<f32> = truth
            .iter()
            .map(|&l| intensity(l) + (self.rng.symmetric(1.0) * c.noise * 3f64.sqrt()) as f32)
            .collect();
        // A 3×3 box blur: imaged boundaries become uncertain too.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn proportions(labels: &[i32], pixels: usize) -> Vec<[f64; 4]> {
        labels
            .chunks(pixels)
            .map(|img| {
                let mut t = [0.0; 4];
                for &l in img {
                    t[l as usize] += 1.0 / pixels as f64;
                }
                t
            })
            .collect()
    }

    #[test]
    fn scenes_are_deterministic_from_the_seed() {
        let a = Scenes::new(SceneConfig::imbalanced(24), 7).batch(3);
        let b = Scenes::new(SceneConfig::imbalanced(24), 7).batch(3);
        let c = Scenes::new(SceneConfig::imbalanced(24), 8).batch(3);
        assert_eq!(a.images, b.images);
        assert_eq!(a.labels, b.labels);
        assert_ne!(a.labels, c.labels);
    }

    #[test]
    fn imbalanced_scenes_hold_every_class_at_its_size() {
        let cfg = SceneConfig::imbalanced(64);
        let batch = Scenes::new(cfg.clone(), 1).batch(40);
        let t = proportions(&batch.labels, cfg.pixels());
        for (k, look) in cfg.classes.iter().enumerate() {
            let mean = t.iter().map(|p| p[k + 1]).sum::<f64>() / t.len() as f64;
            // Smaller structures drawn over larger ones, and the jittered boundary, move the
            // area a little off the drawn range.
            assert!(
                mean > look.area.0 * 0.4 && mean < look.area.1 * 1.5,
                "class {} mean proportion {mean} outside {:?}",
                k + 1,
                look.area
            );
            assert!(t.iter().all(|p| p[k + 1] > 0.0), "class {} absent", k + 1);
        }
        assert_eq!(batch.images.len(), 40 * cfg.pixels());
        assert!(batch.images.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn diverse_scenes_have_absent_classes_and_sizes_over_two_decades() {
        let cfg = SceneConfig::diverse(64);
        let t = proportions(&Scenes::new(cfg.clone(), 2).batch(60).labels, cfg.pixels());
        for k in 1..4 {
            let present: Vec<f64> = t.iter().map(|p| p[k]).filter(|&v| v > 0.0).collect();
            let absent = t.len() - present.len();
            assert!(
                absent > 10 && present.len() > 10,
                "class {k}: {absent} absent"
            );
            let (lo, hi) = present
                .iter()
                .fold((1.0f64, 0.0f64), |(l, h), &v| (l.min(v), h.max(v)));
            assert!(hi / lo > 30.0, "class {k}: areas {lo}..{hi}");
        }
    }
}
