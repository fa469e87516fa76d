"""Deformable position-sensitive RoI pooling (MXNet ``DeformablePSROIPooling``) on NumPy arrays.

RoI r = [b, x1, y1, x2, y2] covers ``round(x1)*s - 0.5 .. (round(x2) + 1)*s - 0.5``
(s = spatial_scale, round half away from zero), at least 0.1 wide; output channel c of
bin (i, j) reads input channel ``(c*group_size + gi)*group_size + gj`` with
``gi = i*group_size // pooled_size``; the bin moves by ``trans_std * offset * (roi_w, roi_h)``
(offset of the class of c at part ``(i*part_size // pooled_size, j*...)``) and averages its
``sample_per_part**2`` samples at sub-bin corners that fall inside ``[-0.5, size - 0.5]``
(``_bilinear.clamped_axis`` with margin 0.5), each clamped into the image.

As in roi_pool.py, a bin's samples form a grid whose validity is separable, so its sum is
``sum_q A[qy] B[qx] x[q]`` over the touched pixels (``_bilinear.axis_weights``), and the
number of valid samples is (valid rows) * (valid columns).

The input is read in its own NCHW layout: each output value reads one channel plane, so
the loops put the RoIs innermost: an (output channel, bin) pair reads one plane, which
stays in cache while every RoI samples it (C = output_dim * group_size**2 planes: sampling
them RoI by RoI would miss the cache on every sample).

forward   parallel over (output channel, bin row).
backward  ``_grad_kernel``, parallel over input channels: a task owns plane ch of every
          image, visits the RoIs in order and scatters (no races, one fixed order,
          independent of the thread count); with an offset it also stores each bin's
          offset-gradient term, from the same bin weights. ``_offset_sum``, parallel over
          (class, part): a task owns those offset entries of every RoI and adds their
          terms channel by channel, bin by bin.

Workspace: none for a C-contiguous input in the forward; the backward's offset terms
(``output_dim * pooled_size**2 * R`` pairs of float64) are made in passes of output
channels and RoIs within the bound. A non-contiguous input is copied in chunks of images
(or of one image's channel groups); the terms then get half of the bound.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import _config
from .._validate import PSRoiPoolParams
from ._bilinear import axis_scratch, axis_weights
from ._scratch import nbytes, workspace
from .roi_pool import chunk_rois, plan_chunks

_MARGIN = 0.5  # MXNet: a sample outside [-0.5, size - 0.5] is skipped

# ``box`` holds per RoI: start_h, start_w, roi_h, roi_w, bin_h, bin_w, sub_h, sub_w
# (float64). ``dims`` = (height, width, group_size, part_size, sample_per_part,
# channels per class). Plane, pixel and image indices in the sampling loops are unsigned
# (Numba adds a negative-index wraparound select to signed ones).


@njit(cache=True, inline="always")
def _bin_axes(box, off, has_off, trans_std, height, width, spp, r, i, j, cls, pi, pj, ys, xs):
    """Row and column weights (``axis_weights`` into the ``axis_scratch`` tuples ys, xs) of
    bin (i, j) of RoI r for offset class cls at part (pi, pj): (used rows * used columns =
    valid samples, touched rows, touched columns). The kernel's arguments come one by one:
    a tuple of them, unpacked per bin, made the forward 1.4-1.5x slower (2-core VM)."""
    y_w, y_s, y_idx, y_cw, y_cs = ys
    x_w, x_s, x_idx, x_cw, x_cs = xs
    hs = i * box[r, 4] + box[r, 0]
    ws = j * box[r, 5] + box[r, 1]
    if has_off:
        ws += off[r, 2 * cls, pi, pj] * trans_std * box[r, 3]
        hs += off[r, 2 * cls + 1, pi, pj] * trans_std * box[r, 2]
    uy, my = axis_weights(hs, 0.0, box[r, 6], 1.0, spp, height, _MARGIN, y_w, y_s, y_idx, y_cw, y_cs)
    ux, mx = axis_weights(ws, 0.0, box[r, 7], 1.0, spp, width, _MARGIN, x_w, x_s, x_idx, x_cw, x_cs)
    return uy * ux, my, mx


@njit(cache=True, parallel=True)
def _forward_kernel(x, o0, rlist, rslot, box, off, has_off, trans_std, dims, out):
    """out[r, c, i, j] for output channels o0 .. o0 + oc; x holds their input channels."""
    height, width, gs, part, spp, cec = dims[0], dims[1], dims[2], dims[3], dims[4], dims[5]
    ps = out.shape[2]
    oc = x.shape[1] // (gs * gs)
    nr = rlist.shape[0]
    wd = np.uint64(width)
    for task in prange(oc * ps):
        c = o0 + task // ps
        i = task % ps
        cls = c // cec if has_off else 0
        gi = i * gs // ps
        pi = i * part // ps
        ys = axis_scratch(height)
        xs = axis_scratch(width)
        _, _, y_idx, y_cw, _ = ys
        _, _, x_idx, x_cw, _ = xs
        for j in range(ps):
            gj = j * gs // ps
            pj = j * part // ps
            ch = np.uint64((c * gs + gi) * gs + gj - o0 * gs * gs)
            for k in range(nr):
                r = rlist[k]
                n = rslot[k]
                cnt, my, mx = _bin_axes(box, off, has_off, trans_std, height, width, spp, r, i, j, cls, pi, pj, ys, xs)
                total = 0.0
                for a in range(my):
                    row = y_idx[a] * wd
                    part_sum = 0.0
                    for b in range(mx):
                        if x_cw[b] != 0.0:
                            part_sum += x_cw[b] * x[n, ch, row + x_idx[b]]
                    if y_cw[a] != 0.0:
                        total += y_cw[a] * part_sum
                out[r, c, i, j] = total / cnt if cnt > 0 else 0.0


@njit(cache=True, inline="always")
def _group_bins(g, gs, ps):
    """The bins i of a side with ``i * gs // ps == g`` (those that read group g, or with
    part_size for gs, those of part g): the range
    ``ceil(g * ps / gs) .. ceil((g + 1) * ps / gs)``. Computed, not tested bin by
    bin: the test's integer divisions took a fifth of the input-gradient kernel's time
    (22 -> 18 ms on the bench's R-FCN row with offsets, 2-core VM)."""
    return (g * ps + gs - 1) // gs, ((g + 1) * ps + gs - 1) // gs


@njit(cache=True, parallel=True)
def _grad_kernel(x, xc0, ch0, n_ch, rlist, rslot, rimg, box, go, off, has_off, trans_std, dims, grad, terms):
    """Input gradient of input channels ch0 .. ch0 + n_ch from the RoIs ``rlist``, and with
    an offset the terms of the offset gradient.

    grad[rimg[r], ch, pixel] += adjoint of the forward (grad is (N, C, H*W)). Parallel over
    input channels: a task owns plane ch of every image and adds the RoIs in ``rlist``
    order (then bins, then pixels): no races, one fixed order.

    With an offset, while the bin's weights are at hand, the task also computes the bin's
    offset-gradient term from plane ch of the input (x[rslot[k], ch - xc0] for RoI
    rlist[k]): ``terms[c - ch0 // gs**2, i, j, k] = trans_std * (roi_w, roi_h) * g *
    (mean of dX/dw, mean of dX/dh)``; ``_offset_sum`` adds them up. Computing the weights
    once for both gradients took the two kernels from 38.6-40.7 to 27.0-28.6 ms on the
    bench's R-FCN row (2-core VM).
    """
    height, width, gs, part, spp, cec = dims[0], dims[1], dims[2], dims[3], dims[4], dims[5]
    ps = go.shape[2]
    gg = gs * gs
    oc0 = ch0 // gg
    wd = np.uint64(width)
    for t in prange(n_ch):
        ch = ch0 + t
        c = ch // gg
        gi = (ch // gs) % gs
        gj = ch % gs
        cls = c // cec if has_off else 0
        uch = np.uint64(ch)
        xch = np.uint64(ch - xc0)
        ys = axis_scratch(height)
        xs = axis_scratch(width)
        _, _, y_idx, y_cw, y_cs = ys
        _, _, x_idx, x_cw, x_cs = xs
        i_lo, i_hi = _group_bins(gi, gs, ps)
        j_lo, j_hi = _group_bins(gj, gs, ps)
        for k in range(rlist.shape[0]):
            r = rlist[k]
            n = np.uint64(rimg[r])
            slot = rslot[k]
            for i in range(i_lo, i_hi):
                pi = i * part // ps
                for j in range(j_lo, j_hi):
                    pj = j * part // ps
                    cnt, my, mx = _bin_axes(
                        box, off, has_off, trans_std, height, width, spp, r, i, j, cls, pi, pj, ys, xs
                    )
                    if cnt == 0:  # no sample: zero output, zero gradients
                        if has_off:
                            terms[c - oc0, i, j, k, 0] = 0.0
                            terms[c - oc0, i, j, k, 1] = 0.0
                        continue
                    g = go[r, c, i, j] / cnt
                    for a in range(my):
                        row = y_idx[a] * wd
                        ga = y_cw[a] * g
                        if ga == 0.0:
                            continue
                        for b in range(mx):
                            if x_cw[b] != 0.0:
                                grad[n, uch, row + x_idx[b]] += ga * x_cw[b]
                    if not has_off:
                        continue
                    # the bin's samples move together: d/dw of their sum is sum_q A B' x_q
                    s_x = 0.0
                    s_y = 0.0
                    for a in range(my):
                        row = y_idx[a] * wd
                        ay = y_cw[a]
                        dy = y_cs[a]
                        for b in range(mx):
                            ax = x_cw[b]
                            dx = x_cs[b]
                            if (ay == 0.0 and dy == 0.0) or (ax == 0.0 and dx == 0.0):
                                continue
                            v = x[slot, xch, row + x_idx[b]]
                            if dx != 0.0:
                                s_x += ay * dx * v
                            if dy != 0.0:
                                s_y += dy * ax * v
                    terms[c - oc0, i, j, k, 0] = trans_std * box[r, 3] * g * s_x
                    terms[c - oc0, i, j, k, 1] = trans_std * box[r, 2] * g * s_y


@njit(cache=True, parallel=True)
def _offset_sum(terms, oc0, rlist, dims, grad_off):
    """grad_off[r, 2*cls : 2*cls + 2, pi, pj] += the terms of output channels oc0 ..
    oc0 + terms.shape[0] in class cls and of bins (i, j) in part (pi, pj), added channel by
    channel, bin by bin (the caller runs channel ranges in increasing order, so each value
    gets its terms in one fixed order). Parallel over (class, part): a task owns those
    offset entries of every RoI."""
    part, cec = dims[3], dims[5]
    oc, ps = terms.shape[0], terms.shape[1]
    n_cls = grad_off.shape[1] // 2
    for task in prange(n_cls * part * part):
        cls = task // (part * part)
        pi = (task // part) % part
        pj = task % part
        i_lo, i_hi = _group_bins(pi, part, ps)  # the bins of part (pi, pj)
        j_lo, j_hi = _group_bins(pj, part, ps)
        for c in range(max(oc0, cls * cec), min(oc0 + oc, (cls + 1) * cec)):
            for i in range(i_lo, i_hi):
                for j in range(j_lo, j_hi):
                    for k in range(rlist.shape[0]):
                        r = rlist[k]
                        grad_off[r, 2 * cls, pi, pj] += terms[c - oc0, i, j, k, 0]
                        grad_off[r, 2 * cls + 1, pi, pj] += terms[c - oc0, i, j, k, 1]


# ---------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------


def round_half_away(v):
    """C's round(): halves away from zero (NumPy's round goes to even). Exact: the
    fractional part ``v - trunc(v)`` of a float is exactly representable."""
    t = np.trunc(v)
    return t + np.sign(v) * (np.abs(v - t) >= 0.5)


def _boxes(p: PSRoiPoolParams, rois):
    """Per-RoI geometry in float64: ``box`` (R, 8) and batch indices (R,)."""
    v = np.asarray(rois, dtype=np.float64)
    s = p.spatial_scale
    start_w = round_half_away(v[:, 1]) * s - 0.5
    start_h = round_half_away(v[:, 2]) * s - 0.5
    end_w = (round_half_away(v[:, 3]) + 1.0) * s - 0.5
    end_h = (round_half_away(v[:, 4]) + 1.0) * s - 0.5
    roi_w = np.maximum(end_w - start_w, 0.1)
    roi_h = np.maximum(end_h - start_h, 0.1)
    bin_h = roi_h / p.pooled_size
    bin_w = roi_w / p.pooled_size
    box = np.stack(
        [start_h, start_w, roi_h, roi_w, bin_h, bin_w, bin_h / p.sample_per_part, bin_w / p.sample_per_part], axis=1
    )
    return np.ascontiguousarray(box), v[:, 0].astype(np.int64)


def _dims(p: PSRoiPoolParams):
    cec = p.output_dim // p.num_classes  # output channels per class
    return np.array([p.h, p.w, p.group_size, p.part_size, p.sample_per_part, cec], dtype=np.int64)


def _offset(p: PSRoiPoolParams, offset, dtype):
    return np.ascontiguousarray(offset) if offset is not None else np.zeros((1, 2, 1, 1), dtype=dtype)


def _input_chunks(p: PSRoiPoolParams, input, batch, planes_bytes_limit, reserve=0):
    """Yield ``(x, o0, rlist, slots, buf)``: x is (images, channels, H*W) holding the input
    channels of output channels o0 .. o0 + x.shape[1] // group_size**2, and ``buf`` the
    workspace carver with ``reserve`` bytes left after x for the caller.

    A C-contiguous input is used in place (one chunk, slots = batch indices). Otherwise
    the images some RoI uses are copied in chunks within ``planes_bytes_limit``; when one
    image does not fit, in ranges of output channels (group_size**2 planes each).
    """
    gg = p.group_size * p.group_size
    if input.flags.c_contiguous:
        buf = workspace(reserve)
        yield input.reshape(p.n, p.c, p.h * p.w), 0, np.arange(p.r, dtype=np.int64), batch.astype(np.uint64), buf
        return
    dtype = input.dtype
    order = np.argsort(batch, kind="stable")
    sorted_batch = batch[order]
    group_bytes = gg * p.h * p.w * dtype.itemsize
    (ni, noc), chunks = plan_chunks(batch, p.output_dim, group_bytes, planes_bytes_limit)
    buf = workspace(nbytes((ni, noc * gg, p.h * p.w), dtype) + reserve)
    for images, o0, oc in chunks:
        buf.reset()
        x = buf.empty((len(images), oc * gg, p.h * p.w), dtype)
        for s, img in enumerate(images):
            x[s].reshape(oc * gg, p.h, p.w)[...] = input[img, o0 * gg : (o0 + oc) * gg]
        rlist, slots = chunk_rois(batch, order, sorted_batch, images)
        yield x, o0, rlist, slots, buf


def forward(p: PSRoiPoolParams, input, rois, offset):
    dtype = input.dtype
    out = np.empty(p.out_shape, dtype=dtype)  # every value is written once
    if p.r == 0:
        return out
    box, batch = _boxes(p, rois)
    off = _offset(p, offset, dtype)
    dims = _dims(p)
    for x, o0, rlist, slots, _ in _input_chunks(p, input, batch, _config.get_workspace_limit()):
        _forward_kernel(x, o0, rlist, slots, box, off, offset is not None, p.trans_std, dims, out)
    return out


def _term_steps(oc: int, nr: int, per: int, budget: int) -> tuple[int, int]:
    """(output channels, RoIs) per pass of the offset gradient, so that its terms buffer,
    ``per`` bytes per output channel and RoI, stays within ``budget`` bytes (at least one
    of each: below that the bound gives way)."""
    oc_step = min(oc, max(1, budget // per))
    return oc_step, min(nr, max(1, budget // (oc_step * per)))


def backward(p: PSRoiPoolParams, grad_output, input, rois, offset, deterministic=True):
    # ``deterministic`` is accepted for API symmetry: this backend always is.
    dtype = input.dtype
    grad_x = np.zeros((p.n, p.c, p.h * p.w), dtype=dtype)
    grad_off = np.zeros(offset.shape, dtype=dtype) if offset is not None else None
    if p.r == 0:
        return grad_x.reshape(p.n, p.c, p.h, p.w), grad_off
    box, batch = _boxes(p, rois)
    off = _offset(p, offset, dtype)
    dims = _dims(p)
    go = np.ascontiguousarray(grad_output)
    if offset is None:  # the input gradient alone: no input, no terms
        _grad_kernel(
            np.zeros((1, 1, 1), dtype),
            0,
            0,
            p.c,
            np.arange(p.r, dtype=np.int64),
            np.zeros(p.r, dtype=np.uint64),
            batch,
            box,
            go,
            off,
            False,
            p.trans_std,
            dims,
            grad_x,
            np.zeros((1, 1, 1, 1, 2)),
        )
        return grad_x.reshape(p.n, p.c, p.h, p.w), None
    gg = p.group_size * p.group_size
    ps = p.pooled_size
    # float64 terms (x, y) per output channel, bin and RoI: each is added to grad_off as the
    # direct sum would add it, so the bits do not depend on the passes
    per = ps * ps * 2 * 8
    limit = _config.get_workspace_limit()
    # the terms take the bound, or half of it when the input is copied in chunks too
    budget = limit if input.flags.c_contiguous else limit // 2
    whole = p.output_dim * p.r * per  # every chunk's terms fit in this, or in the budget
    terms_bytes = nbytes((whole if whole <= budget else max(budget, per),), np.uint8)
    for x, o0, rlist, slots, buf in _input_chunks(p, input, batch, limit - budget, reserve=terms_bytes):
        oc = x.shape[1] // gg
        oc_step, r_step = _term_steps(oc, len(rlist), per, budget)
        flat = buf.empty((oc_step * ps * ps * r_step * 2,), np.float64)
        # channel ranges in increasing order: each offset value gets its terms channel by channel
        for c0 in range(o0, o0 + oc, oc_step):
            cc = min(oc_step, o0 + oc - c0)
            for k0 in range(0, len(rlist), r_step):
                sub, sub_slots = rlist[k0 : k0 + r_step], slots[k0 : k0 + r_step]
                terms = flat[: cc * ps * ps * len(sub) * 2].reshape(cc, ps, ps, len(sub), 2)
                _grad_kernel(
                    x,
                    o0 * gg,
                    c0 * gg,
                    cc * gg,
                    sub,
                    sub_slots,
                    batch,
                    box,
                    go,
                    off,
                    True,
                    p.trans_std,
                    dims,
                    grad_x,
                    terms,
                )
                _offset_sum(terms, c0, sub, dims, grad_off)
    return grad_x.reshape(p.n, p.c, p.h, p.w), grad_off
