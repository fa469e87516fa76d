"""Shared pieces of the DCNv3 / DCNv4 tests: offsets aimed at edge coordinates and the
Hypothesis strategy of small geometries."""

from __future__ import annotations

import numpy as np
from edges import around, edge_targets
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from reference_dcn import geometry_of, sample_location


def edge_coords(size, dtype):
    """edges.edge_targets (interior integers too) plus -1.5, -0.5, size - 0.5 and their
    neighbours."""
    extra = {t for base in (-1.5, -0.5, size - 0.5) for t in around(base, dtype)}
    return sorted(set(edge_targets(size, dtype, interior=tuple(range(1, size - 1)))) | extra)


def _aim(target, integer_position, scale, dtype):
    """The offset (in dtype) that moves a tap at ``integer_position`` (its pixel coordinate
    without offset) to ``target``."""
    return dtype((target - integer_position) / scale)


def targeted(c, rng, targets_y, targets_x, dtype):
    """Offsets putting each point (n, ho, wo, g, k) on a target coordinate, each axis on
    its own: first, for each point, a target not yet hit that this point hits exactly
    (whether it does depends on the roundings of the location formula), else a random
    one. Returns the sets of y and x the points really sample (reference arithmetic)."""
    geo = geometry_of(c)
    off = c["offset"]
    p = len(geo.taps)
    eh, ew = (geo.dh * (geo.kh - 1)) // 2, (geo.dw * (geo.kw - 1)) // 2
    wanted_y, wanted_x = list(targets_y), list(targets_x)
    hit_y, hit_x = set(), set()

    def coords(ho, wo, i, j, ox, oy):
        return sample_location(geo, ho, wo, i, j, ox, oy, dtype)

    for n, ho, wo, g in np.ndindex(geo.n, geo.h_out, geo.w_out, geo.g):
        for k, (i, j) in enumerate(geo.taps):
            cy = (ho * geo.sh - geo.ph + eh) + (j * geo.dh - eh) * geo.scale
            cx = (wo * geo.sw - geo.pw + ew) + (i * geo.dw - ew) * geo.scale
            ch = 2 * (g * p + k)
            oy = next(
                (o for t in wanted_y for o in [_aim(t, cy, geo.scale, dtype)] if coords(ho, wo, i, j, 0.0, o)[0] == t),
                None,
            )
            if oy is None:
                oy = _aim(targets_y[rng.integers(len(targets_y))], cy, geo.scale, dtype)
            ox = next(
                (o for t in wanted_x for o in [_aim(t, cx, geo.scale, dtype)] if coords(ho, wo, i, j, o, 0.0)[1] == t),
                None,
            )
            if ox is None:
                ox = _aim(targets_x[rng.integers(len(targets_x))], cx, geo.scale, dtype)
            off[n, ho, wo, ch], off[n, ho, wo, ch + 1] = ox, oy
            y, x = coords(ho, wo, i, j, ox, oy)
            hit_y.add(y)
            hit_x.add(x)
            wanted_y = [t for t in wanted_y if t != y]
            wanted_x = [t for t in wanted_x if t != x]
    return hit_y, hit_x


SETTINGS = settings(deadline=None, max_examples=25, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def dcn_geometries(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    rc = draw(st.booleans()) if kh % 2 and kw % 2 and kh * kw > 1 else False
    geom = dict(
        n=draw(st.integers(0, 2)),
        h=draw(st.integers(1, 5)),
        w=draw(st.integers(1, 5)),
        group=draw(st.integers(1, 2)),
        group_channels=draw(st.integers(1, 3)),
        kernel_size=(kh, kw),
        stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        padding=(draw(st.integers(0, 2)), draw(st.integers(0, 2))),
        dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        offset_scale=draw(st.sampled_from([1.0, 0.5, 2.0, 0.75])),
        remove_center=rc,
    )
    for size, k, s, p, d in zip(
        (geom["h"], geom["w"]), (kh, kw), geom["stride"], geom["padding"], geom["dilation"]
    ):  # a positive output size
        assume(size + 2 * p - (d * (k - 1) + 1) >= 0)
    return geom
