//! Small calls (ARCHITECTURE.md, "Small calls"): when the stats stage writes few partial
//! rows, finalize adds them itself and the two summing dispatches are not recorded. Each
//! case runs with the path forced on and forced off: every output (loss, terms, statistics,
//! gradient, loss maps) must be the same bits, match the f64 reference, and the recorded
//! kernels must show which path ran, so a test cannot pass on the other path by mistake.

use crate::common::{check_with, new_ctx, spec};
use segloss::gpu::stages::Kernel;
use segloss::gpu::{GpuContext, Strategy, TileSum};
use segloss::input::{Labels, Shape};
use segloss::testing::{random_labels, random_logits, Rng};
use segloss::LossOutput;

const DICE_CE: &str = r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"}]}"#;
/// Every kind of term (region_family.rs's option grid ends with it: with Mesa's shader cache on,
/// as in CI, its pipelines at C = 9 compile once for both): finalize reads
/// every column of the rows it summed.
const EVERY_TERM: &str = r#"{"terms":[{"kind":"cross_entropy","label_smoothing":0.1},{"kind":"focal","weight":0.5},{"kind":"dice","weight":0.7,"squared":true},{"kind":"tversky","weight":0.2,"alpha":0.7,"beta":0.3},{"kind":"generalized_dice","weight":0.3},{"kind":"region","weight":0.1,"penalty":"kl","temperature":10}]}"#;

fn with_sums(strategy: Strategy, on: bool) -> Strategy {
    Strategy {
        finalize_sums_max_floats: if on { u64::MAX } else { 0 },
        ..strategy
    }
}

fn sums_recorded(ctx: &GpuContext) -> bool {
    let k = ctx.last_kernels();
    k.contains(&Kernel::SumTiles) || k.contains(&Kernel::SumTileRows)
}

/// The same bits: loss, term values, gradient and statistics compared as bit patterns
/// (`==` on floats would take −0.0 for 0.0).
fn assert_same_bits(a: &LossOutput, b: &LossOutput, what: &str) {
    assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "{what}: loss");
    for (x, y) in a.terms.iter().zip(&b.terms) {
        assert_eq!(x.value.to_bits(), y.value.to_bits(), "{what}: {}", x.kind);
    }
    let bits32 =
        |g: &Option<Vec<f32>>| -> Vec<u32> { g.iter().flatten().map(|v| v.to_bits()).collect() };
    assert_eq!(bits32(&a.gradient), bits32(&b.gradient), "{what}: gradient");
    let bits64 = |o: &LossOutput| -> Vec<u64> {
        let s = o.statistics.as_ref().expect("statistics requested");
        s.to_flat().iter().map(|v| v.to_bits()).collect()
    };
    assert_eq!(bits64(a), bits64(b), "{what}: statistics");
    assert_eq!(a, b, "{what}: the outputs differ");
}

/// What the call with finalize's sums on recorded: its kernels and its chunks.
struct OnPath {
    kernels: Vec<Kernel>,
    chunks: usize,
}

/// `json` on (`shape`, `z`, `y`) under `strategy` with finalize's sums forced on and off:
/// both against the reference, the kernels each recorded, and the same bits from both.
fn check_both_ways(
    ctx: &GpuContext,
    strategy: Strategy,
    json: &str,
    shape: &Shape,
    z: &[f32],
    y: &[u32],
    what: &str,
) -> OnPath {
    let run = |on: bool, path: &str| {
        let strategy = Some(with_sums(strategy, on));
        let labels = Labels::index(y);
        let what = format!("{path}, {what}");
        check_with(ctx, strategy, &spec(json), shape, z, labels, &what)
    };
    let on = run(true, "finalize sums");
    let path = OnPath {
        kernels: ctx.last_kernels(),
        chunks: ctx.last_chunks(),
    };
    let k = &path.kernels;
    assert!(!sums_recorded(ctx), "{what}: summing dispatches in {k:?}");
    assert!(k.contains(&Kernel::Finalize), "{what}: {k:?}");
    let off = run(false, "summing dispatches");
    assert!(
        ctx.last_kernels().contains(&Kernel::SumTiles),
        "{what}: {:?}",
        ctx.last_kernels()
    );
    assert_same_bits(&on, &off, what);
    path
}

/// Every tile-sum strategy the device runs (partial rows per tile: 1, one per subgroup,
/// one per invocation), over images of one tile (GPUs' workgroups of 256: 8,192 pixels),
/// of several tiles with a partial last one, and of a few pixels.
#[test]
fn finalize_sums_match_the_summing_dispatches_bit_for_bit() {
    let ctx = &new_ctx();
    let mut tile_sums = vec![TileSum::Invocation, TileSum::Workgroup];
    if ctx.uses_subgroups() {
        tile_sums.push(TileSum::Subgroup);
    }
    let mut rng = Rng::new(31);
    for (b, c, spatial) in [
        (1, 3, vec![64, 64]),
        (2, 3, vec![100, 101]),
        (3, 3, vec![7]),
        (2, 9, vec![5, 7, 311]),
    ] {
        let shape = Shape::new(b, c, &spatial);
        let z = random_logits(&mut rng, &shape, 3.0);
        let y = random_labels(&mut rng, &shape, 0.1);
        // One spec per class count, each a pipeline region_family.rs compiles too; the
        // workgroup sum at one of them only (llvmpipe compiles its barriers for about a
        // minute a pipeline, and CI starts with a cold shader cache).
        let json = if c == 3 { DICE_CE } else { EVERY_TERM };
        for &tile_sum in &tile_sums {
            if tile_sum == TileSum::Workgroup && c != 3 {
                continue;
            }
            let own = Strategy {
                tile_sum,
                ..ctx.strategy()
            };
            // GPUs' workgroups too, on the image of one of their tiles (four of a CPU
            // adapter's); the workgroup sum at 256 runs in backend_misuse.rs.
            let mut strategies = vec![own];
            if spatial == [64, 64] && own.pixel_workgroup != 256 && tile_sum != TileSum::Workgroup {
                strategies.push(Strategy {
                    pixel_workgroup: 256,
                    ..own
                });
            }
            for strategy in strategies {
                let wg = strategy.pixel_workgroup;
                let what = format!("{tile_sum:?} in workgroups of {wg} on {shape:?}: {json}");
                check_both_ways(ctx, strategy, json, &shape, &z, &y, &what);
            }
        }
    }
}

/// The default threshold: a 1×2×64×64 DiceCE call (one tile of a GPU's or four of a CPU
/// adapter's, at most 256 partial rows of 28 floats under any tile sum) records its three
/// passes and nothing else.
#[test]
fn small_call_records_three_dispatches() {
    let ctx = &new_ctx();
    let mut rng = Rng::new(64);
    let shape = Shape::new(1, 2, &[64, 64]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    check_with(
        ctx,
        None,
        &spec(DICE_CE),
        &shape,
        &z,
        Labels::index(&y),
        "1×2×64×64",
    );
    let k = ctx.last_kernels();
    assert_eq!(k.len(), 3, "{k:?}");
    assert_eq!(k[1..], [Kernel::Finalize, Kernel::Grad], "{k:?}");
}

/// The one-pass path (pixel terms only) sums in finalize twice; and a batch split into
/// chunks, whose partial rows come from several dispatches.
#[test]
fn finalize_sums_with_one_pass_and_chunks() {
    let ctx = &new_ctx();
    let mut rng = Rng::new(5);
    let shape = Shape::new(3, 5, &[19, 23]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.2);

    let one_pass = Strategy {
        one_pass_min_elements: 0,
        ..ctx.strategy()
    };
    let ce = r#"{"terms":[{"kind":"cross_entropy","class_weights":[1,2,3,0.5,1]}]}"#;
    let k = check_both_ways(ctx, one_pass, ce, &shape, &z, &y, "one pass").kernels;
    assert_eq!(
        k.iter().filter(|x| **x == Kernel::Finalize).count(),
        2,
        "{k:?}"
    );
    assert!(k.contains(&one_pass.tile_sum.kernels()[1]), "{k:?}");

    // One image (9 × 437 logits) per binding: three chunks.
    let shape = Shape::new(3, 9, &[19, 23]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.2);
    let chunked = Strategy {
        binding_limit: (9 * 437 * 4 + 600) as u64,
        ..ctx.strategy()
    };
    let on = check_both_ways(ctx, chunked, EVERY_TERM, &shape, &z, &y, "three chunks");
    assert_eq!(on.chunks, 3);
}
