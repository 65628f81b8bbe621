//! The main job: loss and gradient of CE + Dice + a region penalty for a synthetic batch,
//! the GPU result beside the f64 CPU reference, and one throughput line. Works on a machine
//! without a GPU (it then runs the CPU implementation and says so).
//!
//! cargo run --release --example quickstart

use segloss::testing::{random_labels, random_logits, Rng};
use segloss::{reference, Labels, LossSpec, Segloss, Shape};
use std::time::Instant;

fn main() -> segloss::Result<()> {
    let spec = LossSpec::from_json(
        r#"{"terms": [
            {"kind": "cross_entropy"},
            {"kind": "dice", "weight": 1.0},
            {"kind": "region", "weight": 0.1, "penalty": "l1", "temperature": 10}
        ]}"#,
    )?;
    let shape = Shape::new(4, 4, &[128, 128]);
    let mut rng = Rng::new(42);
    let logits = random_logits(&mut rng, &shape, 3.0);
    let labels = random_labels(&mut rng, &shape, 0.05);

    let engine = Segloss::new();
    println!("segloss on {}", engine.describe());
    let out = engine.evaluate(&spec, &shape, &logits, Labels::index(&labels), true)?;
    let cpu = reference::evaluate(&spec, &shape, &logits, Labels::index(&labels), true)?;

    println!("{:<14} {:>12} {:>12}", "term", "engine", "f64 reference");
    for (a, b) in out.terms.iter().zip(&cpu.terms) {
        println!("{:<14} {:>12.7} {:>12.7}", a.kind, a.value, b.value);
    }
    println!("{:<14} {:>12.7} {:>12.7}", "total", out.loss, cpu.loss);
    let g = out.gradient.as_ref().expect("requested");
    let gr = cpu.gradient.as_ref().expect("requested");
    let diff: f64 = g
        .iter()
        .zip(gr)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = gr.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
    println!(
        "gradient: {} values, relative L2 difference to the reference {:.2e}",
        g.len(),
        diff / norm
    );
    let d = out.decomposition[0];
    println!(
        "image 0: CE {:.4} = region part KL(τ‖û) {:.4} + matching {:.4}; Dice's region part {:.4}",
        d.ce, d.kl, d.matching, d.dice_region
    );

    let reps = 10;
    let start = Instant::now();
    for _ in 0..reps {
        engine.evaluate(&spec, &shape, &logits, Labels::index(&labels), true)?;
    }
    let ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let bytes = 4.0 * shape.len() as f64;
    println!("throughput: {ms:.2} ms per loss + gradient call at {shape:?} ({:.2} GB/s of logits, host transfers included)", bytes / ms / 1e6);
    Ok(())
}
