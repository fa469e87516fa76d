"""Benchmark the deformable RoI pooling operators on the CPU (float32, best of --repeat).

    python benchmarks/bench_roi_pool.py [--repeat 7] [--dtype float32]

deform_roi_pool:   512 RoIs, C = 256, 7x7 bins, 2 images of 64x64 (spatial_scale 1/16, so
                   RoIs of 32-512 image pixels are 2-32 feature pixels), sampling_ratio 0
                   (mmcv's default: ceil(roi_size / 7) samples per bin side), with offset
                   and with offset + mask.
deform_psroi_pool: 300 RoIs, 21 classes x 7x7 score maps (C = 21*49 = 1029, output_dim 21,
                   group_size 7, pooled_size 7), sample_per_part 4, with class-specific
                   offsets (2*21 channels) and without.

Times are milliseconds for the forward and for forward + backward. When torchvision is
importable, its ``roi_align`` (aligned=True, the same sampling as deform_roi_pool with zero
offsets) and ``ps_roi_align`` run on the same shapes as a baseline; otherwise only our
times are printed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import deformarray as da


def best_ms(fn, repeat):
    fn()  # warm up (compiles on the first call)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def make_rois(rng, r, n, image_size, min_size, max_size):
    """r boxes in image coordinates, side lengths uniform in [min_size, max_size]."""
    w = rng.uniform(min_size, max_size, r)
    h = rng.uniform(min_size, max_size, r)
    x1 = rng.uniform(0, image_size - w)
    y1 = rng.uniform(0, image_size - h)
    return np.stack([rng.integers(0, n, r).astype(float), x1, y1, x1 + w, y1 + h], axis=1)


def torchvision_ops():
    try:
        import torch
        import torchvision.ops as tvo
    except Exception:  # noqa: BLE001 - optional baseline
        return None
    return torch, tvo


def bench_roi_pool(rng, dtype, repeat, tv):
    n, c, h, w, r, pooled, scale = 2, 256, 64, 64, 512, 7, 1.0 / 16
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    rois = make_rois(rng, r, n, h / scale, 32, 512).astype(dtype)
    off = (0.5 * rng.standard_normal((r, 2, pooled, pooled))).astype(dtype)
    mask = rng.uniform(0, 1, (r, 1, pooled, pooled)).astype(dtype)
    go = rng.standard_normal((r, c, pooled, pooled)).astype(dtype)
    kw = dict(output_size=pooled, spatial_scale=scale, sampling_ratio=0, gamma=0.1)
    rows = []
    for name, m in (("offset", None), ("offset+mask", mask)):
        fwd = best_ms(lambda: da.deform_roi_pool(x, rois, off, mask=m, **kw), repeat)
        both = best_ms(lambda: (da.deform_roi_pool(x, rois, off, mask=m, **kw),
                                da.deform_roi_pool_backward(go, x, rois, off, mask=m, **kw)), repeat)
        rows.append((f"deform_roi_pool ({name})", fwd, both))
    if tv is not None:
        torch, tvo = tv
        xt = torch.from_numpy(x).requires_grad_(True)
        rt = torch.from_numpy(rois)
        gt = torch.from_numpy(go)

        def run(backward):
            y = tvo.roi_align(xt, rt, pooled, spatial_scale=scale, sampling_ratio=0, aligned=True)
            if backward:
                y.backward(gt)
        rows.append(("torchvision roi_align (aligned)", best_ms(lambda: run(False), repeat),
                     best_ms(lambda: run(True), repeat)))
    return f"N={n} C={c} H=W={h}, R={r}, 7x7, scale 1/16, sampling_ratio 0", rows


def bench_psroi_pool(rng, dtype, repeat, tv):
    n, classes, gs, h, w, r, scale = 2, 21, 7, 64, 64, 300, 1.0 / 16
    c = classes * gs * gs
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    rois = make_rois(rng, r, n, h / scale, 32, 512).astype(dtype)
    off = rng.standard_normal((r, 2 * classes, gs, gs)).astype(dtype)
    go = rng.standard_normal((r, classes, gs, gs)).astype(dtype)
    kw = dict(output_dim=classes, group_size=gs, pooled_size=gs, sample_per_part=4,
              trans_std=0.1, spatial_scale=scale)
    rows = []
    for name, o in (("class offsets", off), ("no offset", None)):
        fwd = best_ms(lambda: da.deform_psroi_pool(x, rois, o, **kw), repeat)
        both = best_ms(lambda: (da.deform_psroi_pool(x, rois, o, **kw),
                                da.deform_psroi_pool_backward(go, x, rois, o, **kw)), repeat)
        rows.append((f"deform_psroi_pool ({name})", fwd, both))
    if tv is not None:
        torch, tvo = tv
        xt = torch.from_numpy(x).requires_grad_(True)
        rt = torch.from_numpy(rois)
        gt = torch.from_numpy(go)

        def run(backward):
            y = tvo.ps_roi_align(xt, rt, gs, spatial_scale=scale, sampling_ratio=4)
            if backward:
                y.backward(gt)
        rows.append(("torchvision ps_roi_align", best_ms(lambda: run(False), repeat),
                     best_ms(lambda: run(True), repeat)))
    return (f"N={n} C={classes}*{gs * gs}={c} H=W={h}, R={r}, {gs}x{gs}, scale 1/16, "
            f"sample_per_part 4"), rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import numba

    rng = np.random.default_rng(args.seed)
    tv = torchvision_ops()
    print(f"deformarray {da.__version__}, numba {numba.__version__}, "
          f"{numba.get_num_threads()} threads, {args.dtype}, best of {args.repeat}; "
          f"torchvision baseline: {'yes' if tv else 'not importable'}")
    for bench in (bench_roi_pool, bench_psroi_pool):
        title, rows = bench(rng, np.dtype(args.dtype), args.repeat, tv)
        print(f"\n{title}")
        print(f"  {'':38s} {'forward ms':>11s} {'fwd+bwd ms':>11s}")
        for name, fwd, both in rows:
            print(f"  {name:38s} {fwd:11.2f} {both:11.2f}")


if __name__ == "__main__":
    main()
