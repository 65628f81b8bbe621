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

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::PaddingConfig2d;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use segloss_burn::synthetic::{SceneConfig, Scenes};
use segloss_burn::{SeglossLoss, SharedDevice};
use std::time::Instant;

/// Two levels: 16 and 32 channels, one skip connection.
#[derive(Module, Debug)]
struct UNet {
    enc1a: Conv2d,
    enc1b: Conv2d,
    enc2a: Conv2d,
    enc2b: Conv2d,
    pool: MaxPool2d,
    up: ConvTranspose2d,
    dec1: Conv2d,
    head: Conv2d,
}

fn conv(i: usize, o: usize, k: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([i, o], [k, k])
        .with_padding(PaddingConfig2d::Same)
        .init(device)
}

impl UNet {
    fn new(classes: usize, device: &Device) -> Self {
        UNet {
            enc1a: conv(1, 16, 3, device),
            enc1b: conv(16, 16, 3, device),
            enc2a: conv(16, 32, 3, device),
            enc2b: conv(32, 32, 3, device),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            up: ConvTranspose2dConfig::new([32, 16], [2, 2])
                .with_stride([2, 2])
                .init(device),
            dec1: conv(32, 16, 3, device),
            head: conv(16, classes, 1, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let e1 = relu(self.enc1b.forward(relu(self.enc1a.forward(x))));
        let e2 = relu(
            self.enc2b
                .forward(relu(self.enc2a.forward(self.pool.forward(e1.clone())))),
        );
        let u = self.up.forward(e2);
        let d = relu(self.dec1.forward(Tensor::cat(vec![u, e1], 1)));
        self.head.forward(d)
    }
}

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
    let mut model = UNet::new(classes, &device);
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
