"""How many output pixels a chunk within one image gets: the rule both backends'
``deform_conv2d`` planners share when one image does not fit the workspace bound.

A chunk needs ``per_image`` bytes whatever its size (the CPU's channels-last copies of the
image, CUDA's float32 input-gradient accumulator of a 16-bit backward) plus ``per_pixel``
bytes per output pixel (columns and products). Chunks of a few pixels let per-chunk work
(Python, kernel launches, BLAS calls) dominate: one-pixel chunks made a 1x16x256x256 CPU
forward take 59 s at a 4 MiB bound, and a 1x256x512x512 float16 CUDA backward plan 262,144
chunks. So a chunk has at least ``MIN_CHUNK_PIXELS`` pixels (or the whole image); when
that does not fit its share of the bound, the call may use up to ``OVERSHOOT`` more than
the share, and beyond that it raises a ``ValueError`` naming the smallest bound that works.
"""

from __future__ import annotations

import math

# measured on the CPU (a 1x16x256x256 float32 backward at an 11 MiB bound): 64 pixels per
# chunk 0.136 s, 256 0.096 s, 1024 0.075 s, no chunks 0.062 s (benchmarks/NOTES.md)
MIN_CHUNK_PIXELS = 512
OVERSHOOT = 1 / 8


def _mib(nbytes: float) -> str:
    return f"{nbytes / (1 << 20):.3g} MiB ({int(nbytes)} bytes)"


def pixels_per_chunk(pixels: int, per_pixel: int, per_image: int, limit: int, share: float, what: str) -> int:
    """Output pixels per chunk within an image, for chunks of ``per_image + per_pixel * L``
    bytes within ``share`` of the bound ``limit`` (``what`` names the per-image part for the
    error message)."""
    floor = min(pixels, MIN_CHUNK_PIXELS)
    budget = limit * share
    need = per_image + floor * per_pixel
    if need > budget * (1 + OVERSHOOT):
        smallest = math.ceil(need / (share * (1 + OVERSHOOT)))
        raise ValueError(
            f"workspace bound of {_mib(limit)} is too small for one image of this call: the smallest chunk "
            f"({what} and {floor} output pixels' columns) needs {_mib(need)}, so the bound must be at least "
            f"{_mib(smallest)}; raise it with deformarray.set_workspace_limit() or DEFORMARRAY_WORKSPACE_MB"
        )
    # over the share only when the per-image part leaves too little of it: then use the
    # overshoot fully rather than make many small chunks
    room = budget if need <= budget else budget * (1 + OVERSHOOT)
    return max(floor, min(pixels, int(room - per_image) // per_pixel))
