"""Compile the CUDA kernels of ``kernels_cu/`` at run time (NVRTC through ``cupy.RawModule``).

Kernel source lives only in the ``.cu`` / ``.cuh`` files of the package
``deformarray.kernels_cu``; this module reads them with :mod:`importlib.resources`, inlines
``#include "..."`` of the package's own headers (so no include path is needed, also when the
package is imported from a zip) and builds one ``cupy.RawModule`` per
``(device id, file, dtype)``, lazily on first use, holding exactly the template
instantiations of that dtype (``name_expressions``).

Everything the NVRTC compile depends on is defined here, once, and reused by
``tests/test_nvrtc_compile.py``, which compiles every file for every dtype on a machine
without a GPU: :data:`KERNELS` (the kernel templates of each file), :data:`CTYPES` (dtype ->
C++ type), :func:`nvrtc_options`, :func:`read_source`, :func:`name_expressions`,
:func:`all_name_expressions`.
"""

from __future__ import annotations

import re
import threading
from importlib import resources
from pathlib import Path
from typing import Any

# C++ element type of each supported dtype. The 16-bit types are deformarray's own storage
# types from common.cuh (not cuda_fp16.h's __half / cuda_bf16.h's __nv_bfloat16, whose headers
# NVRTC does not ship): same bits, converted to float for all arithmetic.
CTYPES: dict[str, str] = {
    "float32": "float",
    "float64": "double",
    "float16": "dfa::half",
    "bfloat16": "dfa::bfloat16",
}

# Kernel templates of each file (each is instantiated once per dtype in CTYPES).
KERNELS: dict[str, tuple[str, ...]] = {
    "deform_conv.cu": (
        "deform_conv_to_channels_last_i32",
        "deform_conv_to_channels_last_i64",
        "deform_conv_from_channels_last_i32",
        "deform_conv_from_channels_last_i64",
        "deform_conv_im2col_i32",
        "deform_conv_im2col_i64",
        "deform_conv_store_output_i32",
        "deform_conv_store_output_i64",
        "deform_conv_gather_grad_output_i32",
        "deform_conv_gather_grad_output_i64",
        "deform_conv_col2im_atomic_i32",
        "deform_conv_col2im_atomic_i64",
        "deform_conv_col2im_owned_i32",
        "deform_conv_col2im_owned_i64",
        "deform_conv_sum_partials_i32",
        "deform_conv_sum_partials_i64",
        "deform_conv_coord_grad_i32",
        "deform_conv_coord_grad_i64",
        "deform_conv_permute_weight",
        "deform_conv_unpermute_weight",
        "deform_conv_from_acc",
    ),
    "roi_pool.cu": (
        "roi_pool_forward",
        "roi_pool_coord_grad",
        "roi_pool_backward_atomic",
        "roi_pool_roi_info",
        "roi_pool_coo",
        "roi_pool_gather",
        "roi_pool_from_acc",
    ),
    "psroi_pool.cu": (
        "psroi_pool_forward",
        "psroi_pool_coord_grad",
        "psroi_pool_backward_atomic",
        "psroi_pool_coo",
        "psroi_pool_gather",
        "psroi_pool_from_acc",
    ),
    "ms_deform_attn.cu": (
        "msda_forward_i32",
        "msda_forward_i64",
        "msda_backward_point_i32",
        "msda_backward_point_i64",
        "msda_grad_value_owned_i32",
        "msda_grad_value_owned_i64",
        "msda_sum_chunks",
    ),
    "dcn.cu": (
        "dcn_forward_i32",
        "dcn_forward_i64",
        "dcn_backward_point_i32",
        "dcn_backward_point_i64",
        "dcn_grad_input_owned_i32",
        "dcn_grad_input_owned_i64",
        "dcn_sum_chunks",
    ),
}

# NVRTC options shared by the run-time build and the compile test. CuPy adds the
# architecture (-arch) of the current device itself; the test adds -arch=compute_XX.
# No --use_fast_math: results must match the CPU backend to 1e-10 in float64.
_NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)

# What cupy.RawModule (CuPy 14, NVRTC backend, no jitify) appends to the options itself,
# besides -arch and include paths: the compile test adds it too, to compile what CuPy does.
CUPY_ADDED_NVRTC_OPTIONS: tuple[str, ...] = ("--device-as-default-execution-space",)

_PACKAGE = "deformarray.kernels_cu"
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)


def nvrtc_options() -> tuple[str, ...]:
    """NVRTC options for every kernel file (without ``-arch``)."""
    return _NVRTC_OPTIONS


def _read_package_file(name: str) -> str:
    try:
        return resources.files(_PACKAGE).joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        # Source checkout without an install: kernels_cu/ sits beside deformarray/.
        return (Path(__file__).resolve().parents[2] / "kernels_cu" / name).read_text(encoding="utf-8")


def kernel_files() -> list[str]:
    """Names of the ``.cu`` files shipped in ``deformarray.kernels_cu``."""
    try:
        entries = [p.name for p in resources.files(_PACKAGE).iterdir()]
    except ModuleNotFoundError:
        entries = [p.name for p in (Path(__file__).resolve().parents[2] / "kernels_cu").iterdir()]
    return sorted(name for name in entries if name.endswith(".cu"))


def read_source(filename: str) -> str:
    """Source of ``filename`` with the package's ``#include "x.cuh"`` lines inlined.

    ``#line`` directives keep NVRTC's error messages pointing at the real file and line.
    Each header is inlined once (the headers use ``#pragma once``, which an inlined text
    cannot honour).
    """
    seen: set[str] = set()

    def expand(name: str) -> str:
        text = _read_package_file(name)
        out: list[str] = [f'#line 1 "{name}"\n']
        pos = 0
        for match in _INCLUDE.finditer(text):
            out.append(text[pos : match.start()])
            header = match.group(1)
            if header not in seen:
                seen.add(header)
                out.append(expand(header))
            line = text.count("\n", 0, match.end()) + 1
            out.append(f'\n#line {line + 1} "{name}"')
            pos = match.end()
        out.append(text[pos:])
        return "".join(out)

    return expand(filename)


def name_expression(kernel: str, dtype: str) -> str:
    """The NVRTC name expression of one instantiation, e.g. ``deform_conv_im2col<float>``."""
    return f"{kernel}<{CTYPES[dtype]}>"


def name_expressions(filename: str, dtype: str) -> list[str]:
    """Name expressions of every kernel of ``filename`` for ``dtype``."""
    return [name_expression(kernel, dtype) for kernel in KERNELS[filename]]


def all_name_expressions() -> dict[str, dict[str, list[str]]]:
    """``{file: {dtype: [name expressions]}}`` for every kernel file and every dtype."""
    return {f: {dt: name_expressions(f, dt) for dt in CTYPES} for f in KERNELS}


_cache: dict[tuple[int, str, str], Any] = {}
_lock = threading.Lock()


def dtype_name(dtype: Any) -> str:
    """Name of a NumPy / CuPy dtype (``bfloat16`` is ml_dtypes' dtype, as CuPy 14 uses)."""
    import numpy as np

    name = np.dtype(dtype).name
    if name not in CTYPES:
        raise TypeError(f"dtype {name} is not supported by the CUDA kernels (supported: {', '.join(CTYPES)})")
    return name


def get_module(filename: str, dtype: Any):
    """The ``cupy.RawModule`` of ``filename`` for ``dtype`` on the current device (memoised).

    Built on first use; CuPy compiles it on the first ``get_function`` (and keeps its own
    on-disk cache of compiled binaries, keyed by source and options).
    """
    import cupy

    name = dtype_name(dtype)
    key = (cupy.cuda.Device().id, filename, name)
    module = _cache.get(key)
    if module is None:
        with _lock:
            module = _cache.get(key)
            if module is None:
                module = cupy.RawModule(
                    code=read_source(filename),
                    options=nvrtc_options(),
                    name_expressions=name_expressions(filename, name),
                )
                _cache[key] = module
    return module


_kernels: dict[tuple[int, str, str, str], Any] = {}


def get_kernel(filename: str, kernel: str, dtype: Any):
    """The ``cupy.RawKernel`` of template ``kernel`` in ``filename`` instantiated for ``dtype``
    on the current device, memoised per ``(device, file, kernel, dtype)``: a launch costs a
    dictionary look-up, not a new kernel object."""
    import cupy

    key = (cupy.cuda.runtime.getDevice(), filename, kernel, getattr(dtype, "name", None) or dtype_name(dtype))
    fn = _kernels.get(key)
    if fn is None:
        name = dtype_name(dtype)
        fn = get_module(filename, name).get_function(name_expression(kernel, name))
        _kernels[key] = fn
    return fn
