//! Every term on the GPU against the f64 reference, on random shapes and data with odd
//! sizes that leave partial tiles; every output element is checked after poisoning.
//! Tolerances: tests/common/mod.rs.

use crate::common;
use crate::common::spec;

use crate::common::{check, gpu};
use segloss::gpu::Options;
use segloss::input::{Labels, Shape, IGNORE};
use segloss::testing::{random_labels, random_logits, random_masks, random_soft_labels, Rng};

/// A random shape: 1 to 5 images, C in `classes`, 1 to 3 spatial dimensions of odd sizes.
fn random_shape(rng: &mut Rng, classes: (usize, usize)) -> Shape {
    let b = rng.range(1, 6);
    let c = rng.range(classes.0, classes.1 + 1);
    let spatial = match rng.range(0, 3) {
        0 => vec![rng.range(1, 3000)],
        1 => vec![rng.range(1, 70), rng.range(1, 70)],
        _ => vec![rng.range(1, 14), rng.range(1, 14), rng.range(1, 14)],
    };
    Shape::new(b, c, &spatial)
}

/// Fills per-class vectors of the JSON template ("{W}") with C random positive values.
fn with_class_vector(template: &str, rng: &mut Rng, c: usize) -> String {
    let v: Vec<String> = (0..c)
        .map(|_| format!("{:.3}", 0.1 + 2.0 * rng.uniform()))
        .collect();
    template.replace("{W}", &format!("[{}]", v.join(",")))
}

const CORE_SPECS: &[&str] = &[
    r#"{"terms":[{"kind":"cross_entropy"}]}"#,
    r#"{"terms":[{"kind":"cross_entropy","class_weights":{W},"label_smoothing":0.2}]}"#,
    r#"{"terms":[{"kind":"cross_entropy","reduction":"sum","label_smoothing":0.05}]}"#,
    r#"{"terms":[{"kind":"cross_entropy","reduction":"none","class_weights":{W}}]}"#,
    r#"{"terms":[{"kind":"focal"}]}"#,
    r#"{"terms":[{"kind":"focal","gamma":0.5,"alpha":{W}}]}"#,
    r#"{"terms":[{"kind":"cross_entropy","weight":0.5},{"kind":"focal","weight":2.0,"gamma":1.0}]}"#,
];

#[test]
fn cross_entropy_and_focal_on_random_shapes() {
    let mut rng = Rng::new(11);
    for round in 0..16 {
        let shape = random_shape(&mut rng, (2, 40));
        let z = random_logits(&mut rng, &shape, 4.0);
        let ignored = [0.0, 0.1, 0.7][round % 3];
        let y = random_labels(&mut rng, &shape, ignored);
        let json = with_class_vector(
            CORE_SPECS[round % CORE_SPECS.len()],
            &mut rng,
            shape.classes,
        );
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
fn every_core_spec_on_one_partial_tile_shape() {
    let mut rng = Rng::new(5);
    let shape = Shape::new(3, 5, &[33, 31]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.2);
    for t in CORE_SPECS {
        let json = with_class_vector(t, &mut rng, 5);
        check(&spec(&json), &shape, &z, Labels::index(&y), &json);
    }
}

#[test]
fn bce_in_sigmoid_mode() {
    let mut rng = Rng::new(12);
    for round in 0..8 {
        let shape = random_shape(&mut rng, (1, 12));
        let z = random_logits(&mut rng, &shape, 5.0);
        let m = random_masks(&mut rng, &shape);
        let json = with_class_vector(
            [
                r#"{"activation":"sigmoid","terms":[{"kind":"bce"}]}"#,
                r#"{"activation":"sigmoid","terms":[{"kind":"bce","pos_weight":{W},"weight":0.3}]}"#,
            ][round % 2],
            &mut rng,
            shape.classes,
        );
        check(
            &spec(&json),
            &shape,
            &z,
            Labels::Soft(&m),
            &format!("{json} on {shape:?}"),
        );
    }
}

#[test]
fn u32_labels_for_many_classes() {
    // 300 classes do not fit packed u8 labels: the u32 path.
    let mut rng = Rng::new(13);
    let shape = Shape::new(2, 300, &[17, 9]);
    let z = random_logits(&mut rng, &shape, 2.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    check(
        &spec(r#"{"terms":[{"kind":"cross_entropy","label_smoothing":0.1},{"kind":"dice"}]}"#),
        &shape,
        &z,
        Labels::index(&y),
        "C=300",
    );
}

#[test]
fn large_logits_do_not_overflow() {
    let mut rng = Rng::new(14);
    let shape = Shape::new(2, 4, &[129]);
    let z = random_logits(&mut rng, &shape, 80.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    for t in CORE_SPECS {
        let json = with_class_vector(t, &mut rng, 4);
        check(
            &spec(&json),
            &shape,
            &z,
            Labels::index(&y),
            &format!("|z| ≤ 80: {json}"),
        );
    }
    let m = random_masks(&mut rng, &shape);
    check(
        &spec(r#"{"activation":"sigmoid","terms":[{"kind":"bce"}]}"#),
        &shape,
        &z,
        Labels::Soft(&m),
        "bce |z| ≤ 80",
    );
}

#[test]
fn ignored_images_contribute_nothing() {
    let mut rng = Rng::new(15);
    let shape = Shape::new(3, 3, &[40, 25]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let mut y = random_labels(&mut rng, &shape, 0.3);
    // Image 1 entirely ignored.
    let s = shape.pixels();
    y[s..2 * s].iter_mut().for_each(|v| *v = IGNORE);
    for t in CORE_SPECS {
        let json = with_class_vector(t, &mut rng, 3);
        let out = check(&spec(&json), &shape, &z, Labels::index(&y), &json);
        assert_eq!(out.valid_pixels[1], 0);
        assert!(out.gradient.unwrap()[s * 3..s * 6]
            .iter()
            .all(|g| *g == 0.0));
    }
    // Every pixel ignored: loss 0 and a zero gradient, never NaN.
    let y = vec![IGNORE; shape.batch * s];
    for t in CORE_SPECS {
        let json = with_class_vector(t, &mut rng, 3);
        let out = gpu()
            .evaluate(
                &spec(&json),
                &shape,
                &z,
                Labels::index(&y),
                common::GRADIENT,
            )
            .unwrap();
        assert_eq!(out.loss, 0.0, "{json}");
        assert!(out.gradient.unwrap().iter().all(|g| *g == 0.0), "{json}");
    }
}

#[test]
fn soft_label_cross_entropy_and_focal() {
    let mut rng = Rng::new(16);
    for round in 0..4 {
        let shape = random_shape(&mut rng, (2, 9));
        let z = random_logits(&mut rng, &shape, 3.0);
        let g = random_soft_labels(&mut rng, &shape);
        let json = with_class_vector(
            CORE_SPECS[round * 2 % CORE_SPECS.len()],
            &mut rng,
            shape.classes,
        );
        check(
            &spec(&json),
            &shape,
            &z,
            Labels::Soft(&g),
            &format!("soft {json} on {shape:?}"),
        );
    }
}

#[test]
fn weights_are_data_and_results_are_deterministic() {
    // A context of its own: the shared one creates buffers for tests running beside this one.
    let ctx = common::new_ctx();
    let mut rng = Rng::new(17);
    let shape = Shape::new(2, 4, &[50, 41]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    let opts = Options {
        gradient: true,
        statistics: true,
        poison: false,
        strategy: None,
        proportions: true,
    };
    let half_dice =
        spec(r#"{"terms":[{"kind":"cross_entropy","weight":1.0},{"kind":"dice","weight":0.5}]}"#);
    let first = ctx
        .evaluate(&half_dice, &shape, &z, Labels::index(&y), opts)
        .unwrap();
    let created = ctx.buffers_created();
    for lambda in [0.25, 2.0, 1.0] {
        let json = format!(
            r#"{{"terms":[{{"kind":"cross_entropy","weight":1.0}},{{"kind":"dice","weight":{lambda}}}]}}"#
        );
        let out = ctx
            .evaluate(&spec(&json), &shape, &z, Labels::index(&y), opts)
            .unwrap();
        let want = out.terms[0].value + lambda * out.terms[1].value;
        assert!((out.loss - want).abs() < 1e-5);
    }
    // Changing λ created no buffer; the same inputs give bitwise-identical outputs.
    assert_eq!(ctx.buffers_created(), created);
    let again = ctx
        .evaluate(&half_dice, &shape, &z, Labels::index(&y), opts)
        .unwrap();
    assert_eq!(first.loss.to_bits(), again.loss.to_bits());
    assert_eq!(first.gradient, again.gradient);
    assert_eq!(first.statistics, again.statistics);
}
