"""Public functions: validate -> pick the backend -> call it."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from . import _config
from ._dispatch import backend_of, operator_module
from ._validate import check_dtypes, check_grad_output, conv_params


class DeformConv2dGrads(NamedTuple):
    """Gradients of ``deform_conv2d`` with respect to each of its array arguments.

    ``bias`` is None when the forward had no bias, ``mask`` is None when it had no mask.
    """

    input: Any
    offset: Any
    weight: Any
    bias: Optional[Any]
    mask: Optional[Any]


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """Deformable convolution v1 (``mask=None``) or v2 (modulated, with ``mask``).

    Same argument order, layouts and numbers as ``torchvision.ops.deform_conv2d``:
    input ``(N, C_in, H, W)``, offset ``(N, 2*G*kh*kw, H_out, W_out)`` (dy, dx pairs),
    weight ``(C_out, C_in // groups, kh, kw)``, bias ``(C_out,)``,
    mask ``(N, G*kh*kw, H_out, W_out)``. Returns ``(N, C_out, H_out, W_out)``.
    See docs/deform_conv2d.md for the sampling rules.
    """
    required = dict(input=input, offset=offset, weight=weight)
    optional = dict(bias=bias, mask=mask)
    backend = backend_of(required, optional)
    check_dtypes(backend, **required, **optional)
    p = conv_params(input, offset, weight, bias, stride, padding, dilation, mask)
    return operator_module(backend, "deform_conv").forward(p, input, offset, weight, bias, mask)


def deform_conv2d_backward(
    grad_output,
    input,
    offset,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    mask=None,
    *,
    deterministic=None,
) -> DeformConv2dGrads:
    """Gradients of ``deform_conv2d`` given ``grad_output`` of shape ``(N, C_out, H_out, W_out)``.

    Returns ``DeformConv2dGrads(input, offset, weight, bias, mask)``. The CPU backward is
    always deterministic; on CUDA, ``deterministic=True`` (default: ``set_deterministic``)
    selects the bitwise-reproducible reduction.
    """
    required = dict(grad_output=grad_output, input=input, offset=offset, weight=weight)
    optional = dict(bias=bias, mask=mask)
    backend = backend_of(required, optional)
    check_dtypes(backend, **required, **optional)
    p = conv_params(input, offset, weight, bias, stride, padding, dilation, mask)
    check_grad_output(grad_output, p.out_shape, "(N, C_out, H_out, W_out)")
    if deterministic is None:
        deterministic = _config.get_deterministic()
    grads = operator_module(backend, "deform_conv").backward(
        p, grad_output, input, offset, weight, bias, mask, deterministic=bool(deterministic)
    )
    return DeformConv2dGrads(*grads)
