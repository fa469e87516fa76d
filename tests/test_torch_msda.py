"""The PyTorch adapter's multi-scale deformable attention: the custom operator against the
array API and the grid_sample composition (values and autograd gradients), gradcheck,
opcheck, torch.compile(fullgraph=True), autocast; mmcv's module (constructor,
state_dict keys, strict loading, forward against the composition); the transformers
kernel layer swapped into a real (tiny, randomly initialised) Deformable DETR when
transformers is installed. Skipped without torch."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import deformarray as da  # noqa: E402
import deformarray.torch as dt  # noqa: E402

SHAPES = [(4, 5), (2, 3), (1, 1)]
STARTS = [0, 20, 26]
S = 27


def composition(value, spatial_shapes, sampling_locations, attention_weights):
    """The pure-PyTorch path of Deformable DETR / mmcv / transformers, written from their
    description: each level's value as an image per (batch, head), ``grid_sample`` at
    ``2*loc - 1`` with align_corners=False and zero padding, then the weighted sum."""
    n, _, m, d = value.shape
    _, lq, _, n_levels, p, _ = sampling_locations.shape
    levels = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        img = levels[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        grid = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (n*m, lq, p, 2)
        sampled.append(F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * p)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


def case(n=2, lq=4, m=2, d=3, p=2, dtype=torch.float64, seed=0, spread=(-0.2, 1.2)):
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(n, S, m, d, generator=g, dtype=dtype)
    loc = torch.rand(n, lq, m, len(SHAPES), p, 2, generator=g, dtype=dtype) * (spread[1] - spread[0]) + spread[0]
    attn = torch.rand(n, lq, m, len(SHAPES), p, generator=g, dtype=dtype)
    return value, loc, attn


def off_kink_case(**kw):
    """Locations whose pixel coordinates have fractional parts in [0.2, 0.8], for gradcheck."""
    value, _, attn = case(**kw)
    g = torch.Generator().manual_seed(1)
    n, lq, m, p = value.shape[0], attn.shape[1], value.shape[2], attn.shape[-1]
    pix = (
        torch.randint(-1, 4, (n, lq, m, len(SHAPES), p, 2), generator=g)
        + 0.2
        + 0.6 * torch.rand(n, lq, m, len(SHAPES), p, 2, generator=g, dtype=torch.float64)
    )
    sizes = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float64)[None, None, None, :, None, :]
    return value, ((pix + 0.5) / sizes).to(value.dtype), attn


SHAPES_T = torch.tensor(SHAPES, dtype=torch.long)
STARTS_T = torch.tensor(STARTS, dtype=torch.long)


def test_matches_array_api_and_composition():
    value, loc, attn = case()
    got = dt.ms_deform_attn(value, SHAPES_T, STARTS_T, loc, attn)
    want = da.ms_deform_attn(value.numpy(), SHAPES, STARTS, loc.numpy(), attn.numpy())
    np.testing.assert_array_equal(got.numpy(), want)
    torch.testing.assert_close(got, composition(value, SHAPES, loc, attn), rtol=1e-12, atol=1e-12)
    # lists for the geometry work as well
    torch.testing.assert_close(dt.ms_deform_attn(value, SHAPES, STARTS, loc, attn), got, rtol=0, atol=0)


def test_autograd_matches_composition():
    value, loc, attn = off_kink_case()
    ours = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref = [t.clone().requires_grad_() for t in (value, loc, attn)]
    g = torch.randn(2, 4, 6, dtype=torch.float64)
    (dt.ms_deform_attn(ours[0], SHAPES_T, STARTS_T, ours[1], ours[2]) * g).sum().backward()
    (composition(ref[0], SHAPES, ref[1], ref[2]) * g).sum().backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


def test_gradcheck():
    value, loc, attn = off_kink_case(n=1, lq=2, m=1, d=2, p=1)
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, lo, a: dt.ms_deform_attn(v, SHAPES_T, STARTS_T, lo, a), inputs, eps=1e-6, atol=1e-6
    )


def test_opcheck():
    value, loc, attn = case(n=1, lq=3)
    value.requires_grad_()
    loc.requires_grad_()
    attn.requires_grad_()
    torch.library.opcheck(torch.ops.deformarray.ms_deform_attn.default, (value, SHAPES_T, STARTS_T, loc, attn))
    g = torch.randn(1, 3, 6, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.deformarray.ms_deform_attn_backward.default,
        (g, value.detach(), SHAPES_T, STARTS_T, loc.detach(), attn.detach(), False),
    )


def test_compile_fullgraph_forward_backward():
    value, loc, attn = off_kink_case(dtype=torch.float32)
    value.requires_grad_()

    def f(v, lo, a, shapes, starts):
        return dt.ms_deform_attn(v, shapes, starts, lo, a).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(value, loc, attn, SHAPES_T, STARTS_T)
    loss.backward()
    v2 = value.detach().clone().requires_grad_()
    f(v2, loc, attn, SHAPES_T, STARTS_T).backward()
    torch.testing.assert_close(value.grad, v2.grad)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_on_cpu_and_autocast(half):
    value, loc, attn = case(dtype=torch.float32)
    out = dt.ms_deform_attn(value.to(half), SHAPES_T, STARTS_T, loc.to(half), attn.to(half))
    assert out.dtype == half
    want = dt.ms_deform_attn(value.to(half).float(), SHAPES_T, STARTS_T, loc.to(half).float(), attn.to(half).float())
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = dt.ms_deform_attn(value, SHAPES_T, STARTS_T, loc.to(torch.bfloat16), attn)
    assert mixed.dtype == torch.float32


def test_empty_and_errors():
    value, loc, attn = case(lq=0)
    assert dt.ms_deform_attn(value, SHAPES_T, STARTS_T, loc, attn).shape == (2, 0, 6)
    value, loc, attn = case()
    with pytest.raises(ValueError, match="level_start_index"):
        dt.ms_deform_attn(value, SHAPES_T, torch.tensor([0, 19, 26]), loc, attn)
    with pytest.raises(TypeError, match="integers"):
        dt.ms_deform_attn(value, SHAPES_T.double(), STARTS_T, loc, attn)
    with pytest.raises(TypeError, match="dtype"):
        dt.ms_deform_attn(value, SHAPES_T, STARTS_T, loc.float(), attn)
    with pytest.raises(ValueError, match="sampling_locations"):
        dt.ms_deform_attn(value, SHAPES_T, STARTS_T, loc[..., :1], attn)


# ---------------------------------------------------------------- mmcv's module

MMCV_KEYS = [
    "sampling_offsets.weight",
    "sampling_offsets.bias",
    "attention_weights.weight",
    "attention_weights.bias",
    "value_proj.weight",
    "value_proj.bias",
    "output_proj.weight",
    "output_proj.bias",
]


def _mmcv_reference_forward(mod, query, value, reference_points, spatial_shapes):
    """mmcv's forward (batch_first=False, no query_pos, no padding mask) with the
    grid_sample composition in place of the kernel, written from its description."""
    q, v = query.permute(1, 0, 2), value.permute(1, 0, 2)
    bs, nq, _ = q.shape
    v = mod.value_proj(v).view(bs, v.shape[1], mod.num_heads, -1)
    off = mod.sampling_offsets(q).view(bs, nq, mod.num_heads, mod.num_levels, mod.num_points, 2)
    a = mod.attention_weights(q).view(bs, nq, mod.num_heads, -1).softmax(-1)
    a = a.view(bs, nq, mod.num_heads, mod.num_levels, mod.num_points)
    norm = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
    loc = reference_points[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    out = mod.output_proj(composition(v, [tuple(s) for s in spatial_shapes.tolist()], loc, a))
    return out.permute(1, 0, 2) + query


def test_mmcv_module_keys_strict_load_and_forward():
    torch.manual_seed(0)
    mod = dt.MultiScaleDeformableAttention(embed_dims=16, num_heads=2, num_levels=3, num_points=2, dropout=0.0)
    assert list(mod.state_dict()) == MMCV_KEYS
    assert mod.sampling_offsets.weight.shape == (2 * 3 * 2 * 2, 16)
    # a checkpoint with mmcv's keys (here: another instance's, perturbed) loads strictly
    other = dt.MultiScaleDeformableAttention(embed_dims=16, num_heads=2, num_levels=3, num_points=2, dropout=0.0)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in other.state_dict().items()}
    mod.load_state_dict(state, strict=True)
    mod = mod.double()
    query = torch.randn(5, 2, 16, dtype=torch.float64)  # (num_query, bs, embed_dims)
    value = torch.randn(S, 2, 16, dtype=torch.float64)
    ref = torch.rand(2, 5, 3, 2, dtype=torch.float64)
    got = mod(query, value=value, reference_points=ref, spatial_shapes=SHAPES_T, level_start_index=STARTS_T)
    want = _mmcv_reference_forward(mod, query, value, ref, SHAPES_T)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got.sum().backward()
    assert all(p.grad is not None for p in mod.parameters())


def test_mmcv_module_init_and_errors():
    mod = dt.MultiScaleDeformableAttention(embed_dims=8, num_heads=4, num_levels=1, num_points=3)
    bias = mod.sampling_offsets.bias.view(4, 1, 3, 2)
    # head 0 points along +x at distances 1, 2, 3 (mmcv's ring initialisation)
    torch.testing.assert_close(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    assert torch.count_nonzero(mod.attention_weights.weight) == 0
    with pytest.raises(ValueError, match="divisible"):
        dt.MultiScaleDeformableAttention(embed_dims=10, num_heads=4)
    with pytest.raises(ValueError, match="im2col_step"):
        dt.MultiScaleDeformableAttention(embed_dims=8, num_heads=4, im2col_step=0)


# ---------------------------------------------------------------- transformers' kernel layer


def test_transformers_kernel_layer_interface():
    value, loc, attn = case()
    layer = dt.MultiScaleDeformableAttentionKernel()
    got = layer(value, SHAPES_T, SHAPES, STARTS_T, loc, attn, 64)
    torch.testing.assert_close(got, composition(value, SHAPES, loc, attn), rtol=1e-12, atol=1e-12)


def test_swap_into_transformers_deformable_detr():
    transformers = pytest.importorskip("transformers")
    config = transformers.DeformableDetrConfig(
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=6,
        num_feature_levels=2,
        encoder_n_points=2,
        decoder_n_points=2,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], out_features=["stage3", "stage4"]
        ),
    )
    torch.manual_seed(0)
    model = transformers.DeformableDetrModel(config).eval().double()
    pixels = torch.randn(1, 3, 64, 48, dtype=torch.float64)
    with torch.no_grad():
        want = model(pixel_values=pixels).last_hidden_state
    assert dt.use_in_transformers(model) == 2  # one encoder and one decoder layer
    assert dt.use_in_transformers(model) == 0
    with torch.no_grad():
        got = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
