//! The other direction of sharing: burn opens its default wgpu device and segloss wraps
//! the handles burn returns (its own test binary: burn's default runtime can be
//! initialised once per process).

use burn::tensor::{Int, Tensor, TensorData};
use segloss::gpu::{HostBatch, Options};
use segloss::input::{Labels, Shape};
use segloss::testing::{random_labels, random_logits, Rng};
use segloss_burn::{SeglossLoss, SharedDevice};

#[test]
fn burn_opens_the_device_and_segloss_shares_it() {
    let shared = SharedDevice::from_burn().unwrap_or_else(|e| {
        panic!("needs a Vulkan device (bash scripts/install-lavapipe.sh): {e}")
    });
    // A second initialisation of burn's default runtime is an error, not a panic.
    assert!(SharedDevice::from_burn().is_err());
    let mut rng = Rng::new(21);
    let shape = Shape::new(2, 5, &[23, 19]);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.0);
    let loss_fn = SeglossLoss::dice_ce(&shared).unwrap();
    let host = shared
        .context()
        .evaluate_host(
            loss_fn.spec(),
            &HostBatch::new(&shape, &z, Labels::index(&y)),
            Options {
                gradient: true,
                ..Default::default()
            },
        )
        .unwrap();
    let device = shared.device().clone().autodiff();
    let zt =
        Tensor::<4>::from_data(TensorData::new(z.clone(), [2, 5, 23, 19]), &device).require_grad();
    let y32: Vec<i32> = y.iter().map(|&v| v as i32).collect();
    let yt = Tensor::<3, Int>::from_data(TensorData::new(y32, [2, 23, 19]), &device);
    let loss = loss_fn.forward(zt.clone(), yt).unwrap();
    let g = zt.grad(&loss.clone().backward()).unwrap();
    let loss = loss.into_data().try_to_vec::<f32>().unwrap()[0];
    assert_eq!(loss, host.loss as f32);
    assert_eq!(
        g.into_data().try_to_vec::<f32>().unwrap(),
        host.gradient.unwrap()
    );
}
