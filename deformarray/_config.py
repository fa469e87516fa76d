"""Process-wide settings: the workspace bound and the deterministic-backward default.

Both can be set from the environment before import (``DEFORMARRAY_WORKSPACE_MB``,
``DEFORMARRAY_DETERMINISTIC``) or at run time with the setters below.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

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
    if mib <= 0:
        raise ValueError(f"DEFORMARRAY_WORKSPACE_MB must be positive, got {raw!r}")
    return int(mib * _MIB)


_state = {
    "workspace_bytes": _env_workspace(),
    "deterministic": os.environ.get("DEFORMARRAY_DETERMINISTIC", "0").lower() in ("1", "true", "yes"),
}


def get_workspace_limit() -> int:
    """Return the bound, in bytes, on the temporary workspace one operator call may allocate."""
    return _state["workspace_bytes"]


def set_workspace_limit(nbytes: int) -> None:
    """Set the workspace bound in bytes (default 256 MiB).

    Operators split the batch (and, for very large images, the output pixels) into chunks
    whose temporary buffers fit this bound. Outputs and gradients themselves are not
    workspace. A single output pixel's column (``C_in * kh * kw`` values) is the smallest
    chunk, so the bound cannot go below that.
    """
    nbytes = int(nbytes)
    if nbytes <= 0:
        raise ValueError(f"workspace limit must be positive, got {nbytes}")
    _state["workspace_bytes"] = nbytes


@contextmanager
def workspace_limit(nbytes: int) -> Iterator[None]:
    """Context manager that sets the workspace bound for the duration of a block."""
    old = get_workspace_limit()
    set_workspace_limit(nbytes)
    try:
        yield
    finally:
        set_workspace_limit(old)


def get_deterministic() -> bool:
    """Default of the ``deterministic`` keyword of the backward functions (CUDA only;
    the CPU backward is always deterministic)."""
    return bool(_state["deterministic"])


def set_deterministic(flag: bool) -> None:
    """Set the default of the backward functions' ``deterministic`` keyword."""
    _state["deterministic"] = bool(flag)
