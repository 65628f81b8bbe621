//! The one-pass path for specs of pixel terms only (ARCHITECTURE.md, "One pass for pixel
//! terms"): a labels-only pass for the normalisers, then one pass over the logits that
//! writes statistics and gradient. Every output element against the f64 reference, on
//! random shapes with partial tiles, C = 2 to 150, both pixel orders, every option of the
//! pixel terms, soft labels, ignored pixels and images with every pixel ignored; and the
//! dispatches each call records, so a test cannot pass on the two-pass path by mistake.

use crate::common;
use crate::common::{check_with, new_ctx, spec, Targets};
use segloss::gpu::stages::Kernel;
use segloss::gpu::{GpuContext, Strategy};
use segloss::input::{Labels, Shape, IGNORE};
use segloss::testing::{random_labels, random_logits, random_masks, random_soft_labels, Rng};

/// The context's strategy with the one-pass path from `min` logits up.
fn from(ctx: &GpuContext, min: u64) -> Strategy {
    Strategy {
        one_pass_min_elements: min,
        ..ctx.strategy()
    }
}

/// The call just recorded took the one-pass path: labels-only stats pass, finalize,
/// the stats pass with the gradient, finalize; no grad pass.
fn assert_one_pass(ctx: &GpuContext, strategy: &Strategy, what: &str) {
    let k = ctx.last_kernels();
    let [alone, with_grad] = strategy.tile_sum.kernels();
    let at = |kernel| k.iter().position(|x| *x == kernel);
    assert!(
        !k.contains(&Kernel::Grad) && !k.contains(&Kernel::GradShared),
        "{what}: a grad pass in {k:?}"
    );
    let (norms, fused) = (at(alone), at(with_grad));
    assert!(
        norms.is_some() && fused.is_some() && norms < fused,
        "{what}: not the one-pass path: {k:?}"
    );
    assert_eq!(
        k.iter().filter(|x| **x == Kernel::Finalize).count(),
        2,
        "{what}: {k:?}"
    );
}

/// [`check_with`] under `strategy`, then [`assert_one_pass`].
fn check_one_pass(
    ctx: &GpuContext,
    strategy: Strategy,
    json: &str,
    shape: &Shape,
    z: &[f32],
    labels: Labels<'_>,
    what: &str,
) -> segloss::LossOutput {
    let out = check_with(ctx, Some(strategy), &spec(json), shape, z, labels, what);
    assert_one_pass(ctx, &strategy, what);
    out
}

/// Random odd shapes: 1 to 4 images, C from `classes`, 1 to 3 spatial dimensions.
fn random_shape(rng: &mut Rng, classes: &[usize]) -> Shape {
    let b = rng.range(1, 5);
    let c = classes[rng.range(0, classes.len())];
    let spatial = match rng.range(0, 3) {
        0 => vec![rng.range(1, 2500)],
        1 => vec![rng.range(1, 50), rng.range(1, 50)],
        _ => vec![rng.range(1, 12), rng.range(1, 12), rng.range(1, 12)],
    };
    Shape::new(b, c, &spatial)
}

fn class_vector(rng: &mut Rng, c: usize) -> String {
    let v: Vec<String> = (0..c)
        .map(|_| format!("{:.3}", 0.1 + 2.0 * rng.uniform()))
        .collect();
    format!("[{}]", v.join(","))
}

/// Softmax specs of pixel terms only: every reduction, class weights, smoothing, focal's
/// α and γ, two terms, and ignore_index.
const SOFTMAX_SPECS: &[&str] = &[
    r#"{"terms":[{"kind":"cross_entropy"}]}"#,
    r#"{"terms":[{"kind":"cross_entropy","class_weights":{W},"label_smoothing":0.2}]}"#,
    r#"{"terms":[{"kind":"cross_entropy","reduction":"sum","label_smoothing":0.05}]}"#,
    r#"{"terms":[{"kind":"cross_entropy","reduction":"none","class_weights":{W}}]}"#,
    r#"{"terms":[{"kind":"focal","gamma":0.5,"alpha":{W}}]}"#,
    r#"{"terms":[{"kind":"cross_entropy","weight":0.5},{"kind":"focal","weight":2.0,"gamma":1.0}]}"#,
    r#"{"ignore_index":1,"terms":[{"kind":"cross_entropy","class_weights":{W}}]}"#,
];

#[test]
fn one_pass_matches_the_reference_on_random_shapes() {
    let ctx = &new_ctx();
    let mut rng = Rng::new(2024);
    for round in 0..14 {
        let shape = random_shape(&mut rng, &[2, 3, 9, 21]);
        let z = random_logits(&mut rng, &shape, 4.0);
        let ignored = [0.0, 0.1, 0.6][round % 3];
        let y = random_labels(&mut rng, &shape, ignored);
        let w = class_vector(&mut rng, shape.classes);
        let json = SOFTMAX_SPECS[round % SOFTMAX_SPECS.len()].replace("{W}", &w);
        // Both pixel orders on alternate rounds.
        let strategy = Strategy {
            contiguous_pixels: round % 2 == 0,
            ..from(ctx, 0)
        };
        let what = format!("{json} on {shape:?}, contiguous {}", round % 2 == 0);
        check_one_pass(ctx, strategy, &json, &shape, &z, Labels::index(&y), &what);
        if !json.contains("ignore_index") && !json.contains("\"none\"") {
            let soft = random_soft_labels(&mut rng, &shape);
            let what = format!("soft labels, {what}");
            check_one_pass(ctx, strategy, &json, &shape, &z, Labels::Soft(&soft), &what);
        }
    }
}

/// 150 classes (past the GPU class block, inside the CPU one) and 300 (past both: the class
/// blocks after the first are read again by the stats sums and the gradient).
#[test]
fn one_pass_with_many_classes() {
    let ctx = &new_ctx();
    let mut rng = Rng::new(150);
    for (c, spatial, json) in [
        (
            150,
            vec![37, 29],
            r#"{"terms":[{"kind":"cross_entropy","label_smoothing":0.1}]}"#,
        ),
        (
            300,
            vec![301],
            r#"{"terms":[{"kind":"focal","gamma":2.0}]}"#,
        ),
    ] {
        let shape = Shape::new(2, c, &spatial);
        let z = random_logits(&mut rng, &shape, 3.0);
        let y = random_labels(&mut rng, &shape, 0.1);
        for contiguous in [true, false] {
            let strategy = Strategy {
                contiguous_pixels: contiguous,
                ..from(ctx, 0)
            };
            let what = format!("C={c} contiguous {contiguous}: {json}");
            check_one_pass(ctx, strategy, json, &shape, &z, Labels::index(&y), &what);
        }
    }
}

/// Images with every pixel ignored, alone and beside others: their normaliser is 0 (a mean
/// of nothing is 0 and its gradient is 0, as PyTorch's weighted mean of no pixel is not
/// taken: the reference's convention), and their gradient is all zeros.
#[test]
fn one_pass_with_all_ignored_images() {
    let ctx = &new_ctx();
    let mut rng = Rng::new(7);
    let shape = Shape::new(3, 5, &[19, 23]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let s = shape.pixels();
    let mut y = random_labels(&mut rng, &shape, 0.2);
    y[s..2 * s].fill(IGNORE); // image 1 entirely ignored
    let none = vec![IGNORE; y.len()];
    let strategy = from(ctx, 0);
    for json in [
        r#"{"terms":[{"kind":"cross_entropy"}]}"#,
        r#"{"terms":[{"kind":"cross_entropy","reduction":"sum","class_weights":[1,2,3,0.5,1]}]}"#,
        r#"{"terms":[{"kind":"focal","gamma":2.0},{"kind":"cross_entropy","reduction":"none"}]}"#,
    ] {
        for (labels, which) in [(&y, "image 1 ignored"), (&none, "every pixel ignored")] {
            let what = format!("{which}: {json}");
            let out = check_one_pass(
                ctx,
                strategy,
                json,
                &shape,
                &z,
                Labels::index(labels),
                &what,
            );
            let g = out.gradient.as_ref().unwrap();
            let image = shape.classes * s;
            assert!(
                g[image..2 * image].iter().all(|v| *v == 0.0),
                "{what}: gradient of an ignored image"
            );
        }
    }
}

#[test]
fn one_pass_bce_in_sigmoid_mode() {
    let ctx = &new_ctx();
    let mut rng = Rng::new(12);
    for round in 0..4 {
        let shape = random_shape(&mut rng, &[1, 3, 10]);
        let z = random_logits(&mut rng, &shape, 5.0);
        let m = random_masks(&mut rng, &shape);
        let json = [
            r#"{"activation":"sigmoid","terms":[{"kind":"bce"}]}"#.to_string(),
            format!(
                r#"{{"activation":"sigmoid","terms":[{{"kind":"bce","pos_weight":{},"weight":0.3}}]}}"#,
                class_vector(&mut rng, shape.classes)
            ),
        ][round % 2]
            .clone();
        let strategy = from(ctx, 0);
        let what = format!("{json} on {shape:?}");
        check_one_pass(ctx, strategy, &json, &shape, &z, Labels::Soft(&m), &what);
    }
}

/// Which calls take the path: pixel terms only, a gradient, at least
/// `one_pass_min_elements` logits; a statistic term, a forward-only call or a smaller
/// call takes the two passes (and still matches the reference).
#[test]
fn the_path_is_taken_exactly_where_it_applies() {
    let ctx = &new_ctx();
    let mut rng = Rng::new(3);
    let shape = Shape::new(2, 4, &[20, 30]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    let ce = r#"{"terms":[{"kind":"cross_entropy"}]}"#;
    let dice_ce = r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"}]}"#;
    let elements = shape.len() as u64;
    let [alone, with_grad] = ctx.strategy().tile_sum.kernels();
    for (json, min, one_pass) in [
        (ce, elements, true),
        (ce, elements + 1, false),
        (ce, u64::MAX, false),
        (dice_ce, 0, false),
    ] {
        let strategy = from(ctx, min);
        let what = format!("{json}, from {min} logits");
        check_with(
            ctx,
            Some(strategy),
            &spec(json),
            &shape,
            &z,
            Labels::index(&y),
            &what,
        );
        let k = ctx.last_kernels();
        assert_eq!(k.contains(&with_grad), one_pass, "{what}: {k:?}");
        assert_eq!(k.contains(&Kernel::Grad), !one_pass, "{what}: {k:?}");
        assert!(k.contains(&alone), "{what}: {k:?}");
    }
    // Forward only: one stats pass, no gradient.
    let out = ctx
        .evaluate(
            &spec(ce),
            &shape,
            &z,
            Labels::index(&y),
            segloss::gpu::Options {
                gradient: false,
                statistics: false,
                poison: true,
                strategy: Some(from(ctx, 0)),
                proportions: true,
            },
        )
        .unwrap();
    assert!(out.loss.is_finite() && out.gradient.is_none());
    assert!(!ctx.last_kernels().contains(&with_grad));
}

/// The host inputs' other forms on the one-pass path, each against the same call on the two
/// passes (which the other test files hold to the reference): f16 logits with an f16
/// gradient (the narrow stage after the pass), channels last, packed u8 labels, and a batch
/// split into chunks that each fit a small binding.
#[test]
fn one_pass_with_half_precision_channels_last_and_chunks() {
    use segloss::gpu::{HostBatch, HostLogits, Options};
    use segloss::input::{permute, GradFormat, LabelFormat, Layout};
    let ctx = &new_ctx();
    let mut rng = Rng::new(16);
    let shape = Shape::new(3, 6, &[29, 31]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    let json = r#"{"terms":[{"kind":"cross_entropy","label_smoothing":0.1},{"kind":"focal","weight":0.5}]}"#;
    let z16: Vec<half::f16> = z.iter().map(|v| half::f16::from_f32(*v)).collect();
    let z_nhwc = permute(&z, &shape, false);
    let image_bytes = (shape.classes * shape.pixels() * 4) as u64;
    let batch = |logits, layout, label_format, grad_format| HostBatch {
        shape: &shape,
        layout,
        logits,
        labels: Labels::index(&y),
        label_format,
        grad_format,
    };
    let cases = [
        (
            "f16 logits and gradient",
            batch(HostLogits::F16(&z16), Layout::Nchw, None, GradFormat::F16),
            0,
        ),
        (
            "channels last, u8 labels",
            batch(
                HostLogits::F32(&z_nhwc),
                Layout::Nhwc,
                Some(LabelFormat::U8),
                GradFormat::F32,
            ),
            0,
        ),
        (
            "one image a chunk",
            batch(
                HostLogits::F32(&z),
                Layout::Nchw,
                Some(LabelFormat::I32),
                GradFormat::F32,
            ),
            image_bytes + 600,
        ),
    ];
    for (what, batch, binding_limit) in cases {
        let grad_format = batch.grad_format;
        let run = |min| {
            let strategy = Strategy {
                binding_limit,
                ..from(ctx, min)
            };
            let opts = Options {
                gradient: true,
                statistics: true,
                poison: true,
                strategy: Some(strategy),
                proportions: true,
            };
            let out = ctx
                .evaluate_host(&spec(json), &batch, opts)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            (out, ctx.last_chunks(), strategy)
        };
        let (two, _, _) = run(u64::MAX);
        let (one, chunks, strategy) = run(0);
        assert_one_pass(ctx, &strategy, what);
        if binding_limit > 0 {
            assert_eq!(chunks, 3, "{what}: chunks");
        }
        assert!(
            common::close(one.loss, two.loss),
            "{what}: loss {} vs {}",
            one.loss,
            two.loss
        );
        let (g1, g2) = (one.gradient.unwrap(), two.gradient.unwrap());
        assert_eq!(g1.len(), g2.len());
        for (k, (a, b)) in g1.iter().zip(&g2).enumerate() {
            // One 16-bit step apart at most (the two f32 values may round to neighbours).
            let tol = match grad_format {
                GradFormat::F16 => 1e-3 * b.abs() + 1e-7,
                _ => 1e-6 * b.abs() + 1e-9,
            };
            assert!(
                a.is_finite() && (a - b).abs() <= tol,
                "{what}: gradient[{k}] {a} vs {b}"
            );
        }
    }
}

/// The same bits for loss, term values and gradient (`==` on floats would take −0.0 for 0.0).
fn assert_same_loss_and_gradient(a: &segloss::LossOutput, b: &segloss::LossOutput, what: &str) {
    assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "{what}: loss");
    for (x, y) in a.terms.iter().zip(&b.terms) {
        assert_eq!(x.value.to_bits(), y.value.to_bits(), "{what}: {}", x.kind);
    }
    let bits =
        |g: &Option<Vec<f32>>| -> Vec<u32> { g.iter().flatten().map(|v| v.to_bits()).collect() };
    assert_eq!(bits(&a.gradient), bits(&b.gradient), "{what}: gradient");
    assert_eq!(a.elements, b.elements, "{what}: elements");
    assert_eq!(a.valid_pixels, b.valid_pixels, "{what}: valid pixels");
}

/// Calls without the proportions (`Options::proportions: false`): for a spec of pixel
/// terms only the stats pass leaves the class sums out, one pass or two, within the class
/// block and past it, softmax and sigmoid; loss, term values and gradient are the same bits
/// as the full call's (which matches the reference), with every output poisoned first, so
/// a class column that finalize read unwritten would show; the proportions and the
/// decomposition come back empty, and asking for the statistics as well is refused. A spec
/// with a statistic term computes the sums anyway and returns them, statistics included.
#[test]
fn calls_without_proportions_give_the_same_loss_and_gradient() {
    let ctx = &new_ctx();
    let mut rng = Rng::new(77);
    let one_pass = from(ctx, 0);
    let two_passes = from(ctx, u64::MAX);
    let past_block = Strategy {
        class_block: 8,
        class_staging: false,
        ..one_pass
    };
    let staged = Strategy {
        class_staging: true,
        ..past_block
    };
    let weights = class_vector(&mut rng, 5);
    let ce = format!(
        r#"{{"ignore_index":1,"terms":[{{"kind":"cross_entropy","label_smoothing":0.1,"class_weights":{weights}}}]}}"#
    );
    let mixed =
        r#"{"terms":[{"kind":"cross_entropy","reduction":"none"},{"kind":"focal","gamma":2.0}]}"#;
    let bce = r#"{"activation":"sigmoid","terms":[{"kind":"bce"}]}"#;
    let dice_ce = r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"}]}"#;
    let cases: [(Shape, &str, Vec<Strategy>); 4] = [
        (Shape::new(2, 5, &[19, 23]), &ce, vec![one_pass, two_passes]),
        (
            Shape::new(2, 21, &[13, 17]),
            mixed,
            vec![past_block, staged],
        ),
        (Shape::new(2, 3, &[11, 29]), bce, vec![one_pass]),
        (Shape::new(2, 4, &[9, 31]), dice_ce, vec![ctx.strategy()]),
    ];
    for (shape, json, strategies) in cases {
        let z = random_logits(&mut rng, &shape, 3.0);
        let targets = Targets::random(&mut rng, &shape, json);
        let labels = targets.labels();
        let pixel_only = spec(json).terms.iter().all(|t| t.is_pixel_term());
        for strategy in strategies {
            let what = format!(
                "{shape:?}, block {}: {json}",
                strategy.block_for(shape.classes)
            );
            let full = check_with(ctx, Some(strategy), &spec(json), &shape, &z, labels, &what);
            let lean_opts = segloss::gpu::Options {
                gradient: true,
                poison: true,
                strategy: Some(strategy),
                proportions: false,
                ..Default::default()
            };
            let lean = ctx
                .evaluate(&spec(json), &shape, &z, labels, lean_opts)
                .unwrap();
            assert_same_loss_and_gradient(&full, &lean, &what);
            assert!(lean.statistics.is_none(), "{what}");
            if pixel_only {
                assert!(lean.predicted_proportions.is_empty(), "{what}");
                assert!(lean.target_proportions.is_empty(), "{what}");
                assert!(lean.decomposition.is_empty(), "{what}");
            } else {
                assert_eq!(
                    lean.predicted_proportions, full.predicted_proportions,
                    "{what}"
                );
                assert_eq!(lean.decomposition, full.decomposition, "{what}");
            }
            let both = segloss::gpu::Options {
                statistics: true,
                ..lean_opts
            };
            let with_stats = ctx.evaluate(&spec(json), &shape, &z, labels, both);
            if pixel_only {
                assert!(with_stats.is_err(), "{what}: statistics without class sums");
            } else {
                let got = with_stats.unwrap().statistics;
                assert_eq!(
                    got, full.statistics,
                    "{what}: statistics of a statistic spec"
                );
            }
        }
    }
}

/// The backend API without the proportions: `record_loss` reads like `record` with empty
/// proportions and refuses `statistics()`; `record_forward_loss` and its backward give the
/// loss and the gradient of `record_forward` and its backward, bit for bit.
#[test]
fn record_loss_and_record_forward_loss() {
    use segloss::gpu::{DeviceBatch, GradTarget};
    use segloss::input::LabelFormat;
    use segloss::wgpu::{self, util::DeviceExt};
    let ctx = &new_ctx();
    let mut rng = Rng::new(78);
    let shape = Shape::new(2, 21, &[13, 17]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    let sp = spec(r#"{"terms":[{"kind":"cross_entropy","label_smoothing":0.05}]}"#);
    let device = ctx.device();
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
    let init = |bytes: &[u8]| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytes,
            usage,
        })
    };
    let logits = init(bytemuck::cast_slice(&z));
    let labels = init(bytemuck::cast_slice(&y));
    let grads: Vec<wgpu::Buffer> = (0..4).map(|_| init(&vec![0u8; 4 * shape.len()])).collect();
    let batch = DeviceBatch::new(&shape, &logits, &labels, LabelFormat::U32);

    let mut enc = device.create_command_encoder(&Default::default());
    let full = ctx
        .record(&mut enc, &sp, &batch, Some(GradTarget::f32(&grads[0])))
        .unwrap();
    ctx.queue().submit([enc.finish()]);
    let full_out = full.read(ctx).unwrap();
    let mut enc = device.create_command_encoder(&Default::default());
    let lean = ctx
        .record_loss(&mut enc, &sp, &batch, Some(GradTarget::f32(&grads[1])))
        .unwrap();
    ctx.queue().submit([enc.finish()]);
    let lean_out = lean.read(ctx).unwrap();
    assert_eq!(full_out.loss.to_bits(), lean_out.loss.to_bits());
    assert!(lean_out.predicted_proportions.is_empty() && lean_out.decomposition.is_empty());
    assert!(lean.statistics(ctx).is_err());
    assert!(full.statistics(ctx).is_ok());

    let backward_of = |forward_loss: bool, grad: &wgpu::Buffer| {
        let mut enc = device.create_command_encoder(&Default::default());
        let fwd = if forward_loss {
            ctx.record_forward_loss(&mut enc, &sp, &batch, None)
        } else {
            ctx.record_forward(&mut enc, &sp, &batch, None)
        }
        .unwrap();
        ctx.record_backward(&mut enc, &fwd, &batch, GradTarget::f32(grad), None, false)
            .unwrap();
        ctx.queue().submit([enc.finish()]);
        fwd.read(ctx).unwrap()
    };
    let a = backward_of(false, &grads[2]);
    let b = backward_of(true, &grads[3]);
    assert_eq!(a.loss.to_bits(), b.loss.to_bits());
    assert!(!a.predicted_proportions.is_empty() && b.predicted_proportions.is_empty());
    let read = |g: &wgpu::Buffer| -> Vec<u32> {
        let v = ctx.read_f32(g, 0, shape.len()).unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    assert_eq!(read(&grads[0]), read(&grads[1]), "record_loss gradient");
    assert_eq!(
        read(&grads[2]),
        read(&grads[3]),
        "record_forward_loss gradient"
    );
    // And the gradient is the reference's.
    let want = segloss::reference::evaluate(&sp, &shape, &z, Labels::index(&y), true).unwrap();
    let got = ctx.read_f32(&grads[3], 0, shape.len()).unwrap();
    common::assert_gradient(
        &got,
        want.gradient.as_deref().unwrap(),
        "record_forward_loss",
    );
}
