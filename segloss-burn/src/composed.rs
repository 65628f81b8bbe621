//! What a burn user writes without segloss: cross-entropy plus soft Dice from burn's tensor
//! ops, differentiated by burn's autodiff. The comparison for the tests (values and
//! gradients) and the benchmark (speed); not the fast path.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Int, Tensor};

/// CE (mean over pixels, every pixel labelled) + soft Dice with MONAI's defaults (smooth
/// 1e-5, mean over images and classes) of logits (B, C, H, W) and labels (B, H, W).
pub fn ce_dice(z: Tensor<4>, y: Tensor<3, Int>, classes: usize) -> Tensor<1> {
    let [b, _, h, w] = z.dims();
    let onehot = y.one_hot::<4>(classes).permute([0, 3, 1, 2]).float();
    let ce = (onehot.clone() * log_softmax(z.clone(), 1)).sum().neg() / (b * h * w) as f32;
    let p = softmax(z, 1);
    let inter = (p.clone() * onehot.clone()).sum_dims(&[2, 3]);
    let denom = p.sum_dims(&[2, 3]) + onehot.sum_dims(&[2, 3]);
    let dice = (inter * 2.0 + 1e-5) / (denom + 1e-5);
    ce + dice.mean().neg() + 1.0
}
