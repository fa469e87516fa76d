"""Process-wide settings: the workspace bound, the deterministic-backward default and
whether float32 products may use TF32 tensor cores (CUDA).

Each can be set from the environment before import (``DEFORMARRAY_WORKSPACE_MB``,
``DEFORMARRAY_DETERMINISTIC``, ``DEFORMARRAY_ALLOW_TF32``) or at run time with the setters
below.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_MIB = 1 << 20
DEFAULT_WORKSPACE_BYTES = 256 * _MIB


def _env_workspace() -> int:
    raw = os.environ.get("DEFORMARRAY_WORKSPACE_MB")
    if raw is None:
        return DEFAULT_WORKSPACE_BYTES
    try:
        mib = float(raw)
    except ValueError:
        raise ValueError(f"DEFORMARRAY_WORKSPACE_MB must be a number of MiB, got {raw!r}") from None
    if not math.isfinite(mib) or mib <= 0:
        raise ValueError(f"DEFORMARRAY_WORKSPACE_MB must be a finite positive number of MiB, got {raw!r}")
    if int(mib * _MIB) < 1:
        raise ValueError(f"DEFORMARRAY_WORKSPACE_MB is below one byte: {raw!r}")
    return int(mib * _MIB)


_state = {
    "workspace_bytes": _env_workspace(),
    "deterministic": os.environ.get("DEFORMARRAY_DETERMINISTIC", "0").lower() in ("1", "true", "yes"),
    "allow_tf32": os.environ.get("DEFORMARRAY_ALLOW_TF32", "0").lower() in ("1", "true", "yes"),
}
# workspace_limit() blocks: an override per thread (and asyncio task), so that two threads
# each in their own block neither lose nor leak each other's value
_scoped_workspace: ContextVar[int | None] = ContextVar("deformarray_workspace_bytes", default=None)
# allow_tf32() blocks (the torch adapter's: it follows torch.backends.cuda.matmul.allow_tf32
# for the duration of one operator call), per thread like the workspace bound
_scoped_tf32: ContextVar[bool | None] = ContextVar("deformarray_allow_tf32", default=None)


def _checked_bytes(nbytes: object) -> int:
    """A workspace size in bytes: a positive integer (not a bool, a float or a string)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral):
        raise TypeError(
            f"workspace limit must be a positive int number of bytes (e.g. 64 << 20 for 64 MiB), "
            f"got {type(nbytes).__name__} {nbytes!r}"
        )
    value = int(nbytes)
    if value <= 0:
        raise ValueError(f"workspace limit must be a positive number of bytes, got {value}")
    return value


def get_workspace_limit() -> int:
    """Return the bound, in bytes, on the temporary workspace one operator call may allocate:
    the innermost ``workspace_limit`` block of the calling thread, else the process-wide value.

    Each operator call reads it once, when it starts."""
    scoped = _scoped_workspace.get()
    return _state["workspace_bytes"] if scoped is None else scoped


def set_workspace_limit(nbytes: int) -> None:
    """Set the process-wide workspace bound in bytes (default 256 MiB).

    Operators split the batch (and, for very large images, the output pixels) into chunks
    whose temporary buffers fit this bound. Outputs and gradients themselves are not
    workspace. ``nbytes`` must be a positive int (TypeError for a bool, float or string,
    ValueError for 0 or less). A call already running keeps the bound it started with.
    See docs/backends.md for what a chunk needs at least.
    """
    _state["workspace_bytes"] = _checked_bytes(nbytes)


@contextmanager
def workspace_limit(nbytes: int) -> Iterator[None]:
    """Set the workspace bound for the duration of a block, in the calling thread only.

    Blocks nest, and blocks in different threads are independent: each sees its own
    value and restores what it found, whatever the others do."""
    token = _scoped_workspace.set(_checked_bytes(nbytes))
    try:
        yield
    finally:
        _scoped_workspace.reset(token)


def get_deterministic() -> bool:
    """Default of the ``deterministic`` keyword of the backward functions (CUDA only;
    the CPU backward is always deterministic)."""
    return bool(_state["deterministic"])


def set_deterministic(flag: bool) -> None:
    """Set the default of the backward functions' ``deterministic`` keyword."""
    _state["deterministic"] = bool(flag)


def get_allow_tf32() -> bool:
    """Whether float32 matrix products on CUDA may round their operands to TF32 (tensor
    cores, about 10 mantissa bits): the innermost ``allow_tf32`` block of the calling thread,
    else the process-wide value (default False: strict float32). float16, bfloat16 and float64
    are not affected (16-bit products always run on tensor cores with float32 accumulation)."""
    scoped = _scoped_tf32.get()
    return bool(_state["allow_tf32"]) if scoped is None else scoped


def set_allow_tf32(flag: bool) -> None:
    """Allow (True) or forbid (False, the default) TF32 in the CUDA backend's float32 matrix
    products, process-wide. The CPU backend never uses TF32."""
    _state["allow_tf32"] = bool(flag)


@contextmanager
def allow_tf32(flag: bool) -> Iterator[None]:
    """``set_allow_tf32(flag)`` for the duration of a block, in the calling thread only."""
    token = _scoped_tf32.set(bool(flag))
    try:
        yield
    finally:
        _scoped_tf32.reset(token)
