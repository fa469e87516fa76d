"""JAX adapter: the deformable operators as differentiable JAX functions.

Each operator is a ``jax.custom_vjp`` whose forward calls the array API's ``op`` and whose
backward calls ``op_backward`` (this module holds no maths). How the arrays reach the
array API depends on where they are and whether JAX is tracing:

* concrete (eager, not traced) arrays on a GPU, when CuPy is importable: zero-copy through
  DLPack (``cupy.from_dlpack``) into the CUDA backend, and back with ``jax.dlpack``.
* everything else (traced: ``jax.jit``, ``jax.vmap``, ``shard_map``, ...; or eager on the
  CPU), with JAX >= 0.6.1: ``jax.experimental.buffer_callback``, which hands the callback
  XLA's own buffers. On the CPU they are host memory: NumPy views of the inputs, the Numba
  CPU backend, the results copied into the output buffers (no device transfer). On a GPU
  (CUDA, with CuPy) they are device memory: CuPy arrays on the same memory (no copy), the
  CUDA backend launched on XLA's stream (``ctx.stream`` as a ``cupy.cuda.ExternalStream``),
  the results copied device to device into the output buffers on that stream: no host
  round trip and no synchronisation.
  UNVERIFIED: no GPU was available when this was written; the GPU paths are unrun.
* ``jax.pure_callback`` (host arrays) where JAX has no buffer_callback (< 0.6.1), or on a
  machine with a GPU but no CuPy: on a GPU a host round trip (every operand copied to the
  host, the CPU backend, the results copied back), forward and backward alike.

dtypes: float32 and float64 everywhere; float16 and bfloat16 run natively on a GPU, and on
the CPU (whose kernels have no half types) are computed in float32 and returned in the
input's dtype, as in the torch adapter.

``vmap``: the callbacks use ``vmap_method="expand_dims"`` and handle the extra leading axes
themselves: when only the per-image arrays (input, offset, mask of a convolution) are
batched, the vmapped axes are folded into N and the operator runs once; otherwise (batched
weights, RoI pooling, every backward) it loops over the vmapped elements, one array-API call
each.

Validation: shapes and dtypes are checked when the function is traced, with the array
API's own messages (``ValueError`` / ``TypeError``). Checks on *values* (the RoIs' batch
indices and coordinates) can only run on concrete arrays: eagerly they raise as usual;
under ``jit`` they run inside the callback, where JAX reports the failure as a runtime
error (``jax.errors.JaxRuntimeError``) carrying the same message.

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
