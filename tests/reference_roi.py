"""Naive float64 references for the deformable RoI pooling operators, used only by the tests.

Written from the formulas in docs/deform_roi_pool.md and docs/deform_psroi_pool.md (mmcv's
DeformRoIPool, MXNet's DeformablePSROIPooling), not from the library's kernels. The
bilinear sample is written with hat functions: for a point (y, x) clamped to
(yc, xc) = (clip(y, 0, H-1), clip(x, 0, W-1)),

    X(y, x) = sum_{qy, qx} k(qy - yc) k(qx - xc) x[qy, qx],   k(d) = max(0, 1 - |d|)

over the pixels of the image. Its derivative along y is zero where y is clamped (y < 0 or
y >= H-1) and otherwise sum_q k'(qy - yc) k(qx - xc) x[q] with the derivative of the hat
taken from the right (dk(q - t)/dt = +1 for q - 1 <= t < q, -1 for q <= t < q + 1), the
same one-sided rule as at the integer kinks of deformable convolution.

deform_roi_pool (RoIAlign rule): a sample with y < -1, y > H, x < -1 or x > W gives 0; a bin
averages its gy*gx samples (count includes those outside), times the mask.
deform_psroi_pool (MXNet rule): a sample outside [-0.5, H-0.5] x [-0.5, W-0.5] is skipped;
a bin is the mean of the others (0 if none).

Gradients are derived by hand from the same formulas (no finite differences). Loops are
plain Python over RoIs, bins and samples, vectorised over channels only: keep cases small.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


def _hat_terms(t: float, size: int):
    """[(q, k(q - tc), d k(q - tc) / dt)] for the pixels q with a non-zero weight or
    slope, tc = clip(t, 0, size - 1). The slope is zero where t is clamped.

    The two pixels around tc are found with a real floor, lo = floor(tc), and the hat's
    values there are 1 - (tc - lo) and tc - lo: testing the rounded differences q - tc
    instead misplaces the kink one ulp below an integer (2 - (1 - 2**-53) rounds to 1).
    """
    tc = min(max(t, 0.0), size - 1.0)
    moving = 0.0 <= t < size - 1.0
    lo = math.floor(tc)
    fr = tc - lo
    out = []
    for q, k, dk in ((lo, 1.0 - fr, -1.0), (lo + 1, fr, 1.0)):
        dk = dk if moving else 0.0
        if 0 <= q < size and (k != 0.0 or dk != 0.0):
            out.append((q, k, dk))
    return out


def sample_terms(y: float, x: float, height: int, width: int):
    """[(qy, qx, weight, d weight/dy, d weight/dx)] of the clamped sample at (y, x)."""
    ty = _hat_terms(y, height)
    tx = _hat_terms(x, width)
    return [(qy, qx, ky * kx, dky * kx, ky * dkx) for qy, ky, dky in ty for qx, kx, dkx in tx]


def c_round(v: float) -> float:
    """C's round(): halves go away from zero (Python's round() goes to even)."""
    t = math.trunc(v)
    frac = v - t
    if frac >= 0.5:
        return float(t + 1)
    if frac <= -0.5:
        return float(t - 1)
    return float(t)


# ---------------------------------------------------------------------------------------
# deform_roi_pool
# ---------------------------------------------------------------------------------------


class RoiGrads(NamedTuple):
    input: np.ndarray
    offset: np.ndarray | None
    mask: np.ndarray | None


def roi_bins(rois, r, pooled, spatial_scale, sampling_ratio, gamma, offset):
    """For RoI r: (batch index, [(i, j, sample points [(y, x)], count, roi_h, roi_w)])."""
    ph, pw = pooled
    b, x1, y1, x2, y2 = (float(v) for v in rois[r])
    start_w, start_h = x1 * spatial_scale - 0.5, y1 * spatial_scale - 0.5
    roi_w = (x2 * spatial_scale - 0.5) - start_w
    roi_h = (y2 * spatial_scale - 0.5) - start_h
    bin_h, bin_w = roi_h / ph, roi_w / pw
    gy = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / ph)
    gx = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pw)
    bins = []
    for i in range(ph):
        for j in range(pw):
            oy = ox = 0.0
            if offset is not None:
                ox = gamma * roi_w * float(offset[r, 0, i, j])
                oy = gamma * roi_h * float(offset[r, 1, i, j])
            pts = [
                (start_h + oy + i * bin_h + (iy + 0.5) * bin_h / gy, start_w + ox + j * bin_w + (ix + 0.5) * bin_w / gx)
                for iy in range(gy)
                for ix in range(gx)
            ]
            bins.append((i, j, pts, gy * gx, roi_h, roi_w))
    return int(b), bins


def _roi_inside(y, x, height, width):
    return -1.0 <= y <= height and -1.0 <= x <= width


def ref_deform_roi_pool(
    x, rois, offset=None, output_size=(7, 7), spatial_scale=1.0, sampling_ratio=0, gamma=0.1, mask=None
):
    x = np.asarray(x, dtype=np.float64)
    n_img, c, height, width = x.shape
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    out = np.zeros((len(rois), c, ph, pw))
    for r in range(len(rois)):
        b, bins = roi_bins(rois, r, (ph, pw), spatial_scale, sampling_ratio, gamma, offset)
        for i, j, pts, count, _, _ in bins:
            if count == 0:
                continue
            acc = np.zeros(c)
            for y, xx in pts:
                if not _roi_inside(y, xx, height, width):
                    continue
                for qy, qx, wgt, _, _ in sample_terms(y, xx, height, width):
                    acc += wgt * x[b, :, qy, qx]
            m = 1.0 if mask is None else float(mask[r, 0, i, j])
            out[r, :, i, j] = m * acc / count
    return out


def ref_deform_roi_pool_backward(
    grad_output, x, rois, offset=None, output_size=(7, 7), spatial_scale=1.0, sampling_ratio=0, gamma=0.1, mask=None
):
    """Hand-derived gradients:

    dL/dx[b, c, q]   = sum_{r of image b, bins, samples} go[r, c, bin] m / count * w_q
    dL/doff_x[r,bin] = gamma roi_w m / count * sum_{c, samples} go[r, c, bin] dX_c/dx
    dL/doff_y[r,bin] = gamma roi_h m / count * sum_{c, samples} go[r, c, bin] dX_c/dy
    dL/dm[r, bin]    = sum_c go[r, c, bin] * (mean over samples of X_c)
    """
    x = np.asarray(x, dtype=np.float64)
    go = np.asarray(grad_output, dtype=np.float64)
    n_img, c, height, width = x.shape
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    gx_ = np.zeros_like(x)
    goff = None if offset is None else np.zeros(np.shape(offset))
    gm = None if mask is None else np.zeros(np.shape(mask))
    for r in range(len(rois)):
        b, bins = roi_bins(rois, r, (ph, pw), spatial_scale, sampling_ratio, gamma, offset)
        for i, j, pts, count, roi_h, roi_w in bins:
            if count == 0:
                continue
            m = 1.0 if mask is None else float(mask[r, 0, i, j])
            g = go[r, :, i, j]
            val = np.zeros(c)
            dy = np.zeros(c)
            dx = np.zeros(c)
            for y, xx in pts:
                if not _roi_inside(y, xx, height, width):
                    continue
                for qy, qx, wgt, wdy, wdx in sample_terms(y, xx, height, width):
                    gx_[b, :, qy, qx] += g * m / count * wgt
                    val += wgt * x[b, :, qy, qx]
                    dy += wdy * x[b, :, qy, qx]
                    dx += wdx * x[b, :, qy, qx]
            if gm is not None:
                gm[r, 0, i, j] = float(g @ val) / count
            if goff is not None:
                goff[r, 0, i, j] = gamma * roi_w * m / count * float(g @ dx)
                goff[r, 1, i, j] = gamma * roi_h * m / count * float(g @ dy)
    return RoiGrads(gx_, goff, gm)


# ---------------------------------------------------------------------------------------
# deform_psroi_pool
# ---------------------------------------------------------------------------------------


class PSRoiGrads(NamedTuple):
    input: np.ndarray
    offset: np.ndarray | None


def psroi_bins(rois, r, c, p, offset, all_points=False):
    """For RoI r and output channel c: (batch index, [(i, j, input channel, used sample
    points, roi_h, roi_w, offset class, part_i, part_j)]). ``p`` is a dict of the keyword
    arguments with part_size resolved. ``all_points``: list the skipped points too."""
    ps, gs, part, spp = p["pooled_size"], p["group_size"], p["part_size"], p["sample_per_part"]
    s, std = p["spatial_scale"], p["trans_std"]
    height, width = p["height"], p["width"]
    b, x1, y1, x2, y2 = (float(v) for v in rois[r])
    start_w = c_round(x1) * s - 0.5
    start_h = c_round(y1) * s - 0.5
    roi_w = max((c_round(x2) + 1.0) * s - 0.5 - start_w, 0.1)
    roi_h = max((c_round(y2) + 1.0) * s - 0.5 - start_h, 0.1)
    bin_h, bin_w = roi_h / ps, roi_w / ps
    n_cls = 1 if offset is None else offset.shape[1] // 2
    cls = c // (p["output_dim"] // n_cls)
    bins = []
    for i in range(ps):
        for j in range(ps):
            pi, pj = (i * part) // ps, (j * part) // ps
            tx = ty = 0.0
            if offset is not None:
                tx = float(offset[r, 2 * cls, pi, pj]) * std
                ty = float(offset[r, 2 * cls + 1, pi, pj]) * std
            hs = i * bin_h + start_h + ty * roi_h
            ws = j * bin_w + start_w + tx * roi_w
            gi, gj = (i * gs) // ps, (j * gs) // ps
            sub_h, sub_w = bin_h / spp, bin_w / spp
            pts = []
            for ih in range(spp):
                for iw in range(spp):
                    y = hs + ih * sub_h
                    xx = ws + iw * sub_w
                    if all_points or (-0.5 <= y <= height - 0.5 and -0.5 <= xx <= width - 0.5):
                        pts.append((y, xx))
            bins.append((i, j, (c * gs + gi) * gs + gj, pts, roi_h, roi_w, cls, pi, pj))
    return int(b), bins


def psroi_param_dict(
    x, output_dim, group_size, pooled_size, part_size=None, sample_per_part=4, trans_std=0.1, spatial_scale=1.0
):
    """The dict ``psroi_bins`` takes, from the operator's keyword arguments."""
    return _ps_params(x, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, spatial_scale)


def _ps_params(x, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, spatial_scale):
    return dict(
        output_dim=output_dim,
        group_size=group_size,
        pooled_size=pooled_size,
        part_size=pooled_size if part_size is None else part_size,
        sample_per_part=sample_per_part,
        trans_std=trans_std,
        spatial_scale=spatial_scale,
        height=x.shape[2],
        width=x.shape[3],
    )


def ref_deform_psroi_pool(
    x,
    rois,
    offset=None,
    *,
    output_dim,
    group_size,
    pooled_size,
    part_size=None,
    sample_per_part=4,
    trans_std=0.1,
    spatial_scale=1.0,
):
    x = np.asarray(x, dtype=np.float64)
    p = _ps_params(x, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, spatial_scale)
    height, width = x.shape[2:]
    out = np.zeros((len(rois), output_dim, pooled_size, pooled_size))
    for r in range(len(rois)):
        for c in range(output_dim):
            b, bins = psroi_bins(rois, r, c, p, offset)
            for i, j, ch, pts, *_ in bins:
                if not pts:
                    continue
                total = 0.0
                for y, xx in pts:
                    for qy, qx, wgt, _, _ in sample_terms(y, xx, height, width):
                        total += wgt * x[b, ch, qy, qx]
                out[r, c, i, j] = total / len(pts)
    return out


def ref_deform_psroi_pool_backward(
    grad_output,
    x,
    rois,
    offset=None,
    *,
    output_dim,
    group_size,
    pooled_size,
    part_size=None,
    sample_per_part=4,
    trans_std=0.1,
    spatial_scale=1.0,
):
    """dL/dx[b, ch, q] = sum go[r, c, bin] / count * w_q over the bins reading ch;
    dL/doff[r, 2*cls + (0: x, 1: y), part] = trans_std * roi_(w, h) * sum over the
    channels c of the class and the bins of the part of go / count * sum_samples dX/d(x, y)."""
    x = np.asarray(x, dtype=np.float64)
    go = np.asarray(grad_output, dtype=np.float64)
    p = _ps_params(x, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, spatial_scale)
    height, width = x.shape[2:]
    gx_ = np.zeros_like(x)
    goff = None if offset is None else np.zeros(np.shape(offset))
    for r in range(len(rois)):
        for c in range(output_dim):
            b, bins = psroi_bins(rois, r, c, p, offset)
            for i, j, ch, pts, roi_h, roi_w, cls, pi, pj in bins:
                if not pts:
                    continue
                g = go[r, c, i, j] / len(pts)
                sy = sx = 0.0
                for y, xx in pts:
                    for qy, qx, wgt, wdy, wdx in sample_terms(y, xx, height, width):
                        gx_[b, ch, qy, qx] += g * wgt
                        sy += wdy * x[b, ch, qy, qx]
                        sx += wdx * x[b, ch, qy, qx]
                if goff is not None:
                    goff[r, 2 * cls, pi, pj] += trans_std * roi_w * g * sx
                    goff[r, 2 * cls + 1, pi, pj] += trans_std * roi_h * g * sy
    return PSRoiGrads(gx_, goff)


# ---------------------------------------------------------------------------------------
# Test data
# ---------------------------------------------------------------------------------------

ROI_KINDS = ("inside", "tiny", "large", "partial", "degenerate")


def random_rois(rng, r, n, height, width, spatial_scale=1.0, kinds=ROI_KINDS):
    """r rows [b, x1, y1, x2, y2] in image coordinates (feature map size / spatial_scale),
    cycling through the kinds: inside the image, smaller than a feature pixel, larger
    than the image, partly outside, and zero width or height (x1 == x2 or y1 == y2)."""
    ih, iw = height / spatial_scale, width / spatial_scale
    px = 1.0 / spatial_scale  # one feature pixel in image units
    rows = []
    for k in range(r):
        kind = kinds[k % len(kinds)]
        if kind == "inside":
            w, h = rng.uniform(min(px, iw / 2), iw), rng.uniform(min(px, ih / 2), ih)
            x1, y1 = rng.uniform(0, iw - w), rng.uniform(0, ih - h)
        elif kind == "tiny":
            w, h = rng.uniform(0.05, 0.9) * px, rng.uniform(0.05, 0.9) * px
            x1, y1 = rng.uniform(0, iw - w), rng.uniform(0, ih - h)
        elif kind == "large":
            w, h = rng.uniform(1.2, 2.0) * iw, rng.uniform(1.2, 2.0) * ih
            x1, y1 = rng.uniform(-0.6, -0.1) * w, rng.uniform(-0.6, -0.1) * h
        elif kind == "partial":
            w, h = rng.uniform(0.3, 0.8) * iw, rng.uniform(0.3, 0.8) * ih
            x1 = rng.choice([rng.uniform(-w, -0.1 * w), rng.uniform(iw - 0.9 * w, iw - 0.1 * w)])
            y1 = rng.choice([rng.uniform(-h, -0.1 * h), rng.uniform(ih - 0.9 * h, ih - 0.1 * h)])
        elif kind == "degenerate":
            x1, y1 = rng.uniform(0, iw), rng.uniform(0, ih)
            w, h = (0.0, rng.uniform(0.1, 0.5) * ih) if k % 2 else (rng.uniform(0.1, 0.5) * iw, 0.0)
        else:
            raise ValueError(kind)
        rows.append([float(rng.integers(0, n)), x1, y1, x1 + w, y1 + h])
    return np.array(rows, dtype=np.float64).reshape(r, 5)


def image_rois(rng, n, r, h, w, scale, integer=False, margin=0.3):
    """(r, 5) RoIs in image coordinates of an (h, w) feature map at ``scale``; with
    margin > 0 some reach outside the image. For the CUDA tests (real and emulated)."""
    H, W = h / scale, w / scale
    x1 = rng.uniform(-margin * W, 0.9 * W, r)
    y1 = rng.uniform(-margin * H, 0.9 * H, r)
    x2 = x1 + rng.uniform(0.2 * W, 0.8 * W, r)
    y2 = y1 + rng.uniform(0.2 * H, 0.8 * H, r)
    out = np.stack([rng.integers(0, n, r), x1, y1, x2, y2], axis=1)
    if integer:
        out[:, 1:] = np.round(out[:, 1:])
    return out
