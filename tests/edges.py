"""Edge coordinates for the sampling tests of every operator.

Bugs in bilinear sampling live at integers and borders: a floor taken by truncation or by
adding and subtracting rounds the wrong way one ulp below an integer (``h + 1.0`` rounds
up when ``h = nextafter(H, 0)`` and H is a power of two) and for tiny negatives
(``-1e-17 + 1.0 == 1.0``). These helpers give coordinates exactly on, and one ulp either
side of, the borders -1, 0, size-1, size and interior integers, plus tiny negatives, and
offsets that put each sample point on one of them.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from reference import geometry

TINY = (-1e-17, -1e-40)  # below -2**-54 and subnormal: floor -1, but 1 + t rounds to 1


def around(t: float, dtype=np.float64) -> list[float]:
    """``t`` and its two neighbours in ``dtype``, as Python floats."""
    v = np.asarray(t, dtype=dtype)
    return [float(np.nextafter(v, dtype(-np.inf))), float(v), float(np.nextafter(v, dtype(np.inf)))]


def edge_targets(size: int, dtype=np.float64, interior: tuple[int, ...] = (1,)) -> list[float]:
    """Coordinates on and one ulp either side of -1, 0, size-1, size and the ``interior``
    integers, plus tiny negatives (as representable in ``dtype``), sorted, no repeats."""
    values: set[float] = set()
    for t in (-1.0, 0.0, size - 1.0, float(size), *map(float, interior)):
        values.update(around(t, dtype))
    values.update(float(np.asarray(t, dtype=dtype)) for t in TINY)
    return sorted(values)


def edge_coordinate(size: int, dtype=np.float64) -> st.SearchStrategy[float]:
    """A Hypothesis strategy over ``edge_targets(size)`` and any interior integer."""
    return st.one_of(
        st.sampled_from(edge_targets(size, dtype)),
        st.integers(0, max(size - 1, 0)).flatmap(lambda k: st.sampled_from(around(float(k), dtype))),
    )


def targeted_offsets(rng, case, targets_h, targets_w):
    """Offsets of a deform_conv2d case that put every sample point on a value drawn from
    the targets: ``(offset, hit_h, hit_w)``, the sets of targets used. The sample point
    ``base + offset`` is exactly the target where the subtraction ``target - base`` is
    exact (always for the targets above and small bases); callers check what they need."""
    g = geometry(case.input, case.offset, case.weight, case.stride, case.padding, case.dilation)
    off = np.zeros(case.offset.shape)
    hit_h, hit_w = set(), set()
    for n in range(g.n):
        for og in range(g.offset_groups):
            for i in range(g.kh):
                for j in range(g.kw):
                    ch = 2 * (og * g.kh * g.kw + i * g.kw + j)
                    for ho in range(g.h_out):
                        for wo in range(g.w_out):
                            th = targets_h[rng.integers(len(targets_h))]
                            tw = targets_w[rng.integers(len(targets_w))]
                            off[n, ch, ho, wo] = th - (ho * g.sh - g.ph + i * g.dh)
                            off[n, ch + 1, ho, wo] = tw - (wo * g.sw - g.pw + j * g.dw)
                            hit_h.add(th)
                            hit_w.add(tw)
    return off, hit_h, hit_w
