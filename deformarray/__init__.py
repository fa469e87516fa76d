"""deformarray: deformable convolution (v1/v2, DCNv3, DCNv4), RoI pooling and multi-scale
deformable attention on NumPy and CuPy arrays.

The array type picks the backend: ``numpy.ndarray`` runs Numba-parallel CPU loops,
``cupy.ndarray`` runs CUDA kernels compiled at run time by NVRTC.
"""

from ._api import (
    Dcnv3Grads,
    Dcnv4Grads,
    DeformConv2dGrads,
    DeformPSRoiPoolGrads,
    DeformRoiPoolGrads,
    MsDeformAttnGrads,
    dcnv3,
    dcnv3_backward,
    dcnv4,
    dcnv4_backward,
    deform_conv2d,
    deform_conv2d_backward,
    deform_psroi_pool,
    deform_psroi_pool_backward,
    deform_roi_pool,
    deform_roi_pool_backward,
    ms_deform_attn,
    ms_deform_attn_backward,
)
from ._config import (
    allow_tf32,
    get_allow_tf32,
    get_deterministic,
    get_workspace_limit,
    set_allow_tf32,
    set_deterministic,
    set_workspace_limit,
    workspace_limit,
)
from .cpu._scratch import release_workspace

__version__ = "0.1.0"

__all__ = [
    "Dcnv3Grads",
    "Dcnv4Grads",
    "DeformConv2dGrads",
    "DeformPSRoiPoolGrads",
    "DeformRoiPoolGrads",
    "MsDeformAttnGrads",
    "allow_tf32",
    "dcnv3",
    "dcnv3_backward",
    "dcnv4",
    "dcnv4_backward",
    "deform_conv2d",
    "deform_conv2d_backward",
    "deform_psroi_pool",
    "deform_psroi_pool_backward",
    "deform_roi_pool",
    "deform_roi_pool_backward",
    "get_allow_tf32",
    "get_deterministic",
    "get_workspace_limit",
    "ms_deform_attn",
    "ms_deform_attn_backward",
    "release_workspace",
    "set_allow_tf32",
    "set_deterministic",
    "set_workspace_limit",
    "workspace_limit",
]
