"""Numba CPU backend: one module per operator, shared ``@njit`` helpers in ``_bilinear``.

Importing it chooses Numba's threading layer (``_threading``: TBB when installed, so that
forked processes work) before any parallel kernel runs.
"""

from . import _threading

_threading.configure()
