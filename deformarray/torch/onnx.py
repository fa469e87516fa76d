"""ONNX export of models that use ``deformarray.torch`` (docs/deployment.md).

Plain ``torch.onnx.export(model, args)`` (the TorchDynamo exporter, PyTorch's default since
2.9) needs nothing from this module: while the exporter traces the model, deformarray's
public functions and modules put ONNX nodes into the graph themselves, through PyTorch's
public ``torch.onnx.ops.symbolic`` (``deformarray/torch/_onnx_nodes.py``):

* ``deform_conv2d`` (``DeformConv2d``, ``DeformConv2dPack``, ``ModulatedDeformConv2dPack``,
  ...): the standard ONNX ``DeformConv`` (opset 19 or later: ``opset_version`` must not be
  set below 19; PyTorch's default is 20), which ONNX Runtime runs;
* ``deform_roi_pool``, ``deform_psroi_pool``, ``ms_deform_attn``, ``dcnv3``, ``dcnv4``:
  nodes of the custom domain ``"deformarray"`` (version 1), ``DeformRoIPool``,
  ``DeformPSRoIPool``, ``MultiScaleDeformableAttention``, ``DCNv3``, ``DCNv4``, for a
  runtime plugin to implement (docs/deployment.md lists their inputs and attributes).

What this module adds is for a graph that already holds the ``deformarray::`` operators,
an ``ExportedProgram`` made by ``torch.export.export`` outside of ONNX export:
``DECOMPOSITIONS`` (for ``ExportedProgram.run_decompositions``) turns each operator into
the same ONNX node, and ``export`` is ``torch.onnx.export`` that applies them first.

The TorchDynamo exporter has no public global registry of translations (its registry is
rebuilt from PyTorch's private torchlib at every export; ``custom_translation_table`` is
per call, and ``torch.onnx.register_custom_op_symbolic`` serves the legacy TorchScript
exporter only), hence ``torch.onnx.ops.symbolic`` in the functions themselves.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _onnx_nodes
from ._glue import _roi_out_shape
from ._onnx_nodes import DEFORM_CONV_OPSET, DOMAIN, DOMAIN_VERSION
from .dcn import _out_shape as _dcn_out_shape
from .deform_conv import _conv_out_shape
from .msda import _msda_out_shape

__all__ = ["DECOMPOSITIONS", "DEFORM_CONV_OPSET", "DOMAIN", "DOMAIN_VERSION", "export"]


def _decomposition(op: Any, node: Callable[..., Any], shape: Callable[..., Sequence[Any]]) -> Callable[..., Any]:
    """A decomposition of ``op`` into its ONNX node (``shape``: its output's shape)."""
    names = [a.name for a in op._schema.arguments]

    def decompose(*args: Any, **kwargs: Any) -> torch.Tensor:
        full = list(args) + [kwargs[name] for name in names[len(args) :]]
        return _onnx_nodes.emit(node, shape(*full), *full)

    decompose.__name__ = f"{op.name().split('::')[-1]}_to_onnx"
    return decompose


_ops = torch.ops.deformarray

DECOMPOSITIONS: dict[Any, Callable[..., Any]] = {
    _ops.deform_conv2d.default: _decomposition(
        _ops.deform_conv2d.default, _onnx_nodes.deform_conv2d_node, _conv_out_shape
    ),
    _ops.deform_roi_pool.default: _decomposition(
        _ops.deform_roi_pool.default,
        _onnx_nodes.deform_roi_pool_node,
        lambda input, rois, offset, output_size, *_: _roi_out_shape(input, rois, *output_size),
    ),
    _ops.deform_psroi_pool.default: _decomposition(
        _ops.deform_psroi_pool.default,
        _onnx_nodes.deform_psroi_pool_node,
        lambda input, rois, offset, output_dim, group_size, pooled_size, *_: (
            rois.shape[0],
            output_dim,
            pooled_size,
            pooled_size,
        ),
    ),
    _ops.ms_deform_attn.default: _decomposition(
        _ops.ms_deform_attn.default,
        _onnx_nodes.ms_deform_attn_node,
        lambda value, spatial_shapes, level_start_index, locations, weights: _msda_out_shape(value, locations, weights),
    ),
    _ops.dcnv3.default: _decomposition(
        _ops.dcnv3.default,
        _onnx_nodes.dcnv3_node,
        lambda input, offset, mask, kernel_size, stride, padding, dilation, *_: _dcn_out_shape(
            input, kernel_size, stride, padding, dilation
        ),
    ),
    _ops.dcnv4.default: _decomposition(
        _ops.dcnv4.default,
        _onnx_nodes.dcnv4_node,
        lambda input, offset_mask, kernel_size, stride, padding, dilation, *_: _dcn_out_shape(
            input, kernel_size, stride, padding, dilation
        ),
    ),
}
"""``{deformarray operator: function}``: each ``deformarray::`` forward operator as its ONNX
node, for ``ExportedProgram.run_decompositions(DECOMPOSITIONS)`` (the ONNX exporter then
keeps the nodes as they are)."""


def export(model: Any, args: tuple[Any, ...] = (), f: Any = None, **kwargs: Any) -> Any:
    """``torch.onnx.export(model, args, f, dynamo=True, **kwargs)``, for a model using
    deformarray.torch or an ``ExportedProgram`` whose graph holds ``deformarray::``
    operators (which are first turned into their ONNX nodes by ``DECOMPOSITIONS``).

    Raises ValueError for an ``opset_version`` below 19, where ONNX has no ``DeformConv``
    (the plain exporter would write a model that no runtime loads). Returns the
    ``torch.onnx.ONNXProgram``."""
    opset = kwargs.get("opset_version")
    if opset is not None and opset < DEFORM_CONV_OPSET:
        raise ValueError(
            f"opset_version={opset}: ONNX DeformConv needs opset {DEFORM_CONV_OPSET} or later "
            "(leave opset_version unset for PyTorch's default)"
        )
    if kwargs.pop("dynamo", True) is not True:
        raise ValueError("deformarray's ONNX export uses the TorchDynamo exporter (dynamo=True)")
    if isinstance(model, torch.export.ExportedProgram):
        model = model.run_decompositions(DECOMPOSITIONS)
    return torch.onnx.export(model, args, f, dynamo=True, **kwargs)
