"""Naive float64 reference for deformable convolution, used only by the tests.

Written directly from the equations of Dai et al. 2017 ("Deformable Convolutional
Networks", eq. 2-4) and Zhu et al. 2019 ("Deformable ConvNets v2", eq. 3), with the
sampling rules of docs/SPEC:

    y[n, o, ho, wo] = b[o] + sum_{c, i, j} w[o, c, i, j] * m[n, g(c), k, ho, wo] * X_c(h, w)
    h = ho*sh - ph + i*dh + dy[n, g(c), k, ho, wo]
    w = wo*sw - pw + j*dw + dx[n, g(c), k, ho, wo]

with bilinear sampling X_c(h, w) = sum_q G(q_y, h) G(q_x, w) x[c, q_y, q_x],
G(a, b) = max(0, 1 - |a - b|), over the integer corners q inside the image. A point
with h <= -1, h >= H, w <= -1 or w >= W samples 0 and has zero derivative. Derivatives
at integer coordinates are taken with the floor corner (one-sided, from the right).

Every gradient below is derived by hand from these formulas (no finite differences):

    dL/dx[c, q]     = sum_{o, k, p} go[o, p] w[o, c, k] m[g(c), k, p] G(q_y, h) G(q_x, w)
    dL/dm[g, k, p]  = sum_{c in g, o} go[o, p] w[o, c, k] X_c(h, w)
    dL/ddy[g, k, p] = sum_{c in g, o} go[o, p] w[o, c, k] m[g, k, p] dX_c/dh
    dL/ddx[g, k, p] = sum_{c in g, o} go[o, p] w[o, c, k] m[g, k, p] dX_c/dw
    dL/dw[o, c, k]  = sum_{n, p} go[n, o, p] m[n, g(c), k, p] X_c(h, w)
    dL/db[o]        = sum_{n, p} go[n, o, p]

Loops run over batch, output pixels, offset groups and kernel points in plain Python;
only the channel dimension is vectorised. Keep cases small.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


def _pair(v):
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def sample_corners(h: float, w: float, height: int, width: int):
    """Corners of the bilinear sample at (h, w) that lie inside the image.

    Returns a list of ``(qy, qx, weight, d_weight/dh, d_weight/dw)``. Empty when the
    point is outside (h <= -1, h >= H, w <= -1, w >= W, or NaN).
    """
    if not (h > -1.0 and w > -1.0 and h < height and w < width):
        return []
    h_low = math.floor(h)
    w_low = math.floor(w)
    lh = h - h_low  # in [0, 1): at an integer coordinate the floor corner is used
    lw = w - w_low
    out = []
    for qy, gy, dgy in ((h_low, 1.0 - lh, -1.0), (h_low + 1, lh, 1.0)):
        if qy < 0 or qy > height - 1:
            continue
        for qx, gx, dgx in ((w_low, 1.0 - lw, -1.0), (w_low + 1, lw, 1.0)):
            if qx < 0 or qx > width - 1:
                continue
            out.append((int(qy), int(qx), gy * gx, dgy * gx, gy * dgx))
    return out


class Geometry(NamedTuple):
    n: int
    c_in: int
    height: int
    width: int
    c_out: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    groups: int
    offset_groups: int
    h_out: int
    w_out: int


def geometry(x, offset, weight, stride, padding, dilation) -> Geometry:
    n, c_in, height, width = x.shape
    c_out, cpg, kh, kw = weight.shape
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    groups = c_in // cpg
    offset_groups = offset.shape[1] // (2 * kh * kw)
    h_out = (height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    w_out = (width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    return Geometry(n, c_in, height, width, c_out, kh, kw, sh, sw, ph, pw, dh, dw, groups, offset_groups, h_out, w_out)


def sample_point(g: Geometry, offset, n, og, i, j, ho, wo):
    """Sample coordinates (h, w) of kernel point (i, j), offset group og, output (ho, wo)."""
    k = i * g.kw + j
    ch = 2 * (og * g.kh * g.kw + k)
    h = ho * g.sh - g.ph + i * g.dh + float(offset[n, ch, ho, wo])
    w = wo * g.sw - g.pw + j * g.dw + float(offset[n, ch + 1, ho, wo])
    return h, w


def _as64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def ref_columns(x, offset, weight, stride=1, padding=0, dilation=1, mask=None):
    """Modulated sampled values cols[n, c, i, j, ho, wo] = m * X_c(h, w) (float64)."""
    x, offset, weight, mask = (_as64(a) for a in (x, offset, weight, mask))
    g = geometry(x, offset, weight, stride, padding, dilation)
    cpo = g.c_in // g.offset_groups  # channels per offset group
    cols = np.zeros((g.n, g.c_in, g.kh, g.kw, g.h_out, g.w_out))
    for n in range(g.n):
        for og in range(g.offset_groups):
            chans = slice(og * cpo, (og + 1) * cpo)
            for i in range(g.kh):
                for j in range(g.kw):
                    k = i * g.kw + j
                    for ho in range(g.h_out):
                        for wo in range(g.w_out):
                            h, w = sample_point(g, offset, n, og, i, j, ho, wo)
                            m = 1.0 if mask is None else mask[n, og * g.kh * g.kw + k, ho, wo]
                            val = np.zeros(cpo)
                            for qy, qx, wt, _, _ in sample_corners(h, w, g.height, g.width):
                                val = val + wt * x[n, chans, qy, qx]
                            cols[n, chans, i, j, ho, wo] = m * val
    return cols


def ref_deform_conv2d(x, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """Forward deformable convolution in float64, shape (N, C_out, H_out, W_out)."""
    weight = _as64(weight)
    cols = ref_columns(x, offset, weight, stride, padding, dilation, mask)
    g = geometry(np.asarray(x), np.asarray(offset), weight, stride, padding, dilation)
    cpg = g.c_in // g.groups
    opg = g.c_out // g.groups
    y = np.zeros((g.n, g.c_out, g.h_out, g.w_out))
    for grp in range(g.groups):
        wg = weight[grp * opg : (grp + 1) * opg]  # (opg, cpg, kh, kw)
        cg = cols[:, grp * cpg : (grp + 1) * cpg]  # (n, cpg, kh, kw, ho, wo)
        y[:, grp * opg : (grp + 1) * opg] = np.einsum("ocij,ncijhw->nohw", wg, cg)
    if bias is not None:
        y += _as64(bias)[None, :, None, None]
    return y


class RefGrads(NamedTuple):
    input: np.ndarray
    offset: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None
    mask: np.ndarray | None


def ref_deform_conv2d_backward(
    grad_output, x, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None
) -> RefGrads:
    """All five gradients of ``ref_deform_conv2d``, analytically, in float64."""
    go, x, offset, weight, mask = (_as64(a) for a in (grad_output, x, offset, weight, mask))
    g = geometry(x, offset, weight, stride, padding, dilation)
    cpg = g.c_in // g.groups
    opg = g.c_out // g.groups
    cpo = g.c_in // g.offset_groups
    K = g.kh * g.kw

    # Gradient w.r.t. the modulated columns: gcols[n, c, i, j, p] = sum_o w[o, c, i, j] go[n, o, p]
    gcols = np.zeros((g.n, g.c_in, g.kh, g.kw, g.h_out, g.w_out))
    for grp in range(g.groups):
        wg = weight[grp * opg : (grp + 1) * opg]
        gog = go[:, grp * opg : (grp + 1) * opg]
        gcols[:, grp * cpg : (grp + 1) * cpg] = np.einsum("ocij,nohw->ncijhw", wg, gog)

    g_x = np.zeros_like(x)
    g_off = np.zeros_like(offset)
    g_mask = None if mask is None else np.zeros_like(mask)
    for n in range(g.n):
        for og in range(g.offset_groups):
            chans = slice(og * cpo, (og + 1) * cpo)
            for i in range(g.kh):
                for j in range(g.kw):
                    k = i * g.kw + j
                    for ho in range(g.h_out):
                        for wo in range(g.w_out):
                            h, w = sample_point(g, offset, n, og, i, j, ho, wo)
                            m = 1.0 if mask is None else mask[n, og * K + k, ho, wo]
                            gc = gcols[n, chans, i, j, ho, wo]  # (cpo,)
                            val = np.zeros(cpo)
                            dval_h = np.zeros(cpo)
                            dval_w = np.zeros(cpo)
                            for qy, qx, wt, dwt_h, dwt_w in sample_corners(h, w, g.height, g.width):
                                xv = x[n, chans, qy, qx]
                                val = val + wt * xv
                                dval_h = dval_h + dwt_h * xv
                                dval_w = dval_w + dwt_w * xv
                                g_x[n, chans, qy, qx] += gc * m * wt
                            ch = 2 * (og * K + k)
                            g_off[n, ch, ho, wo] = m * np.dot(gc, dval_h)
                            g_off[n, ch + 1, ho, wo] = m * np.dot(gc, dval_w)
                            if g_mask is not None:
                                g_mask[n, og * K + k, ho, wo] = np.dot(gc, val)

    cols = ref_columns(x, offset, weight, stride, padding, dilation, mask)
    g_w = np.zeros_like(weight)
    for grp in range(g.groups):
        gog = go[:, grp * opg : (grp + 1) * opg]
        cg = cols[:, grp * cpg : (grp + 1) * cpg]
        g_w[grp * opg : (grp + 1) * opg] = np.einsum("nohw,ncijhw->ocij", gog, cg)
    g_b = None if bias is None else go.sum(axis=(0, 2, 3))
    return RefGrads(g_x, g_off, g_w, g_b, g_mask)


# ---------------------------------------------------------------------------------------
# Random test cases (shared by the test modules; not part of the reference maths)
# ---------------------------------------------------------------------------------------


class Case(NamedTuple):
    """Arrays and geometry of one deform_conv2d call, in argument order."""

    input: np.ndarray
    offset: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None
    stride: object
    padding: object
    dilation: object
    mask: np.ndarray | None

    def kwargs(self):
        return dict(bias=self.bias, stride=self.stride, padding=self.padding, dilation=self.dilation, mask=self.mask)

    def astype(self, dtype):
        cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
        return self._replace(
            input=cast(self.input),
            offset=cast(self.offset),
            weight=cast(self.weight),
            bias=cast(self.bias),
            mask=cast(self.mask),
        )

    def out_shape(self):
        g = geometry(self.input, self.offset, self.weight, self.stride, self.padding, self.dilation)
        return (g.n, g.c_out, g.h_out, g.w_out)


def make_case(
    rng,
    n=2,
    c_in=4,
    height=6,
    width=7,
    c_out=4,
    kernel=3,
    stride=1,
    padding=1,
    dilation=1,
    groups=1,
    offset_groups=1,
    mask=True,
    bias=True,
    offset_scale=1.5,
    dtype=np.float64,
) -> Case:
    """A random case; offsets uniform in [-offset_scale, offset_scale], mask in [0, 1]."""
    kh, kw = _pair(kernel)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    h_out = (height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    w_out = (width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    assert h_out > 0 and w_out > 0, "bad test geometry"
    assert c_in % groups == 0 and c_out % groups == 0 and c_in % offset_groups == 0
    K = kh * kw
    x = rng.standard_normal((n, c_in, height, width))
    off = rng.uniform(-offset_scale, offset_scale, (n, 2 * offset_groups * K, h_out, w_out))
    w = rng.standard_normal((c_out, c_in // groups, kh, kw))
    b = rng.standard_normal(c_out) if bias else None
    m = rng.uniform(0.0, 1.0, (n, offset_groups * K, h_out, w_out)) if mask else None
    return Case(x, off, w, b, stride, padding, dilation, m).astype(dtype)


# Geometries (keyword arguments of make_case) shared by the deform_conv2d tests, NumPy and
# CUDA; zero_offsets_pad1 puts kernel row/col 0 at exactly h = -1 / w = -1.
CONV_CASES = {
    "basic_v2": dict(),
    "v1_no_bias_stride2_nopad": dict(stride=2, padding=0, mask=False, bias=False, height=7, width=8),
    "dilation2_groups2_og2": dict(dilation=2, padding=2, groups=2, offset_groups=2, c_out=6),
    "rect_kernel_pairs": dict(
        kernel=(2, 3),
        stride=(2, 1),
        padding=(0, 1),
        dilation=(1, 2),
        groups=2,
        offset_groups=4,
        c_out=6,
        height=7,
        width=6,
    ),
    "depthwise_og4_v1": dict(groups=4, offset_groups=4, c_out=8, mask=False),
    "groups1_og2_stride_pad_pairs": dict(offset_groups=2, stride=(1, 2), padding=(2, 0), c_out=3),
    "groups2_og1": dict(groups=2, offset_groups=1, c_out=2, bias=False),
    "large_offsets_leave_image": dict(offset_scale=7.0, offset_groups=2, height=5, width=5),
    "zero_offsets_pad1": dict(offset_scale=0.0),
    "kernel1x1": dict(kernel=1, padding=0, c_out=5, offset_scale=2.0),
    "single_pixel_out": dict(n=1, c_in=1, c_out=1, height=3, width=3, padding=0),
    "big_padding": dict(padding=3, height=4, width=5, offset_scale=2.5, n=1),
}


def off_kink(rng, shape, spread=2):
    """Offsets in [-spread - 0.8, spread + 0.8] whose fractional parts stay in [0.2, 0.8]:
    off the bilinear kinks, so finite differences see one smooth piece."""
    whole = rng.integers(-spread, spread + 1, size=shape)
    return whole + rng.uniform(0.2, 0.8, size=shape) * rng.choice([-1, 1], size=shape)


def off_kink_conv_case(rng, n, c_in, c_out, hw):
    """deform_conv2d arguments (3x3 kernel, NCHW) with offsets off the kinks (``off_kink``)."""
    return dict(
        input=rng.standard_normal((n, c_in, *hw)),
        offset=off_kink(rng, (n, 18, *hw)),
        weight=rng.standard_normal((c_out, c_in, 3, 3)),
        bias=rng.standard_normal(c_out),
        mask=rng.uniform(0.1, 1.0, (n, 9, *hw)),
    )
