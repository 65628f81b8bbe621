//! segloss-burn on lavapipe (or any Vulkan device): values and gradients against segloss's
//! host API and against burn's own tensor-op CE + soft Dice, the chain rule, label dtypes
//! with ignored pixels, permuted logits, small tensors sharing burn's pages, and errors.
//! Without a Vulkan device these tests fail, saying how to install one.

use burn::tensor::{Device, Int, Tensor, TensorData};
use segloss::gpu::{HostBatch, Options};
use segloss::input::{Labels, Shape, IGNORE};
use segloss::testing::{random_labels, random_logits, Rng};
use segloss::LossSpec;
use segloss_burn::{SeglossLoss, SharedDevice};
use std::sync::OnceLock;

fn shared() -> &'static SharedDevice {
    static S: OnceLock<SharedDevice> = OnceLock::new();
    S.get_or_init(|| {
        SharedDevice::new().unwrap_or_else(|e| {
            panic!(
                "segloss-burn tests need a Vulkan device ({e}): on Debian/Ubuntu run \
                 `bash scripts/install-lavapipe.sh` (Mesa's lavapipe), then WGPU_BACKEND=vulkan"
            )
        })
    })
}

fn ad() -> Device {
    shared().device().clone().autodiff()
}

/// Host data of one case.
struct Case {
    shape: Shape,
    z: Vec<f32>,
    y: Vec<u32>,
}

fn case(seed: u64, b: usize, c: usize, h: usize, w: usize, ignored: f64) -> Case {
    let mut rng = Rng::new(seed);
    let shape = Shape::new(b, c, &[h, w]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, ignored);
    Case { shape, z, y }
}

impl Case {
    fn dims(&self) -> [usize; 4] {
        let s = &self.shape.spatial;
        [self.shape.batch, self.shape.classes, s[0], s[1]]
    }

    fn logits(&self, device: &Device) -> Tensor<4> {
        Tensor::from_data(TensorData::new(self.z.clone(), self.dims()), device).require_grad()
    }

    /// Labels as i32 with ignored pixels written as `ignored`.
    fn labels_i32(&self, device: &Device, ignored: i32) -> Tensor<3, Int> {
        let [b, _, h, w] = self.dims();
        let v: Vec<i32> = self
            .y
            .iter()
            .map(|&c| if c == IGNORE { ignored } else { c as i32 })
            .collect();
        Tensor::from_data(TensorData::new(v, [b, h, w]), device)
    }

    fn labels_i64(&self, device: &Device, ignored: i64) -> Tensor<3, Int> {
        let [b, _, h, w] = self.dims();
        let v: Vec<i64> = self
            .y
            .iter()
            .map(|&c| if c == IGNORE { ignored } else { c as i64 })
            .collect();
        Tensor::from_data(TensorData::new(v, [b, h, w]), device)
    }

    /// Loss and gradient from segloss's host API on the same context.
    fn host(&self, spec: &LossSpec) -> (f64, Vec<f32>) {
        let out = shared()
            .context()
            .evaluate_host(
                spec,
                &HostBatch::new(&self.shape, &self.z, Labels::index(&self.y)),
                Options {
                    gradient: true,
                    ..Default::default()
                },
            )
            .unwrap();
        (out.loss, out.gradient.unwrap())
    }
}

fn values(t: Tensor<4>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn loss_value(t: Tensor<1>) -> f64 {
    t.into_data().try_to_vec::<f32>().unwrap()[0] as f64
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}

fn dice_ce_spec() -> LossSpec {
    LossSpec::from_json(r#"{"terms": [{"kind": "cross_entropy"}, {"kind": "dice"}]}"#).unwrap()
}

#[test]
fn value_and_gradient_match_the_host_api_and_burn_tensor_ops() {
    let spec = dice_ce_spec();
    let loss_fn = SeglossLoss::new(spec.clone(), shared()).unwrap();
    for (seed, b, c, h, w) in [(1, 2, 4, 32, 32), (2, 3, 21, 17, 29), (3, 1, 9, 45, 7)] {
        let k = case(seed, b, c, h, w, 0.0);
        let (host_loss, host_grad) = k.host(&spec);
        let device = ad();
        let z = k.logits(&device);
        let loss = loss_fn
            .forward(z.clone(), k.labels_i32(&device, -1))
            .unwrap();
        let grads = loss.clone().backward();
        let got = loss_value(loss);
        let g = values(z.grad(&grads).unwrap());
        assert_eq!(
            got.to_bits(),
            (host_loss as f32 as f64).to_bits(),
            "loss vs host API"
        );
        assert_eq!(g, host_grad, "gradient vs host API, {:?}", k.shape);
        // burn's composed ops with its autodiff.
        let z2 = k.logits(&device);
        let want = segloss_burn::composed::ce_dice(z2.clone(), k.labels_i32(&device, 0), c);
        let grads = want.clone().backward();
        let want_loss = loss_value(want);
        let want_grad = values(z2.grad(&grads).unwrap());
        assert!(
            (got - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
            "{got} vs burn {want_loss}"
        );
        let e = rel_l2(&g, &want_grad);
        assert!(e < 1e-4, "gradient vs burn's tensor ops: relative L2 {e}");
    }
}

#[test]
fn chain_rule_with_upstream_scale_and_the_loss_used_twice() {
    let loss_fn = SeglossLoss::dice_ce(shared()).unwrap();
    let k = case(4, 2, 5, 19, 23, 0.1);
    let (_, host_grad) = k.host(&dice_ce_spec());
    let device = ad();
    let z = k.logits(&device);
    let y = k.labels_i32(&device, -100);
    // 3·loss: the upstream gradient 3 reaches the kernel.
    let loss = loss_fn.forward(z.clone(), y.clone()).unwrap() * 3.0;
    let g = values(z.grad(&loss.backward()).unwrap());
    let want: Vec<f32> = host_grad.iter().map(|v| v * 3.0).collect();
    assert!(rel_l2(&g, &want) < 1e-6, "3·loss: {}", rel_l2(&g, &want));
    // One loss value used twice, and two evaluations on the same logits.
    let z = k.logits(&device);
    let l = loss_fn.forward(z.clone(), y.clone()).unwrap();
    let l2 = loss_fn.forward(z.clone(), y).unwrap();
    let total = l.clone() + l * 0.5 + l2;
    let g = values(z.grad(&total.backward()).unwrap());
    let want: Vec<f32> = host_grad.iter().map(|v| v * 2.5).collect();
    assert!(
        rel_l2(&g, &want) < 1e-6,
        "reused loss: {}",
        rel_l2(&g, &want)
    );
}

#[test]
fn i32_and_i64_labels_with_ignored_pixels() {
    let spec = LossSpec::from_json(
        r#"{"ignore_index": 255, "terms": [{"kind": "cross_entropy", "label_smoothing": 0.1},
            {"kind": "dice"}, {"kind": "region", "weight": 0.1, "temperature": 10}]}"#,
    )
    .unwrap();
    let loss_fn = SeglossLoss::new(spec.clone(), shared()).unwrap();
    let k = case(5, 2, 6, 33, 17, 0.25);
    let (host_loss, host_grad) = k.host(&spec);
    let device = ad();
    for ignored in [-1i64, -100, 255] {
        for wide in [false, true] {
            let z = k.logits(&device);
            let y = if wide {
                k.labels_i64(&device, ignored)
            } else {
                k.labels_i32(&device, ignored as i32)
            };
            let (loss, report) = loss_fn.forward_with_report(z.clone(), y).unwrap();
            let g = values(z.grad(&loss.clone().backward()).unwrap());
            let what = format!("ignored as {ignored}, i64 {wide}");
            assert_eq!(loss_value(loss), host_loss as f32 as f64, "{what}");
            assert_eq!(g, host_grad, "{what}");
            let out = report.read().unwrap();
            assert_eq!(out.loss as f32 as f64, host_loss as f32 as f64, "{what}");
            let valid: u64 = out.valid_pixels.iter().sum();
            let want = k.y.iter().filter(|&&c| c != IGNORE).count() as u64;
            assert_eq!(valid, want, "{what}: valid pixels in the report");
            assert_eq!(out.predicted_proportions.len(), 2);
        }
    }
}

/// Cross-entropy alone without a report leaves the per-class sums out
/// (`record_forward_loss`): the same loss and gradient bits as with a report, whose
/// proportions are there.
#[test]
fn a_pixel_only_loss_without_a_report_gives_the_same_loss_and_gradient() {
    let spec = LossSpec::from_json(
        r#"{"ignore_index": 255, "terms": [{"kind": "cross_entropy", "label_smoothing": 0.1}]}"#,
    )
    .unwrap();
    let loss_fn = SeglossLoss::new(spec.clone(), shared()).unwrap();
    let k = case(9, 2, 13, 21, 19, 0.2);
    let (host_loss, host_grad) = k.host(&spec);
    let device = ad();
    let z = k.logits(&device);
    let lean = loss_fn
        .forward(z.clone(), k.labels_i32(&device, 255))
        .unwrap();
    let lean_grad = values(z.grad(&lean.clone().backward()).unwrap());
    let z = k.logits(&device);
    let (full, report) = loss_fn
        .forward_with_report(z.clone(), k.labels_i32(&device, 255))
        .unwrap();
    let full_grad = values(z.grad(&full.clone().backward()).unwrap());
    assert_eq!(loss_value(lean).to_bits(), loss_value(full).to_bits());
    let bits = |g: &[f32]| g.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&lean_grad), bits(&full_grad));
    assert_eq!(full_grad, host_grad);
    assert_eq!(
        loss_value(
            loss_fn
                .forward(k.logits(&device), k.labels_i32(&device, 255))
                .unwrap()
        ),
        host_loss as f32 as f64
    );
    assert_eq!(report.read().unwrap().predicted_proportions.len(), 2);
}

#[test]
fn permuted_and_strided_logits() {
    let loss_fn = SeglossLoss::dice_ce(shared()).unwrap();
    let k = case(6, 2, 7, 13, 21, 0.0);
    let (host_loss, host_grad) = k.host(&dice_ce_spec());
    let device = ad();
    let [b, c, h, w] = k.dims();
    // Channels-last storage seen as (B, C, H, W): read in place.
    let nhwc = segloss::input::permute(&k.z, &k.shape, false);
    let base = Tensor::<4>::from_data(TensorData::new(nhwc, [b, h, w, c]), &device).require_grad();
    let z = base.clone().permute([0, 3, 1, 2]);
    let loss = loss_fn.forward(z, k.labels_i32(&device, -1)).unwrap();
    let got = loss_value(loss.clone());
    let g = base.grad(&loss.backward()).unwrap();
    let g = segloss::input::permute(&g.into_data().try_to_vec::<f32>().unwrap(), &k.shape, true);
    assert!(
        (got - host_loss).abs() <= 1e-6 * host_loss.abs().max(1.0),
        "nhwc loss"
    );
    assert!(
        rel_l2(&g, &host_grad) < 1e-6,
        "nhwc gradient {}",
        rel_l2(&g, &host_grad)
    );
    // Any other strides: made contiguous by burn first.
    let t = Tensor::<4>::from_data(TensorData::new(k.z.clone(), [b, c, h, w]), &device)
        .swap_dims(2, 3)
        .require_grad();
    let z = t.clone().swap_dims(2, 3);
    let loss = loss_fn.forward(z, k.labels_i32(&device, -1)).unwrap();
    let g = values(t.grad(&loss.backward()).unwrap().swap_dims(2, 3));
    assert!(rel_l2(&g, &host_grad) < 1e-6, "strided gradient");
}

#[test]
fn small_tensors_sharing_burns_pages() {
    // burn sub-allocates small tensors from shared pages: logits, labels, loss and gradient
    // land in one wgpu buffer at distinct offsets, which segloss binds without conflict.
    let loss_fn = SeglossLoss::dice_ce(shared()).unwrap();
    let device = ad();
    for seed in 10..16 {
        let k = case(seed, 2, 4, 8, 8, 0.0);
        let (host_loss, host_grad) = k.host(&dice_ce_spec());
        let z = k.logits(&device);
        let loss = loss_fn
            .forward(z.clone(), k.labels_i32(&device, -1))
            .unwrap();
        let g = values(z.grad(&loss.clone().backward()).unwrap());
        assert_eq!(loss_value(loss), host_loss as f32 as f64);
        assert_eq!(g, host_grad);
    }
}

#[test]
fn soft_targets_and_sigmoid() {
    let spec = LossSpec::from_json(
        r#"{"activation": "sigmoid", "terms": [{"kind": "bce"}, {"kind": "dice"}]}"#,
    )
    .unwrap();
    let loss_fn = SeglossLoss::new(spec.clone(), shared()).unwrap();
    let mut rng = Rng::new(7);
    let shape = Shape::new(2, 3, &[15, 11]);
    let z = random_logits(&mut rng, &shape, 2.0);
    let g = segloss::testing::random_masks(&mut rng, &shape);
    let want = segloss::reference::evaluate(&spec, &shape, &z, Labels::Soft(&g), true).unwrap();
    let device = ad();
    let dims = [2, 3, 15, 11];
    let zt = Tensor::<4>::from_data(TensorData::new(z.clone(), dims), &device).require_grad();
    let gt = Tensor::<4>::from_data(TensorData::new(g.clone(), dims), &device);
    let loss = loss_fn.forward_soft(zt.clone(), gt).unwrap();
    let got = loss_value(loss.clone());
    let grad = values(zt.grad(&loss.backward()).unwrap());
    assert!(
        (got - want.loss).abs() <= 2e-5 * want.loss.abs().max(1.0),
        "{got} vs {}",
        want.loss
    );
    let want_g = want.gradient.unwrap();
    assert!(rel_l2(&grad, &want_g) < 1e-4);
}

#[test]
fn errors_are_values() {
    let device = ad();
    let k = case(8, 2, 4, 9, 9, 0.0);
    let loss_fn = SeglossLoss::dice_ce(shared()).unwrap();
    let z = k.logits(&device);
    let err = |r: segloss::Result<Tensor<1>>| r.unwrap_err().to_string();
    // Labels of the wrong shape.
    let y = Tensor::<3, Int>::zeros([2, 9, 8], &device);
    assert!(err(loss_fn.forward(z.clone(), y)).contains("expected"));
    let y = Tensor::<4, Int>::zeros([2, 1, 9, 9], &device);
    assert!(err(loss_fn.forward(z.clone(), y)).contains("expected"));
    // Logits without a class axis.
    let flat = Tensor::<2>::zeros([2, 4], &device);
    let y1 = Tensor::<1, Int>::zeros([2], &device);
    assert!(err(loss_fn.forward(flat, y1)).contains("dimensions"));
    // A spec that does not fit C (class weights of another length), and a bad spec.
    let weighted = SeglossLoss::new(
        LossSpec::from_json(
            r#"{"terms": [{"kind": "cross_entropy", "class_weights": [1, 2, 3]}]}"#,
        )
        .unwrap(),
        shared(),
    )
    .unwrap();
    assert!(err(weighted.forward(z.clone(), k.labels_i32(&device, 0))).contains("3"));
    assert!(SeglossLoss::focal(-1.0, shared()).is_err());
    // Sigmoid with index labels.
    let sig = SeglossLoss::new(
        LossSpec::from_json(r#"{"activation": "sigmoid", "terms": [{"kind": "bce"}]}"#).unwrap(),
        shared(),
    )
    .unwrap();
    assert!(err(sig.forward(z.clone(), k.labels_i32(&device, 0))).contains("soft"));
    // The device is still usable after the refusals.
    let loss = loss_fn
        .forward(z.clone(), k.labels_i32(&device, 0))
        .unwrap();
    assert!(loss_value(loss).is_finite());
}
