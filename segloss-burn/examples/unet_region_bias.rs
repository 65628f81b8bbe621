//! The findings of "Do We Really Need Dice?" (Liu, Dolz, Galdran, Kobbi, Ben Ayed) put to a
//! real network: a small U-Net trained through segloss-burn with CE, Dice, CE + Dice,
//! CE + λ·L1 (T = 10, λ ∈ {0.1, 1, 10}) and CE + KL (λ = 1, T = 10), three seeds each, in
//! two synthetic settings (`segloss_burn::synthetic`): `imbalanced` (medical-like: every
//! class in every image, areas ~20 %, ~2 % and ~0.3 %) and `diverse` (natural-image-like:
//! each class present in half the images, its area anywhere from 0.2 % to 30 %).
//!
//! ```sh
//! WGPU_BACKEND=vulkan cargo run --release -p segloss-burn --example unet_region_bias
//! WGPU_BACKEND=vulkan cargo run -p segloss-burn --example unet_region_bias -- --quick   # CI
//! ```
//! Flags: `--out DIR` (default `.`), `--steps N`, `--seeds N`, `--size N`, `--batch N`,
//! `--width N`, `--lr X`, `--only CE,Dice` (a subset of the losses), `--quick`.
//!
//! On held-out images it measures, per loss, mean ± std over seeds: the Dice score per class
//! and the proportion error û − τ of each foreground class in each image (soft: the mean
//! softmax probability; argmax: the fraction of pixels predicted), signed and absolute,
//! binned by the ground-truth region size τ. During training it logs segloss's
//! decomposition of each batch: CE's region term KL(τ‖û), its matching term CE − KL, and
//! Dice's region term Σ_c log(û_c + τ_c)/C. It writes `unet_region_bias.md` (the tables),
//! `unet_region_bias.png` (proportion error against region size, one line per loss, error
//! bars over seeds), `decomposition.png` (the decomposition terms over training) and
//! `region_terms.png` (the theory, no training: both region terms as functions of û).
//!
//! Expected outcome, written before the first run (2026-12-03), claim by claim:
//! 1. Dice is biased towards extreme region sizes: Dice-trained models get the largest
//!    proportion errors, soft and argmax, and the largest relative errors on the smallest
//!    structures; its soft predictions are far from calibrated proportions (û ≠ τ even
//!    where its argmax is right). Its region term Σ log(û + τ) is minimal at a vertex of
//!    the simplex (a class predicted empty), not at û = τ (`region_terms.png`).
//! 2. CE encourages the ground-truth proportions: with CE alone KL(τ‖û) falls during
//!    training to near zero, and CE's soft signed error is near zero in every size bin.
//! 3. CE + an explicit region term controls the bias: CE + L1 has smaller |û − τ| than CE,
//!    decreasing with λ (λ = 10 at some cost in Dice score); CE + KL behaves like CE + L1
//!    at λ = 1.
//! 4. Dice helps where structures are small and always present (imbalanced: Dice and
//!    CE + Dice score at least as well as CE on the smallest class), and CE does better
//!    where class proportions vary (diverse: CE's Dice score ≥ Dice's, and Dice predicts
//!    absent classes worse).
//!
//! Result of the default run (2026-12-03, lavapipe, 16 min 52 s and 18 min 59 s in two runs
//! with the same numbers; tables and pictures in README.md, "Region-size bias with a
//! U-Net", and docs/region-bias/):
//! 1. Holds in `diverse`, strongly: Dice predicts background everywhere in 2 of 3 seeds and
//!    never class 1 in the third; KL(τ‖û) of its batches stays at 1.27. Not in `imbalanced`,
//!    where Dice's proportion errors equal CE's (0.0083 against 0.0077).
//! 2. Holds but for the largest `diverse` regions (CE under-predicts them by 0.064).
//! 3. Does not hold here: the penalties do not reduce |û − τ| below CE's; λ = 10 destabilises
//!    training.
//! 4. Holds: CE + Dice learns the 0.3 % class (Dice 0.55 against CE's 0.08); in `diverse`
//!    CE beats Dice on every class.

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use segloss::{Error, LossSpec, Result};
use segloss_burn::synthetic::{Batch, SceneConfig, Scenes};
use segloss_burn::unet::UNet;
use segloss_burn::{SeglossLoss, SharedDevice};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

const CLASSES: usize = 4;

/// The run's settings (flags of the same names).
#[derive(Debug, Clone)]
pub struct Args {
    /// Output folder.
    pub out: PathBuf,
    /// Training steps per run.
    pub steps: usize,
    /// Seeds per (setting, loss).
    pub seeds: usize,
    /// Image side.
    pub size: usize,
    /// Images per training step.
    pub batch: usize,
    /// Held-out images per setting.
    pub eval_images: usize,
    /// U-Net width (channels of the first level).
    pub width: usize,
    /// Steps between decomposition readings.
    pub log_every: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// Only the losses of these names (all when empty).
    pub only: Vec<String>,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            out: PathBuf::from("."),
            steps: 150,
            seeds: 3,
            size: 48,
            batch: 8,
            eval_images: 48,
            width: 8,
            log_every: 10,
            lr: 5e-3,
            only: vec![],
        }
    }
}

impl Args {
    /// `--quick`: a few steps, one seed, small images (CI: tests/unet_region_bias_quick.rs).
    pub fn quick() -> Self {
        Args {
            steps: 4,
            seeds: 1,
            size: 32,
            batch: 2,
            eval_images: 4,
            log_every: 2,
            ..Args::default()
        }
    }

    fn parse() -> std::result::Result<Self, String> {
        let mut a = Args::default();
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            if flag == "--quick" {
                a = Args {
                    out: a.out,
                    ..Args::quick()
                };
                continue;
            }
            let value = it.next().ok_or(format!("{flag} needs a value"))?;
            let num = || {
                value
                    .parse::<usize>()
                    .map_err(|_| format!("{flag} {value}"))
            };
            match flag.as_str() {
                "--out" => a.out = PathBuf::from(&value),
                "--steps" => a.steps = num()?,
                "--seeds" => a.seeds = num()?,
                "--size" => a.size = num()?,
                "--batch" => a.batch = num()?,
                "--width" => a.width = num()?,
                "--lr" => a.lr = value.parse().map_err(|_| format!("--lr {value}"))?,
                "--only" => a.only = value.split(',').map(String::from).collect(),
                other => return Err(format!("unknown flag {other}")),
            }
        }
        Ok(a)
    }
}

/// The losses compared, with their specs.
pub fn losses() -> Vec<(&'static str, String)> {
    let ce = r#"{"kind":"cross_entropy"}"#;
    let region = |weight: f64, penalty: &str| {
        format!(
            r#"{{"terms":[{ce},{{"kind":"region","weight":{weight},"penalty":"{penalty}","temperature":10}}]}}"#
        )
    };
    vec![
        ("CE", format!(r#"{{"terms":[{ce}]}}"#)),
        ("Dice", r#"{"terms":[{"kind":"dice"}]}"#.into()),
        (
            "CE+Dice",
            format!(r#"{{"terms":[{ce},{{"kind":"dice"}}]}}"#),
        ),
        ("CE+0.1·L1", region(0.1, "l1")),
        ("CE+1·L1", region(1.0, "l1")),
        ("CE+10·L1", region(10.0, "l1")),
        ("CE+KL", region(1.0, "kl")),
    ]
}

/// The two data settings.
pub fn settings(size: usize) -> [(&'static str, SceneConfig); 2] {
    [
        ("imbalanced", SceneConfig::imbalanced(size)),
        ("diverse", SceneConfig::diverse(size)),
    ]
}

/// Ground-truth region-size bins of a foreground class in an image: τ = 0 (absent), then
/// upper edges as fractions of the image.
pub const BIN_EDGES: [f64; 5] = [0.005, 0.015, 0.05, 0.15, 1.0];
/// Names of the bins.
pub const BIN_NAMES: [&str; 6] = ["absent", "<0.5%", "0.5–1.5%", "1.5–5%", "5–15%", ">15%"];

fn bin_of(tau: f64) -> usize {
    if tau == 0.0 {
        return 0;
    }
    1 + BIN_EDGES.iter().position(|&e| tau <= e).unwrap_or(4)
}

/// Sums of proportion errors of the (image, class) pairs of one bin.
#[derive(Debug, Clone, Copy, Default)]
pub struct BinSums {
    /// Pairs in the bin.
    pub n: usize,
    /// Σ (û − τ), û the mean softmax probability.
    pub soft: f64,
    /// Σ |û − τ|.
    pub soft_abs: f64,
    /// Σ (â − τ), â the fraction of pixels predicted (argmax).
    pub hard: f64,
    /// Σ |â − τ|.
    pub hard_abs: f64,
}

/// One decomposition reading during training: batch means.
#[derive(Debug, Clone, Copy)]
pub struct LogPoint {
    /// Training step.
    pub step: usize,
    /// The training loss.
    pub loss: f64,
    /// KL(τ‖û), CE's region term.
    pub kl: f64,
    /// CE − KL, CE's matching term.
    pub matching: f64,
    /// Σ_c log(û_c + τ_c)/C, Dice's region term.
    pub dice_region: f64,
}

/// What one training run gives.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Setting name.
    pub setting: &'static str,
    /// Loss name.
    pub loss: &'static str,
    /// Seed.
    pub seed: u64,
    /// Dice score per class over the held-out set (argmax segmentation).
    pub dice: [f64; CLASSES],
    /// Proportion errors per size bin.
    pub bins: [BinSums; 6],
    /// Decomposition readings.
    pub log: Vec<LogPoint>,
    /// Seconds of training and evaluation.
    pub seconds: f64,
}

impl RunResult {
    fn numbers(&self) -> impl Iterator<Item = f64> + '_ {
        let bins = self
            .bins
            .iter()
            .flat_map(|b| [b.soft, b.soft_abs, b.hard, b.hard_abs]);
        let log = self
            .log
            .iter()
            .flat_map(|p| [p.loss, p.kl, p.matching, p.dice_region]);
        self.dice.iter().copied().chain(bins).chain(log)
    }

    /// Mean |error| over every (image, foreground class) pair, soft and argmax.
    pub fn mean_abs(&self) -> (f64, f64) {
        let n: usize = self.bins.iter().map(|b| b.n).sum();
        let n = n.max(1) as f64;
        (
            self.bins.iter().map(|b| b.soft_abs).sum::<f64>() / n,
            self.bins.iter().map(|b| b.hard_abs).sum::<f64>() / n,
        )
    }
}

/// Everything a run wrote.
#[derive(Debug)]
pub struct Outputs {
    /// Every training run.
    pub runs: Vec<RunResult>,
    /// The files written.
    pub files: Vec<PathBuf>,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
}

fn main() {
    let args = Args::parse().unwrap_or_else(|e| {
        eprintln!("{e}\nflags: --quick --out DIR --steps N --seeds N --size N --batch N --width N --lr X --only NAMES");
        std::process::exit(2)
    });
    match run(&args) {
        Ok(out) => {
            for f in &out.files {
                println!("wrote {}", f.display());
            }
            println!("{} runs in {:.0} s", out.runs.len(), out.seconds);
        }
        Err(e) => {
            eprintln!("unet_region_bias: {e}");
            std::process::exit(1)
        }
    }
}

fn images_tensor(batch: &Batch, n: usize, size: usize, device: &Device) -> Tensor<4> {
    Tensor::from_data(
        TensorData::new(batch.images.clone(), [n, 1, size, size]),
        device,
    )
}

fn decomposition_means(out: &segloss::output::LossOutput) -> (f64, f64, f64) {
    let n = out.decomposition.len().max(1) as f64;
    let sum = |f: fn(&segloss::output::Decomposition) -> f64| {
        out.decomposition.iter().map(f).sum::<f64>() / n
    };
    (sum(|d| d.kl), sum(|d| d.matching), sum(|d| d.dice_region))
}

/// Trains one U-Net and evaluates it on `test`.
fn train_and_evaluate(
    a: &Args,
    shared: &SharedDevice,
    (setting, config): (&'static str, &SceneConfig),
    (loss_name, spec): (&'static str, &LossSpec),
    seed: u64,
    test: &Batch,
) -> Result<RunResult> {
    let start = Instant::now();
    let device = shared.device().clone().autodiff();
    device.seed(seed);
    let loss_fn = SeglossLoss::new(spec.clone(), shared)?;
    let mut model = UNet::new(1, CLASSES, a.width, &device);
    let mut optim = AdamConfig::new().init();
    // The same training images for every loss of a seed: paired comparisons.
    let mut scenes = Scenes::new(config.clone(), seed);
    let (s, n) = (a.size, a.batch);
    let mut log = vec![];
    for step in 0..a.steps {
        let batch = scenes.batch(n);
        let x = images_tensor(&batch, n, s, &device);
        let y = Tensor::<3, Int>::from_data(TensorData::new(batch.labels, [n, s, s]), &device);
        let logits = model.forward(x);
        let logging = step % a.log_every == 0 || step + 1 == a.steps;
        let loss = if logging {
            let (loss, report) = loss_fn.forward_with_report(logits, y)?;
            let out = report.read()?;
            let (kl, matching, dice_region) = decomposition_means(&out);
            log.push(LogPoint {
                step,
                loss: out.loss,
                kl,
                matching,
                dice_region,
            });
            if !out.loss.is_finite() {
                return Err(Error::Input(format!(
                    "{setting}/{loss_name}/seed {seed}: the loss is {} at step {step}",
                    out.loss
                )));
            }
            loss
        } else {
            loss_fn.forward(logits, y)?
        };
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(a.lr, model, grads);
    }
    let (dice, bins) = evaluate(&model.valid(), shared.device(), test, a)?;
    Ok(RunResult {
        setting,
        loss: loss_name,
        seed,
        dice,
        bins,
        log,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Dice per class and binned proportion errors of `model` on `test`.
fn evaluate(
    model: &UNet,
    device: &Device,
    test: &Batch,
    a: &Args,
) -> Result<([f64; CLASSES], [BinSums; 6])> {
    let p = a.size * a.size;
    let n = test.labels.len() / p;
    let logits = model
        .forward(images_tensor(test, n, a.size, device))
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| Error::Gpu(format!("reading the logits: {e:?}")))?;
    let mut bins = [BinSums::default(); 6];
    let (mut inter, mut pred, mut truth) = ([0f64; CLASSES], [0f64; CLASSES], [0f64; CLASSES]);
    for b in 0..n {
        let (mut soft, mut hard, mut count) = ([0.0; CLASSES], [0.0; CLASSES], [0.0; CLASSES]);
        for i in 0..p {
            let z: [f64; CLASSES] =
                std::array::from_fn(|c| logits[(b * CLASSES + c) * p + i] as f64);
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: [f64; CLASSES] = std::array::from_fn(|c| (z[c] - m).exp());
            let sum: f64 = e.iter().sum();
            let arg = (0..CLASSES).fold(0, |k, c| if z[c] > z[k] { c } else { k });
            let y = test.labels[b * p + i] as usize;
            for c in 0..CLASSES {
                soft[c] += e[c] / sum;
            }
            hard[arg] += 1.0;
            count[y] += 1.0;
            pred[arg] += 1.0;
            truth[y] += 1.0;
            if arg == y {
                inter[y] += 1.0;
            }
        }
        for c in 1..CLASSES {
            let (u, h, t) = (soft[c] / p as f64, hard[c] / p as f64, count[c] / p as f64);
            let bin = &mut bins[bin_of(t)];
            bin.n += 1;
            bin.soft += u - t;
            bin.soft_abs += (u - t).abs();
            bin.hard += h - t;
            bin.hard_abs += (h - t).abs();
        }
    }
    let dice = std::array::from_fn(|c| 2.0 * inter[c] / (pred[c] + truth[c]).max(1.0));
    Ok((dice, bins))
}

/// Trains every (setting, loss, seed), writes the tables and the pictures.
pub fn run(a: &Args) -> Result<Outputs> {
    if !a.size.is_multiple_of(2) || a.steps == 0 || a.seeds == 0 || a.batch == 0 || a.log_every == 0
    {
        return Err(Error::Input(format!(
            "need an even --size and positive steps, seeds and batch: {a:?}"
        )));
    }
    let start = Instant::now();
    std::fs::create_dir_all(&a.out).map_err(|e| Error::Io(format!("{}: {e}", a.out.display())))?;
    let shared = SharedDevice::new()?;
    let info = shared.context().adapter_info().clone();
    let specs: Vec<(&'static str, LossSpec)> = losses()
        .into_iter()
        .filter(|(name, _)| a.only.is_empty() || a.only.iter().any(|o| o == name))
        .map(|(name, json)| LossSpec::from_json(&json).map(|spec| (name, spec)))
        .collect::<Result<_>>()?;
    println!(
        "U-Net (width {}) on {} ({:?}): {} losses × {} seeds × 2 settings, {} steps of {}×{}×{}",
        a.width,
        info.name,
        info.backend,
        specs.len(),
        a.seeds,
        a.steps,
        a.batch,
        a.size,
        a.size
    );
    let mut runs = vec![];
    for (k, &(setting, ref config)) in settings(a.size).iter().enumerate() {
        // Held-out images: a seed no training stream uses, the same for every loss.
        let test = Scenes::new(config.clone(), 1_000_003 + k as u64).batch(a.eval_images);
        for &(loss_name, ref spec) in &specs {
            for seed in 0..a.seeds as u64 {
                let r = train_and_evaluate(
                    a,
                    &shared,
                    (setting, config),
                    (loss_name, spec),
                    seed,
                    &test,
                )?;
                let (soft, hard) = r.mean_abs();
                println!(
                    "{setting:<10} {loss_name:<10} seed {seed}  Dice {:.3} {:.3} {:.3}  |û−τ| soft {soft:.4} argmax {hard:.4}  ({:.1} s)",
                    r.dice[1], r.dice[2], r.dice[3], r.seconds
                );
                if let Some(bad) = r.numbers().find(|v| !v.is_finite()) {
                    return Err(Error::Input(format!(
                        "{setting}/{loss_name}/seed {seed}: a result is {bad}"
                    )));
                }
                runs.push(r);
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let names: Vec<&'static str> = specs.iter().map(|s| s.0).collect();
    let table = report::markdown(a, &runs, &names, &info.name, seconds);
    let md = a.out.join("unet_region_bias.md");
    std::fs::write(&md, table).map_err(|e| Error::Io(format!("{}: {e}", md.display())))?;
    let csv = a.out.join("unet_region_bias_runs.csv");
    std::fs::write(&csv, report::csv(&runs))
        .map_err(|e| Error::Io(format!("{}: {e}", csv.display())))?;
    let mut files = vec![md, csv];
    type Draw = fn(&Path, &[RunResult], &[&str]) -> plots::Drawn;
    let pictures: [(&str, Draw); 3] = [
        ("unet_region_bias.png", plots::errors_by_size),
        ("decomposition.png", plots::decomposition),
        ("region_terms.png", |p, _, _| plots::region_terms(p)),
    ];
    for (name, draw) in pictures {
        let path = a.out.join(name);
        draw(&path, &runs, &names).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
        files.push(path);
    }
    Ok(Outputs {
        runs,
        files,
        seconds,
    })
}

/// Mean and sample standard deviation.
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

/// Per-seed values of `f` for (setting, loss), `None` values (empty bins) skipped.
fn per_seed(
    runs: &[RunResult],
    setting: &str,
    loss: &str,
    f: impl Fn(&RunResult) -> Option<f64>,
) -> Vec<f64> {
    runs.iter()
        .filter(|r| r.setting == setting && r.loss == loss)
        .filter_map(f)
        .collect()
}

/// Which proportion error: of the soft (û) or the argmax (â) proportion, signed or absolute.
#[derive(Debug, Clone, Copy)]
pub struct Measure {
    /// û (mean softmax probability) rather than â (fraction predicted).
    pub soft: bool,
    /// |error| rather than the signed error.
    pub absolute: bool,
}

/// Mean error in bin `k`, `None` when the bin is empty.
fn bin_mean(r: &RunResult, k: usize, m: Measure) -> Option<f64> {
    let b = &r.bins[k];
    let sum = match (m.soft, m.absolute) {
        (true, false) => b.soft,
        (true, true) => b.soft_abs,
        (false, false) => b.hard,
        (false, true) => b.hard_abs,
    };
    (b.n > 0).then(|| sum / b.n as f64)
}

mod report {
    use super::*;

    /// One line per run: `unet_region_bias_runs.csv`, the raw numbers behind the tables.
    pub fn csv(runs: &[RunResult]) -> String {
        let mut out = String::from(
            "setting,loss,seed,seconds,dice_bg,dice_1,dice_2,dice_3,mean_abs_soft,mean_abs_argmax,last_loss,last_kl,last_matching,last_dice_region\n",
        );
        for r in runs {
            let (soft, hard) = r.mean_abs();
            let last = r.log.last().copied();
            let l = |f: fn(&LogPoint) -> f64| last.as_ref().map_or(f64::NAN, f);
            let _ = writeln!(
                out,
                "{},{},{},{:.1},{:.5},{:.5},{:.5},{:.5},{soft:.6},{hard:.6},{:.6},{:.6},{:.6},{:.6}",
                r.setting,
                r.loss,
                r.seed,
                r.seconds,
                r.dice[0],
                r.dice[1],
                r.dice[2],
                r.dice[3],
                l(|p| p.loss),
                l(|p| p.kl),
                l(|p| p.matching),
                l(|p| p.dice_region),
            );
        }
        out
    }

    fn cell(v: &[f64], digits: usize) -> String {
        if v.is_empty() {
            return "—".into();
        }
        let (m, s) = mean_std(v);
        format!("{m:.digits$} ± {s:.digits$}")
    }

    /// The tables of `unet_region_bias.md`.
    pub fn markdown(
        a: &Args,
        runs: &[RunResult],
        names: &[&str],
        adapter: &str,
        seconds: f64,
    ) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "# Region-size bias with a U-Net\n\n{} runs on {adapter}: {} seeds, {} steps of {}×{}×{}, \
             U-Net width {}, {} held-out images per setting; {seconds:.0} s in all. \
             Mean ± standard deviation over seeds.\n",
            runs.len(),
            a.seeds,
            a.steps,
            a.batch,
            a.size,
            a.size,
            a.width,
            a.eval_images
        );
        for (setting, _) in settings(a.size) {
            let _ = writeln!(md, "## Setting `{setting}`\n");
            let _ = writeln!(
                md,
                "| loss | Dice bg | Dice 1 | Dice 2 | Dice 3 | mean abs(û−τ) soft | mean abs(â−τ) argmax | KL(τ‖û) last | Dice region term last |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            );
            for loss in names {
                let s =
                    |f: &dyn Fn(&RunResult) -> f64| per_seed(runs, setting, loss, |r| Some(f(r)));
                let last = |r: &RunResult| *r.log.last().expect("logged");
                let _ = writeln!(
                    md,
                    "| {loss} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    cell(&s(&|r| r.dice[0]), 3),
                    cell(&s(&|r| r.dice[1]), 3),
                    cell(&s(&|r| r.dice[2]), 3),
                    cell(&s(&|r| r.dice[3]), 3),
                    cell(&s(&|r| r.mean_abs().0), 4),
                    cell(&s(&|r| r.mean_abs().1), 4),
                    cell(&s(&|r| last(r).kl), 4),
                    cell(&s(&|r| last(r).dice_region), 4),
                );
            }
            let measures = [
                (true, false, "Signed", "soft, û − τ"),
                (true, true, "Absolute", "soft, |û − τ|"),
                (false, false, "Signed", "argmax, â − τ"),
                (false, true, "Absolute", "argmax, |â − τ|"),
            ];
            for (soft, absolute, kind, what) in measures {
                let m = Measure { soft, absolute };
                let counts: Vec<usize> = (0..6)
                    .map(|k| {
                        runs.iter()
                            .find(|r| r.setting == setting)
                            .map_or(0, |r| r.bins[k].n)
                    })
                    .collect();
                let _ = writeln!(
                    md,
                    "\n{kind} proportion error by ground-truth region size ({what}; pairs per bin: {counts:?})\n"
                );
                let _ = writeln!(
                    md,
                    "| loss | {} |\n| --- |{}",
                    BIN_NAMES.join(" | "),
                    " ---: |".repeat(BIN_NAMES.len())
                );
                for loss in names {
                    let cells: Vec<String> = (0..6)
                        .map(|k| cell(&per_seed(runs, setting, loss, |r| bin_mean(r, k, m)), 4))
                        .collect();
                    let _ = writeln!(md, "| {loss} | {} |", cells.join(" | "));
                }
            }
            md.push('\n');
        }
        md
    }
}

mod plots {
    use super::*;
    use plotters::coord::types::RangedCoordf64;
    use plotters::coord::Shift;
    use plotters::prelude::*;

    /// What a drawing returns.
    pub type Drawn = std::result::Result<(), Box<dyn std::error::Error>>;

    // Distinct on white and from each other.
    const COLORS: [RGBColor; 7] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(23, 190, 207),
        RGBColor(140, 86, 75),
    ];

    fn font() -> Drawn {
        // ab_glyph draws only registered fonts; every text uses "sans-serif".
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| "DejaVu Sans is not a valid font")?;
        Ok(())
    }

    type Area<'b> = DrawingArea<BitMapBackend<'b>, Shift>;

    /// A white picture at `path` with a title over a grid of panels (root, panels).
    fn figure<'b>(
        path: &'b Path,
        size: (u32, u32),
        title: &str,
        grid: (usize, usize),
    ) -> std::result::Result<(Area<'b>, Vec<Area<'b>>), Box<dyn std::error::Error>> {
        font()?;
        let root = BitMapBackend::new(path, size).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 24))?;
        let panels = root.split_evenly(grid);
        Ok((root, panels))
    }

    fn range(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
        let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(v), h.max(v)));
        if lo > hi {
            return (-1.0, 1.0);
        }
        let span = (hi - lo).max(1e-6);
        (lo - pad * span, hi + pad * span)
    }

    type Chart<'a, 'b> =
        ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;
    type Format<'f> = &'f dyn Fn(&f64) -> String;

    /// An axis: its range, its description and how its ticks read.
    type Axis<'f> = (std::ops::Range<f64>, &'f str, Format<'f>);

    /// A captioned chart on `area` with every panel's axes: described, formatted, faint
    /// grid, the one font.
    fn panel<'a, 'b: 'a>(
        area: &'a Area<'b>,
        caption: &str,
        x: Axis,
        y: Axis,
        x_ticks: usize,
    ) -> std::result::Result<Chart<'a, 'b>, Box<dyn std::error::Error>> {
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 19))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(70)
            .build_cartesian_2d(x.0, y.0)?;
        chart
            .configure_mesh()
            .x_labels(x_ticks)
            .x_desc(x.1)
            .y_desc(y.1)
            .x_label_formatter(x.2)
            .y_label_formatter(y.2)
            .light_line_style(TRANSPARENT)
            .bold_line_style(BLACK.mix(0.12))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .draw()?;
        Ok(chart)
    }

    /// A curve with its legend entry.
    fn line(
        chart: &mut Chart<'_, '_>,
        points: impl IntoIterator<Item = (f64, f64)>,
        color: RGBColor,
        label: &str,
    ) -> Drawn {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3)));
        Ok(())
    }

    fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, at: SeriesLabelPosition, font: u32) -> Drawn {
        chart
            .configure_series_labels()
            .position(at)
            .label_font(("sans-serif", font))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    }

    /// `unet_region_bias.png`: signed proportion error against region-size bin, a line per
    /// loss with error bars over seeds; rows soft / argmax, columns the settings.
    pub fn errors_by_size(path: &Path, runs: &[RunResult], names: &[&str]) -> Drawn {
        let (root, panels) = figure(
            path,
            (1500, 1000),
            "Proportion error by ground-truth region size (held-out images, mean ± std over seeds)",
            (2, 2),
        )?;
        let settings = ["imbalanced", "diverse"];
        for (i, panel) in panels.iter().enumerate() {
            let (soft, setting) = (i < 2, settings[i % 2]);
            let what = if soft {
                "soft û − τ"
            } else {
                "argmax â − τ"
            };
            draw_errors(panel, runs, names, setting, soft, what, i == 0)?;
        }
        root.present()?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn draw_errors(
        area: &Area<'_>,
        runs: &[RunResult],
        names: &[&str],
        setting: &str,
        soft: bool,
        what: &str,
        with_legend: bool,
    ) -> Drawn {
        // (loss index, bin, mean, std) of the non-empty bins.
        let mut points = vec![];
        for (l, loss) in names.iter().enumerate() {
            for k in 0..6 {
                let m = Measure {
                    soft,
                    absolute: false,
                };
                let v = per_seed(runs, setting, loss, |r| bin_mean(r, k, m));
                if !v.is_empty() {
                    let (m, s) = mean_std(&v);
                    points.push((l, k, m, s));
                }
            }
        }
        let (lo, hi) = range(
            points
                .iter()
                .flat_map(|p| [p.2 - p.3, p.2 + p.3])
                .chain([0.0]),
            0.08,
        );
        let bin_name = |v: &f64| {
            let k = v.round();
            if (v - k).abs() < 0.01 && (0.0..6.0).contains(&k) {
                BIN_NAMES[k as usize].to_string()
            } else {
                String::new()
            }
        };
        let mut chart = panel(
            area,
            &format!("{setting}: {what}"),
            (
                -0.5..5.5,
                "ground-truth proportion τ of the class in the image",
                &bin_name,
            ),
            (lo..hi, "signed error (fraction of pixels)", &|v| {
                format!("{v:+.3}")
            }),
            6,
        )?;
        chart.draw_series(LineSeries::new([(-0.5, 0.0), (5.5, 0.0)], BLACK.mix(0.5)))?;
        for (l, loss) in names.iter().enumerate() {
            let color = COLORS[l % COLORS.len()];
            // Each loss shifted a little sideways, so error bars do not hide each other.
            let dx = (l as f64 - (names.len() - 1) as f64 / 2.0) * 0.07;
            let mine: Vec<_> = points.iter().filter(|p| p.0 == l).collect();
            line(
                &mut chart,
                mine.iter().map(|p| (p.1 as f64 + dx, p.2)),
                color,
                loss,
            )?;
            chart.draw_series(mine.iter().map(|p| {
                let x = p.1 as f64 + dx;
                ErrorBar::new_vertical(x, p.2 - p.3, p.2, p.2 + p.3, color.filled(), 6)
            }))?;
        }
        if with_legend {
            legend(&mut chart, SeriesLabelPosition::LowerLeft, 14)?;
        }
        Ok(())
    }

    /// `decomposition.png`: the decomposition terms of the training batches over training
    /// (mean over seeds), a line per loss; a row per setting.
    pub fn decomposition(path: &Path, runs: &[RunResult], names: &[&str]) -> Drawn {
        let (root, panels) = figure(
            path,
            (1650, 1060),
            "segloss's decomposition of the training batches (mean over seeds)",
            (2, 3),
        )?;
        type Term = fn(&LogPoint) -> f64;
        let terms: [(&str, Term); 3] = [
            ("CE's region term KL(τ‖û)", |p| p.kl),
            ("CE's matching term CE − KL", |p| p.matching),
            ("Dice's region term Σ log(û + τ) / C", |p| p.dice_region),
        ];
        let cells = ["imbalanced", "diverse"]
            .into_iter()
            .flat_map(|setting| terms.map(|t| (setting, t)));
        for (area, (setting, (title, term))) in panels.iter().zip(cells) {
            // Per loss: (step, mean over seeds).
            let curves: Vec<Vec<(f64, f64)>> = names
                .iter()
                .map(|loss| {
                    let mine: Vec<&RunResult> = runs
                        .iter()
                        .filter(|r| r.setting == setting && r.loss == *loss)
                        .collect();
                    let len = mine.iter().map(|r| r.log.len()).min().unwrap_or(0);
                    (0..len)
                        .map(|i| {
                            let v: Vec<f64> = mine.iter().map(|r| term(&r.log[i])).collect();
                            (mine[0].log[i].step as f64, mean_std(&v).0)
                        })
                        .collect()
                })
                .collect();
            let xmax = curves.iter().flatten().map(|p| p.0).fold(1.0f64, f64::max);
            let (lo, hi) = range(curves.iter().flatten().map(|p| p.1), 0.05);
            let mut chart = panel(
                area,
                &format!("{setting}: {title}"),
                (0.0..xmax, "training step", &|v| format!("{v:.0}")),
                (lo..hi, "", &|v| format!("{v:.3}")),
                10,
            )?;
            for (l, (loss, curve)) in names.iter().zip(&curves).enumerate() {
                line(
                    &mut chart,
                    curve.iter().copied(),
                    COLORS[l % COLORS.len()],
                    loss,
                )?;
            }
            legend(&mut chart, SeriesLabelPosition::UpperRight, 13)?;
        }
        root.present()?;
        Ok(())
    }

    /// `region_terms.png`: the theory, no training. Two classes, the foreground's target
    /// proportion τ fixed; CE's region term KL(τ‖û) and Dice's region term
    /// Σ_c log(û_c + τ_c)/2 as functions of the predicted foreground proportion û, each
    /// curve's minimum marked.
    pub fn region_terms(path: &Path) -> Drawn {
        let (root, panels) = figure(
            path,
            (1400, 600),
            "Region-size terms for two classes, as functions of the predicted foreground proportion û (dots: minima)",
            (1, 2),
        )?;
        let taus = [0.02, 0.1, 0.3, 0.5];
        let kl = |t: f64, u: f64| {
            let f = |a: f64, b: f64| if a > 0.0 { a * (a / b).ln() } else { 0.0 };
            f(t, u) + f(1.0 - t, 1.0 - u)
        };
        let dice = |t: f64, u: f64| ((u + t).ln() + (2.0 - u - t).ln()) / 2.0;
        type Term = Box<dyn Fn(f64, f64) -> f64>;
        let terms: [(&str, Term, f64, SeriesLabelPosition); 2] = [
            (
                "CE's region term KL(τ‖û): minimal at û = τ",
                Box::new(kl),
                2.0,
                SeriesLabelPosition::UpperMiddle,
            ),
            (
                "Dice's region term Σ log(û + τ) / 2: minimal at an end (û = 0 for τ < ½)",
                Box::new(dice),
                f64::MAX,
                SeriesLabelPosition::LowerRight,
            ),
        ];
        let grid: Vec<f64> = (1..1000).map(|i| i as f64 / 1000.0).collect();
        for (area, (title, term, cap, legend_at)) in panels.iter().zip(terms) {
            let curves: Vec<Vec<(f64, f64)>> = taus
                .iter()
                .map(|&t| grid.iter().map(|&u| (u, term(t, u).min(cap))).collect())
                .collect();
            let (lo, hi) = range(curves.iter().flatten().map(|p| p.1), 0.05);
            let mut chart = panel(
                area,
                title,
                (0.0..1.0, "predicted foreground proportion û", &|v| {
                    format!("{v:.1}")
                }),
                (lo..hi, "term value", &|v| format!("{v:.2}")),
                10,
            )?;
            for (k, (t, curve)) in taus.iter().zip(&curves).enumerate() {
                let color = COLORS[k % COLORS.len()];
                let min =
                    curve
                        .iter()
                        .copied()
                        .fold((0.0, f64::MAX), |m, p| if p.1 < m.1 { p } else { m });
                line(
                    &mut chart,
                    curve.iter().copied(),
                    color,
                    &format!("τ = {t}"),
                )?;
                chart.draw_series([Circle::new(min, 6, color.filled())])?;
            }
            legend(&mut chart, legend_at, 15)?;
        }
        root.present()?;
        Ok(())
    }
}
