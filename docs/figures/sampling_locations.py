"""Draw docs/images/sampling_locations.png: where deform_conv2d samples for one output pixel.

One output pixel of a 3x3 deformable convolution (stride 1, padding 1, dilation 1) on a 7x7
input. Left: the regular grid positions p0 + p_k (kernel points k = i*3 + j, row-major), the
offset arrows and the deformed positions p0 + p_k + dp_k. Right: one deformed sample and its
four bilinear corner pixels with their weights.

Conventions are those of docs/deform_conv2d.md: offset channel 2k is dy (rows), 2k + 1 is dx
(columns); sample point h = ho*sh - ph + i*dh + dy, w = wo*sw - pw + j*dw + dx; bilinear
weights from the floor corner. The offsets are random (fixed seed). When deformarray is
importable, the script checks its drawing against deformarray.deform_conv2d.

    python docs/figures/sampling_locations.py [--out PATH]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, Rectangle

OUT = Path(__file__).resolve().parents[1] / "images" / "sampling_locations.png"

H = W = 7  # input size
KH = KW = 3  # kernel
STRIDE, PAD, DIL = 1, 1, 1
HO, WO = 3, 3  # the output pixel drawn (H_out = W_out = 7 with padding 1)
SEED = 123
CHOSEN = 1  # kernel point whose bilinear corners are drawn (i = 0, j = 1)

REGULAR = "#1f77b4"
DEFORMED = "#d62728"
CORNER = "#2ca02c"


def make_offset(rng: np.random.Generator) -> np.ndarray:
    """The offset array (1, 2*kh*kw, H_out, W_out): zero except at (HO, WO)."""
    h_out = (H + 2 * PAD - (DIL * (KH - 1) + 1)) // STRIDE + 1
    w_out = (W + 2 * PAD - (DIL * (KW - 1) + 1)) // STRIDE + 1
    offset = np.zeros((1, 2 * KH * KW, h_out, w_out))
    offset[0, :, HO, WO] = rng.uniform(-0.9, 0.9, 2 * KH * KW)
    return offset


def sample_points(offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Regular and deformed (h, w) of each kernel point k = i*KW + j at (HO, WO)."""
    regular, deformed = [], []
    for i in range(KH):
        for j in range(KW):
            k = i * KW + j
            h0 = HO * STRIDE - PAD + i * DIL
            w0 = WO * STRIDE - PAD + j * DIL
            dy, dx = offset[0, 2 * k, HO, WO], offset[0, 2 * k + 1, HO, WO]  # channel 2k: dy, 2k+1: dx
            regular.append((h0, w0))
            deformed.append((h0 + dy, w0 + dx))
    return np.array(regular, dtype=float), np.array(deformed, dtype=float)


def bilinear_corners(h: float, w: float) -> list[tuple[int, int, float]]:
    """The four corners (row, column, weight) of a point inside the image."""
    h_low, w_low = math.floor(h), math.floor(w)
    lh, lw = h - h_low, w - w_low
    return [
        (h_low, w_low, (1 - lh) * (1 - lw)),
        (h_low, w_low + 1, (1 - lh) * lw),
        (h_low + 1, w_low, lh * (1 - lw)),
        (h_low + 1, w_low + 1, lh * lw),
    ]


def check_with_deformarray(offset: np.ndarray, deformed: np.ndarray) -> None:
    """The drawn corners and weights are what deformarray computes (skipped without it)."""
    try:
        import deformarray as da
    except ImportError:
        return
    rng = np.random.default_rng(0)
    x = rng.random((1, 1, H, W))
    for k in range(KH * KW):
        weight = np.zeros((1, 1, KH, KW))
        weight[0, 0, k // KW, k % KW] = 1.0  # only kernel point k
        y = da.deform_conv2d(x, offset, weight, stride=STRIDE, padding=PAD, dilation=DIL)
        h, w = deformed[k]
        expected = sum(wt * x[0, 0, r, c] for r, c, wt in bilinear_corners(h, w) if 0 <= r < H and 0 <= c < W)
        assert abs(y[0, 0, HO, WO] - expected) < 1e-12, (k, y[0, 0, HO, WO], expected)


def pixel_grid(ax) -> None:
    """Pixel centres at integer (h, w); the image is [-0.5, H-0.5] x [-0.5, W-0.5]."""
    ax.add_patch(Rectangle((-0.5, -0.5), W, H, fill=False, lw=1.0, ec="0.55"))
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    ax.scatter(cols.ravel(), rows.ravel(), s=6, c="0.6", zorder=1)
    ax.set_xticks(range(W))
    ax.set_yticks(range(H))
    ax.grid(True, color="0.92", lw=0.8, zorder=0)
    ax.set_axisbelow(True)
    ax.set_aspect("equal")
    ax.set_xlabel("w (column)")
    ax.set_ylabel("h (row)")


def draw(regular: np.ndarray, deformed: np.ndarray, out: Path) -> None:
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 4.5), dpi=100, layout="constrained")

    # Left: regular grid, offsets, deformed positions
    pixel_grid(ax0)
    ax0.set_xlim(-0.7, W - 0.3)
    ax0.set_ylim(H - 0.3, -0.7)  # rows grow downwards, as in an image
    ax0.scatter([WO], [HO], marker="s", s=150, facecolor="none", edgecolor="black", lw=1.2, zorder=2)
    for k, ((h0, w0), (h, w)) in enumerate(zip(regular, deformed)):
        ax0.add_patch(
            FancyArrowPatch((w0, h0), (w, h), arrowstyle="-|>", mutation_scale=9, color="0.35", lw=1.0, zorder=3)
        )
        ax0.annotate(str(k), (w0, h0), xytext=(-9, -9), textcoords="offset points", fontsize=8, color=REGULAR)
    ax0.scatter(regular[:, 1], regular[:, 0], s=42, facecolor="white", edgecolor=REGULAR, lw=1.5, zorder=4)
    ax0.scatter(deformed[:, 1], deformed[:, 0], s=30, color=DEFORMED, zorder=5)
    hc, wc = deformed[CHOSEN]
    ax0.scatter([wc], [hc], s=170, facecolor="none", edgecolor=CORNER, lw=1.5, zorder=5)
    ax0.scatter([], [], s=42, facecolor="white", edgecolor=REGULAR, lw=1.5, label="$p_0 + p_k$ (regular grid)")
    ax0.scatter([], [], s=30, color=DEFORMED, label=r"$p_0 + p_k + \Delta p_k$ (deformed)")
    ax0.scatter(
        [], [], marker="s", s=60, facecolor="none", edgecolor="black", label=f"output pixel $p_0$ = ({HO}, {WO})"
    )
    ax0.legend(loc="lower left", fontsize=7.5, framealpha=0.95)
    ax0.set_title("3x3 kernel, padding 1, dilation 1: offsets $(dy, dx)_k$", fontsize=10)

    # Right: bilinear corners of one deformed sample
    corners = bilinear_corners(hc, wc)
    r0, c0 = corners[0][0], corners[0][1]
    lh, lw = hc - r0, wc - c0
    ax1.set_xlim(c0 - 0.5, c0 + 1.5)
    ax1.set_ylim(r0 + 1.5, r0 - 0.5)
    ax1.set_aspect("equal")
    ax1.set_xticks([c0, c0 + 1])
    ax1.set_yticks([r0, r0 + 1])
    ax1.set_xlabel("w (column)")
    ax1.set_ylabel("h (row)")
    ax1.add_patch(Rectangle((c0, r0), 1, 1, fill=False, ec="0.7", lw=0.8, zorder=0))
    for r, c, wt in corners:
        ax1.plot([c, wc], [r, hc], color=CORNER, lw=0.5 + 4.0 * wt, alpha=0.5, zorder=1)
        ax1.scatter([c], [r], marker="s", s=220, color=CORNER, zorder=2)
        ax1.annotate(
            f"x[{r}, {c}]: weight {wt:.3f}",
            (c, r),
            xytext=(0, 17 if r == r0 else -17),
            textcoords="offset points",
            ha="center",
            va="center",
            fontsize=9,
        )
    # l_w: from the left edge to the sample; l_h: from the top edge to the sample
    ax1.plot([c0, wc], [hc, hc], ls=":", color="0.3", lw=1.0, zorder=1)
    ax1.plot([wc, wc], [r0, hc], ls=":", color="0.3", lw=1.0, zorder=1)
    box = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.9}
    ax1.annotate(
        f"$l_w$ = {lw:.3f}",
        ((c0 + wc) / 2, hc),
        xytext=(0, -9),
        textcoords="offset points",
        ha="center",
        fontsize=8.5,
        bbox=box,
    )
    ax1.annotate(
        f"$l_h$ = {lh:.3f}",
        (wc, (r0 + hc) / 2),
        xytext=(5, 0),
        textcoords="offset points",
        va="center",
        fontsize=8.5,
        bbox=box,
    )
    ax1.scatter([wc], [hc], s=60, color=DEFORMED, zorder=3)
    ax1.annotate(
        f"(h, w) = ({hc:.3f}, {wc:.3f})",
        (wc, hc),
        xytext=(8, 8),
        textcoords="offset points",
        fontsize=8.5,
        color=DEFORMED,
        bbox=box,
    )
    ax1.set_title(
        f"kernel point k = {CHOSEN}: bilinear weights of its 4 corners\n"
        r"$(1-l_h)(1-l_w)$, $(1-l_h)\,l_w$, $l_h(1-l_w)$, $l_h l_w$ from the floor corner",
        fontsize=9.5,
    )
    for side in ("top", "right"):
        ax1.spines[side].set_visible(False)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, metadata={"Software": None}, pil_kwargs={"optimize": True})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"PNG to write (default {OUT})")
    args = parser.parse_args()
    offset = make_offset(np.random.default_rng(SEED))
    regular, deformed = sample_points(offset)
    hc, wc = deformed[CHOSEN]
    assert 0 <= hc < H - 1 and 0 <= wc < W - 1, "the chosen sample must have all four corners inside"
    check_with_deformarray(offset, deformed)
    draw(regular, deformed, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
