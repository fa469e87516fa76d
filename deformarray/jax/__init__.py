"""JAX adapter: the deformable operators as differentiable JAX functions.

Each operator is a ``jax.custom_vjp`` whose forward calls the array API's ``op`` and whose
backward calls ``op_backward`` (this module holds no maths). How the arrays reach the
array API depends on where they are and whether JAX is tracing:

* traced (``jax.jit``, ``jax.vmap``, ``shard_map``, ...), or concrete arrays on the CPU:
  ``jax.pure_callback`` hands the operands to Python as host arrays, which are viewed as
  NumPy arrays and run by the Numba CPU backend; on the CPU platform there is no device
  transfer, the results are handed back to XLA (at most a host copy).
* concrete (eager, not traced) arrays on a GPU, when CuPy is importable: zero-copy through
  DLPack (``cupy.from_dlpack``) into the CUDA backend, and back with ``jax.dlpack``.
* traced arrays on a GPU (or eager ones without CuPy): ``jax.pure_callback``, i.e. a
  host round-trip. XLA copies every operand to the host, the Numba CPU backend computes,
  and the result is copied back to the device: cost = device->host and host->device
  transfers of all operands and results, plus CPU compute, on every call (forward and
  backward). There is no GPU lowering (XLA custom call) yet.
  UNVERIFIED: no GPU was available when this was written; both GPU paths are unrun.

``vmap``: the callbacks use ``vmap_method="expand_dims"`` and the host side handles the
extra leading axes: when only the per-image arrays (input, offset, mask of a convolution)
are batched, the vmapped axes are folded into N and the operator runs once; otherwise
(batched weights, RoI pooling, every backward) it loops over the vmapped elements in
NumPy, one array-API call each.

Validation: shapes and dtypes are checked when the function is traced, with the array
API's own messages (``ValueError`` / ``TypeError``). Checks on *values* (the RoIs' batch
indices and coordinates) can only run on concrete arrays: eagerly they raise as usual;
under ``jit`` they run inside the callback, where JAX reports the failure as a runtime
error carrying the same message.

RoI pooling: ``rois`` gets a zero gradient (as in torchvision and mmcv).

Multi-scale deformable attention: ``spatial_shapes`` and ``level_start_index`` are
geometry, not data: they must be concrete (a list, a NumPy array or a concrete JAX array;
under ``jit`` close over them or pass them as static arguments) and get no gradient.

Public functions (same signatures as the array API):
``deform_conv2d``, ``deform_roi_pool``, ``deform_psroi_pool``, ``ms_deform_attn``, ``dcnv3``,
``dcnv4``.

Layout: ``_machinery.py`` holds the call paths and the ``custom_vjp`` every operator shares;
one module per operator family (``conv.py``, ``roi.py``, ``msda.py``, ``dcn.py``) describes
its operators (arrays, ranks, output shape) and calls ``_machinery.apply``. A new family is
one module plus its names below.
"""

from .conv import deform_conv2d
from .dcn import dcnv3, dcnv4
from .msda import ms_deform_attn
from .roi import deform_psroi_pool, deform_roi_pool

__all__ = ["deform_conv2d", "deform_roi_pool", "deform_psroi_pool", "ms_deform_attn", "dcnv3", "dcnv4"]
