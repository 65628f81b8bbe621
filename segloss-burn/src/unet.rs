//! A small U-Net (two levels, one skip connection) for the examples and their tests: big
//! enough to see context, small enough to train in seconds on a software device.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

/// Two levels of `width` and `2·width` channels, one skip connection, a 1×1 head.
#[derive(Module, Debug)]
pub struct UNet {
    enc1a: Conv2d,
    enc1b: Conv2d,
    enc2a: Conv2d,
    enc2b: Conv2d,
    pool: MaxPool2d,
    up: ConvTranspose2d,
    dec1: Conv2d,
    head: Conv2d,
}

fn conv(i: usize, o: usize, k: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([i, o], [k, k])
        .with_padding(PaddingConfig2d::Same)
        .init(device)
}

impl UNet {
    /// A U-Net from `inputs` image channels to `classes` logits per pixel.
    pub fn new(inputs: usize, classes: usize, width: usize, device: &Device) -> Self {
        let w = width;
        UNet {
            enc1a: conv(inputs, w, 3, device),
            enc1b: conv(w, w, 3, device),
            enc2a: conv(w, 2 * w, 3, device),
            enc2b: conv(2 * w, 2 * w, 3, device),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            up: ConvTranspose2dConfig::new([2 * w, w], [2, 2])
                .with_stride([2, 2])
                .init(device),
            dec1: conv(2 * w, w, 3, device),
            head: conv(w, classes, 1, device),
        }
    }

    /// Logits (B, classes, H, W) of images (B, inputs, H, W); H and W even.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let e1 = relu(self.enc1b.forward(relu(self.enc1a.forward(x))));
        let e2 = relu(
            self.enc2b
                .forward(relu(self.enc2a.forward(self.pool.forward(e1.clone())))),
        );
        let u = self.up.forward(e2);
        let d = relu(self.dec1.forward(Tensor::cat(vec![u, e1], 1)));
        self.head.forward(d)
    }
}
