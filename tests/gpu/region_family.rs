//! The statistic terms (Dice family and region penalties) on the GPU against the f64
//! reference, over an option grid that uses every option at least once and in
//! combinations, with the edge cases of the region-size family.

use crate::common::spec;

use crate::common::{check, check_with, new_ctx};
use segloss::gpu::{Strategy, TileSum};
use segloss::input::{Labels, Shape, IGNORE};
use segloss::testing::{random_labels, random_logits, random_masks, random_soft_labels, Rng};

/// Every option of every statistic term at least once, several combined.
const GRID: &[&str] = &[
    r#"{"terms":[{"kind":"dice"}]}"#,
    r#"{"terms":[{"kind":"dice","include_background":false,"squared":true}]}"#,
    r#"{"terms":[{"kind":"dice","jaccard":true,"batch":true,"reduction":"sum"}]}"#,
    r#"{"terms":[{"kind":"dice","log":true,"skip_empty":true,"class_weights":[0.5,1.5,1.0,2.0]}]}"#,
    r#"{"terms":[{"kind":"dice","batch":true,"smooth_nr":0,"smooth_dr":0,"skip_empty":true}]}"#,
    r#"{"terms":[{"kind":"dice","squared":true,"jaccard":true,"log":true,"reduction":"none","smooth_nr":1e-3,"smooth_dr":1e-2}]}"#,
    r#"{"terms":[{"kind":"dice","batch":true,"reduction":"none","include_background":false}]}"#,
    r#"{"terms":[{"kind":"tversky"}]}"#,
    r#"{"terms":[{"kind":"tversky","alpha":0.3,"beta":0.7,"include_background":false,"batch":true}]}"#,
    r#"{"terms":[{"kind":"tversky","gamma":1.33,"smooth_nr":0,"smooth_dr":1e-4}]}"#,
    r#"{"terms":[{"kind":"generalized_dice"}]}"#,
    r#"{"terms":[{"kind":"generalized_dice","w_type":"simple","batch":true}]}"#,
    r#"{"terms":[{"kind":"generalized_dice","w_type":"uniform","include_background":false,"smooth_nr":0,"smooth_dr":0}]}"#,
    r#"{"terms":[{"kind":"region"}]}"#,
    r#"{"terms":[{"kind":"cross_entropy"},{"kind":"region","penalty":"l1","temperature":10}]}"#,
    r#"{"terms":[{"kind":"region","penalty":"kl"}]}"#,
    r#"{"terms":[{"kind":"region","penalty":"l2","target":"uniform","temperature":0.5}]}"#,
    r#"{"terms":[{"kind":"region","penalty":"log_sum","target":[0.4,0.3,0.2,0.1]}]}"#,
    r#"{"terms":[{"kind":"cross_entropy","weight":1.0},{"kind":"dice","weight":1.0}]}"#,
    r#"{"terms":[{"kind":"cross_entropy","label_smoothing":0.1},{"kind":"focal","weight":0.5},{"kind":"dice","weight":0.7,"squared":true},{"kind":"tversky","weight":0.2,"alpha":0.7,"beta":0.3},{"kind":"generalized_dice","weight":0.3},{"kind":"region","weight":0.1,"penalty":"kl","temperature":10}]}"#,
];

#[test]
fn option_grid_with_hard_labels() {
    let mut rng = Rng::new(21);
    let shape = Shape::new(3, 4, &[37, 23]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let mut y = random_labels(&mut rng, &shape, 0.15);
    // Class 3 absent from image 0.
    let s = shape.pixels();
    y[..s].iter_mut().filter(|v| **v == 3).for_each(|v| *v = 0);
    for json in GRID {
        check(&spec(json), &shape, &z, Labels::index(&y), json);
    }
}

#[test]
fn option_grid_with_soft_labels() {
    let mut rng = Rng::new(22);
    let shape = Shape::new(2, 4, &[3, 11, 13]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let g = random_soft_labels(&mut rng, &shape);
    for json in GRID {
        check(
            &spec(json),
            &shape,
            &z,
            Labels::Soft(&g),
            &format!("soft {json}"),
        );
    }
}

#[test]
fn random_shapes_and_class_counts() {
    let mut rng = Rng::new(23);
    for round in 0..6 {
        let c = rng.range(2, 24);
        let shape = Shape::new(rng.range(1, 5), c, &[rng.range(1, 90), rng.range(1, 40)]);
        let z = random_logits(&mut rng, &shape, 4.0);
        let y = random_labels(&mut rng, &shape, 0.2);
        let json = GRID[(round * 7) % GRID.len()]
            .replace("[0.5,1.5,1.0,2.0]", "null")
            .replace("[0.4,0.3,0.2,0.1]", "\"uniform\"");
        check(
            &spec(&json),
            &shape,
            &z,
            Labels::index(&y),
            &format!("{json} on {shape:?}"),
        );
    }
}

#[test]
fn sigmoid_mode_statistic_terms() {
    let mut rng = Rng::new(24);
    let shape = Shape::new(2, 3, &[45, 19]);
    let z = random_logits(&mut rng, &shape, 4.0);
    let m = random_masks(&mut rng, &shape);
    for json in [
        r#"{"activation":"sigmoid","terms":[{"kind":"bce"},{"kind":"dice"}]}"#,
        r#"{"activation":"sigmoid","terms":[{"kind":"dice","squared":true,"batch":true},{"kind":"tversky","alpha":0.2,"beta":0.8}]}"#,
        r#"{"activation":"sigmoid","terms":[{"kind":"generalized_dice","w_type":"simple"}]}"#,
        r#"{"activation":"sigmoid","terms":[{"kind":"bce"},{"kind":"region","penalty":"kl","temperature":10}]}"#,
        r#"{"activation":"sigmoid","terms":[{"kind":"region","penalty":"l1"}]}"#,
        r#"{"activation":"sigmoid","terms":[{"kind":"region","penalty":"l2","target":"uniform"}]}"#,
    ] {
        check(&spec(json), &shape, &z, Labels::Soft(&m), json);
    }
}

#[test]
fn edge_cases_of_the_region_size_family() {
    let mut rng = Rng::new(25);
    // C = 2 without background: one class left.
    let shape = Shape::new(2, 2, &[61, 7]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    for json in [
        r#"{"terms":[{"kind":"dice","include_background":false}]}"#,
        r#"{"terms":[{"kind":"tversky","include_background":false}]}"#,
        r#"{"terms":[{"kind":"generalized_dice","include_background":false}]}"#,
    ] {
        check(
            &spec(json),
            &shape,
            &z,
            Labels::index(&y),
            &format!("C=2 {json}"),
        );
    }
    // A class absent from the whole batch, an image with every pixel ignored, smoothing 0.
    let shape = Shape::new(3, 5, &[29, 31]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let mut y: Vec<u32> = random_labels(&mut rng, &shape, 0.1)
        .into_iter()
        .map(|v| if v == 4 { 1 } else { v })
        .collect();
    let s = shape.pixels();
    y[s..2 * s].iter_mut().for_each(|v| *v = IGNORE);
    for json in GRID {
        let json = json
            .replace("[0.5,1.5,1.0,2.0]", "[0.5,1.5,1.0,2.0,1.0]")
            .replace("[0.4,0.3,0.2,0.1]", "[0.4,0.3,0.1,0.1,0.1]");
        let out = check(
            &spec(&json),
            &shape,
            &z,
            Labels::index(&y),
            &format!("absent class 4, image 1 ignored: {json}"),
        );
        assert!(out.loss.is_finite());
        assert!(out.gradient.unwrap()[5 * s..10 * s]
            .iter()
            .all(|g| *g == 0.0));
    }
}

/// The stats stage's three reduction strategies (subgroup operations where the adapter has
/// them; workgroup memory, or a row per invocation, otherwise) on one device, each against the reference, with
/// class counts on both sides of the register block (8) and partial tiles.
#[test]
fn both_reduction_strategies_match_the_reference() {
    let ctx = new_ctx();
    let info = ctx.adapter_info();
    let has = ctx.device().features().contains(wgpu::Features::SUBGROUP);
    assert_eq!(
        ctx.uses_subgroups(),
        has && info.subgroup_min_size >= 4 && info.subgroup_max_size <= 128,
        "subgroup reductions are used exactly where the adapter supports them"
    );
    // (subgroups, planned subgroup size; 0: the adapter's smallest). The last run plans rows
    // for subgroups half the adapter's smallest size: half of each tile's rows are left to
    // clear_spare_rows (the poisoned partial buffer holds NaN until then).
    let mut runs = vec![(TileSum::Workgroup, 0), (TileSum::Invocation, 0)];
    if ctx.uses_subgroups() {
        runs.push((TileSum::Subgroup, 0));
        runs.push((TileSum::Subgroup, (info.subgroup_min_size / 2).max(1)));
    }
    let mut rng = Rng::new(77);
    for round in 0..6 {
        let classes = [2, 3, 8, 9, 17, 23][round];
        let shape = Shape::new(2, classes, &[45, 101]);
        let z = random_logits(&mut rng, &shape, 3.0);
        let y = random_labels(&mut rng, &shape, 0.1);
        let json = [GRID[GRID.len() - 1], GRID[GRID.len() - 2], GRID[14]][round % 3];
        for &(strategy, planned) in &runs {
            // The workgroup strategy (GPUs without subgroups) on both sides of the register
            // block only: llvmpipe compiles its barriers slowly (about a minute a pipeline
            // with a cold shader cache), and CI starts with a cold cache.
            if strategy == TileSum::Workgroup && ![3, 9].contains(&classes) {
                continue;
            }
            let chosen = Strategy {
                tile_sum: strategy,
                planned_subgroup_size: planned,
                ..ctx.strategy()
            };
            // The device can run it (a strategy it cannot run is an error, not ignored).
            assert!(chosen.validate(ctx.device(), info).is_ok());
            check_with(
                &ctx,
                Some(chosen),
                &spec(json),
                &shape,
                &z,
                Labels::index(&y),
                &format!("{strategy:?}, rows planned for size {planned}: {json} on {shape:?}"),
            );
        }
    }
}

/// Many images and classes in one call: finalize's work grows with B·C (lavapipe once gave
/// a wrong loss at 16 images × 150 classes, where one invocation did every term and
/// llvmpipe's cap of 65 535 loop iterations an invocation cut it short), and batch-pooled
/// statistics over more than 64 images; and the stats pass's loops at 150 and 600 classes
/// over full tiles.
#[test]
fn many_images_and_classes() {
    let mut rng = Rng::new(150);
    let all = r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"},{"kind":"tversky"},{"kind":"generalized_dice"},{"kind":"region","penalty":"l1"}]}"#;
    let pooled = r#"{"terms":[{"kind":"dice","batch":true},{"kind":"tversky","batch":true},{"kind":"generalized_dice","batch":true,"w_type":"simple"},{"kind":"region","penalty":"kl"}]}"#;
    for (b, c, json) in [
        (16, 150, all),
        (33, 151, all),
        (70, 5, pooled),
        (67, 97, pooled),
    ] {
        let shape = Shape::new(b, c, &[3, 5]);
        let z = random_logits(&mut rng, &shape, 3.0);
        let y = random_labels(&mut rng, &shape, 0.1);
        check(
            &spec(json),
            &shape,
            &z,
            Labels::index(&y),
            &format!("B={b} C={c}: {json}"),
        );
    }
}

/// Both pixel orders of the stats and grad stages (runs of consecutive pixels per
/// invocation, the CPU default; neighbouring pixels across invocations, the GPU default) on
/// one device, with partial tiles, class blocks past the first (C > 8), soft labels, class
/// weights and a loss map.
#[test]
fn both_pixel_orders_match_the_reference() {
    let ctx = new_ctx();
    let default = ctx.contiguous_pixels();
    assert_eq!(
        default,
        ctx.adapter_info().device_type == wgpu::DeviceType::Cpu,
        "runs of consecutive pixels exactly on CPU adapters"
    );
    let mut rng = Rng::new(4242);
    let weighted = r#"{"terms":[{"kind":"cross_entropy","class_weights":[0.5,1.0,2.0],"reduction":"none"},{"kind":"dice"}]}"#;
    let cases: [(Shape, &str); 4] = [
        (Shape::new(2, 3, &[45, 101]), weighted),
        (Shape::new(1, 11, &[37, 29]), GRID[GRID.len() - 1]),
        (Shape::new(3, 2, &[9000]), GRID[14]),
        (Shape::new(2, 4, &[17, 19]), GRID[3]),
    ];
    for (shape, json) in cases {
        let z = random_logits(&mut rng, &shape, 3.0);
        let y = random_labels(&mut rng, &shape, 0.1);
        let soft = random_soft_labels(&mut rng, &shape);
        for on in [false, true] {
            let order = Some(Strategy {
                contiguous_pixels: on,
                ..ctx.strategy()
            });
            let what = format!("contiguous {on}: {json} on {shape:?}");
            check_with(
                &ctx,
                order,
                &spec(json),
                &shape,
                &z,
                Labels::index(&y),
                &what,
            );
            if !json.contains("class_weights\":[0.5,1.0,2.0]") {
                check_with(
                    &ctx,
                    order,
                    &spec(json),
                    &shape,
                    &z,
                    Labels::Soft(&soft),
                    &format!("soft, {what}"),
                );
            }
        }
    }
}

/// Class counts past the register block of GPUs (8) and up to 1,024, with partial tiles,
/// under the adapter's own strategy (on CPU adapters every class of a pixel kept in
/// invocation memory up to 256, staged past it: each logit read once per pass) and, up to
/// 150 classes, under a class block of 8 without staging (the register path's classes past
/// the block, read again), each against the reference; C = 21 also in the other pixel
/// order, C = 21 and 150 with soft labels.
#[test]
fn class_blocks_match_the_reference() {
    let ctx = new_ctx();
    let mut rng = Rng::new(1024);
    let tempered = r#"{"terms":[{"kind":"cross_entropy"},{"kind":"dice"},{"kind":"region","weight":0.5,"penalty":"l1","temperature":10}]}"#;
    let focal =
        r#"{"terms":[{"kind":"focal","gamma":2},{"kind":"tversky","alpha":0.3,"beta":0.7}]}"#;
    for (b, c, spatial, json) in [
        (2, 9, vec![93, 97], tempered),
        (2, 21, vec![93, 97], focal),
        (1, 150, vec![37, 29], tempered),
        (1, 600, vec![19, 23], focal),
        (1, 1024, vec![13, 17], tempered),
    ] {
        let shape = Shape::new(b, c, &spatial);
        let z = random_logits(&mut rng, &shape, 3.0);
        let y = random_labels(&mut rng, &shape, 0.1);
        let own = ctx.strategy();
        // GPUs' class block and workgroup size, without staging (the register path past
        // the block; staged calls: staged.rs).
        let gpu_block = Strategy {
            class_block: 8,
            pixel_workgroup: 256,
            class_staging: false,
            ..own
        };
        assert!(own.validate(ctx.device(), ctx.adapter_info()).is_ok());
        // The block of 8 at large C compiles slowly on llvmpipe (CI starts with a cold
        // shader cache); 150 classes already cover its classes-past-the-block path.
        let strategies = if c <= 150 {
            vec![own, gpu_block]
        } else {
            vec![own]
        };
        for strategy in strategies {
            let what = format!("class block {} at C = {c}: {json}", strategy.block_for(c));
            check_with(
                &ctx,
                Some(strategy),
                &spec(json),
                &shape,
                &z,
                Labels::index(&y),
                &what,
            );
        }
        if c == 21 || c == 150 {
            // The other pixel order at 21 only: a 256-class pipeline set takes llvmpipe
            // seconds to compile, and the order's indexing does not depend on C.
            if c == 21 {
                let other_order = Strategy {
                    contiguous_pixels: !own.contiguous_pixels,
                    ..own
                };
                let what = format!("other pixel order at C = {c}: {json}");
                check_with(
                    &ctx,
                    Some(other_order),
                    &spec(json),
                    &shape,
                    &z,
                    Labels::index(&y),
                    &what,
                );
            }
            let soft = random_soft_labels(&mut rng, &shape);
            let what = format!("soft labels at C = {c}: {json}");
            check_with(
                &ctx,
                None,
                &spec(json),
                &shape,
                &z,
                Labels::Soft(&soft),
                &what,
            );
        }
    }
}
