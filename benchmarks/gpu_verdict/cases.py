"""The smoke cases of the GPU verdict: one small call of every operator, its array arguments
(float64) and its static arguments. ``make_refs.py`` computes their float64 references on the
CPU; ``smoke.py`` runs them on the GPU in every dtype and both backward modes.

Integer arrays (spatial shapes, level starts) stay NumPy int64; the others are cast to the
dtype under test. Small on purpose: refs.npz stays well under 1 MB.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# name -> (operator, static keyword arguments)
STATIC: dict[str, tuple[str, dict[str, Any]]] = {
    "deform_conv2d": ("deform_conv2d", {"padding": 1}),
    "deform_conv2d_groups": ("deform_conv2d", {"padding": 1, "stride": 2, "dilation": 1}),
    "deform_roi_pool": ("deform_roi_pool", {"output_size": (3, 3), "spatial_scale": 0.5, "sampling_ratio": 2}),
    "deform_psroi_pool": (
        "deform_psroi_pool",
        {"output_dim": 2, "group_size": 3, "pooled_size": 3, "sample_per_part": 2, "spatial_scale": 0.5},
    ),
    "ms_deform_attn": ("ms_deform_attn", {}),
    "dcnv3": ("dcnv3", {"kernel_size": 3, "padding": 1, "group": 2}),
    "dcnv4": ("dcnv4", {"kernel_size": 3, "padding": 1, "group": 2}),
}
INTEGER_ARGS = ("spatial_shapes", "level_start_index")


def arrays(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """The array arguments of case ``name`` (float64, integer arrays int64)."""
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal
    if name == "deform_conv2d":
        n, c, h, w, co = 2, 4, 5, 6, 3
        return {
            "input": normal((n, c, h, w)),
            "offset": 1.5 * normal((n, 18, h, w)),
            "weight": normal((co, c, 3, 3)) / 6,
            "bias": normal(co),
            "mask": rng.uniform(0, 1, (n, 9, h, w)),
        }
    if name == "deform_conv2d_groups":  # stride 2, no mask, no bias
        n, c, h, w, co = 1, 4, 7, 7, 4
        return {"input": normal((n, c, h, w)), "offset": 2 * normal((n, 18, 4, 4)), "weight": normal((co, c, 3, 3)) / 6}
    if name in ("deform_roi_pool", "deform_psroi_pool"):
        c = 5 if name == "deform_roi_pool" else 2 * 9
        r = 4
        xy1 = rng.uniform(0, 10, (r, 2))
        rois = np.concatenate([rng.integers(0, 2, (r, 1)), xy1, xy1 + rng.uniform(2, 10, (r, 2))], axis=1)
        out = {"input": normal((2, c, 9, 10)), "rois": rois}
        if name == "deform_roi_pool":
            out["offset"] = 0.5 * normal((r, 2, 3, 3))
            out["mask"] = rng.uniform(0, 1, (r, 1, 3, 3))
        else:
            out["offset"] = 0.5 * normal((r, 2, 3, 3))
        return out
    if name == "ms_deform_attn":
        shapes = np.array([[4, 5], [2, 3], [1, 1]], np.int64)
        starts = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])[:-1]]).astype(np.int64)
        n, lq, m, d, p = 2, 5, 2, 3, 2
        s = int((shapes[:, 0] * shapes[:, 1]).sum())
        return {
            "value": normal((n, s, m, d)),
            "spatial_shapes": shapes,
            "level_start_index": starts,
            "sampling_locations": rng.uniform(-0.2, 1.2, (n, lq, m, 3, p, 2)),
            "attention_weights": rng.uniform(-0.5, 1, (n, lq, m, 3, p)),
        }
    if name == "dcnv3":
        n, h, w, g, d = 1, 5, 6, 2, 3
        return {
            "input": normal((n, h, w, g * d)),
            "offset": 1.5 * normal((n, h, w, g * 9 * 2)),
            "mask": rng.uniform(0, 1, (n, h, w, g * 9)),
        }
    if name == "dcnv4":
        n, h, w, g, d = 1, 5, 6, 2, 4
        return {"input": normal((n, h, w, g * d)), "offset_mask": 1.5 * normal((n, h, w, 56))}
    raise KeyError(name)


def grads_of(result: Any) -> dict[str, Any]:
    """The named gradients of a ``*_backward`` result (a NamedTuple), Nones dropped."""
    return {k: v for k, v in result._asdict().items() if v is not None}
