//! Bad input found on the device, a lost device, determinism and load.

use crate::common;
use crate::common::spec;

use crate::common::{close, device_call, gpu, new_ctx};
use segloss::gpu::{DeviceBatch, GpuContext, Options};
use segloss::input::{LabelFormat, Labels, Shape};
use segloss::testing::{random_labels, random_logits, Rng};
use segloss::{reference, LossSpec};
use wgpu::util::DeviceExt;

/// Device-resident inputs are checked on the device: the read-back reports the count and
/// the first offending position instead of a NaN loss.
#[test]
fn device_inputs_with_nan_or_bad_labels_are_errors() {
    let ctx = gpu();
    let dev = ctx.device();
    let shape = Shape::new(2, 3, &[40, 30]);
    let mut rng = Rng::new(41);
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
    let run = |z: &[f32], y: &[u32]| {
        let logits = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(z),
            usage,
        });
        let labels = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(y),
            usage,
        });
        let batch = DeviceBatch::new(&shape, &logits, &labels, LabelFormat::U32);
        let mut enc = dev.create_command_encoder(&Default::default());
        let rec = ctx
            .record(
                &mut enc,
                &spec(r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"}]}"#),
                &batch,
                None,
            )
            .unwrap();
        ctx.queue().submit([enc.finish()]);
        rec.read(ctx)
    };
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.0);
    assert!(run(&z, &y).is_ok());
    let mut bad = z.clone();
    bad[2000] = f32::NAN;
    bad[3000] = f32::INFINITY;
    let e = run(&bad, &y).unwrap_err().to_string();
    assert!(
        e.contains("2 non-finite") && e.contains("position 2000"),
        "{e}"
    );
    let mut bad_y = y.clone();
    bad_y[777] = 3;
    bad_y[1500] = 99;
    let e = run(&z, &bad_y).unwrap_err().to_string();
    assert!(e.contains("2 invalid") && e.contains("position 777"), "{e}");
    // The next call with good inputs on the same workspace is clean again.
    assert!(run(&z, &y).is_ok());
}

/// Past the stats stage's class block (32 on CPU adapters, where `pieces` counts the
/// non-finite logits past it as it reads them for the softmax, and the input check reads
/// only the block), NaN, +∞ and −∞ logits are each counted once, with the first position,
/// whichever class they sit in: with a tempered term (two softmaxes read them), in the
/// one-pass form (which writes the gradient), and in sigmoid mode (no softmax: the check
/// reads every class), on the register path under the adapter's strategy and under a
/// stats block of 8, with pixels one at a time (63 a image) and, on CPU adapters, the
/// classes past the block read four pixels a vec4 (64: stats.wgsl `PAST_QUADS`).
#[test]
fn non_finite_logits_past_the_stats_class_block_are_counted_once() {
    let own = new_ctx();
    for spatial in [[9, 7], [8, 8]] {
        non_finite_past_the_block(&own, &Shape::new(2, 150, &spatial));
    }
}

fn non_finite_past_the_block(own: &GpuContext, shape: &Shape) {
    let shape = shape.clone();
    let s = shape.pixels();
    let mut rng = Rng::new(4242);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    let tempered = r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"},{"kind":"region","penalty":"l1","temperature":10}]}"#;
    let ce = r#"{"terms":[{"kind":"cross_entropy"}]}"#;
    let bce = r#"{"activation":"sigmoid","terms":[{"kind":"bce"},{"kind":"dice"}]}"#;
    let base = own.strategy();
    for stats_class_block in [base.stats_class_block, 8] {
        let strategy = segloss::gpu::Strategy {
            stats_class_block,
            class_staging: false,
            one_pass_min_elements: 0,
            ..base
        };
        let ctx = new_ctx().with_strategy(strategy).unwrap();
        for json in [tempered, ce, bce] {
            let labels: Vec<f32>;
            let (y_bytes, format): (&[u8], LabelFormat) = if json.contains("sigmoid") {
                labels = segloss::testing::random_masks(&mut rng, &shape);
                (bytemuck::cast_slice(&labels), LabelFormat::Soft)
            } else {
                (bytemuck::cast_slice(&y), LabelFormat::U32)
            };
            // With the gradient, so that CE takes the one-pass form.
            let run = |z: &[f32]| device_call(&ctx, json, &shape, z, y_bytes, format, true);
            assert!(run(&z).is_ok(), "{json}");
            let mut bad = z.clone();
            // Image 0: class 40 at pixel 17 (the first in flat order), the same pixel's
            // last class, class 100; image 1: class 3 (inside every block).
            let first = 40 * s + 17;
            bad[first] = f32::NAN;
            bad[149 * s + 17] = f32::INFINITY;
            bad[100 * s + 30] = f32::NEG_INFINITY;
            bad[(150 + 3) * s + 60] = f32::NEG_INFINITY;
            let e = run(&bad).unwrap_err();
            assert!(
                e.contains("4 non-finite") && e.contains(&format!("position {first}")),
                "{shape:?}, stats block {stats_class_block}, {json}: {e}"
            );
            let mut bad = z.clone();
            bad[(150 + 120) * s + 5] = f32::NEG_INFINITY; // alone: no NaN reaches the sums
            let e = run(&bad).unwrap_err();
            assert!(
                e.contains("1 non-finite"),
                "{shape:?}, stats block {stats_class_block}, {json}: {e}"
            );
            assert!(run(&z).is_ok(), "{json}");
        }
    }
}

/// After the device is lost, calls return errors (no panic), and a new context works.
#[test]
fn a_lost_device_is_reported_and_a_new_context_works() {
    let shape = Shape::new(1, 2, &[16, 16]);
    let mut rng = Rng::new(42);
    let z = random_logits(&mut rng, &shape, 2.0);
    let y = random_labels(&mut rng, &shape, 0.0);
    let sp = spec(r#"{"terms":[{"kind":"cross_entropy"}]}"#);
    let ctx = new_ctx();
    ctx.evaluate(&sp, &shape, &z, Labels::index(&y), Options::default())
        .unwrap();
    ctx.device().destroy();
    let _ = ctx.device().poll(wgpu::PollType::wait_indefinitely());
    let e = ctx.evaluate(&sp, &shape, &z, Labels::index(&y), Options::default());
    assert!(e.is_err(), "a destroyed device still answered");
    let again = new_ctx()
        .evaluate(&sp, &shape, &z, Labels::index(&y), Options::default())
        .unwrap();
    assert!(again.loss.is_finite());
}

/// 100 runs, with pool reuse between shapes and from four threads, give bitwise-identical
/// loss, statistics and gradient.
#[test]
fn results_are_bitwise_deterministic() {
    let ctx = new_ctx();
    let shape = Shape::new(3, 5, &[45, 37]);
    let other = Shape::new(2, 5, &[20, 20]);
    let mut rng = Rng::new(43);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    let zo = random_logits(&mut rng, &other, 3.0);
    let yo = random_labels(&mut rng, &other, 0.1);
    let sp = spec(
        r#"{"terms":[{"kind":"cross_entropy","label_smoothing":0.1},{"kind":"dice","batch":true},{"kind":"region","weight":0.2,"penalty":"kl","temperature":10}]}"#,
    );
    let opts = Options {
        gradient: true,
        statistics: true,
        poison: false,
        strategy: None,
        proportions: true,
    };
    let first = ctx
        .evaluate(&sp, &shape, &z, Labels::index(&y), opts)
        .unwrap();
    let same = |out: &segloss::LossOutput| {
        out.loss.to_bits() == first.loss.to_bits()
            && out.gradient == first.gradient
            && out.statistics == first.statistics
    };
    for k in 0..60 {
        if k % 10 == 0 {
            ctx.evaluate(&sp, &other, &zo, Labels::index(&yo), opts)
                .unwrap();
        }
        assert!(
            same(
                &ctx.evaluate(&sp, &shape, &z, Labels::index(&y), opts)
                    .unwrap()
            ),
            "run {k} differs"
        );
    }
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..10 {
                    assert!(
                        same(
                            &ctx.evaluate(&sp, &shape, &z, Labels::index(&y), opts)
                                .unwrap()
                        ),
                        "a concurrent run differs"
                    );
                }
            });
        }
    });
}

/// 8 threads × 200 calls of mixed shapes and specs on one context: every result correct,
/// and the pool stops growing once every (shape, spec) has been seen.
#[test]
fn load_from_eight_threads() {
    let ctx = new_ctx();
    let specs = [
        r#"{"terms":[{"kind":"cross_entropy"}]}"#,
        r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"}]}"#,
        r#"{"terms":[{"kind":"focal"},{"kind":"region","penalty":"l1","temperature":10}]}"#,
        r#"{"terms":[{"kind":"tversky"},{"kind":"generalized_dice"}]}"#,
    ];
    let shapes = [
        Shape::new(1, 2, &[16, 16]),
        Shape::new(2, 3, &[13, 11]),
        Shape::new(3, 4, &[9, 9, 3]),
    ];
    // (spec, shape, logits, labels, reference loss)
    type Case = (LossSpec, Shape, Vec<f32>, Vec<u32>, f64);
    let cases: Vec<Case> = (0..specs.len() * shapes.len())
        .map(|k| {
            let (sp, sh) = (
                spec(specs[k % specs.len()]),
                shapes[k / specs.len()].clone(),
            );
            let mut rng = Rng::new(k as u64);
            let z = random_logits(&mut rng, &sh, 3.0);
            let y = random_labels(&mut rng, &sh, 0.1);
            let want = reference::evaluate(&sp, &sh, &z, Labels::index(&y), false)
                .unwrap()
                .loss;
            (sp, sh, z, y, want)
        })
        .collect();
    let run_all = |calls: usize| {
        std::thread::scope(|s| {
            for t in 0..8 {
                let (ctx, cases) = (&ctx, &cases);
                s.spawn(move || {
                    for k in 0..calls {
                        let (sp, sh, z, y, want) = &cases[(t * 7 + k) % cases.len()];
                        let out = ctx
                            .evaluate(
                                sp,
                                sh,
                                z,
                                Labels::index(y),
                                Options {
                                    gradient: k % 2 == 0,
                                    ..Default::default()
                                },
                            )
                            .unwrap();
                        assert!(
                            close(out.loss, *want),
                            "thread {t} call {k}: {} vs {want}",
                            out.loss
                        );
                    }
                });
            }
        });
    };
    run_all(100);
    let high_water = ctx.pool_bytes();
    run_all(100);
    println!("pool high-water mark after 8 × 200 mixed calls: {high_water} bytes ({} after the second half)", ctx.pool_bytes());
    assert!(
        ctx.pool_bytes() <= high_water * 2,
        "the pool keeps growing: {high_water} → {}",
        ctx.pool_bytes()
    );
}

/// A random spec: one to four terms of any kind with random options (softmax mode).
fn random_spec(rng: &mut Rng, classes: usize) -> String {
    let f = |rng: &mut Rng, lo: f64, hi: f64| lo + (hi - lo) * rng.uniform();
    let b = |rng: &mut Rng| rng.uniform() < 0.5;
    let weights = |rng: &mut Rng| {
        if rng.uniform() < 0.5 {
            "null".to_string()
        } else {
            format!(
                "[{}]",
                (0..classes)
                    .map(|_| format!("{:.3}", 0.1 + 2.0 * rng.uniform()))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        }
    };
    let reduction = |rng: &mut Rng| ["mean", "sum", "none"][rng.range(0, 3)];
    let temperature = [1.0, 10.0, 0.5][rng.range(0, 3)];
    let mut terms = vec![];
    for _ in 0..rng.range(1, 5) {
        let w = f(rng, 0.1, 2.0);
        terms.push(match rng.range(0, 6) {
            0 => format!(
                r#"{{"kind":"cross_entropy","weight":{w},"class_weights":{},"label_smoothing":{},"reduction":"{}"}}"#,
                weights(rng),
                f(rng, 0.0, 0.3),
                reduction(rng)
            ),
            1 => format!(r#"{{"kind":"focal","weight":{w},"gamma":{},"alpha":{}}}"#, f(rng, 0.0, 3.0), weights(rng)),
            2 => format!(
                r#"{{"kind":"dice","weight":{w},"include_background":{},"squared":{},"jaccard":{},"log":{},"batch":{},"skip_empty":{},"smooth_nr":{},"smooth_dr":{},"class_weights":{},"reduction":"{}"}}"#,
                b(rng), b(rng), b(rng), b(rng), b(rng), b(rng), f(rng, 0.0, 1e-3), f(rng, 1e-5, 1e-3), weights(rng), reduction(rng)
            ),
            3 => format!(
                r#"{{"kind":"tversky","weight":{w},"alpha":{},"beta":{},"gamma":{},"include_background":{},"batch":{}}}"#,
                f(rng, 0.0, 1.0), f(rng, 0.0, 1.0), f(rng, 0.75, 2.0), b(rng), b(rng)
            ),
            4 => format!(
                r#"{{"kind":"generalized_dice","weight":{w},"w_type":"{}","include_background":{},"batch":{}}}"#,
                ["square", "simple", "uniform"][rng.range(0, 3)], b(rng), b(rng)
            ),
            _ => format!(
                r#"{{"kind":"region","weight":{w},"penalty":"{}","target":"{}","temperature":{temperature}}}"#,
                ["l1", "kl", "l2", "log_sum"][rng.range(0, 4)],
                ["ground_truth", "uniform"][rng.range(0, 2)]
            ),
        });
    }
    format!(r#"{{"terms":[{}]}}"#, terms.join(","))
}

/// Property: for random shapes, labels and specs, the GPU equals the f64 reference.
#[test]
fn random_specs_on_random_shapes_match_the_reference() {
    let mut rng = Rng::new(44);
    for case in 0..24 {
        let classes = rng.range(2, 9);
        let spatial: Vec<usize> = (0..rng.range(1, 4)).map(|_| rng.range(1, 40)).collect();
        let shape = Shape::new(rng.range(1, 4), classes, &spatial);
        let json = random_spec(&mut rng, classes);
        let z = random_logits(&mut rng, &shape, 4.0);
        let y = random_labels(&mut rng, &shape, [0.0, 0.2, 0.9][case % 3]);
        common::check(
            &spec(&json),
            &shape,
            &z,
            Labels::index(&y),
            &format!("case {case}: {json} on {shape:?}"),
        );
    }
}
