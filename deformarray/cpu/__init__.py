"""Numba CPU backend: one module per operator, shared ``@njit`` helpers in ``_bilinear``."""
