//! Shared by the GPU test files: the device, and comparison against the f64 reference.
#![allow(dead_code)]

use segloss::gpu::{context, GpuContext, HostBatch, HostLogits, Options, Strategy};
use segloss::input::{permute, GradFormat, Labels, Layout, LogitFormat, Shape};
use segloss::output::LossOutput;
use segloss::reference;
use segloss::spec::LossSpec;
use std::sync::OnceLock;

/// Loss and gradient, outputs poisoned first (no raw statistics).
pub const GRADIENT: Options = Options {
    gradient: true,
    statistics: false,
    poison: true,
    strategy: None,
    proportions: true,
};

/// A spec from JSON, panicking with the JSON on a mistake in the test itself.
pub fn spec(json: &str) -> LossSpec {
    LossSpec::from_json(json).unwrap_or_else(|e| panic!("{json}: {e}"))
}

/// A context of its own (for tests that count allocations, lose the device or need a
/// second device). Without a device the test fails, saying how to install lavapipe.
pub fn new_ctx() -> GpuContext {
    GpuContext::new().unwrap_or_else(|e| panic!("GPU tests need a Vulkan device: {e}"))
}

/// The shared test device. Without one the tests fail, saying how to install lavapipe: a GPU test
/// never passes silently.
pub fn gpu() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| match GpuContext::new() {
        Ok(c) => c,
        Err(e) => panic!("GPU tests need a Vulkan device: {e}"),
    })
}

/// Tolerances, f32 kernels against the f64 reference:
/// - loss and term values: |gpu − ref| ≤ 2e-5·max(1, |ref|) (f32 sums over up to 10⁵ pixels
///   in a fixed tree order keep ~1e-6 relative; the slack covers 1 − ratio cancellation);
/// - every gradient element: |gpu − ref| ≤ 1e-5·max|ref| + 1e-7, and the whole gradient
///   within 1e-4 relative L2 (the agreement with PyTorch and MONAI that README.md promises).
pub const VALUE_TOL: f64 = 2e-5;
pub const GRAD_ELEM_TOL: f64 = 1e-5;
pub const GRAD_L2_TOL: f64 = 1e-4;

pub fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= VALUE_TOL * b.abs().max(1.0)
}

/// Runs `spec` on the GPU (outputs poisoned first) and on the reference and checks every
/// output element. Returns the GPU output.
pub fn check(
    spec: &LossSpec,
    shape: &Shape,
    logits: &[f32],
    labels: Labels<'_>,
    what: &str,
) -> LossOutput {
    check_on(gpu(), spec, shape, logits, labels, what)
}

/// [`check`] on a given context.
pub fn check_on(
    ctx: &GpuContext,
    spec: &LossSpec,
    shape: &Shape,
    logits: &[f32],
    labels: Labels<'_>,
    what: &str,
) -> LossOutput {
    check_with(ctx, None, spec, shape, logits, labels, what)
}

/// [`check_on`] with a strategy of the test's choosing (`None`: the context's).
pub fn check_with(
    ctx: &GpuContext,
    strategy: Option<Strategy>,
    spec: &LossSpec,
    shape: &Shape,
    logits: &[f32],
    labels: Labels<'_>,
    what: &str,
) -> LossOutput {
    let want = reference::evaluate(spec, shape, logits, labels, true).unwrap();
    let got = ctx
        .evaluate(
            spec,
            shape,
            logits,
            labels,
            Options {
                gradient: true,
                statistics: true,
                poison: true,
                strategy,
                proportions: true,
            },
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        got.loss.is_finite() && close(got.loss, want.loss),
        "{what}: loss {} vs reference {}",
        got.loss,
        want.loss
    );
    for (g, w) in got.terms.iter().zip(&want.terms) {
        assert!(
            close(g.value, w.value),
            "{what}: term {} = {} vs reference {}",
            g.kind,
            g.value,
            w.value
        );
    }
    assert_eq!(got.valid_pixels, want.valid_pixels, "{what}: valid pixels");
    for (name, g, w) in [
        (
            "predicted",
            &got.predicted_proportions,
            &want.predicted_proportions,
        ),
        ("target", &got.target_proportions, &want.target_proportions),
    ] {
        for (gr, wr) in g.iter().zip(w) {
            for (a, b) in gr.iter().zip(wr) {
                assert!(close(*a, *b), "{what}: {name} proportion {a} vs {b}");
            }
        }
    }
    assert_eq!(got.decomposition.len(), want.decomposition.len());
    for (g, w) in got.decomposition.iter().zip(&want.decomposition) {
        for (a, b) in [
            (g.ce, w.ce),
            (g.kl, w.kl),
            (g.matching, w.matching),
            (g.dice_region, w.dice_region),
        ] {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{what}: decomposition {g:?} vs {w:?}"
            );
        }
    }
    assert_eq!(got.elements.len(), want.elements.len(), "{what}: elements");
    for (ge, we) in got.elements.iter().zip(&want.elements) {
        match (ge, we) {
            (Some(g), Some(w)) => {
                assert_eq!(g.len(), w.len());
                for (a, b) in g.iter().zip(w) {
                    assert!(close(*a, *b), "{what}: element {a} vs {b}");
                }
            }
            (None, None) => {}
            _ => panic!("{what}: elements present on one side only"),
        }
    }
    let gs = got.statistics.as_ref().unwrap();
    let ws = want.statistics.as_ref().unwrap();
    for (g, w) in gs.per_class.iter().zip(&ws.per_class) {
        for (a, b) in g.iter().zip(w) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{what}: statistic {a} vs {b}"
            );
        }
    }
    let gg = got.gradient.as_ref().unwrap();
    let wg = want.gradient.as_ref().unwrap();
    assert_eq!(gg.len(), wg.len());
    let scale = wg.iter().fold(0.0f64, |m, v| m.max((*v as f64).abs()));
    let (mut diff, mut norm) = (0.0, 0.0);
    for (k, (a, b)) in gg.iter().zip(wg).enumerate() {
        let (a, b) = (*a as f64, *b as f64);
        assert!(
            a.is_finite(),
            "{what}: gradient element {k} is {a} (unwritten or NaN)"
        );
        assert!(
            (a - b).abs() <= GRAD_ELEM_TOL * scale + 1e-7,
            "{what}: gradient[{k}] = {a} vs reference {b} (max |ref| {scale})"
        );
        diff += (a - b) * (a - b);
        norm += b * b;
    }
    assert!(
        diff.sqrt() <= GRAD_L2_TOL * norm.sqrt() + 1e-12,
        "{what}: gradient relative L2 {}",
        diff.sqrt() / norm.sqrt()
    );
    got
}

/// Every gradient element within the tolerances of [`check_on`] (and finite).
pub fn assert_gradient(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: gradient length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max((*v as f64).abs()));
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        let (a, b) = (*a as f64, *b as f64);
        assert!(
            a.is_finite() && (a - b).abs() <= GRAD_ELEM_TOL * scale + 1e-7,
            "{what}: gradient[{k}] = {a} vs reference {b} (max |ref| {scale})"
        );
    }
}

/// The device `context::choose` picks, opened with at most `bytes` of workgroup memory.
pub fn device_with_workgroup_memory(bytes: u32) -> GpuContext {
    let adapter = context::choose(context::enumerate()).unwrap();
    let mut desc = context::device_descriptor(&adapter);
    desc.required_limits.max_compute_workgroup_storage_size = bytes;
    let (device, queue) = pollster::block_on(adapter.request_device(&desc)).unwrap();
    assert_eq!(device.limits().max_compute_workgroup_storage_size, bytes);
    GpuContext::from_device(device, queue, adapter.get_info())
}

/// `spec` on class-index labels `y` with the logits `z` (NCHW f32) handed over in `layout`
/// and `format`: loss, terms and every gradient element against the reference on the same
/// values rounded to `format` (16-bit logits, f32 gradient).
#[allow(clippy::too_many_arguments)]
pub fn check_layout_format(
    ctx: &GpuContext,
    strategy: Option<Strategy>,
    spec: &LossSpec,
    shape: &Shape,
    z: &[f32],
    y: &[u32],
    layout: Layout,
    format: LogitFormat,
    what: &str,
) {
    let rounded: Vec<f32> = match format {
        LogitFormat::F32 => z.to_vec(),
        LogitFormat::F16 => z.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect(),
        LogitFormat::Bf16 => z
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_f32())
            .collect(),
    };
    let want = reference::evaluate(spec, shape, &rounded, Labels::index(y), true).unwrap();
    let laid = if layout == Layout::Nhwc {
        permute(&rounded, shape, false)
    } else {
        rounded
    };
    let (h16, b16): (Vec<half::f16>, Vec<half::bf16>) = (
        laid.iter().map(|v| half::f16::from_f32(*v)).collect(),
        laid.iter().map(|v| half::bf16::from_f32(*v)).collect(),
    );
    let logits = match format {
        LogitFormat::F32 => HostLogits::F32(&laid),
        LogitFormat::F16 => HostLogits::F16(&h16),
        LogitFormat::Bf16 => HostLogits::Bf16(&b16),
    };
    let got = ctx
        .evaluate_host(
            spec,
            &HostBatch {
                shape,
                layout,
                logits,
                labels: Labels::index(y),
                label_format: None,
                grad_format: GradFormat::F32,
            },
            Options {
                gradient: true,
                poison: true,
                strategy,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut g = got.gradient.clone().unwrap();
    if layout == Layout::Nhwc {
        g = permute(&g, shape, true);
    }
    assert_loss_and_gradient(&got, &g, &want, what);
}

/// The loss, every term's value and every element of `gradient` (the GPU's, in the
/// reference's layout) against the reference's output `want`.
pub fn assert_loss_and_gradient(got: &LossOutput, gradient: &[f32], want: &LossOutput, what: &str) {
    assert!(
        close(got.loss, want.loss),
        "{what}: loss {} vs reference {}",
        got.loss,
        want.loss
    );
    for (g, w) in got.terms.iter().zip(&want.terms) {
        assert!(
            close(g.value, w.value),
            "{what}: term {} {} vs {}",
            g.kind,
            g.value,
            w.value
        );
    }
    assert_gradient(gradient, want.gradient.as_ref().unwrap(), what);
}

/// Runs `json` through the backend API (device-resident inputs, checked on the device,
/// under the context's own strategy; with `gradient`, into a gradient buffer of its own)
/// and returns the read-back's error, if any.
pub fn device_call(
    ctx: &GpuContext,
    json: &str,
    shape: &Shape,
    z: &[f32],
    labels: &[u8],
    format: segloss::input::LabelFormat,
    gradient: bool,
) -> Result<(), String> {
    use wgpu::util::DeviceExt;
    let dev = ctx.device();
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
    let buffer = |bytes: &[u8]| {
        dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytes,
            usage,
        })
    };
    let (zb, yb) = (buffer(bytemuck::cast_slice(z)), buffer(labels));
    let grad = dev.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (z.len() * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let batch = segloss::gpu::DeviceBatch::new(shape, &zb, &yb, format);
    let target = gradient.then(|| segloss::gpu::GradTarget::f32(&grad));
    let mut enc = dev.create_command_encoder(&Default::default());
    let rec = ctx
        .record(&mut enc, &spec(json), &batch, target)
        .map_err(|e| e.to_string())?;
    ctx.queue().submit([enc.finish()]);
    rec.read(ctx).map(|_| ()).map_err(|e| e.to_string())
}

/// Random targets for a spec: 0/1 masks in sigmoid mode, else class-index labels with
/// 10 % of the pixels ignored.
pub enum Targets {
    Index(Vec<u32>),
    Masks(Vec<f32>),
}

impl Targets {
    pub fn random(rng: &mut segloss::testing::Rng, shape: &Shape, json: &str) -> Self {
        if json.contains("sigmoid") {
            Targets::Masks(segloss::testing::random_masks(rng, shape))
        } else {
            Targets::Index(segloss::testing::random_labels(rng, shape, 0.1))
        }
    }

    pub fn labels(&self) -> Labels<'_> {
        match self {
            Targets::Index(y) => Labels::index(y),
            Targets::Masks(m) => Labels::Soft(m),
        }
    }
}
