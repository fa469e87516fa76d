"""Cold-start notices and ahead-of-time compilation of the CPU kernels.

The CPU kernels are Numba functions compiled on their first call for each dtype (5-16 s
per operator and dtype) and then cached on disk (``__pycache__`` next to
``deformarray/cpu/*.py``, or ``NUMBA_CACHE_DIR``). Later processes load them in well under
a second. Two things here keep that first wait from being a silent one:

* ``notice_if_cold(backend, function, dtype)``, called by each public function before it
  runs the CPU backend: if the kernels that call needs are not in Numba's on-disk cache for
  that dtype, one line on stderr says that they are being compiled, once per process.
  Cheap: each (function, dtype) is checked at most once per process (a look at one or two
  small index files), and nothing at all is checked after the line has been printed.
* ``warmup()`` (``deformarray warmup``): runs every operator forward and backward on tiny
  inputs for float32 and float64, which compiles and caches every kernel ahead.

``notice_torch_import()`` is the PyTorch adapter's: on a first use since installation it
says, before the first operator call imports ``torch._dynamo`` (1-8 s), what that call
will cost. ``DEFORMARRAY_QUIET=1`` silences every notice.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

QUIET_ENV = "DEFORMARRAY_QUIET"
DTYPES = ("float32", "float64")

# public function -> (CPU operator module, the kernels every call of it runs). Only kernels
# that run on every call are listed (not, e.g., the offset-gradient kernels of the RoI
# poolings, which run only when an offset is given): a kernel that some callers never reach
# would stay uncompiled and the notice would come back in every process.
KERNELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "deform_conv2d": ("deform_conv", ("_im2col",)),
    "deform_conv2d_backward": ("deform_conv", ("_col2im", "_coord_grad")),
    "deform_roi_pool": ("roi_pool", ("_forward_kernel",)),
    "deform_roi_pool_backward": ("roi_pool", ("_grad_input_kernel",)),
    "deform_psroi_pool": ("psroi_pool", ("_forward_kernel",)),
    "deform_psroi_pool_backward": ("psroi_pool", ("_grad_kernel",)),
    "ms_deform_attn": ("ms_deform_attn", ("_forward_kernel",)),
    "ms_deform_attn_backward": ("ms_deform_attn", ("_grad_point_kernel", "_grad_value_kernel")),
    "dcnv3": ("dcn", ("_forward_kernel",)),
    "dcnv3_backward": ("dcn", ("_grad_point_kernel", "_grad_input_kernel")),
    "dcnv4": ("dcn", ("_forward_kernel",)),
    "dcnv4_backward": ("dcn", ("_grad_point_kernel", "_grad_input_kernel")),
}

_lock = threading.Lock()
_checked: set[tuple[str, str]] = set()
_said = False  # a notice was printed (or silenced) in this process: no more checks


def quiet() -> bool:
    """True when ``DEFORMARRAY_QUIET`` is set to anything but "", "0" or "false"."""
    return os.environ.get(QUIET_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _dtype_name(dtype: Any) -> str:
    import numpy as np

    return np.dtype(dtype).name


def _kernels(function: str) -> list[Any]:
    """The Numba dispatchers of ``function``'s CPU kernels that exist (names others may
    rename are skipped here; tests/test_warmup.py checks that every listed name exists)."""
    module_name, names = KERNELS[function]
    module = importlib.import_module(f"deformarray.cpu.{module_name}")
    return [k for k in (getattr(module, n, None) for n in names) if hasattr(k, "py_func")]


def _array_dtype(sig: Any) -> str | None:
    """The dtype of the first array argument of a kernel signature (the data's dtype: a
    float32 kernel may take float64 helper arrays after it)."""
    from numba.core import types

    return next((str(a.dtype) for a in sig if isinstance(a, types.Array)), None)


def _compiled(kernel: Any, dtype: str) -> bool | None:
    """Whether ``kernel`` has a version for ``dtype`` data in memory or in Numba's on-disk
    cache, looked up as Numba looks it up (an entry for another CPU or for older source
    does not count). None when that cannot be told (no cache, NUMBA_DISABLE_JIT, a Numba
    whose internals differ)."""
    try:
        if any(_array_dtype(sig) == dtype for sig in kernel.overloads):
            return True
        cache = kernel._cache
        codegen = kernel.targetctx.codegen()
        index = cache._cache_file._load_index()
        return any(_array_dtype(key[0]) == dtype and cache._index_key(key[0], codegen) == key for key in index)
    except Exception:
        return None


def is_cold(function: str, dtype: Any) -> bool:
    """True when a CPU call of ``function`` on ``dtype`` arrays will compile kernels first
    (none of them cached); False when cached or when that cannot be told."""
    name = _dtype_name(dtype)
    states = [_compiled(k, name) for k in _kernels(function)]
    return any(s is False for s in states)


def cache_dir() -> str | None:
    """Where Numba caches the CPU kernels (None when it cannot be told)."""
    try:
        return str(_kernels("deform_conv2d")[0]._cache._cache_path)
    except Exception:
        return None


def _say(text: str) -> None:
    try:
        print(f"deformarray: {text}", file=sys.stderr, flush=True)
    except Exception:  # a closed stderr must not break the call
        pass


def notice_if_cold(backend: str, function: str, dtype: Any) -> None:
    """Once per process, one line on stderr when the CPU call about to run compiles its
    kernels first. Never raises; costs a set lookup once the (function, dtype) was seen."""
    global _said
    if _said or backend != "numpy":
        return
    try:
        key = (function, _dtype_name(dtype))
    except Exception:
        return
    if key in _checked:
        return
    with _lock:
        if _said or key in _checked:
            return
        _checked.add(key)
        if quiet():
            _said = True
            return
        try:
            cold = is_cold(function, dtype)
        except Exception:
            return
        if cold:
            _said = True
            _say(
                f"compiling the CPU kernels of {function} for {key[1]} (first use since installation: "
                "5-16 s per operator and dtype, once; Numba caches them on disk). "
                f"`deformarray warmup` compiles them all ahead; {QUIET_ENV}=1 silences this note."
            )


def notice_torch_import() -> None:
    """For ``deformarray.torch`` at import: on a first use since installation (no operator
    compiled for float32 yet), say before the first operator call that it imports
    ``torch._dynamo`` and compiles the kernels. Nothing when torch._dynamo is loaded
    already, when the cache is warm, or when quiet; at most once per process."""
    global _said
    if _said or "torch._dynamo" in sys.modules:
        return
    with _lock:
        if _said:
            return
        if quiet():
            _said = True
            return
        try:
            first_use = all(is_cold(f, "float32") for f in KERNELS if not f.endswith("_backward"))
        except Exception:
            return
        if first_use:
            _said = True
            _say(
                "first use since installation: the first operator call imports torch._dynamo (1-8 s, "
                "every process) and compiles the CPU kernels of each operator and dtype it runs "
                "(5-16 s each, once; Numba caches them on disk). "
                f"`deformarray warmup` compiles them all ahead; {QUIET_ENV}=1 silences this note."
            )


# ---------------------------------------------------------------------------------------
# warmup: every operator, forward + backward, on tiny inputs
# ---------------------------------------------------------------------------------------


def _runs(dtype: str) -> dict[str, list[Callable[[], object]]]:
    """Per operator, calls covering its kernels: forward and backward with and without the
    optional arrays (mask, bias, offset), contiguous inputs as the operators make them."""
    import numpy as np

    import deformarray as da

    rng = np.random.default_rng(0)

    def arr(*shape):
        return rng.uniform(-0.9, 0.9, shape).astype(dtype)

    x, w, b = arr(1, 2, 5, 5), arr(3, 2, 3, 3), arr(3)
    off, m = arr(1, 18, 5, 5), np.abs(arr(1, 9, 5, 5))
    rois = np.array([[0, 0.5, 0.5, 4.0, 3.5]], dtype=dtype)
    roff, rmask = arr(1, 2, 2, 2), np.abs(arr(1, 1, 2, 2))
    ps = arr(1, 2 * 4, 5, 5)  # output_dim 2, group_size 2
    poff = arr(1, 2, 2, 2)
    kw_ps = dict(output_dim=2, group_size=2, pooled_size=2, sample_per_part=2, spatial_scale=1.0)

    def conv(bias, mask):
        y = da.deform_conv2d(x, off, w, bias, padding=1, mask=mask)
        return da.deform_conv2d_backward(np.ones_like(y), x, off, w, bias, padding=1, mask=mask)

    def roi(offset, mask):
        y = da.deform_roi_pool(x, rois, offset, output_size=2, mask=mask)
        return da.deform_roi_pool_backward(np.ones_like(y), x, rois, offset, output_size=2, mask=mask)

    spatial, starts = np.array([[3, 4], [1, 1]]), np.array([0, 12])
    value, loc, attn = arr(1, 13, 2, 3), arr(1, 2, 2, 2, 2, 2) + 0.5, arr(1, 2, 2, 2, 2)

    def msda():
        y = da.ms_deform_attn(value, spatial, starts, loc, attn)
        return da.ms_deform_attn_backward(np.ones_like(y), value, spatial, starts, loc, attn)

    dcn_x, dcn_off, dcn_mask = arr(1, 3, 3, 4), arr(1, 3, 3, 2 * 9 * 2), arr(1, 3, 3, 2 * 9)
    dcn_om = arr(1, 3, 3, 56)  # 3*G*P = 54, padded to a multiple of 8

    def dcnv3():
        y = da.dcnv3(dcn_x, dcn_off, dcn_mask, 3, padding=1, group=2)
        return da.dcnv3_backward(np.ones_like(y), dcn_x, dcn_off, dcn_mask, 3, padding=1, group=2)

    def dcnv4():
        y = da.dcnv4(dcn_x, dcn_om, 3, padding=1, group=2)
        return da.dcnv4_backward(np.ones_like(y), dcn_x, dcn_om, 3, padding=1, group=2)

    def psroi(offset):
        y = da.deform_psroi_pool(ps, rois, offset, **kw_ps)
        return da.deform_psroi_pool_backward(np.ones_like(y), ps, rois, offset, **kw_ps)

    return {
        "deform_conv2d": [lambda: conv(b, m), lambda: conv(None, None)],
        "deform_roi_pool": [lambda: roi(roff, rmask), lambda: roi(roff, None), lambda: roi(None, None)],
        "deform_psroi_pool": [lambda: psroi(poff), lambda: psroi(None)],
        "ms_deform_attn": [msda],
        "dcnv3": [dcnv3],
        "dcnv4": [dcnv4],
    }


def warmup(dtypes: Iterable[str] = DTYPES, report: Callable[[str, str, bool, float], None] | None = None) -> None:
    """Compile (or load from Numba's cache) every CPU kernel for ``dtypes``.

    ``report(operator, dtype, was_cold, seconds)`` is called after each operator."""
    global _said
    with _lock:
        said, _said = _said, True  # the caller knows: no notice in the middle of the warm-up
    try:
        for dtype in dtypes:
            for op, calls in _runs(dtype).items():
                was_cold = is_cold(op, dtype) or is_cold(op + "_backward", dtype)
                t0 = time.perf_counter()
                for call in calls:
                    call()
                if report is not None:
                    report(op, dtype, was_cold, time.perf_counter() - t0)
    finally:
        with _lock:
            _said = said
