"""PyTorch adapter (``deformarray.torch``); the code is in ``modules.py`` until the split."""

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
    _to_array,  # noqa: F401
    _to_tensor,  # noqa: F401
    deform_conv2d,
    deform_psroi_pool,
    deform_roi_pool,
)

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
]
