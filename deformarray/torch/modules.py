"""The ``nn.Module`` s of ``deformarray.torch``: torchvision's ``DeformConv2d``, mmcv's
deformable convolution layers (with their ``conv_offset`` predictors), and the RoI pooling
modules. They hold parameters and call the functional operators; no glue, no registration.
"""

import math
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import init

from .deform_conv import deform_conv2d
from .psroi_pool import deform_psroi_pool
from .roi_pool import deform_roi_pool

# ---------------------------------------------------------------------------------------
# Modules: deformable convolution


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[1]))
    return (int(value), int(value))


class _DeformConvModule(nn.Module):
    """What the deformable convolution modules share: their geometry attributes, ``weight``
    and ``bias`` (made, not initialised: each module has its library's init), and the call
    of ``deform_conv2d`` with them."""

    def _make_parameters(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias) -> None:
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:  # mmcv: a truthy value, 'auto' included, means a bias
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)

    def _deform(self, x: Tensor, offset: Tensor, mask: Tensor | None) -> Tensor:
        return deform_conv2d(
            x,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )


class DeformConv2d(_DeformConvModule):
    """``torchvision.ops.DeformConv2d``: same constructor, parameters (``weight``,
    ``bias``), initialisation and ``forward(input, offset, mask=None)``, so torchvision
    checkpoints load as they are. The offset groups follow from ``offset``'s channels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError("in_channels must be divisible by groups")
        if out_channels % groups != 0:
            raise ValueError("out_channels must be divisible by groups")
        self._make_parameters(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's (and ``nn.Conv2d``'s) initialisation."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        return self._deform(input, offset, mask)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


def _mmcv_init_weight(weight: Tensor, in_channels: int, kernel_size: tuple[int, int]) -> None:
    """mmcv's ModulatedDeformConv2d weight init: U(-s, s), s = 1/sqrt(in_channels*kh*kw)."""
    stdv = 1.0 / math.sqrt(in_channels * kernel_size[0] * kernel_size[1])
    with torch.no_grad():
        weight.uniform_(-stdv, stdv)


class _MmcvConvBase(_DeformConvModule):
    """Constructor and parameters shared by the mmcv-style modules."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool | str = False,
    ) -> None:
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError(f"in_channels {in_channels} must be divisible by groups {groups}")
        if out_channels % groups != 0:
            raise ValueError(f"out_channels {out_channels} must be divisible by groups {groups}")
        if in_channels % deform_groups != 0:
            raise ValueError(f"in_channels {in_channels} must be divisible by deform_groups {deform_groups}")
        self._make_parameters(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.deform_groups = deform_groups
        # nn.Conv2d look-alike attributes (mmcv sets them too; some tools read them)
        self.transposed = False
        self.output_padding = (0,)

    def _make_conv_offset(self, per_point: int) -> nn.Conv2d:
        """The offset (and mask) predictor, zero-initialised: offsets 0 (and masks
        sigmoid(0) = 0.5) at the start of training, as in the papers and mmcv."""
        conv = nn.Conv2d(
            self.in_channels,
            self.deform_groups * per_point * self.kernel_size[0] * self.kernel_size[1],
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(cast(Tensor, conv.bias))
        return conv

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, groups={self.groups}, "
            f"deform_groups={self.deform_groups}, bias={self.bias is not None}"
        )


class ModulatedDeformConv2d(_MmcvConvBase):
    """mmcv's ``ModulatedDeformConv2d``: ``forward(x, offset, mask)``, parameters ``weight``
    and ``bias`` (default ``bias=True``), mmcv's initialisation (weight
    U(-1/sqrt(in_channels*kh*kw), +...), bias 0)."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deform_groups=1,
        bias: bool | str = True,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deform_groups, bias)
        self.init_weights()

    def init_weights(self) -> None:
        _mmcv_init_weight(self.weight, self.in_channels, self.kernel_size)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if hasattr(self, "conv_offset"):
            offset_conv = cast(nn.Conv2d, self.conv_offset)
            nn.init.zeros_(offset_conv.weight)
            nn.init.zeros_(cast(Tensor, offset_conv.bias))

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        return self._deform(x, offset, mask)


class ModulatedDeformConv2dPack(ModulatedDeformConv2d):
    """mmcv's ``ModulatedDeformConv2dPack`` (DCNv2 layer): a drop-in for ``nn.Conv2d``
    that predicts its own offsets and masks with ``conv_offset`` (an ``nn.Conv2d`` with
    ``3*deform_groups*kh*kw`` outputs, zero-initialised). Its output is split in three
    equal parts ``o1, o2, m``: the offsets are ``cat(o1, o2)`` read as (dy, dx) pairs, the
    mask is ``sigmoid(m)``. ``state_dict`` keys: ``weight``, ``bias``, ``conv_offset.weight``,
    ``conv_offset.bias``, as mmcv's, so mmcv/mmdet checkpoints load."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_offset = self._make_conv_offset(3)
        self.init_weights()

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        o1, o2, m = torch.chunk(self.conv_offset(x), 3, dim=1)
        return self._deform(x, torch.cat((o1, o2), dim=1), torch.sigmoid(m))


class DeformConv2dPack(_MmcvConvBase):
    """mmcv's ``DeformConv2dPack`` (DCNv1 layer): a drop-in for ``nn.Conv2d`` that
    predicts its own offsets with ``conv_offset`` (an ``nn.Conv2d`` with
    ``2*deform_groups*kh*kw`` outputs read as (dy, dx) pairs, zero-initialised, so the
    layer starts as a plain convolution).

    Constructor as mmcv's: ``(in_channels, out_channels, kernel_size, stride=1, padding=0,
    dilation=1, groups=1, deform_groups=1, bias=False, im2col_step=32)``; mmcv allows no
    bias, here ``bias=True`` adds one (key ``bias``). ``im2col_step`` is accepted and
    ignored (deformarray bounds its workspace itself). Weight init as mmcv's
    (``kaiming_uniform_(nonlinearity='relu')``). ``state_dict`` keys: ``weight``
    (``bias``), ``conv_offset.weight``, ``conv_offset.bias``. ``forward(x)``.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deform_groups=1,
        bias: bool | str = False,
        im2col_step: int = 32,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deform_groups, bias)
        self.im2col_step = im2col_step
        self.reset_parameters()  # before conv_offset exists: mmcv's order of random draws
        self.conv_offset = self._make_conv_offset(2)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if hasattr(self, "conv_offset"):
            self.init_offset()

    def init_offset(self) -> None:
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(cast(Tensor, self.conv_offset.bias))

    def forward(self, x: Tensor) -> Tensor:
        return self._deform(x, self.conv_offset(x), None)


# ---------------------------------------------------------------------------------------
# Modules: RoI pooling


class DeformRoIPool(nn.Module):
    """mmcv's ``DeformRoIPool``: ``forward(input, rois, offset=None)``, no parameters."""

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)

    def _pool(self, input: Tensor, rois: Tensor, offset: Tensor | None, mask: Tensor | None = None) -> Tensor:
        return deform_roi_pool(
            input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio, self.gamma, mask
        )

    def forward(self, input: Tensor, rois: Tensor, offset: Tensor | None = None) -> Tensor:
        return self._pool(input, rois, offset)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}"
        )


class ModulatedDeformRoIPool(DeformRoIPool):
    """Modulated deformable RoI pooling (DCNv2): ``forward(input, rois, offset=None,
    mask=None)``, each bin's average multiplied by ``mask`` ``(R, 1, ph, pw)``."""

    def forward(self, input: Tensor, rois: Tensor, offset: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return self._pool(input, rois, offset, mask)


def _roi_fc(
    in_features: int, hidden: int, out_features: int, layers: int, final: nn.Module | None = None
) -> nn.Sequential:
    """mmcv's offset/mask heads: ``layers`` Linear layers with ReLU between them (and an
    optional final activation), the last Linear zero-initialised."""
    mods: list[nn.Module] = []
    width = in_features
    for _ in range(layers - 1):
        mods += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    last = nn.Linear(width, out_features)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    mods.append(last)
    if final is not None:
        mods.append(final)
    return nn.Sequential(*mods)


class DeformRoIPoolPack(DeformRoIPool):
    """mmcv's ``DeformRoIPoolPack``: pools without offsets, predicts the offsets from that
    with ``offset_fc`` (Linear-ReLU-Linear-ReLU-Linear, last layer zero-initialised), then
    pools again with them. Same constructor and ``state_dict`` keys
    (``offset_fc.{0,2,4}.{weight,bias}``) as mmcv. ``forward(input, rois)``."""

    def __init__(
        self,
        output_size,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        ph, pw = self.output_size
        self.offset_fc = _roi_fc(ph * pw * output_channels, deform_fc_channels, ph * pw * 2, 3)

    def _check_channels(self, input: Tensor) -> None:
        if input.shape[1] != self.output_channels:
            raise ValueError(
                f"input must have output_channels = {self.output_channels} channels, got shape {tuple(input.shape)}"
            )

    def _head(self, fc: nn.Module, pooled: Tensor, channels: int) -> Tensor:
        """A head's output per RoI, ``(R, channels, ph, pw)``, from the pooled features."""
        r = pooled.shape[0]
        return fc(pooled.reshape(r, -1)).reshape(r, channels, *self.output_size)

    def _offset(self, pooled: Tensor) -> Tensor:
        return self._head(self.offset_fc, pooled, 2)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        self._check_channels(input)
        return self._pool(input, rois, self._offset(self._pool(input, rois, None)))


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """mmcv's ``ModulatedDeformRoIPoolPack``: as ``DeformRoIPoolPack`` plus a mask head
    ``mask_fc`` (Linear-ReLU-Linear-Sigmoid, last Linear zero-initialised, so masks start at
    0.5). ``state_dict`` keys as mmcv's: ``offset_fc.{0,2,4}.*``, ``mask_fc.{0,2}.*``.
    ``forward(input, rois)``."""

    def __init__(
        self,
        output_size,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio, gamma)
        ph, pw = self.output_size
        self.mask_fc = _roi_fc(ph * pw * output_channels, deform_fc_channels, ph * pw, 2, final=nn.Sigmoid())

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        self._check_channels(input)
        pooled = self._pool(input, rois, None)
        return self._pool(input, rois, self._offset(pooled), self._head(self.mask_fc, pooled, 1))


class DeformPSRoIPool(nn.Module):
    """Deformable position-sensitive RoI pooling (R-FCN), no parameters:
    ``forward(input, rois, offset=None)``; see ``deform_psroi_pool``."""

    def __init__(
        self,
        output_dim: int,
        group_size: int,
        pooled_size: int,
        part_size: int | None = None,
        sample_per_part: int = 4,
        trans_std: float = 0.1,
        spatial_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.output_dim = int(output_dim)
        self.group_size = int(group_size)
        self.pooled_size = int(pooled_size)
        self.part_size = None if part_size is None else int(part_size)
        self.sample_per_part = int(sample_per_part)
        self.trans_std = float(trans_std)
        self.spatial_scale = float(spatial_scale)

    def forward(self, input: Tensor, rois: Tensor, offset: Tensor | None = None) -> Tensor:
        return deform_psroi_pool(
            input,
            rois,
            offset,
            output_dim=self.output_dim,
            group_size=self.group_size,
            pooled_size=self.pooled_size,
            part_size=self.part_size,
            sample_per_part=self.sample_per_part,
            trans_std=self.trans_std,
            spatial_scale=self.spatial_scale,
        )

    def extra_repr(self) -> str:
        return (
            f"output_dim={self.output_dim}, group_size={self.group_size}, "
            f"pooled_size={self.pooled_size}, part_size={self.part_size}, "
            f"sample_per_part={self.sample_per_part}, trans_std={self.trans_std}, "
            f"spatial_scale={self.spatial_scale}"
        )
