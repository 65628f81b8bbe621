//! The `segloss` command line: the kernels from any language, through .npy files and JSON.
//! Its interface is a fixed contract (ARCHITECTURE.md, "The command-line contract"); errors
//! print one line and exit with status 2.

use clap::{Parser, Subcommand, ValueEnum};
use segloss::gpu::{HostBatch, HostLogits};
use segloss::input::{GradFormat, Labels, Shape};
use segloss::npy::{self, NpyArray, NpyData};
use segloss::spec::{Activation, LossSpec};
use segloss::{Error, LossOutput, Result, Segloss};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The spec reference printed by `segloss eval --help` (README.md has the same with the
/// PyTorch and MONAI equivalents).
const SPEC_HELP: &str = "SPEC: JSON text or @path to a JSON file:
  {\"activation\": \"softmax\"|\"sigmoid\", \"ignore_index\": -100, \"terms\": [TERM, ...]}
Every TERM has \"kind\" and \"weight\" (λ, default 1). Kinds and their other fields (defaults):
  cross_entropy     class_weights [C], label_smoothing (0), reduction mean|sum|none
  focal             gamma (2), alpha [C]
  dice              include_background (true), squared (false), jaccard (false), log (false),
                    batch (false), smooth_nr (1e-5), smooth_dr (1e-5), skip_empty (false),
                    class_weights [C], reduction mean|sum|none
  tversky           alpha (0.5), beta (0.5), gamma (1), include_background, batch, smooth_nr, smooth_dr
  generalized_dice  w_type square|simple|uniform, include_background, batch, smooth_nr, smooth_dr
  region            penalty l1|kl|l2|log_sum, target ground_truth|uniform|[C], temperature (1:
                    û = mean softmax(T·z), T multiplies the logits; the paper uses 10)
  bce               pos_weight [C] (sigmoid mode)";

fn eval_help() -> String {
    let usage = "Example:\n  segloss eval --logits x.npy --labels y.npy \\\n    --spec '{\"terms\":[{\"kind\":\"cross_entropy\"},{\"kind\":\"dice\"}]}' --grad-out g.npy\n\nlogits: float32, float16 or float64 (converted once to float32), (B, C, *spatial) for nchw or (B, *spatial, C) for nhwc.\nlabels: any integer dtype (B, *spatial) or (B, 1, *spatial), or float32/16/64 of the logits' shape (soft labels, sigmoid masks).\n\n";
    format!("{usage}{SPEC_HELP}")
}

#[derive(Parser)]
#[command(
    name = "segloss",
    version,
    about = "Fused segmentation losses and gradients on the GPU (wgpu), with an f64 CPU fallback",
    after_help = "Examples:\n  segloss info\n  segloss eval --logits x.npy --labels y.npy --spec '{\"terms\":[{\"kind\":\"cross_entropy\"},{\"kind\":\"dice\"}]}' --grad-out g.npy\n  segloss bench --shape 8,4,256,256 --spec @dicece.json --json\n\nWithout a GPU: install Mesa's lavapipe (apt-get install mesa-vulkan-drivers) and set WGPU_BACKEND=vulkan,\nor pass --device cpu to eval."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Layout {
    Nchw,
    Nhwc,
}

impl Layout {
    /// The library's layout of the same name.
    fn lib(self) -> segloss::input::Layout {
        match self {
            Layout::Nchw => segloss::input::Layout::Nchw,
            Layout::Nhwc => segloss::input::Layout::Nhwc,
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Device {
    Gpu,
    Cpu,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum LabelKind {
    U8,
    U16,
    U32,
}

#[derive(Subcommand)]
enum Command {
    /// List the adapters found, the one chosen, its features and limits.
    #[command(after_help = "Example:\n  WGPU_BACKEND=vulkan segloss info")]
    Info,
    /// Time loss + gradient on random data against a device copy of the logits.
    #[command(
        after_help = "Example:\n  segloss bench --shape 8,4,256,256 --spec '{\"terms\":[{\"kind\":\"cross_entropy\"},{\"kind\":\"dice\"}]}' --json\n\nmedian_ms: loss + gradient, submit to completion, after warm-up; copy_median_ms: a device copy\nof the logits in the same run (loss + gradient cannot beat about 1.5× of it); shader_copy_median_ms:\na compute kernel that only copies the logits (the floor of any shader pass on this adapter);\nsoftmax_floor_median_ms: the plainest softmax cross-entropy with its gradient (one read, one\nexponential and one write a logit; softmax specs, NCHW)."
    )]
    Bench {
        /// B,C,H,W (or B,C,D,H,W, or B,C,N).
        #[arg(long)]
        shape: String,
        /// The loss spec: JSON text, or @path to a JSON file.
        #[arg(long)]
        spec: String,
        /// Timed repetitions.
        #[arg(long, default_value_t = 30)]
        reps: usize,
        /// Memory layout of the logits.
        #[arg(long, value_enum, default_value = "nchw")]
        layout: Layout,
        /// Label storage on the device.
        #[arg(long, value_enum, default_value = "u8")]
        labels: LabelKind,
        /// Print one JSON object instead of a line of text.
        #[arg(long)]
        json: bool,
    },
    /// Loss (and gradient) of a spec on logits and labels stored as .npy files.
    #[command(
        after_help = eval_help()
    )]
    Eval {
        /// Logits .npy (float32 or float16).
        #[arg(long)]
        logits: PathBuf,
        /// Labels .npy (integer class indices, or float32 of the logits' shape).
        #[arg(long)]
        labels: PathBuf,
        /// The loss spec: JSON text, or @path to a JSON file.
        #[arg(long)]
        spec: String,
        /// Memory layout of logits (and soft labels and the gradient).
        #[arg(long, value_enum, default_value = "nchw")]
        layout: Layout,
        /// Write ∂loss/∂logits here as float32, same shape and layout as the logits.
        #[arg(long)]
        grad_out: Option<PathBuf>,
        /// gpu (error if none), or cpu (the f64 reference). Default: the GPU if there is one.
        #[arg(long, value_enum)]
        device: Option<Device>,
    },
}

fn read_spec(text: &str) -> Result<LossSpec> {
    let json = match text.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|e| Error::Io(format!("{path}: {e}")))?
        }
        None => text.to_string(),
    };
    LossSpec::from_json(&json)
}

fn eval(
    logits: PathBuf,
    labels: PathBuf,
    spec: String,
    layout: Layout,
    grad_out: Option<PathBuf>,
    device: Option<Device>,
) -> Result<()> {
    let spec = read_spec(&spec)?;
    let (x, shape) = read_logits(&logits, layout)?;
    spec.validate(Some(shape.classes))?;
    let y = npy::read(&labels)?;
    check_label_shape(&y, &x.shape, &shape, layout, &labels)?;
    let soft_labels = match &y.data {
        NpyData::Int(_) => Vec::new(),
        NpyData::Float(_) | NpyData::Half(_) => y.data.to_f32(),
    };
    let labels_in = match &y.data {
        NpyData::Int(v) => Labels::index(v),
        NpyData::Float(_) | NpyData::Half(_) => Labels::Soft(&soft_labels),
    };
    if spec.activation == Activation::Sigmoid && matches!(labels_in, Labels::Index(_)) {
        return Err(file_error(
            &labels,
            "sigmoid mode needs float masks of the logits' shape as labels, not integers".into(),
        ));
    }
    let engine = match device {
        Some(Device::Gpu) => Segloss::gpu()?,
        Some(Device::Cpu) => Segloss::cpu(),
        None => Segloss::new(),
    };
    let logits_in = match &x.data {
        NpyData::Half(v) => HostLogits::F16(v),
        NpyData::Float(v) => HostLogits::F32(v),
        NpyData::Int(_) => unreachable!("refused by read_logits"),
    };
    let batch = HostBatch {
        shape: &shape,
        layout: layout.lib(),
        logits: logits_in,
        labels: labels_in,
        label_format: None,
        grad_format: GradFormat::F32,
    };
    let out = engine.evaluate_host(&spec, &batch, grad_out.is_some())?;
    let json = eval_json(&out, &spec, &engine)?;
    if let (Some(path), Some(g)) = (grad_out, out.gradient) {
        npy::write_f32(&path, &x.shape, &g)?;
    }
    print_out(&json.to_string())
}

/// An input error about the file at `path`.
fn file_error(path: &Path, why: String) -> Error {
    Error::Input(format!("{}: {why}", path.display()))
}

/// The logits at `path`, checked to be floating point with a class axis and at least one
/// spatial axis, and their shape as B, C and the spatial extents for `layout`.
fn read_logits(path: &Path, layout: Layout) -> Result<(NpyArray, Shape)> {
    let x = npy::read(path)?;
    if matches!(x.data, NpyData::Int(_)) {
        return Err(file_error(
            path,
            "logits must be floating point (float32, float16 or float64), not integers".into(),
        ));
    }
    if x.shape.len() < 3 {
        return Err(file_error(
            path,
            format!(
                "logits have shape {:?}: expected (B, C, *spatial) with at least one spatial dimension",
                x.shape
            ),
        ));
    }
    let (b_n, c_n, spatial) = match layout {
        Layout::Nchw => (x.shape[0], x.shape[1], &x.shape[2..]),
        Layout::Nhwc => (
            x.shape[0],
            x.shape[x.shape.len() - 1],
            &x.shape[1..x.shape.len() - 1],
        ),
    };
    let shape = Shape::new(b_n, c_n, spatial);
    shape.check().map_err(|e| file_error(path, e.to_string()))?;
    Ok((x, shape))
}

/// Checks the shape of the labels `y` read from `path`: class indices are (B, *spatial),
/// with or without a class axis of size 1; soft labels have the logits' shape `x_shape`.
fn check_label_shape(
    y: &NpyArray,
    x_shape: &[usize],
    shape: &Shape,
    layout: Layout,
    path: &Path,
) -> Result<()> {
    match &y.data {
        NpyData::Int(_) => {
            let want: Vec<usize> = std::iter::once(shape.batch)
                .chain(shape.spatial.iter().cloned())
                .collect();
            // MONAI and many pipelines keep a class axis of size 1: (B, 1, *spatial), or
            // (B, *spatial, 1) channels last.
            let mut with_axis = want.clone();
            match layout {
                Layout::Nchw => with_axis.insert(1, 1),
                Layout::Nhwc => with_axis.push(1),
            }
            if y.shape != want && y.shape != with_axis {
                return Err(file_error(
                    path,
                    format!(
                        "index labels have shape {:?}, expected (B, *spatial) = {want:?} or {with_axis:?}",
                        y.shape
                    ),
                ));
            }
        }
        NpyData::Float(_) | NpyData::Half(_) => {
            if y.shape != x_shape {
                return Err(file_error(
                    path,
                    format!(
                        "float labels have shape {:?}, expected the logits' shape {:?} (integer labels for class indices)",
                        y.shape, x_shape
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The JSON object `segloss eval` prints for `out`.
fn eval_json(out: &LossOutput, spec: &LossSpec, engine: &Segloss) -> Result<serde_json::Value> {
    let mut json = serde_json::json!({
        "loss": out.loss,
        "terms": out.terms,
        "predicted_proportions": out.predicted_proportions,
        "target_proportions": out.target_proportions,
        "valid_pixels": out.valid_pixels,
        "device": engine.describe(),
    });
    if spec.activation == Activation::Softmax {
        json["decomposition"] =
            serde_json::to_value(&out.decomposition).map_err(|e| Error::Io(e.to_string()))?;
    }
    if !out.elements.is_empty() {
        json["elements"] =
            serde_json::to_value(&out.elements).map_err(|e| Error::Io(e.to_string()))?;
    }
    Ok(json)
}

/// Prints a line on stdout. A reader that went away (`segloss eval … | head`) ends the
/// program quietly, as any Unix filter does, instead of a panic.
fn print_out(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(Error::Io(format!("writing to stdout: {e}"))),
    }
}

fn info() -> Result<()> {
    let adapters = segloss::gpu::context::enumerate();
    let listed: Vec<_> = adapters
        .iter()
        .map(|a| {
            let i = a.get_info();
            serde_json::json!({"name": i.name, "backend": format!("{:?}", i.backend), "device_type": format!("{:?}", i.device_type), "driver": i.driver, "driver_info": i.driver_info})
        })
        .collect();
    let chosen = segloss::gpu::context::choose(adapters)?;
    let l = chosen.limits();
    let json = serde_json::json!({
        "adapters": listed,
        "chosen": chosen.get_info().name,
        "features": segloss::gpu::context::feature_names(
            chosen.features() & segloss::gpu::context::wanted_features()
        ),
        "limits": {
            "max_storage_buffer_binding_size": l.max_storage_buffer_binding_size,
            "max_buffer_size": l.max_buffer_size,
            "max_compute_workgroups_per_dimension": l.max_compute_workgroups_per_dimension,
            "max_compute_invocations_per_workgroup": l.max_compute_invocations_per_workgroup,
            "max_compute_workgroup_storage_size": l.max_compute_workgroup_storage_size,
            "max_storage_buffers_per_shader_stage": l.max_storage_buffers_per_shader_stage,
        },
    });
    print_out(&serde_json::to_string_pretty(&json).map_err(|e| Error::Io(e.to_string()))?)
}

#[allow(clippy::too_many_arguments)]
fn bench(
    shape: String,
    spec: String,
    reps: usize,
    layout: Layout,
    labels: LabelKind,
    json: bool,
) -> Result<()> {
    let dims: Vec<usize> = shape
        .split(',')
        .map(|d| {
            d.trim()
                .parse::<usize>()
                .map_err(|_| Error::Input(format!("--shape {shape}: '{d}' is not a size")))
        })
        .collect::<Result<_>>()?;
    if dims.len() < 3 {
        return Err(Error::Input(format!(
            "--shape {shape}: expected B,C,H,W (at least B,C and one spatial size)"
        )));
    }
    if reps == 0 {
        return Err(Error::Input(
            "--reps 0: at least one timed repetition is needed".into(),
        ));
    }
    let shape = Shape::new(dims[0], dims[1], &dims[2..]);
    let spec = read_spec(&spec)?;
    let ctx = segloss::GpuContext::new()?;
    let layout = layout.lib();
    let format = match labels {
        LabelKind::U8 => segloss::input::LabelFormat::U8,
        LabelKind::U16 => segloss::input::LabelFormat::U16,
        LabelKind::U32 => segloss::input::LabelFormat::U32,
    };
    let problem = segloss::bench::Problem::new(&ctx, &spec, &shape, layout, Some(format))?;
    let bar = indicatif::ProgressBar::new(reps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("segloss bench");
    let result = segloss::bench::run(&ctx, &problem, reps, 3, || bar.inc(1));
    bar.finish_and_clear();
    let r = result?;
    if json {
        print_out(&serde_json::to_string(&r).map_err(|e| Error::Io(e.to_string()))?)
    } else {
        print_out(&format!(
            "{}: loss + gradient {:.3} ms, device copy {:.3} ms, ratio {:.2}, shader copy {:.3} ms{}{} ({} on {})",
            r.shape,
            r.median_ms,
            r.copy_median_ms,
            r.ratio_to_copy,
            r.shader_copy_median_ms,
            r.softmax_floor_median_ms
                .map(|d| format!(", softmax floor {d:.3} ms"))
                .unwrap_or_default(),
            r.device_median_ms
                .map(|d| format!(", device time {d:.3} ms"))
                .unwrap_or_default(),
            r.adapter,
            r.backend
        ))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => info(),
        Command::Bench {
            shape,
            spec,
            reps,
            layout,
            labels,
            json,
        } => bench(shape, spec, reps, layout, labels, json),
        Command::Eval {
            logits,
            labels,
            spec,
            layout,
            grad_out,
            device,
        } => eval(logits, labels, spec, layout, grad_out, device),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("segloss: {}", e.to_string().replace('\n', " "));
            ExitCode::from(2)
        }
    }
}
