//! Reproduces the central finding of "Do We Really Need Dice?" (Liu, Dolz, Galdran, Kobbi,
//! Ben Ayed) on synthetic data made here: a per-pixel model trained by gradient descent with
//! segloss's gradients, under CE, Dice, CE + Dice and CE + λ·L1 region penalty (T = 10).
//! It prints, per loss, the test Dice score and the gap between predicted and true region
//! proportions (soft: the mean probability û; argmax: the fraction predicted), and draws the
//! argmax gap over training to region_bias.png.
//!
//! cargo run --release --example region_bias [-- --out PATH --steps N]
//!
//! The data: 64×64 images of background with one to three small discs (a few percent of the
//! pixels). Each pixel shows a noisy intensity (disc 1, background 0, Gaussian noise σ = 0.9),
//! so many pixels are ambiguous. The model sees the pixel's intensity and its 3×3 mean and
//! maps them linearly to two logits: the only freedom is where it puts the boundary, which
//! is exactly where the losses' region-size biases show.

use segloss::testing::Rng;
use segloss::{Labels, LossSpec, Segloss, Shape};

const SIZE: usize = 64;
const FEATURES: usize = 3; // intensity, 3×3 mean intensity, 1

struct Data {
    shape: Shape,
    features: Vec<[f32; FEATURES]>, // per (image, pixel)
    labels: Vec<u32>,
}

fn gaussian(rng: &mut Rng) -> f64 {
    let (u, v) = (rng.uniform().max(1e-12), rng.uniform());
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

fn make_data(rng: &mut Rng, images: usize) -> Data {
    let s = SIZE * SIZE;
    let mut labels = vec![0u32; images * s];
    let mut intensity = vec![0f32; images * s];
    for b in 0..images {
        for _ in 0..rng.range(1, 4) {
            let (cx, cy, r) = (
                rng.range(6, SIZE - 6) as f64,
                rng.range(6, SIZE - 6) as f64,
                2.0 + 3.5 * rng.uniform(),
            );
            for y in 0..SIZE {
                for x in 0..SIZE {
                    if (x as f64 - cx).powi(2) + (y as f64 - cy).powi(2) <= r * r {
                        labels[b * s + y * SIZE + x] = 1;
                    }
                }
            }
        }
        for i in 0..s {
            intensity[b * s + i] = labels[b * s + i] as f32 + 0.9 * gaussian(rng) as f32;
        }
    }
    let mut features = vec![[0f32; FEATURES]; images * s];
    for b in 0..images {
        for y in 0..SIZE {
            for x in 0..SIZE {
                let (mut sum, mut n) = (0.0, 0.0);
                for dy in -1i64..=1 {
                    for dx in -1i64..=1 {
                        let (yy, xx) = (y as i64 + dy, x as i64 + dx);
                        if (0..SIZE as i64).contains(&yy) && (0..SIZE as i64).contains(&xx) {
                            sum += intensity[b * s + yy as usize * SIZE + xx as usize];
                            n += 1.0;
                        }
                    }
                }
                features[b * s + y * SIZE + x] = [intensity[b * s + y * SIZE + x], sum / n, 1.0];
            }
        }
    }
    Data {
        shape: Shape::new(images, 2, &[SIZE, SIZE]),
        features,
        labels,
    }
}

/// Logits (NCHW) of the per-pixel linear model W (2 × FEATURES).
fn logits(w: &[[f64; FEATURES]; 2], d: &Data) -> Vec<f32> {
    let s = d.shape.pixels();
    let mut z = vec![0f32; d.shape.len()];
    for b in 0..d.shape.batch {
        for c in 0..2 {
            for i in 0..s {
                let f = &d.features[b * s + i];
                z[(b * 2 + c) * s + i] =
                    (0..FEATURES).map(|k| w[c][k] * f[k] as f64).sum::<f64>() as f32;
            }
        }
    }
    z
}

/// How a trained model does on a set of images.
struct Scores {
    /// Mean over images of |û − τ| for the foreground, û the mean softmax probability (the
    /// predicted proportion the paper's analysis is about).
    soft_gap: f64,
    /// The same with û the fraction of pixels predicted foreground (argmax).
    hard_gap: f64,
    /// Foreground Dice of the argmax segmentation over the set.
    dice: f64,
}

fn evaluate(w: &[[f64; FEATURES]; 2], d: &Data) -> Scores {
    let s = d.shape.pixels();
    let z = logits(w, d);
    let (mut soft_gap, mut hard_gap, mut inter, mut pred_sum, mut true_sum) =
        (0.0, 0.0, 0.0, 0.0, 0.0);
    for b in 0..d.shape.batch {
        let (mut soft, mut hard, mut t) = (0.0, 0.0, 0.0);
        for i in 0..s {
            let margin = (z[(b * 2 + 1) * s + i] - z[(b * 2) * s + i]) as f64;
            let y = d.labels[b * s + i] == 1;
            soft += 1.0 / (1.0 + (-margin).exp());
            hard += f64::from(u8::from(margin > 0.0));
            t += f64::from(u8::from(y));
            inter += f64::from(u8::from(margin > 0.0 && y));
        }
        soft_gap += (soft - t).abs() / s as f64;
        hard_gap += (hard - t).abs() / s as f64;
        pred_sum += hard;
        true_sum += t;
    }
    let n = d.shape.batch as f64;
    Scores {
        soft_gap: soft_gap / n,
        hard_gap: hard_gap / n,
        dice: 2.0 * inter / (pred_sum + true_sum).max(1.0),
    }
}

/// Adam on the six weights, driven by segloss's ∂loss/∂logits through the chain rule.
fn train(
    engine: &Segloss,
    spec: &LossSpec,
    d: &Data,
    steps: usize,
) -> segloss::Result<(Vec<f64>, [[f64; FEATURES]; 2])> {
    let s = d.shape.pixels();
    let mut w = [[0.0; FEATURES]; 2];
    w[1][2] = -1.0; // start predicting background
    let (mut m, mut v) = ([[0.0; FEATURES]; 2], [[0.0; FEATURES]; 2]);
    let (lr, b1, b2) = (0.05, 0.9, 0.999);
    let mut gaps = vec![];
    for step in 1..=steps {
        let z = logits(&w, d);
        let out = engine.evaluate(spec, &d.shape, &z, Labels::index(&d.labels), true)?;
        let g = out.gradient.expect("requested");
        let mut dw = [[0.0; FEATURES]; 2];
        for b in 0..d.shape.batch {
            for (c, row) in dw.iter_mut().enumerate() {
                for i in 0..s {
                    let gi = g[(b * 2 + c) * s + i] as f64;
                    let f = &d.features[b * s + i];
                    for k in 0..FEATURES {
                        row[k] += gi * f[k] as f64;
                    }
                }
            }
        }
        for c in 0..2 {
            for k in 0..FEATURES {
                m[c][k] = b1 * m[c][k] + (1.0 - b1) * dw[c][k];
                v[c][k] = b2 * v[c][k] + (1.0 - b2) * dw[c][k] * dw[c][k];
                let (mh, vh) = (
                    m[c][k] / (1.0 - b1.powi(step as i32)),
                    v[c][k] / (1.0 - b2.powi(step as i32)),
                );
                w[c][k] -= lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        gaps.push(evaluate(&w, d).hard_gap);
    }
    Ok((gaps, w))
}

// ---- the chart (plotters, text in DejaVu Sans embedded by the `dejavu` crate) ----

fn plot(curves: &[(String, Vec<f64>)], path: &str) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    // ab_glyph draws only registered fonts; labels, caption and legend use "sans-serif".
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| "DejaVu Sans is not a valid font")?;
    // Distinct on white and from each other (Palette99's yellow is not).
    const COLORS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(23, 190, 207),
        RGBColor(140, 86, 75),
        BLACK,
    ];
    let steps = curves.iter().map(|c| c.1.len()).max().unwrap_or(1);
    // The scale skips the first steps, where every model still predicts almost nothing.
    let ymax = curves
        .iter()
        .flat_map(|c| c.1.iter().skip(c.1.len() / 20).cloned())
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.05;
    let root = BitMapBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Argmax foreground-proportion gap on the training images, per step",
            ("sans-serif", 22),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..(steps - 1).max(1) as f64, 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc("training step (Adam updates)")
        .y_desc("|predicted − true| proportion (fraction of pixels)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.3}"))
        .light_line_style(TRANSPARENT)
        .bold_line_style(BLACK.mix(0.12))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()?;
    for (k, (name, ys)) in curves.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let points = ys.iter().enumerate().map(|(i, y)| (i as f64, y.min(ymax)));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> segloss::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let out = arg("--out").unwrap_or_else(|| "region_bias.png".into());
    let steps: usize = arg("--steps").and_then(|s| s.parse().ok()).unwrap_or(300);
    let mut rng = Rng::new(2024);
    let train_set = make_data(&mut rng, 8);
    let test_set = make_data(&mut rng, 8);
    let engine = Segloss::new();
    println!(
        "training on {} ({} steps, {} train and {} test images of {SIZE}×{SIZE})",
        engine.describe(),
        steps,
        8,
        8
    );
    let dice = r#"{"kind":"dice","include_background":false}"#;
    let losses: Vec<(String, String)> = vec![
        ("CE".into(), r#"{"terms":[{"kind":"cross_entropy"}]}"#.into()),
        ("Dice".into(), format!(r#"{{"terms":[{dice}]}}"#)),
        ("CE+Dice".into(), format!(r#"{{"terms":[{{"kind":"cross_entropy"}},{dice}]}}"#)),
        ("CE+0.1 L1".into(), r#"{"terms":[{"kind":"cross_entropy"},{"kind":"region","weight":0.1,"penalty":"l1","temperature":10}]}"#.into()),
        ("CE+1 L1".into(), r#"{"terms":[{"kind":"cross_entropy"},{"kind":"region","weight":1,"penalty":"l1","temperature":10}]}"#.into()),
        ("CE+10 L1".into(), r#"{"terms":[{"kind":"cross_entropy"},{"kind":"region","weight":10,"penalty":"l1","temperature":10}]}"#.into()),
    ];
    println!(
        "{:<10} {:>10} {:>16} {:>16}",
        "loss", "test Dice", "soft gap |û−τ|", "argmax gap"
    );
    let mut curves = vec![];
    for (name, json) in &losses {
        let spec = LossSpec::from_json(json)?;
        let (gaps, w) = train(&engine, &spec, &train_set, steps)?;
        let sc = evaluate(&w, &test_set);
        println!(
            "{name:<10} {:>10.4} {:>16.4} {:>16.4}",
            sc.dice, sc.soft_gap, sc.hard_gap
        );
        curves.push((name.clone(), gaps));
    }
    plot(&curves, &out).map_err(|e| segloss::Error::Io(format!("{out}: {e}")))?;
    println!("wrote {out}");
    Ok(())
}
