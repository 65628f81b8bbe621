"""Checks `segloss eval` against PyTorch and MONAI on random data (by hand; the project's
tests do not need Python). usage: python3 scripts/check_against_torch.py [path/to/segloss]
Needs torch and monai. Prints one line per case: loss rel. error, gradient rel. L2."""
import json, subprocess, sys, tempfile, os
import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, TverskyLoss, GeneralizedDiceLoss

exe = sys.argv[1] if len(sys.argv) > 1 else "target/release/segloss"
tmp = tempfile.mkdtemp()
rng = np.random.default_rng(0)
B, C, H, W = 3, 4, 17, 13
x = rng.normal(0, 2, (B, C, H, W)).astype(np.float32)
y = (rng.random((B, H, W)) ** 2 * C).astype(np.int64)
y_ign = y.copy(); y_ign[rng.random(y.shape) < 0.2] = 255
np.save(f"{tmp}/x.npy", x); np.save(f"{tmp}/y.npy", y); np.save(f"{tmp}/y_ign.npy", y_ign)
mask = (rng.random((B, C, H, W)) < 0.4).astype(np.float32)
np.save(f"{tmp}/m.npy", mask)
soft = rng.random((B, C, H, W)).astype(np.float32); soft /= soft.sum(1, keepdims=True)
np.save(f"{tmp}/soft.npy", soft)

def run(spec, labels="y.npy"):
    r = subprocess.run([exe, "eval", "--logits", f"{tmp}/x.npy", "--labels", f"{tmp}/{labels}", "--spec", json.dumps(spec),
                        "--grad-out", f"{tmp}/g.npy"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout)["loss"], np.load(f"{tmp}/g.npy")

def torch_ref(fn):
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    l = fn(xt)
    l.backward()
    return l.item(), xt.grad.numpy()

def onehot(t):
    return F.one_hot(torch.tensor(t), C).movedim(-1, 1).double()

yt = torch.tensor(y)
cases = [
    ("cross_entropy", {"terms": [{"kind": "cross_entropy"}]}, lambda z: F.cross_entropy(z, yt), "y.npy"),
    ("ce weights+smoothing+ignore", {"ignore_index": 255, "terms": [{"kind": "cross_entropy", "class_weights": [1, 2, 0.5, 3], "label_smoothing": 0.1}]},
     lambda z: F.cross_entropy(z, torch.tensor(y_ign), weight=torch.tensor([1, 2, 0.5, 3.0], dtype=torch.float64), label_smoothing=0.1, ignore_index=255), "y_ign.npy"),
    ("ce sum", {"terms": [{"kind": "cross_entropy", "reduction": "sum"}]}, lambda z: F.cross_entropy(z, yt, reduction="sum"), "y.npy"),
    ("ce soft labels", {"terms": [{"kind": "cross_entropy", "label_smoothing": 0.2}]}, lambda z: F.cross_entropy(z, torch.tensor(soft, dtype=torch.float64), label_smoothing=0.2), "soft.npy"),
    ("dice (MONAI defaults)", {"terms": [{"kind": "dice"}]}, lambda z: DiceLoss(softmax=True, to_onehot_y=True)(z, yt[:, None]), "y.npy"),
    ("dice squared, no bg, batch", {"terms": [{"kind": "dice", "squared": True, "include_background": False, "batch": True}]},
     lambda z: DiceLoss(softmax=True, to_onehot_y=True, squared_pred=True, include_background=False, batch=True)(z, yt[:, None]), "y.npy"),
    ("jaccard", {"terms": [{"kind": "dice", "jaccard": True}]}, lambda z: DiceLoss(softmax=True, to_onehot_y=True, jaccard=True)(z, yt[:, None]), "y.npy"),
    ("dice class weights", {"terms": [{"kind": "dice", "class_weights": [0.5, 1, 2, 1]}]},
     lambda z: DiceLoss(softmax=True, to_onehot_y=True, weight=torch.tensor([0.5, 1, 2, 1.0]))(z, yt[:, None]), "y.npy"),
    ("tversky", {"terms": [{"kind": "tversky", "alpha": 0.3, "beta": 0.7}]}, lambda z: TverskyLoss(softmax=True, to_onehot_y=True, alpha=0.3, beta=0.7)(z, yt[:, None]), "y.npy"),
    ("generalized dice", {"terms": [{"kind": "generalized_dice"}]}, lambda z: GeneralizedDiceLoss(softmax=True, to_onehot_y=True)(z, yt[:, None]), "y.npy"),
    ("generalized dice simple batch", {"terms": [{"kind": "generalized_dice", "w_type": "simple", "batch": True}]},
     lambda z: GeneralizedDiceLoss(softmax=True, to_onehot_y=True, w_type="simple", batch=True)(z, yt[:, None]), "y.npy"),
    ("bce pos_weight", {"activation": "sigmoid", "terms": [{"kind": "bce", "pos_weight": [1, 2, 3, 0.5]}]},
     lambda z: F.binary_cross_entropy_with_logits(z, torch.tensor(mask, dtype=torch.float64), pos_weight=torch.tensor([1, 2, 3, 0.5], dtype=torch.float64)[:, None, None]), "m.npy"),
    ("CE + L1 region T=10 (paper)", {"terms": [{"kind": "cross_entropy"}, {"kind": "region", "penalty": "l1", "temperature": 10}]},
     lambda z: F.cross_entropy(z, yt) + ((z * 10).softmax(1).mean((2, 3)) - onehot(y).mean((2, 3))).abs().mean(), "y.npy"),
]
worst = 0.0
for name, spec, fn, labels in cases:
    l, g = run(spec, labels)
    lt, gt = torch_ref(fn)
    rel = abs(l - lt) / max(abs(lt), 1e-12)
    grel = np.linalg.norm(g - gt) / np.linalg.norm(gt)
    worst = max(worst, rel)
    print(f"{name:34s} loss {l:.7f} ref {lt:.7f} rel {rel:.1e}  grad rel L2 {grel:.1e}")
