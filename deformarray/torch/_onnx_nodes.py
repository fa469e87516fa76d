"""The ONNX node of each ``deformarray`` operator, one description shared by the two ways a
model reaches ONNX (docs/deployment.md):

* ``torch.onnx.export(model, args)`` with nothing more: while the exporter traces the
  model, the public functions (``deform_conv2d``, ...) see ``torch.onnx.is_in_onnx_export()``
  and put the node itself into the graph with ``torch.onnx.ops.symbolic`` (public PyTorch
  API) instead of calling the ``deformarray::`` operator (``emit`` below);
* a graph that already holds the ``deformarray::`` operators (an ``ExportedProgram`` made
  by ``torch.export.export``): ``deformarray.torch.onnx.DECOMPOSITIONS`` turns each
  operator into the same node (``ExportedProgram.run_decompositions``), through ``emit``.

Each ``*_node`` function takes the operator's arguments, as the ``deformarray::`` schema
holds them (tensors, fake ones while tracing, and plain ints, floats, lists), and returns
``(domain, op_type, version, inputs, attributes)``.

* ``deform_conv2d``: the standard ONNX ``DeformConv`` (opset 19), whose layouts are
  torchvision's: offset ``(N, 2*offset_group*kh*kw, oH, oW)`` as (y, x) pairs, mask
  ``(N, offset_group*kh*kw, oH, oW)``; ``group`` and ``offset_group`` come from the shapes.
* the others: nodes of the ``deformarray`` domain, version ``DOMAIN_VERSION``, whose
  inputs are the operator's tensors in order (an absent optional one: the empty name)
  and whose attributes are its static arguments under their deformarray names (bools as
  ints 0/1, pairs as two ints, ``part_size=None`` as ``pooled_size``).

This module imports nothing of ``torch.onnx`` at import time (nor onnx or onnxscript):
``deformarray.torch`` stays as quick to import as before.
"""

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

DOMAIN = "deformarray"
DOMAIN_VERSION = 1
DEFORM_CONV_OPSET = 19  # ONNX DeformConv appeared in opset 19

Node = tuple[str, str, int, list[Any], dict[str, Any]]


def exporting() -> bool:
    """True while ``torch.onnx.export`` traces the model (its torch.export capture).

    ``torch.onnx`` is not imported here (about 0.1 s): when nobody imported it, no ONNX
    export is running. Under ``torch.compile`` (and a strict ``torch.export``, which
    runs TorchDynamo) it is False, as TorchDynamo itself folds ``is_in_onnx_export``."""
    if torch.compiler.is_dynamo_compiling():
        return False
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and bool(onnx.is_in_onnx_export())


def _channels(value: Any, dim: int, what: str) -> int:
    """A static size of a tensor (ONNX attributes are constants)."""
    size = value.shape[dim]
    try:
        return int(size)
    except (TypeError, ValueError):
        raise ValueError(f"ONNX export needs a static {what}, got the symbolic size {size!r}") from None


def _pair(value: Sequence[int]) -> list[int]:
    return [int(v) for v in value]


def _trim(inputs: list[Any]) -> list[Any]:
    """Trailing absent optional inputs are left out (ONNX's convention)."""
    while inputs and inputs[-1] is None:
        inputs.pop()
    return inputs


def deform_conv2d_node(input, offset, weight, bias, stride, padding, dilation, mask) -> Node:
    kh, kw = _channels(weight, 2, "kernel height"), _channels(weight, 3, "kernel width")
    c_in = _channels(input, 1, "number of input channels")
    c_w = _channels(weight, 1, "number of weight channels")
    ph, pw = _pair(padding)
    attrs = dict(
        dilations=_pair(dilation),
        group=c_in // c_w,
        kernel_shape=[kh, kw],
        offset_group=_channels(offset, 1, "number of offset channels") // (2 * kh * kw),
        pads=[ph, pw, ph, pw],
        strides=_pair(stride),
    )
    return "", "DeformConv", DEFORM_CONV_OPSET, _trim([input, weight, offset, bias, mask]), attrs


def deform_roi_pool_node(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask) -> Node:
    attrs = dict(
        output_size=_pair(output_size),
        spatial_scale=float(spatial_scale),
        sampling_ratio=int(sampling_ratio),
        gamma=float(gamma),
    )
    return DOMAIN, "DeformRoIPool", DOMAIN_VERSION, _trim([input, rois, offset, mask]), attrs


def deform_psroi_pool_node(
    input, rois, offset, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, spatial_scale
) -> Node:
    attrs = dict(
        output_dim=int(output_dim),
        group_size=int(group_size),
        pooled_size=int(pooled_size),
        part_size=int(pooled_size if part_size is None else part_size),
        sample_per_part=int(sample_per_part),
        trans_std=float(trans_std),
        spatial_scale=float(spatial_scale),
    )
    return DOMAIN, "DeformPSRoIPool", DOMAIN_VERSION, _trim([input, rois, offset]), attrs


def ms_deform_attn_node(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> Node:
    inputs = [value, spatial_shapes, level_start_index, sampling_locations, attention_weights]
    return DOMAIN, "MultiScaleDeformableAttention", DOMAIN_VERSION, inputs, {}


def _dcn_attrs(kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center):
    return dict(
        kernel_size=_pair(kernel_size),
        stride=_pair(stride),
        padding=_pair(padding),
        dilation=_pair(dilation),
        group=int(group),
        group_channels=int(group_channels),
        offset_scale=float(offset_scale),
        remove_center=int(bool(remove_center)),
    )


def dcnv3_node(input, offset, mask, *geometry) -> Node:
    return DOMAIN, "DCNv3", DOMAIN_VERSION, [input, offset, mask], _dcn_attrs(*geometry)


def dcnv4_node(input, offset_mask, *geometry) -> Node:
    return DOMAIN, "DCNv4", DOMAIN_VERSION, [input, offset_mask], _dcn_attrs(*geometry)


def emit(node: Callable[..., Node], shape: Sequence[Any], *args: Any) -> torch.Tensor:
    """The ONNX node for the operator's arguments ``args``, as ``torch.onnx.ops.symbolic``
    puts it into the graph the exporter traces; ``shape``: its output's shape, whose dtype
    is that of the first input."""
    domain, op_type, version, inputs, attrs = node(*args)
    if not hasattr(torch.onnx, "ops"):
        raise RuntimeError(
            f"ONNX export of deformarray's operators needs PyTorch 2.8 or later, this is {torch.__version__}"
        )
    return torch.onnx.ops.symbolic(
        f"{domain}::{op_type}" if domain else op_type,
        inputs,
        attrs,
        dtype=inputs[0].dtype,
        shape=tuple(shape),
        version=version,
    )
