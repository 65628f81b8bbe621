//! A small U-Net trained with burn on synthetic images, its loss a segloss loss through
//! segloss-burn: the loss and its gradient in segloss's fused passes, everything else burn.
//!
//! ```sh
//! cargo run --release -p segloss-burn --example unet                 # DiceCE, 64×64, 200 steps
//! cargo run --release -p segloss-burn --example unet -- --loss ce_region --steps 100
//! cargo run -p segloss-burn --example unet -- --quick                # CI: a few steps
//! ```
//!
//! The images: a noisy, blurred background with discs of three classes whose areas differ
//! by two orders of magnitude (`segloss_burn::synthetic`). The run prints the loss every few
//! steps and fails unless the loss of the last steps is below that of the first ones.

use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Int, Tensor, TensorData};
use segloss_burn::synthetic::{SceneConfig, Scenes};
use segloss_burn::unet::UNet;
use segloss_burn::{SeglossLoss, SharedDevice};
use std::time::Instant;

/// The run's settings (flags of the same names).
pub struct Args {
    pub loss: String,
    pub steps: usize,
    pub size: usize,
    pub batch: usize,
    pub seed: u64,
}

impl Args {
    /// `--quick`: a few steps on small images (CI runs it: tests/unet_quick.rs).
    pub fn quick() -> Self {
        Args {
            steps: 12,
            size: 32,
            batch: 4,
            ..Args::default()
        }
    }
}

impl Default for Args {
    fn default() -> Self {
        Args {
            loss: "dice_ce".into(),
            steps: 200,
            size: 64,
            batch: 8,
            seed: 1,
        }
    }
}

fn args() -> Args {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--quick" => {
                let q = Args::quick();
                (a.steps, a.size, a.batch) = (q.steps, q.size, q.batch);
            }
            "--loss" => a.loss = value(),
            "--steps" => a.steps = value().parse().expect("--steps N"),
            "--size" => a.size = value().parse().expect("--size N"),
            "--batch" => a.batch = value().parse().expect("--batch N"),
            "--seed" => a.seed = value().parse().expect("--seed N"),
            other => {
                panic!("unknown flag {other} (--quick, --loss, --steps, --size, --batch, --seed)")
            }
        }
    }
    a
}

fn main() -> segloss::Result<()> {
    run(&args()).map(|_| ())
}

/// Trains and returns the loss of every step; an error unless every loss is finite and the
/// mean of the last quarter of the steps is below that of the first quarter.
pub fn run(a: &Args) -> segloss::Result<Vec<f32>> {
    let shared = SharedDevice::new()?;
    let device = shared.device().clone().autodiff();
    let classes = 4;
    let loss_fn = match a.loss.as_str() {
        "ce" => SeglossLoss::cross_entropy(&shared)?,
        "dice" => SeglossLoss::dice(&shared)?,
        "dice_ce" => SeglossLoss::dice_ce(&shared)?,
        "focal" => SeglossLoss::focal(2.0, &shared)?,
        "tversky" => SeglossLoss::tversky(0.3, 0.7, &shared)?,
        "ce_region" => SeglossLoss::ce_region(1.0, "l1", 10.0, &shared)?,
        other => panic!("unknown loss {other} (ce, dice, dice_ce, focal, tversky, ce_region)"),
    };
    println!(
        "U-Net on {} ({:?}), {} loss, {} steps of {}×{}×{}",
        shared.context().adapter_info().name,
        shared.context().adapter_info().backend,
        a.loss,
        a.steps,
        a.batch,
        a.size,
        a.size
    );
    let mut scenes = Scenes::new(SceneConfig::imbalanced(a.size), a.seed);
    let mut model = UNet::new(1, classes, 16, &device);
    let mut optim = AdamConfig::new().init();
    let mut losses = vec![];
    let start = Instant::now();
    for step in 0..a.steps {
        let batch = scenes.batch(a.batch);
        let (h, w) = (a.size, a.size);
        let x = Tensor::<4>::from_data(TensorData::new(batch.images, [a.batch, 1, h, w]), &device);
        let y =
            Tensor::<3, Int>::from_data(TensorData::new(batch.labels, [a.batch, h, w]), &device);
        let loss = loss_fn.forward(model.forward(x), y)?;
        let value: f32 = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(2e-3, model, grads);
        losses.push(value);
        if step % 10 == 0 || step + 1 == a.steps {
            println!(
                "step {step:4}  loss {value:.4}  ({:.1} s)",
                start.elapsed().as_secs_f64()
            );
        }
    }
    let k = (losses.len() / 4).max(1);
    let first = losses[..k].iter().sum::<f32>() / k as f32;
    let last = losses[losses.len() - k..].iter().sum::<f32>() / k as f32;
    println!(
        "mean loss of the first {k} steps {first:.4}, of the last {k} {last:.4}; {:.1} s",
        start.elapsed().as_secs_f64()
    );
    if !losses.iter().all(|v| v.is_finite()) || last >= first {
        return Err(segloss::Error::Input(format!(
            "the loss did not fall ({first} → {last})"
        )));
    }
    Ok(losses)
}
