"""Drop-in modules for InternImage's ``DCNv3`` (and ``DCNv3_pytorch``: same weights) and
DCNv4's ``DCNv4``: same constructors, parameters, state_dict keys, initialisation and
forward, running deformarray's ``dcnv3`` / ``dcnv4`` on any device (the CPU included),
with any kernel size, group_channels and batch size. The maths is the operators'; here
only the layers around them."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from .dcn import dcnv3, dcnv4


class _ToChannelsLast(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


def _norm_layer(channels: int, norm_layer: str) -> nn.Sequential:
    """InternImage's ``build_norm_layer(C, norm_layer, 'channels_first', 'channels_last')``:
    LN converts to channels-last then normalises over C (eps 1e-6); BN normalises NCHW then
    converts. Module indices as theirs, so the state_dict keys match."""
    if norm_layer == "LN":
        return nn.Sequential(_ToChannelsLast(), nn.LayerNorm(channels, eps=1e-6))
    if norm_layer == "BN":
        return nn.Sequential(nn.BatchNorm2d(channels), _ToChannelsLast())
    raise ValueError(f"norm_layer must be 'LN' or 'BN', got {norm_layer!r}")


def _act_layer(act_layer: str) -> nn.Module:
    if act_layer == "GELU":
        return nn.GELU()
    if act_layer == "ReLU":
        return nn.ReLU(inplace=True)
    if act_layer == "SiLU":
        return nn.SiLU(inplace=True)
    raise ValueError(f"act_layer must be 'GELU', 'ReLU' or 'SiLU', got {act_layer!r}")


def _group_channels(channels: int, group: int, warn: bool) -> int:
    """channels // group; ``warn``: InternImage's DCNv3 warns when it is not a power of 2
    (DCNv4 asserts a multiple of 16 instead, a limit deformarray does not have)."""
    if group < 1 or channels % group != 0:
        raise ValueError(f"channels must be divisible by group, but got {channels} and {group}")
    d = channels // group
    if warn and d & (d - 1):
        warnings.warn(
            f"group_channels = {d} is not a power of 2: the reference CUDA kernels prefer one; deformarray does not "
            "need it",
            stacklevel=3,
        )
    return d


def _center_feature_scale(query: Tensor, weight: Tensor, bias: Tensor, group_channels: int) -> Tensor:
    """Per-group blend weight sigmoid(query . W^T + b), repeated over each group's channels."""
    scale = F.linear(query, weight, bias).sigmoid()
    return scale[..., None].repeat(1, 1, 1, 1, group_channels).flatten(-2)


class _DcnModule(nn.Module):
    """What InternImage's DCNv3 and DCNv4's modules share: the geometry attributes, the
    centre-feature-scale parameters (registered on the module itself, so their keys come
    first, as theirs), the blend, and the operator's geometry arguments."""

    def _setup(
        self,
        channels: int,
        kernel_size: int,
        stride: int,
        pad: int,
        dilation: int,
        group: int,
        offset_scale: float,
        center_feature_scale: bool,
        remove_center: bool,
        warn: bool,
    ) -> None:
        self.group_channels = _group_channels(channels, group, warn=warn)
        if remove_center and kernel_size % 2 == 0:
            raise ValueError("remove_center is only compatible with an odd kernel size")
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.pad = pad
        self.dilation = dilation
        self.group = group
        self.offset_scale = offset_scale
        self.center_feature_scale = center_feature_scale
        self.remove_center = int(remove_center)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros((group, channels), dtype=torch.float))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group, dtype=torch.float))

    def _geometry(self) -> tuple:
        """The operator's arguments after the arrays."""
        return (
            self.kernel_size,
            self.stride,
            self.pad,
            self.dilation,
            self.group,
            self.group_channels,
            self.offset_scale,
            bool(self.remove_center),
        )

    def _blend(self, x: Tensor, x_proj: Tensor, query: Tensor) -> Tensor:
        """With ``center_feature_scale``: ``x*(1 - s) + x_proj*s``, s per group from ``query``."""
        if not self.center_feature_scale:
            return x
        scale = _center_feature_scale(
            query, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias, self.group_channels
        )
        return x * (1 - scale) + x_proj * scale

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, pad={self.pad}, "
            f"dilation={self.dilation}, group={self.group}, offset_scale={self.offset_scale}"
        )


class DCNv3(_DcnModule):
    """InternImage's ``DCNv3`` module (also its ``DCNv3_pytorch``: same weights).

    input and output ``(N, H, W, C)``. Keys: ``dw_conv.0.*`` (depthwise conv),
    ``dw_conv.1.1.*`` (LayerNorm; ``dw_conv.1.0.*`` with BN), ``offset``, ``mask``,
    ``input_proj``, ``output_proj`` and, with ``center_feature_scale``,
    ``center_feature_scale_proj_weight`` / ``_bias``: an InternImage checkpoint loads with
    ``strict=True``. The mask is softmax-normalised over each group's P points here, as
    theirs. Works on the CPU, where InternImage's compiled op does not.
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        dw_kernel_size: int | None = None,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        act_layer: str = "GELU",
        norm_layer: str = "LN",
        center_feature_scale: bool = False,
        remove_center: bool = False,
    ):
        super().__init__()
        self._setup(
            channels,
            kernel_size,
            stride,
            pad,
            dilation,
            group,
            offset_scale,
            center_feature_scale,
            remove_center,
            warn=True,
        )
        dw_kernel_size = dw_kernel_size if dw_kernel_size is not None else kernel_size
        self.dw_kernel_size = dw_kernel_size
        points = kernel_size * kernel_size - self.remove_center
        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, dw_kernel_size, 1, (dw_kernel_size - 1) // 2, groups=channels),
            _norm_layer(channels, norm_layer),
            _act_layer(act_layer),
        )
        self.offset = nn.Linear(channels, group * points * 2)
        self.mask = nn.Linear(channels, group * points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Theirs: offsets and mask logits start at 0 (regular grid, uniform 1/P weights after
        the softmax); projections Xavier-uniform with zero bias."""
        for layer in (self.offset, self.mask):
            init.constant_(layer.weight, 0.0)
            init.constant_(layer.bias, 0.0)
        for layer in (self.input_proj, self.output_proj):
            init.xavier_uniform_(layer.weight)
            init.constant_(layer.bias, 0.0)

    def forward(self, input: Tensor) -> Tensor:
        n, h, w, _ = input.shape
        x = self.input_proj(input)
        x_proj = x
        x1 = self.dw_conv(input.permute(0, 3, 1, 2))
        offset = self.offset(x1)
        mask = self.mask(x1).reshape(n, h, w, self.group, -1).softmax(-1).reshape(n, h, w, -1).type(x.dtype)
        x = self._blend(dcnv3(x, offset, mask, *self._geometry()), x_proj, x1)
        return self.output_proj(x)


class DCNv4(_DcnModule):
    """DCNv4's ``DCNv4`` module: input and output ``(N, L, C)`` with ``shape=(H, W)`` (or
    a square L). Keys: ``offset_mask`` (``ceil(3*G*P/8)*8`` outputs, as theirs),
    ``offset_mask_dw`` (when ``dw_kernel_size``), ``value_proj``, ``output_proj`` (unless
    ``without_pointwise``) and the centre-feature-scale parameters: a DCNv4 checkpoint
    loads with ``strict=True``. No softmax on the mask. Without their limits: any kernel
    size, group_channels and batch size, on the CPU too."""

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        dw_kernel_size: int | None = None,
        center_feature_scale: bool = False,
        remove_center: bool = False,
        output_bias: bool = True,
        without_pointwise: bool = False,
        **kwargs: Any,
    ):
        super().__init__()
        self._setup(
            channels,
            kernel_size,
            stride,
            pad,
            dilation,
            group,
            offset_scale,
            center_feature_scale,
            remove_center,
            warn=False,
        )
        self.dw_kernel_size = dw_kernel_size
        self.without_pointwise = without_pointwise
        self.K = group * (kernel_size * kernel_size - self.remove_center)
        if dw_kernel_size is not None:
            self.offset_mask_dw = nn.Conv2d(
                channels, channels, dw_kernel_size, 1, (dw_kernel_size - 1) // 2, groups=channels
            )
        self.offset_mask = nn.Linear(channels, int(math.ceil((self.K * 3) / 8) * 8))
        if not without_pointwise:
            self.value_proj = nn.Linear(channels, channels)
            self.output_proj = nn.Linear(channels, channels, bias=output_bias)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Theirs: offset_mask all zero (so the output starts at exactly 0: no softmax),
        projections Xavier-uniform with zero bias; the depthwise conv keeps torch's init."""
        init.constant_(self.offset_mask.weight, 0.0)
        init.constant_(self.offset_mask.bias, 0.0)
        if not self.without_pointwise:
            init.xavier_uniform_(self.value_proj.weight)
            init.constant_(self.value_proj.bias, 0.0)
            init.xavier_uniform_(self.output_proj.weight)
            if self.output_proj.bias is not None:
                init.constant_(self.output_proj.bias, 0.0)

    def forward(self, input: Tensor, shape: tuple[int, int] | None = None) -> Tensor:
        n, length, c = input.shape
        if shape is not None:
            h, w = shape
        else:
            h = w = int(math.sqrt(length))
        if h * w != length:
            raise ValueError(f"input has L = {length} positions, not H*W for shape ({h}, {w})")
        x = input if self.without_pointwise else self.value_proj(input)
        x = x.reshape(n, h, w, -1)
        if self.dw_kernel_size is not None:
            om_input = self.offset_mask_dw(input.view(n, h, w, c).permute(0, 3, 1, 2))
            om_input = om_input.permute(0, 2, 3, 1).reshape(n, length, c)
        else:
            om_input = input
        offset_mask = self.offset_mask(om_input).reshape(n, h, w, -1)
        x_proj = x
        x = dcnv4(x, offset_mask, *self._geometry())
        x = self._blend(x, x_proj, x)  # DCNv4's query is the operator's output
        x = x.reshape(n, -1, x.shape[-1])
        if not self.without_pointwise:
            x = self.output_proj(x)
        return x
