//! Kernels compiled without naga's index clamps (`Strategy::index_checks` off, lavapipe's
//! default) give the bits of the same kernels compiled with them. Without the clamps an
//! index past the end of an invocation or workgroup array is undefined behaviour instead
//! of the last element, so a kernel that ever indexed past an array would differ here
//! (every output: loss, terms, statistics, proportions, loss maps and every gradient
//! element), beside the checks against the f64 reference that every other test makes
//! under the adapter's own strategy.

use crate::common::{new_ctx, spec, GRADIENT};
use segloss::gpu::{GpuContext, Options, Strategy};
use segloss::input::{Labels, Shape};
use segloss::output::LossOutput;
use segloss::testing::{random_labels, random_logits, random_masks, random_soft_labels, Rng};

/// Runs `json` under `strategy` with and without index clamps and compares every bit.
fn same_bits(
    ctx: &GpuContext,
    strategy: Strategy,
    json: &str,
    shape: &Shape,
    z: &[f32],
    labels: Labels<'_>,
) {
    let what = format!(
        "{shape:?}, block {}: {json}",
        strategy.block_for(shape.classes)
    );
    let run = |index_checks| {
        let strategy = Some(Strategy {
            index_checks,
            ..strategy
        });
        let opts = Options {
            statistics: true,
            strategy,
            ..GRADIENT
        };
        let out = ctx.evaluate(&spec(json), shape, z, labels, opts);
        (
            out.unwrap_or_else(|e| panic!("{what}: {e}")),
            ctx.last_kernels(),
        )
    };
    let (clamped, kernels) = run(true);
    let (unclamped, unclamped_kernels) = run(false);
    assert_eq!(kernels, unclamped_kernels, "{what}: the same kernels");
    let (gc, gu) = (
        clamped.gradient.as_ref().unwrap(),
        unclamped.gradient.as_ref().unwrap(),
    );
    assert_eq!(gc.len(), shape.len(), "{what}");
    for (k, (a, b)) in gc.iter().zip(gu).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{what}: gradient[{k}] {a} clamped, {b} not"
        );
    }
    // Debug prints each f64 in its shortest round-trip form: equal text, equal bits.
    let rest = |o: &LossOutput| {
        format!(
            "{:?}",
            LossOutput {
                gradient: None,
                ..o.clone()
            }
        )
    };
    assert_eq!(rest(&clamped), rest(&unclamped), "{what}");
}

const DICE_CE: &str = r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"}]}"#;
const TEMPERED: &str = r#"{"terms":[{"kind":"cross_entropy","label_smoothing":0.1},{"kind":"dice"},{"kind":"region","weight":0.5,"penalty":"l1","temperature":10}]}"#;
const FOCAL_TVERSKY: &str = r#"{"ignore_index":1,"terms":[{"kind":"focal","gamma":2},{"kind":"tversky","alpha":0.3,"beta":0.7}]}"#;
const CE: &str = r#"{"ignore_index":0,"terms":[{"kind":"cross_entropy","label_smoothing":0.05,"reduction":"none"}]}"#;
const BCE_LOG_DICE: &str =
    r#"{"activation":"sigmoid","terms":[{"kind":"bce"},{"kind":"dice","log":true}]}"#;

/// Class counts around every block edge (1, 2, a block of 5 and of 21 classes exactly, 32,
/// 33 and 150 past the stats block), every path a call can take on this adapter: its own
/// strategy (register blocks, quads where they fit, chunked classes past 32 on CPU
/// adapters), pixels one at a time, one pass for pixel terms, staged classes past a block
/// of 8, and soft labels.
#[test]
fn unclamped_indices_give_the_bits_of_clamped_ones() {
    let ctx = new_ctx();
    let own = ctx.strategy();
    let mut rng = Rng::new(0x1DC4);
    let one_at_a_time = Strategy {
        quad_pixels: false,
        ..own
    };
    let one_pass = Strategy {
        one_pass_min_elements: 0,
        ..own
    };
    let staged = Strategy {
        class_block: 8,
        stats_class_block: 8,
        class_staging: true,
        ..own
    };
    let cases: [(usize, &str, Strategy); 12] = [
        (2, DICE_CE, own),
        (4, TEMPERED, own),
        (4, FOCAL_TVERSKY, one_at_a_time),
        (5, DICE_CE, own),
        (21, DICE_CE, own),
        (21, TEMPERED, own),
        (21, CE, one_pass),
        (32, FOCAL_TVERSKY, own),
        (33, TEMPERED, own),
        (150, DICE_CE, own),
        (150, CE, one_pass),
        (21, DICE_CE, staged),
    ];
    for (classes, json, strategy) in cases {
        // 2 images of 12×11 pixels: partial tiles, whole quads (132 pixels).
        let shape = Shape::new(2, classes, &[12, 11]);
        let z = random_logits(&mut rng, &shape, 6.0);
        let y = random_labels(&mut rng, &shape, 0.1);
        same_bits(&ctx, strategy, json, &shape, &z, Labels::index(&y));
    }
    // Soft labels and partial quads (13×11 pixels); sigmoid with one class.
    let shape = Shape::new(2, 21, &[13, 11]);
    let z = random_logits(&mut rng, &shape, 6.0);
    let soft = random_soft_labels(&mut rng, &shape);
    same_bits(&ctx, own, TEMPERED, &shape, &z, Labels::Soft(&soft));
    let shape = Shape::new(3, 1, &[13, 11]);
    let z = random_logits(&mut rng, &shape, 6.0);
    let masks = random_masks(&mut rng, &shape);
    same_bits(&ctx, own, BCE_LOG_DICE, &shape, &z, Labels::Soft(&masks));
}

/// lavapipe compiles without the clamps by default, so that the rest of the suite checks
/// that configuration against the reference; other adapters keep wgpu's default.
#[test]
fn lavapipe_is_the_adapter_without_index_clamps() {
    let ctx = new_ctx();
    let info = ctx.adapter_info();
    let lavapipe = info.device_type == wgpu::DeviceType::Cpu && info.name.starts_with("llvmpipe");
    assert_eq!(ctx.strategy().index_checks, !lavapipe, "{info:?}");
}
