"""CuPy CUDA backend: launch code per operator; kernel sources live in ``kernels_cu/``."""
