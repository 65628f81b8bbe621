//! CI's run of the U-Net example (`--quick`): it trains, every loss is finite and the loss
//! falls (the example's own check).

#[path = "../examples/unet.rs"]
#[allow(dead_code)]
mod unet;

#[test]
fn the_unet_example_trains_and_its_loss_falls() {
    let losses = unet::run(&unet::Args::quick()).unwrap_or_else(|e| {
        panic!("the U-Net example failed (a Vulkan device is needed: scripts/install-lavapipe.sh): {e}")
    });
    assert_eq!(losses.len(), unet::Args::quick().steps);
}
