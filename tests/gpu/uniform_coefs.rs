//! The gradient's two ways of reading the coefficient table (grad_pixel.wgsl
//! `UNIFORM_COEFS`, `Strategy::uniform_coefs`): through the uniform view `fin_coefs` where
//! the whole batch's table fits it (B·C ≤ `GpuContext::coef_rows`), through the storage
//! binding `fin` elsewhere. Each kernel that reads coefficients (the register grad stage,
//! the chunked one, the staged one), both ways, every output element against the f64
//! reference; and the batch at the uniform view's edge and one image past it.

use crate::common::{check_with, new_ctx, spec, Targets};
use segloss::gpu::stages::Kernel;
use segloss::gpu::{GpuContext, Strategy};
use segloss::input::Shape;
use segloss::testing::{random_logits, Rng};

/// Every coefficient slot: ∂L/∂P and ∂L/∂I (Dice), ∂L/∂Q (squared denominators), ∂L/∂U
/// (the tempered region term, whose coefficients the gradient reads apart from ∂L/∂P).
const ALL_SLOTS: &str = r#"{"terms":[{"kind":"cross_entropy","label_smoothing":0.1},{"kind":"dice","squared":true},{"kind":"region","weight":0.5,"penalty":"l1","temperature":10}]}"#;
/// Untempered region coefficients (∂L/∂U joins ∂L/∂P), Tversky and ignored pixels.
const TVERSKY_REGION: &str = r#"{"ignore_index":3,"terms":[{"kind":"focal","gamma":2},{"kind":"tversky","alpha":0.3,"beta":0.7},{"kind":"region","penalty":"kl"}]}"#;
/// Sigmoid mode, where each class's gradient reads its coefficients alone.
const SIGMOID_DICE: &str =
    r#"{"activation":"sigmoid","terms":[{"kind":"bce"},{"kind":"dice","jaccard":true}]}"#;
const DICE_CE: &str = r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"}]}"#;

/// Runs `json` on `shape` under `strategy` against the reference and checks that the call's
/// gradient read the coefficients through the uniform view exactly when `want_uniform`, and
/// which grad kernel it ran (with `Kernel::Grad`, whether it took its classes in chunks).
fn check(
    ctx: &GpuContext,
    strategy: Strategy,
    json: &str,
    shape: &Shape,
    rng: &mut Rng,
    want_uniform: bool,
    kernel: Kernel,
) {
    let z = random_logits(rng, shape, 3.0);
    let targets = Targets::random(rng, shape, json);
    let what = format!(
        "{shape:?}, uniform coefficients {}: {json}",
        strategy.uniform_coefs
    );
    check_with(
        ctx,
        Some(strategy),
        &spec(json),
        shape,
        &z,
        targets.labels(),
        &what,
    );
    assert!(
        ctx.last_kernels().contains(&kernel),
        "{what}: {:?}",
        ctx.last_kernels()
    );
    assert_eq!(ctx.last_uniform_coefs(), want_uniform, "{what}");
    if kernel == Kernel::Grad {
        let chunks = strategy.grad_chunks
            && shape.classes > strategy.stats_block_for(shape.classes) as usize;
        assert_eq!(ctx.last_grad_chunks(), chunks, "{what}: chunks");
    }
}

/// The register path (21 classes), the chunked grad stage (150) and the staged one (40),
/// each with the coefficients read both ways, partial tiles and quads.
#[test]
fn both_bindings_match_the_reference_in_every_grad_kernel() {
    let ctx = new_ctx();
    let own = ctx.strategy();
    let two_pass = Strategy {
        one_pass_min_elements: u64::MAX,
        ..own
    };
    let chunked = Strategy {
        class_block: 256,
        stats_class_block: 32,
        grad_chunks: true,
        class_staging: false,
        ..two_pass
    };
    let staged = Strategy {
        class_block: 8,
        class_staging: true,
        ..two_pass
    };
    let register = Strategy {
        class_block: 32,
        stats_class_block: 32,
        ..two_pass
    };
    let mut rng = Rng::new(1414);
    for (strategy, c, spatial, json, kernel) in [
        (register, 21, [19, 23], ALL_SLOTS, Kernel::Grad),
        (register, 21, [20, 23], TVERSKY_REGION, Kernel::Grad),
        (register, 21, [19, 21], SIGMOID_DICE, Kernel::Grad),
        (chunked, 150, [13, 11], ALL_SLOTS, Kernel::Grad),
        (chunked, 150, [12, 11], TVERSKY_REGION, Kernel::Grad),
        (chunked, 150, [12, 7], SIGMOID_DICE, Kernel::Grad),
        (staged, 40, [11, 9], ALL_SLOTS, Kernel::GradStaged),
        (staged, 40, [12, 9], TVERSKY_REGION, Kernel::GradStaged),
    ] {
        let shape = Shape::new(2, c, &spatial);
        for uniform in [false, true] {
            let s = Strategy {
                uniform_coefs: uniform,
                ..strategy
            };
            check(&ctx, s, json, &shape, &mut rng, uniform, kernel);
        }
    }
}

/// The largest batch whose table fits the uniform view (B·C = `coef_rows` where C divides
/// it, as it does on every adapter with 64 KiB uniform bindings) reads it there;
/// one image more reads the storage binding; both match the reference. 64 classes (the
/// chunked grad stage on CPU adapters), 3×5 pixels an image.
#[test]
fn the_table_past_the_uniform_view_reads_storage() {
    let ctx = new_ctx();
    let strategy = Strategy {
        uniform_coefs: true,
        one_pass_min_elements: u64::MAX,
        ..ctx.strategy()
    };
    let rows = ctx.coef_rows() as usize;
    let c = 64;
    assert!(rows >= c, "coef_rows {rows}");
    let edge = rows / c;
    let mut rng = Rng::new(4097);
    let grad = if ctx.strategy().class_staging {
        Kernel::GradStaged
    } else {
        Kernel::Grad
    };
    for (b, want_uniform) in [(edge, true), (edge + 1, false)] {
        let shape = Shape::new(b, c, &[3, 5]);
        check(
            &ctx,
            strategy,
            DICE_CE,
            &shape,
            &mut rng,
            want_uniform,
            grad,
        );
    }
}
