//! The reference's gradients against central finite differences, for every term and option.

use super::*;
use crate::input::IGNORE;
use crate::testing::{random_labels, random_logits, random_masks, random_soft_labels, Rng};

fn loss_at(spec: &LossSpec, shape: &Shape, z: &[f64], labels: Labels<'_>) -> f64 {
    let (st, _) = statistics(spec, shape, z, labels);
    let fin = finalize(spec, &st);
    spec.terms
        .iter()
        .zip(&fin.values)
        .map(|(t, v)| t.weight() * v)
        .sum()
}

/// Central differences with h = 1e-5 on f64 logits; the analytic gradient must agree to
/// 1e-6 relative L2 (FD truncation error is ~h² ≈ 1e-10; the gap is round-off).
fn check_fd(spec_json: &str, shape: &Shape, labels: Labels<'_>, seed: u64) {
    let spec = LossSpec::from_json(spec_json).unwrap();
    spec.validate(Some(shape.classes)).unwrap();
    let mut rng = Rng::new(seed);
    let z: Vec<f64> = random_logits(&mut rng, shape, 3.0)
        .iter()
        .map(|&v| v as f64)
        .collect();
    let (st, _) = statistics(&spec, shape, &z, labels);
    let fin = finalize(&spec, &st);
    let g = gradient(&spec, shape, &z, labels, &fin);
    let h = 1e-5;
    let mut num = vec![0.0; z.len()];
    for k in 0..z.len() {
        let mut zp = z.clone();
        zp[k] += h;
        let mut zm = z.clone();
        zm[k] -= h;
        num[k] =
            (loss_at(&spec, shape, &zp, labels) - loss_at(&spec, shape, &zm, labels)) / (2.0 * h);
    }
    let diff: f64 = g
        .iter()
        .zip(&num)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = num.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!(
        norm > 1e-8,
        "{spec_json}: the gradient is zero, the check would be empty"
    );
    assert!(
        diff <= 1e-6 * norm,
        "{spec_json}: analytic vs finite differences, rel L2 {}",
        diff / norm
    );
}

const SOFTMAX_SPECS: &[&str] = &[
    r#"{"terms":[{"kind":"cross_entropy"}]}"#,
    r#"{"terms":[{"kind":"cross_entropy","class_weights":[0.5,2.0,1.0,3.0],"label_smoothing":0.1}]}"#,
    r#"{"terms":[{"kind":"cross_entropy","reduction":"sum","label_smoothing":0.3}]}"#,
    r#"{"terms":[{"kind":"cross_entropy","reduction":"none","class_weights":[1,2,3,4]}]}"#,
    r#"{"terms":[{"kind":"focal"}]}"#,
    r#"{"terms":[{"kind":"focal","gamma":0.5,"alpha":[0.25,0.75,0.5,1.0]}]}"#,
    r#"{"terms":[{"kind":"focal","gamma":0.0}]}"#,
    r#"{"terms":[{"kind":"dice"}]}"#,
    r#"{"terms":[{"kind":"dice","squared":true,"batch":true,"include_background":false}]}"#,
    r#"{"terms":[{"kind":"dice","jaccard":true,"log":true,"class_weights":[1,2,0.5,1]}]}"#,
    r#"{"terms":[{"kind":"dice","jaccard":true,"squared":true,"reduction":"sum","skip_empty":true}]}"#,
    r#"{"terms":[{"kind":"dice","batch":true,"smooth_nr":0,"smooth_dr":0,"skip_empty":true,"reduction":"none"}]}"#,
    r#"{"terms":[{"kind":"tversky","alpha":0.3,"beta":0.7}]}"#,
    r#"{"terms":[{"kind":"tversky","gamma":1.5,"batch":true,"include_background":false}]}"#,
    r#"{"terms":[{"kind":"generalized_dice"}]}"#,
    r#"{"terms":[{"kind":"generalized_dice","w_type":"simple","batch":true,"include_background":false}]}"#,
    r#"{"terms":[{"kind":"generalized_dice","w_type":"uniform"}]}"#,
    r#"{"terms":[{"kind":"region","penalty":"l1"}]}"#,
    r#"{"terms":[{"kind":"region","penalty":"kl","temperature":10}]}"#,
    r#"{"terms":[{"kind":"region","penalty":"l2","target":"uniform","temperature":0.5}]}"#,
    r#"{"terms":[{"kind":"region","penalty":"log_sum","target":[0.4,0.3,0.2,0.1]}]}"#,
    r#"{"terms":[{"kind":"cross_entropy","weight":0.7},{"kind":"dice","weight":0.3},{"kind":"region","weight":0.1,"temperature":10},{"kind":"focal","weight":0.2}]}"#,
];

#[test]
fn softmax_gradients_match_finite_differences() {
    let shape = Shape::new(2, 4, &[3, 3]);
    let mut rng = Rng::new(7);
    let mut hard = random_labels(&mut rng, &shape, 0.2);
    hard[0] = IGNORE;
    hard[1] = 3;
    let soft = random_soft_labels(&mut rng, &shape);
    for (i, spec) in SOFTMAX_SPECS.iter().enumerate() {
        check_fd(spec, &shape, Labels::index(&hard), i as u64);
        check_fd(spec, &shape, Labels::Soft(&soft), 100 + i as u64);
    }
}

#[test]
fn sigmoid_gradients_match_finite_differences() {
    let shape = Shape::new(2, 3, &[7]);
    let masks = random_masks(&mut Rng::new(3), &shape);
    for (i, spec) in [
        r#"{"activation":"sigmoid","terms":[{"kind":"bce"}]}"#,
        r#"{"activation":"sigmoid","terms":[{"kind":"bce","pos_weight":[2,0.5,1]}]}"#,
        r#"{"activation":"sigmoid","terms":[{"kind":"dice","squared":true},{"kind":"tversky","alpha":0.2,"beta":0.8}]}"#,
        r#"{"activation":"sigmoid","terms":[{"kind":"generalized_dice","batch":true}]}"#,
        r#"{"activation":"sigmoid","terms":[{"kind":"bce"},{"kind":"region","penalty":"kl","temperature":3}]}"#,
        r#"{"activation":"sigmoid","terms":[{"kind":"region","penalty":"l1","target":"uniform"}]}"#,
    ]
    .iter()
    .enumerate()
    {
        check_fd(spec, &shape, Labels::Soft(&masks), i as u64);
    }
}

#[test]
fn cross_entropy_matches_a_hand_computation() {
    // One image, two pixels, two classes: z = [[0, ln 3], [ln 3, 0]] (class-major), y = [1, 1].
    let l3 = 3f32.ln();
    let shape = Shape::new(1, 2, &[2]);
    let spec = LossSpec::from_json(r#"{"terms":[{"kind":"cross_entropy"}]}"#).unwrap();
    let out = evaluate(
        &spec,
        &shape,
        &[0.0, l3, l3, 0.0],
        Labels::index(&[1, 1]),
        true,
    )
    .unwrap();
    // p_1 = 3/4 at pixel 0 and 1/4 at pixel 1.
    let want = (-(0.75f64).ln() - (0.25f64).ln()) / 2.0;
    assert!((out.loss - want).abs() < 1e-7, "{} vs {want}", out.loss);
    let g = out.gradient.unwrap();
    let want_g = [0.25 / 2.0, 0.75 / 2.0, -0.25 / 2.0, -0.75 / 2.0];
    for (a, b) in g.iter().zip(want_g) {
        assert!((*a as f64 - b).abs() < 1e-7, "{g:?}");
    }
    assert_eq!(out.valid_pixels, vec![2]);
    let d = out.decomposition[0];
    assert!(d.matching >= 0.0 && (d.ce - want).abs() < 1e-7);
}

#[test]
fn all_ignored_gives_zero_not_nan() {
    let shape = Shape::new(2, 4, &[4]);
    let z = random_logits(&mut Rng::new(1), &shape, 2.0);
    let y = vec![IGNORE; 8];
    for spec in SOFTMAX_SPECS {
        let spec = LossSpec::from_json(spec).unwrap();
        let out = evaluate(&spec, &shape, &z, Labels::index(&y), true).unwrap();
        assert_eq!(out.loss, 0.0, "{spec:?}");
        assert!(out.gradient.unwrap().iter().all(|g| *g == 0.0));
        assert!(out.decomposition.iter().all(|d| d.ce == 0.0 && d.kl == 0.0));
    }
}
