"""Drop-in modules for multi-scale deformable attention:

* ``MultiScaleDeformableAttention``: mmcv's module (``mmcv.ops.MultiScaleDeformableAttention``)
  with the same constructor, parameters, state_dict keys, initialisation and forward;
* ``MultiScaleDeformableAttentionKernel``: the kernel layer of Hugging Face transformers'
  Deformable DETR family (no parameters; its forward takes value, value_spatial_shapes,
  value_spatial_shapes_list, level_start_index, sampling_locations, attention_weights,
  im2col_step), and ``use_in_transformers(model)``, which swaps it into a loaded model.

The maths is the operator's (``ms_deform_attn``); here only the layers around it."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import init

from .._validate_msda import check_im2col_step
from .msda import ms_deform_attn


class MultiScaleDeformableAttention(nn.Module):
    """mmcv's ``MultiScaleDeformableAttention`` (Deformable DETR's attention module):
    same constructor, parameters (``sampling_offsets``, ``attention_weights``,
    ``value_proj``, ``output_proj``), initialisation and forward, so an mmcv checkpoint
    loads with ``strict=True``. ``norm_cfg`` and ``init_cfg`` are kept for the interface
    (mmcv does not use ``norm_cfg`` either; ``init_cfg`` is mmengine's)."""

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        im2col_step: int = 64,
        dropout: float = 0.1,
        batch_first: bool = False,
        norm_cfg: dict | None = None,
        init_cfg: Any = None,
        value_proj_ratio: float = 1.0,
    ):
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(f"embed_dims must be divisible by num_heads, but got {embed_dims} and {num_heads}")
        for name, v in (("num_heads", num_heads), ("num_levels", num_levels), ("num_points", num_points)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.im2col_step = check_im2col_step(im2col_step)
        self.norm_cfg = norm_cfg
        self.init_cfg = init_cfg
        self.dropout = nn.Dropout(dropout)
        self.batch_first = batch_first
        self.embed_dims = embed_dims
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        value_proj_size = int(embed_dims * value_proj_ratio)
        if value_proj_size % num_heads != 0:
            raise ValueError(
                f"int(embed_dims * value_proj_ratio) = {value_proj_size} must be divisible by num_heads = {num_heads}"
            )
        self.value_proj = nn.Linear(embed_dims, value_proj_size)
        self.output_proj = nn.Linear(value_proj_size, embed_dims)
        self.init_weights()

    def init_weights(self) -> None:
        """mmcv's initialisation: offsets start on a ring of directions, one per head,
        point i at distance i+1; attention weights zero (uniform after the softmax);
        projections Xavier-uniform with zero bias."""
        init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid *= torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        init.constant_(self.attention_weights.weight, 0.0)
        init.constant_(self.attention_weights.bias, 0.0)
        for layer in (self.value_proj, self.output_proj):
            init.xavier_uniform_(layer.weight)
            init.constant_(layer.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        identity: Tensor | None = None,
        query_pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        reference_points: Tensor | None = None,
        spatial_shapes: Tensor | None = None,
        level_start_index: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """mmcv's forward: query ``(num_query, bs, embed_dims)`` (``(bs, num_query,
        embed_dims)`` when ``batch_first``), value likewise over the pyramid's pixels,
        reference_points ``(bs, num_query, num_levels, 2)`` (points) or ``(..., 4)``
        (boxes), spatial_shapes ``(num_levels, 2)`` rows ``(h, w)``. Returns the query's
        shape: ``dropout(output_proj(attention)) + identity``."""
        if "residual" in kwargs:  # mmcv's deprecated name for identity
            warnings.warn("'residual' is deprecated, use 'identity'", DeprecationWarning, stacklevel=2)
            identity = kwargs.pop("residual")
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if reference_points is None or spatial_shapes is None or level_start_index is None:
            raise ValueError("reference_points, spatial_shapes and level_start_index are required")
        if not self.batch_first:
            query = query.permute(1, 0, 2)
            value = value.permute(1, 0, 2)
        bs, num_query, _ = query.shape
        bs, num_value, _ = value.shape

        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(bs, num_value, self.num_heads, -1)
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        sampling_offsets = self.sampling_offsets(query).view(bs, num_query, heads, levels, points, 2)
        attention_weights = self.attention_weights(query).view(bs, num_query, heads, levels * points)
        attention_weights = attention_weights.softmax(-1).view(bs, num_query, heads, levels, points)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            sampling_locations = (
                reference_points[:, :, None, :, None, :] + sampling_offsets / normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(f"Last dim of reference_points must be 2 or 4, but got {reference_points.shape[-1]}")
        output = ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        output = self.output_proj(output)
        if not self.batch_first:
            output = output.permute(1, 0, 2)
        return self.dropout(output) + identity

    def extra_repr(self) -> str:
        return (
            f"embed_dims={self.embed_dims}, num_heads={self.num_heads}, num_levels={self.num_levels}, "
            f"num_points={self.num_points}, batch_first={self.batch_first}"
        )


class MultiScaleDeformableAttentionKernel(nn.Module):
    """The kernel layer of transformers' Deformable DETR family
    (``transformers.models.deformable_detr.modeling_deformable_detr.MultiScaleDeformableAttention``
    and its copies in DETA, Grounding DINO, RT-DETR, ...): no parameters, same forward.
    ``value_spatial_shapes_list`` (the same shapes as Python ints) and ``im2col_step`` are
    accepted for the interface; deformarray reads the shapes from ``value_spatial_shapes``
    and chunks by its workspace bound."""

    def forward(
        self,
        value: Tensor,
        value_spatial_shapes: Tensor,
        value_spatial_shapes_list: list[tuple[int, int]] | None,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
        im2col_step: int = 64,
    ) -> Tensor:
        check_im2col_step(im2col_step)
        return ms_deform_attn(value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights)


def use_in_transformers(model: nn.Module) -> int:
    """Swap ``MultiScaleDeformableAttentionKernel`` into every attention layer of a
    transformers model (each module's ``attn`` whose class is transformers'
    ``MultiScaleDeformableAttention`` kernel layer). Returns how many were replaced; the
    model's parameters are untouched (the kernel layer has none)."""
    count = 0
    for module in model.modules():
        attn = getattr(module, "attn", None)
        if attn is None or isinstance(attn, MultiScaleDeformableAttentionKernel):
            continue
        kind = type(attn)
        if kind.__name__ == "MultiScaleDeformableAttention" and kind.__module__.startswith("transformers."):
            module.attn = MultiScaleDeformableAttentionKernel()
            count += 1
    return count
