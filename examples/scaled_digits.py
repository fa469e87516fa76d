"""Deformable convolution learns to undo scaling: scikit-learn's digits, regular vs deformable CNN.

A re-run, small enough for a laptop CPU, of the scaled-MNIST experiment of the original
Keras implementation (felixlaumon/deform-conv): train a plain CNN on unscaled digits, then
swap each of its 3x3 convolutions for ``deformarray.torch.DeformConv2dPack`` (the trained
weights copied in, the offset convolutions zero-initialised, so the network starts out
computing exactly the same thing) and fine-tune *only the offset convolutions* on randomly
scaled digits (scale 0.5-1.5). Every other weight stays frozen: the deformable network can
only move where its kernels sample.

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, bundled with scikit-learn, no
download), each digit resized to 20x20 and centred in a 28x28 frame as in MNIST.

Prints the 2x2 table of test accuracies (regular / scaled test set, regular / deformable
network) and writes a PNG of the learned sampling locations on one scaled test digit.

    python examples/scaled_digits.py            # full run, a few minutes on 2 CPU cores
    python examples/scaled_digits.py --quick    # seconds-long smoke run (used by the tests)

Needs torch and scikit-learn (``pip install "deformarray[examples]"``); the PNG is
written with NumPy and zlib only.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from deformarray.torch import DeformConv2dPack

SCALE_RANGE = (0.5, 1.5)
SMOKE_NOTE = (
    "SMOKE RUN (--quick): 128 training images, 1 epoch each, 64 test images. It checks that the "
    "code runs; its accuracies mean nothing (chance is 10%). Run without --quick for the experiment."
)


# ------------------------------------------------------------------------------ data


def load_data(seed: int, n_train: int | None = None, n_test: int | None = None):
    """Digits as float32 tensors (N, 1, 28, 28) in [0, 1], split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    x = F.pad(x, (4, 4, 4, 4))  # MNIST-like: 20x20 digit centred in a 28x28 frame
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_tr = int(0.8 * len(x))
    tr, te = perm[:n_tr], perm[n_tr:]
    if n_train is not None:
        tr = tr[:n_train]
    if n_test is not None:
        te = te[:n_test]
    return x[tr], y[tr], x[te], y[te]


def random_scale(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image zoomed about its centre by a factor drawn uniformly from SCALE_RANGE
    (bilinear, zeros outside)."""
    lo, hi = SCALE_RANGE
    s = lo + (hi - lo) * torch.rand(len(x), generator=generator)
    theta = torch.zeros(len(x), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / s  # output pixel p reads input at p / s
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ------------------------------------------------------------------------------ model


class Net(nn.Module):
    """Four 3x3 convolutions (+ batch norm, ReLU), global average pooling, a linear layer:
    the 4-layer CNN of the Keras experiment, narrower. Global pooling makes it insensitive
    to translation but not to scale."""

    def __init__(self, widths=(16, 32, 64, 64)):
        super().__init__()
        chans = (1, *widths)
        strides = (1, 2, 1, 2)
        layers = []
        for i, s in enumerate(strides):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, stride=s, padding=1),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], 10)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def to_deformable(net: Net) -> Net:
    """A copy of ``net`` whose 3x3 convolutions are DeformConv2dPack layers holding the same
    weights; their offset convolutions start at zero (so outputs are unchanged) and are the
    only trainable parameters."""
    import copy

    deform = copy.deepcopy(net)
    for i, m in enumerate(deform.features):
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            d = DeformConv2dPack(m.in_channels, m.out_channels, 3, stride=m.stride, padding=m.padding, bias=True)
            with torch.no_grad():
                d.weight.copy_(m.weight)
                d.bias.copy_(m.bias)
            deform.features[i] = d
    for name, p in deform.named_parameters():
        p.requires_grad_("conv_offset" in name)
    return deform


# ------------------------------------------------------------------------------ training


class Progress:
    """A one-line text progress bar (no dependency), on stderr."""

    def __init__(self, total: int, label: str, width: int = 30):
        self.total, self.label, self.width, self.n = total, label, width, 0
        self.start = time.perf_counter()

    def update(self, info: str = "") -> None:
        self.n += 1
        done = int(self.width * self.n / self.total)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.n * (self.total - self.n)
        sys.stderr.write(
            f"\r{self.label} [{'#' * done}{'.' * (self.width - done)}] "
            f"{self.n}/{self.total} {elapsed:5.1f}s eta {eta:5.1f}s {info}   "
        )
        sys.stderr.flush()
        if self.n == self.total:
            sys.stderr.write("\n")


def train(model, x, y, epochs, lr, batch, generator, label, scale=False):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = Progress(steps, label)
    for _ in range(epochs):
        model.train()
        if scale:  # fine-tuning: batch-norm statistics stay those of the regular network
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        perm = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            xb = random_scale(x[idx], generator) if scale else x[idx]
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(f"loss {loss.item():.3f}")


@torch.no_grad()
def accuracy(model, x, y, batch=256) -> float:
    model.eval()
    hits = sum((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item() for i in range(0, len(x), batch))
    return hits / len(x)


# ------------------------------------------------------------------------------ picture


def sampling_locations(model: Net, image: torch.Tensor, deformable: bool, full_layers: int = 2) -> np.ndarray:
    """Input-image positions (y, x) read by the centre unit of the last convolution, traced
    back layer by layer: all 9 taps of the top ``full_layers`` layers (81 points for 2),
    carried down through the lower layers by their centre tap. With ``deformable`` each
    layer's learned offsets are added (read at the nearest output pixel of that layer)."""
    convs = [m for m in model.features if isinstance(m, (nn.Conv2d, DeformConv2dPack))]
    offsets = []
    hooks = [
        c.conv_offset.register_forward_hook(lambda m, i, o: offsets.append(o[0].numpy()))
        for c in convs
        if isinstance(c, DeformConv2dPack)
    ]
    with torch.no_grad():
        model.eval()
        model(image[None])
    for h in hooks:
        h.remove()
    size = image.shape[-1]
    for c in convs:
        size = (size + 2 * c.padding[0] - 3) // c.stride[0] + 1
    pts = [(float(size // 2), float(size // 2))]  # centre unit of the last layer's output
    for li in reversed(range(len(convs))):
        s, p = convs[li].stride[0], convs[li].padding[0]
        off = offsets[li] if deformable else None
        taps = range(9) if li >= len(convs) - full_layers else (4,)
        new = []
        for yo, xo in pts:
            iy = min(max(int(round(yo)), 0), off.shape[1] - 1) if off is not None else 0
            ix = min(max(int(round(xo)), 0), off.shape[2] - 1) if off is not None else 0
            for k in taps:
                dy, dx = (off[2 * k, iy, ix], off[2 * k + 1, iy, ix]) if off is not None else (0.0, 0.0)
                new.append((yo * s - p + k // 3 + dy, xo * s - p + k % 3 + dx))
        pts = new
    return np.array(pts)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Writes an (H, W, 3) uint8 array as a PNG with zlib only."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def draw_panel(image: np.ndarray, layers, zoom: int) -> np.ndarray:
    """The grey image enlarged ``zoom`` times with each (points, colour) layer drawn as dots."""
    g = (np.clip(image, 0, 1) * 160).astype(np.uint8)
    rgb = np.stack([np.repeat(np.repeat(g, zoom, 0), zoom, 1)] * 3, axis=-1)
    h, w, _ = rgb.shape
    for pts, color in layers:
        for y, x in pts:
            cy, cx = int(round((y + 0.5) * zoom)), int(round((x + 0.5) * zoom))
            if 1 <= cy < h - 1 and 1 <= cx < w - 1:
                rgb[cy - 1 : cy + 2, cx - 1 : cx + 2] = color
    return rgb


def zoom_image(image: torch.Tensor, scale: float) -> torch.Tensor:
    theta = torch.tensor([[[1.0 / scale, 0.0, 0.0], [0.0, 1.0 / scale, 0.0]]])
    grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
    return F.grid_sample(image[None], grid, align_corners=False)[0]


def save_picture(path: Path, regular: Net, deform: Net, image: torch.Tensor) -> None:
    """One test digit shrunk (x0.6) and enlarged (x1.4). On each: green, where the regular
    network's centre unit samples (fixed grid); red, where the deformable network's does."""
    zoom = 10
    panels = []
    for scale in (0.6, 1.4):
        img = zoom_image(image, scale)
        layers = [
            (sampling_locations(regular, img, False), (0, 200, 0)),
            (sampling_locations(deform, img, True), (255, 40, 40)),
        ]
        panels += [draw_panel(img[0].numpy(), layers, zoom), np.full((28 * zoom, 8, 3), 255, np.uint8)]
    write_png(path, np.concatenate(panels[:-1], axis=1))


# ------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="seconds-long smoke run (tiny data, 1 epoch each): accuracies mean nothing"
    )
    ap.add_argument("--epochs", type=int, default=12, help="epochs of regular training")
    ap.add_argument("--finetune-epochs", type=int, default=8, help="epochs of offset fine-tuning")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--png",
        type=Path,
        default=Path("scaled_digits_sampling.png"),
        help="where to write the picture of sampling locations",
    )
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    if args.quick:
        xtr, ytr, xte, yte = load_data(args.seed, n_train=128, n_test=64)
        epochs, ft_epochs = 1, 1
    else:
        xtr, ytr, xte, yte = load_data(args.seed)
        epochs, ft_epochs = args.epochs, args.finetune_epochs
    xte_scaled = random_scale(xte, torch.Generator().manual_seed(args.seed + 1))
    if args.quick:
        print(SMOKE_NOTE)
    print(
        f"digits: {len(xtr)} train, {len(xte)} test images (28x28); scaled test set: "
        f"zoom {SCALE_RANGE[0]}-{SCALE_RANGE[1]}"
    )

    t0 = time.perf_counter()
    regular = Net()
    train(regular, xtr, ytr, epochs, 3e-3, 64, gen, "regular CNN, unscaled digits ")
    t1 = time.perf_counter()
    deform = to_deformable(regular)
    same = torch.allclose(regular.eval()(xte[:8]), deform.eval()(xte[:8]), atol=1e-4)
    n_offset = sum(p.numel() for p in deform.parameters() if p.requires_grad)
    print(f"deformable copy: same outputs before fine-tuning: {same}; trainable (offset) parameters: {n_offset}")
    train(deform, xtr, ytr, ft_epochs, 1e-3, 64, gen, "offsets only, scaled digits  ", scale=True)
    t2 = time.perf_counter()

    acc = {
        (name, test): accuracy(model, xs, yte)
        for name, model in (("regular", regular), ("deformable", deform))
        for test, xs in (("regular", xte), ("scaled", xte_scaled))
    }
    print()
    print("| test accuracy      | regular CNN | deformable CNN |")
    print("|--------------------|-------------|----------------|")
    for test, label in (("regular", "regular digits"), ("scaled", "scaled digits")):
        print(f"| {label:<18} | {100 * acc[('regular', test)]:10.2f}% | {100 * acc[('deformable', test)]:13.2f}% |")
    if args.quick:
        print("(smoke run: these accuracies mean nothing, see above)")
    print()
    print(f"time: regular training {t1 - t0:.1f} s, offset fine-tuning {t2 - t1:.1f} s")

    save_picture(args.png, regular, deform, xte[0])
    print(
        f"sampling locations of one unit (green: regular grid, red: learned) on test digit "
        f"'{int(yte[0])}' shrunk x0.6 (left) and enlarged x1.4 (right): {args.png}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
