//! Calls with more classes than the stats stage's block on CPU adapters
//! (`Strategy::stats_class_block`, `grad_chunks`): the stats stage keeps 32 classes and
//! reads the rest again, `CHUNK` at a time in the class sums; the grad stage keeps none,
//! sums what each class's gradient needs in its online softmax pass and writes the classes
//! in chunks of 8 (grad.wgsl `GRAD_CHUNKS`). Four pixels a vec4 where the pixels per image
//! are a multiple of 4 (`PAST_QUADS`, `grad_chunk_quads`). Every output element against
//! the f64 reference, with partial tiles and a partial last chunk.

use crate::common::{assert_loss_and_gradient, check_with, new_ctx, spec, Targets};
use segloss::distributed::{step_host, HostShard, SingleProcess};
use segloss::gpu::stages::Kernel;
use segloss::gpu::HostLogits;
use segloss::gpu::{GpuContext, Strategy};
use segloss::input::Layout;
use segloss::input::{Labels, Shape};
use segloss::reference;
use segloss::testing::{random_labels, random_logits, random_soft_labels, Rng};

/// A strategy that chunks past `stats_class_block` classes, on two passes (the grad
/// stage, not the one-pass form) and without staging.
fn chunked(ctx: &GpuContext, stats_class_block: u32, class_block: u32) -> Strategy {
    Strategy {
        stats_class_block,
        class_block,
        grad_chunks: true,
        class_staging: false,
        one_pass_min_elements: u64::MAX,
        ..ctx.strategy()
    }
}

/// Runs `json` on `shape` under `strategy` against the reference, and checks that the call
/// had a grad stage that took the classes in chunks exactly when `want_chunks`, four
/// pixels at a time where every quad is whole (pixels a multiple of 4 on a CPU adapter).
fn check_chunks(
    ctx: &GpuContext,
    strategy: Strategy,
    json: &str,
    shape: &Shape,
    labels: Labels<'_>,
    z: &[f32],
    want_chunks: bool,
) {
    let what = format!(
        "{shape:?}, stats block {}, block {}: {json}",
        strategy.stats_block_for(shape.classes),
        strategy.block_for(shape.classes)
    );
    check_with(ctx, Some(strategy), &spec(json), shape, z, labels, &what);
    assert!(
        ctx.last_kernels().contains(&Kernel::Grad),
        "{what}: {:?}",
        ctx.last_kernels()
    );
    assert_eq!(ctx.last_grad_chunks(), want_chunks, "{what}");
    // A call that computes its own statistics hands its softmax pieces to a chunked
    // softmax gradient (pixels.wgsl `STORED_PIECES`).
    let softmax = !json.contains("sigmoid");
    assert_eq!(
        ctx.last_stored_pieces(),
        want_chunks && softmax,
        "{what}: stored pieces"
    );
    let quads = want_chunks
        && strategy.quad_pixels
        && strategy.contiguous_pixels
        && shape.pixels().is_multiple_of(4);
    assert_eq!(ctx.last_quads(), quads, "{what}: quads");
}

const DICE_CE: &str = r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"}]}"#;
const TEMPERED: &str = r#"{"terms":[{"kind":"cross_entropy","label_smoothing":0.1},{"kind":"dice"},{"kind":"region","weight":0.5,"penalty":"l1","temperature":10}]}"#;
const FOCAL_TVERSKY: &str = r#"{"ignore_index":2,"terms":[{"kind":"focal","gamma":2,"alpha":{W}},{"kind":"tversky","alpha":0.3,"beta":0.7}]}"#;
const CE_WEIGHTED: &str = r#"{"ignore_index":1,"terms":[{"kind":"cross_entropy","class_weights":{W},"label_smoothing":0.1}]}"#;
const GENERALIZED: &str = r#"{"terms":[{"kind":"cross_entropy","class_weights":{W}},{"kind":"generalized_dice"},{"kind":"region","penalty":"kl"}]}"#;
/// Squared denominators (∂L/∂Q, the online sums' Σe² term) and a weighted CE whose Σh
/// on soft labels is summed class by class.
const SQUARED_WEIGHTED: &str = r#"{"terms":[{"kind":"cross_entropy","class_weights":{W},"label_smoothing":0.05},{"kind":"dice","squared":true,"jaccard":true}]}"#;
const BCE_DICE: &str =
    r#"{"activation":"sigmoid","terms":[{"kind":"bce","pos_weight":{W}},{"kind":"dice"}]}"#;

/// A class vector of C positive weights in place of `{W}`.
fn with_weights(json: &str, rng: &mut Rng, classes: usize) -> String {
    let w: Vec<String> = (0..classes)
        .map(|_| format!("{:.3}", 0.2 + 2.0 * rng.uniform()))
        .collect();
    json.replace("{W}", &format!("[{}]", w.join(",")))
}

/// A case of `b` images of `c` classes: its shape, `json` with class weights in place of
/// `{W}`, random logits and class-index labels (a tenth ignored).
fn random_case(
    rng: &mut Rng,
    b: usize,
    c: usize,
    spatial: &[usize],
    json: &str,
) -> (Shape, String, Vec<f32>, Vec<u32>) {
    let shape = Shape::new(b, c, spatial);
    let json = with_weights(json, rng, c);
    let z = random_logits(rng, &shape, 3.0);
    let y = random_labels(rng, &shape, 0.1);
    (shape, json, z, y)
}

/// The adapter's own strategy past 32 classes (150 and 33, a partial last chunk; 256, the
/// class block's edge; 300, past it, where the grad stage chunks with the class block as
/// its own), every kind of term, both pixel orders at 150.
#[test]
fn chunked_classes_match_the_reference() {
    let ctx = new_ctx();
    let own = ctx.strategy();
    let cpu = own.grad_chunks;
    let mut rng = Rng::new(3300);
    for (b, c, spatial, json) in [
        (2, 33, vec![37, 29], DICE_CE),
        (2, 33, vec![36, 29], DICE_CE),
        (1, 150, vec![23, 19], TEMPERED),
        (1, 150, vec![24, 19], TEMPERED),
        (2, 150, vec![13, 11], FOCAL_TVERSKY),
        (2, 150, vec![13, 12], FOCAL_TVERSKY),
        (1, 150, vec![17, 13], CE_WEIGHTED),
        (1, 150, vec![20, 13], CE_WEIGHTED),
        (1, 150, vec![21, 11], SQUARED_WEIGHTED),
        (1, 150, vec![20, 11], SQUARED_WEIGHTED),
        (1, 256, vec![11, 9], GENERALIZED),
        (1, 256, vec![12, 9], GENERALIZED),
        (1, 300, vec![9, 7], DICE_CE),
        (1, 300, vec![8, 7], DICE_CE),
    ] {
        let (shape, json, z, y) = random_case(&mut rng, b, c, &spatial, json);
        let strategy = Strategy {
            one_pass_min_elements: u64::MAX,
            ..own
        };
        check_chunks(&ctx, strategy, &json, &shape, Labels::index(&y), &z, cpu);
        if c == 150 {
            let other_order = Strategy {
                contiguous_pixels: !own.contiguous_pixels,
                ..strategy
            };
            check_chunks(&ctx, other_order, &json, &shape, Labels::index(&y), &z, cpu);
        }
    }
}

/// Chunks forced on small blocks (the stats stage keeping 8 classes, the grad stage none),
/// so the chunked code runs at class counts just past a chunk and with every label form:
/// soft labels (with class weights and squared denominators), sigmoid mode with pos_weight, NHWC-free index labels with ignored pixels;
/// and the same calls without chunks for contrast.
#[test]
fn chunks_on_small_blocks_match_the_reference() {
    let ctx = new_ctx();
    let mut rng = Rng::new(909);
    for (c, spatial, json) in [
        (9, [19, 23], TEMPERED),
        (9, [20, 23], TEMPERED),
        (17, [19, 23], FOCAL_TVERSKY),
        (17, [19, 24], FOCAL_TVERSKY),
        (21, [19, 23], CE_WEIGHTED),
        (21, [16, 23], CE_WEIGHTED),
        (21, [19, 23], SQUARED_WEIGHTED),
        (21, [20, 23], SQUARED_WEIGHTED),
        (21, [19, 23], BCE_DICE),
        (21, [19, 20], BCE_DICE),
    ] {
        let shape = Shape::new(2, c, &spatial);
        let json = with_weights(json, &mut rng, c);
        let z = random_logits(&mut rng, &shape, 3.0);
        let targets = Targets::random(&mut rng, &shape, &json);
        let labels = targets.labels();
        check_chunks(&ctx, chunked(&ctx, 8, 8), &json, &shape, labels, &z, true);
        let plain = Strategy {
            grad_chunks: false,
            ..chunked(&ctx, 8, 8)
        };
        check_chunks(&ctx, plain, &json, &shape, labels, &z, false);
        if !json.contains("sigmoid") && !json.contains("ignore_index") {
            let soft = random_soft_labels(&mut rng, &shape);
            let soft_labels = Labels::Soft(&soft);
            check_chunks(
                &ctx,
                chunked(&ctx, 8, 8),
                &json,
                &shape,
                soft_labels,
                &z,
                true,
            );
        }
    }
}

/// Statistics given by the caller (the two-phase API's second call, here one rank of
/// `distributed::step_host`): no stats pass runs before the grad stage, so the chunked grad
/// stage finds each pixel's softmax pieces itself with its online max and sum (the path
/// without `STORED_PIECES`), for every kind of sum it keeps: Dice's, tempered, focal.
#[test]
fn given_statistics_find_their_own_pieces() {
    // GPUs stage their classes by default: chunks on every adapter here.
    let own = new_ctx();
    let strategy = chunked(&own, 32, 256);
    let ctx = own.with_strategy(strategy).unwrap();
    let mut rng = Rng::new(4040);
    for (b, c, spatial, json) in [
        (2, 40, vec![13, 11], DICE_CE),
        (1, 150, vec![12, 11], TEMPERED),
        (2, 150, vec![9, 7], FOCAL_TVERSKY),
        (1, 150, vec![11, 9], SQUARED_WEIGHTED),
    ] {
        let (shape, json, z, y) = random_case(&mut rng, b, c, &spatial, json);
        let what = format!("{shape:?}: {json}");
        let sp = spec(&json);
        let shard = HostShard {
            shape: &shape,
            layout: Layout::Nchw,
            logits: HostLogits::F32(&z),
            labels: Labels::index(&y),
            image_offset: 0,
            total_batch: b,
        };
        let got = step_host(&ctx, &sp, &shard, true, &SingleProcess)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(ctx.last_grad_chunks(), "{what}");
        assert!(!ctx.last_stored_pieces(), "{what}: stored pieces");
        let want = reference::evaluate(&sp, &shape, &z, Labels::index(&y), true).unwrap();
        assert_loss_and_gradient(&got, got.gradient.as_ref().unwrap(), &want, &what);
    }
}
