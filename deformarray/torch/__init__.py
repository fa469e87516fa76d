"""PyTorch adapter: deformarray's operators as PyTorch operators and ``nn.Module`` s.

Import it as ``deformarray.torch`` (PyTorch is an optional dependency: nothing else in
deformarray imports torch). What it provides:

* Functions with the signatures of ``torchvision.ops.deform_conv2d`` (and of the
  RoI poolings of the array API), differentiable with autograd.
* Real PyTorch operators in the ``deformarray`` namespace, declared with
  ``torch.library.custom_op``: ``torch.ops.deformarray.deform_conv2d`` and its explicit
  backward ``torch.ops.deformarray.deform_conv2d_backward`` (likewise for the RoI
  poolings). Each has a fake (meta) implementation, so ``torch.compile(fullgraph=True)``
  traces models using them without a graph break, and an autograd formula that calls the
  backward operator, which calls the array API's ``*_backward`` function.
* Modules: ``DeformConv2d`` (torchvision's constructor, parameters and initialisation),
  ``ModulatedDeformConv2d``, ``DeformConv2dPack`` and ``ModulatedDeformConv2dPack``
  (mmcv's, with their ``conv_offset`` layer), and the RoI pooling modules.
* DCNv3 / DCNv4: ``dcnv3``, ``dcnv4`` (``torch.ops.deformarray.dcnv3`` / ``dcnv4``) and
  InternImage's ``DCNv3`` and DCNv4's ``DCNv4`` modules, on the CPU too.
* Multi-scale deformable attention: ``ms_deform_attn`` (``torch.ops.deformarray.ms_deform_attn``),
  mmcv's ``MultiScaleDeformableAttention`` module, transformers' kernel layer
  (``MultiScaleDeformableAttentionKernel``) and ``use_in_transformers(model)``.
* ONNX export with plain ``torch.onnx.export``: ``deform_conv2d`` as the standard
  ``DeformConv``, the others as nodes of a ``deformarray`` domain (docs/deployment.md).

This package holds no maths. Tensors cross to NumPy (CPU) or CuPy (CUDA) through DLPack
without copying, any strides included; results come back the same way. On CUDA the work
runs on PyTorch's current stream of the tensors' device (CuPy is pointed at it through
``cupy.cuda.ExternalStream``).

dtypes: float32 and float64 everywhere; float16 and bfloat16 run natively on CUDA, and on
the CPU (whose kernels have no half types) are computed in float32 and returned in the
input's dtype. Under ``torch.autocast`` (CPU or CUDA) the operators run in float32, like
torchvision's: floating inputs are cast to float32 and the result is cast back to the
dtype of ``input``.

Determinism: ``torch.use_deterministic_algorithms(True)`` makes the backward pass request
the deterministic reduction (``deterministic=True`` of the array API's backward
functions); otherwise deformarray's own default (``deformarray.set_deterministic``)
applies. The CPU backward is deterministic in every case.

See docs/torch.md.

Layout (one module per operator family, so a new family is new files, not edits all over):

* ``_glue.py``: what every family shares (DLPack crossing, device and stream, dtypes,
  ``_call_array_api``, argument checks, deterministic flag, autocast, cast back).
* ``deform_conv.py``, ``roi_pool.py``, ``psroi_pool.py``: one family each, its
  ``torch.library`` operators (``deformarray::<name>`` and ``deformarray::<name>_backward``,
  names that saved graphs and exports refer to: never rename them), their fake kernels,
  autograd and autocast registration, and the public functional wrapper.
* ``msda.py``: multi-scale deformable attention's operators, likewise; ``dcn.py``: DCNv3's
  and DCNv4's.
* ``modules.py``: the ``nn.Module`` s of the convolution and RoI poolings, which only call
  the functional wrappers; ``modules_msda.py``: those of multi-scale deformable attention
  (mmcv's module, transformers' kernel layer and the swap helper); ``modules_dcn.py``:
  InternImage's ``DCNv3`` and DCNv4's ``DCNv4``.
* ``_onnx_nodes.py``: the ONNX node of each operator, which the public functions put into
  the graph under ``torch.onnx.export`` (docs/deployment.md); ``onnx.py``: the public
  ``deformarray.torch.onnx`` (``export`` of ``ExportedProgram`` s, ``DECOMPOSITIONS``),
  imported by whoever needs it, not by this file.
* ``__init__.py`` (this file): re-exports the public names and says, at import, what a first
  call costs (``_warmup.notice_torch_import``).

Imports go one way: ``_glue``, ``_onnx_nodes`` <- the family modules <- ``modules*`` <-
``__init__`` (``onnx`` imports the family modules, and nothing of the package imports it); a
family module imports nothing of this package but ``_glue`` and ``_onnx_nodes``
(tests/test_repository.py fails on an import cycle). Adding a family: its operators in a
module of its own on the model of ``roi_pool.py`` or ``msda.py`` (never named like a public
function, which would shadow the module), its ONNX node in ``_onnx_nodes.py`` (and its
entry in ``onnx.DECOMPOSITIONS``), its ``nn.Module`` s in ``modules.py`` or, as
``modules_msda.py``, a modules file of its own, and its public names imported and listed here.
"""

from .. import _warmup
from .dcn import dcnv3, dcnv4
from .deform_conv import deform_conv2d
from .modules import (
    DeformConv2d,
    DeformConv2dPack,
    DeformPSRoIPool,
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformConv2d,
    ModulatedDeformConv2dPack,
    ModulatedDeformRoIPool,
    ModulatedDeformRoIPoolPack,
)
from .modules_dcn import DCNv3, DCNv4
from .modules_msda import MultiScaleDeformableAttention, MultiScaleDeformableAttentionKernel, use_in_transformers
from .msda import ms_deform_attn
from .psroi_pool import deform_psroi_pool
from .roi_pool import deform_roi_pool

__all__ = [
    "deform_conv2d",
    "deform_roi_pool",
    "deform_psroi_pool",
    "DeformConv2d",
    "ModulatedDeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2dPack",
    "DeformRoIPool",
    "ModulatedDeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformRoIPoolPack",
    "DeformPSRoIPool",
    "ms_deform_attn",
    "MultiScaleDeformableAttention",
    "MultiScaleDeformableAttentionKernel",
    "use_in_transformers",
    "dcnv3",
    "dcnv4",
    "DCNv3",
    "DCNv4",
]

_warmup.notice_torch_import()  # a first use since installation: say what the first call costs
