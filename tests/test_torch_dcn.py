"""The PyTorch adapter's DCNv3 / DCNv4: operators against the array API, gradcheck,
opcheck, torch.compile(fullgraph=True), autocast and half on the CPU; InternImage's
``DCNv3`` and DCNv4's ``DCNv4`` modules: state_dict keys and shapes as theirs, strict
loading, and their forward at known weights against plain torch (average pooling).
Skipped without torch."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import deformarray as da  # noqa: E402
import deformarray.torch as dt  # noqa: E402

GEO = dict(kernel_size=3, stride=1, padding=1, dilation=1, group=2, group_channels=3, offset_scale=1.0)


def v3_case(n=2, h=5, w=4, g=2, d=3, k=3, dtype=torch.float64, seed=0, spread=1.5):
    gen = torch.Generator().manual_seed(seed)
    p = k * k
    x = torch.randn(n, h, w, g * d, generator=gen, dtype=dtype)
    off = (torch.rand(n, h, w, g * p * 2, generator=gen, dtype=dtype) * 2 - 1) * spread
    mask = torch.rand(n, h, w, g * p, generator=gen, dtype=dtype)
    return x, off, mask


def off_kink(off: torch.Tensor) -> torch.Tensor:
    """Offsets whose fractional parts lie in [0.2, 0.8]: sample points away from the kinks."""
    whole = torch.floor(off)
    return whole + 0.2 + 0.6 * (off - whole)


def packed(off: torch.Tensor, mask: torch.Tensor, g: int, p: int, pad_to: int = 8) -> torch.Tensor:
    """DCNv4's offset_mask from DCNv3's offset and mask: per group 2P offsets then P masks,
    zero-padded to a multiple of ``pad_to``."""
    n, h, w, _ = off.shape
    om = torch.cat([off.reshape(n, h, w, g, 2 * p), mask.reshape(n, h, w, g, p)], -1).reshape(n, h, w, 3 * g * p)
    extra = (-om.shape[-1]) % pad_to
    return F.pad(om, (0, extra))


def test_dcnv3_matches_array_api():
    x, off, mask = v3_case()
    got = dt.dcnv3(x, off, mask, **GEO)
    want = da.dcnv3(x.numpy(), off.numpy(), mask.numpy(), **GEO)
    np.testing.assert_array_equal(got.numpy(), want)


def test_dcnv4_matches_dcnv3_and_padding_gets_no_gradient():
    x, off, mask = v3_case()
    om = packed(off, mask, g=2, p=9).requires_grad_()
    assert om.shape[-1] == 56  # 3*2*9 = 54, padded to 56 as DCNv4 does
    got = dt.dcnv4(x, om, **GEO)
    torch.testing.assert_close(got, dt.dcnv3(x, off, mask, **GEO), rtol=0, atol=0)
    got.sum().backward()
    assert torch.count_nonzero(om.grad[..., 54:]) == 0


def test_dcnv3_gradcheck():
    x, off, mask = v3_case(n=1, h=3, w=3, g=1, d=2)
    inputs = (x.requires_grad_(), off_kink(off).requires_grad_(), mask.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b, c: dt.dcnv3(a, b, c, 3, 1, 1, 1, 1), inputs, eps=1e-6, atol=1e-6)


def test_dcnv4_gradcheck():
    x, off, mask = v3_case(n=1, h=3, w=3, g=1, d=2)
    om = packed(off_kink(off), mask, g=1, p=9)
    inputs = (x.requires_grad_(), om.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: dt.dcnv4(a, b, 3, 1, 1, 1, 1), inputs, eps=1e-6, atol=1e-6)


def test_opcheck():
    x, off, mask = v3_case(n=1, h=3, w=4)
    geo = ([3, 3], [1, 1], [1, 1], [1, 1], 2, 3, 1.0, False)
    for t in (x, off, mask):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.deformarray.dcnv3.default, (x, off, mask, *geo))
    om = packed(off.detach(), mask.detach(), g=2, p=9).requires_grad_()
    torch.library.opcheck(torch.ops.deformarray.dcnv4.default, (x, om, *geo))
    g = torch.randn(1, 3, 4, 6, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.deformarray.dcnv3_backward.default, (g, x.detach(), off.detach(), mask.detach(), *geo, False)
    )


def test_compile_fullgraph_modules():
    torch.manual_seed(0)
    for net, x in (
        (dt.DCNv3(channels=8, group=2), torch.randn(1, 4, 5, 8)),
        (dt.DCNv4(channels=32, group=2, dw_kernel_size=3), torch.randn(1, 16, 32)),
    ):
        compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        out.square().sum().backward()
        torch.testing.assert_close(out, net(x))
        assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_on_cpu_and_autocast(half):
    x, off, mask = v3_case(dtype=torch.float32)
    out = dt.dcnv3(x.to(half), off.to(half), mask.to(half), **GEO)
    assert out.dtype == half
    want = dt.dcnv3(x.to(half).float(), off.to(half).float(), mask.to(half).float(), **GEO)
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = dt.dcnv3(x, off.to(torch.bfloat16), mask, **GEO)
    assert mixed.dtype == torch.float32


def test_errors_name_the_argument():
    x, off, mask = v3_case()
    with pytest.raises(ValueError, match="mask"):
        dt.dcnv3(x, off, mask[..., :-1], **GEO)
    with pytest.raises(ValueError, match="offset_mask"):
        dt.dcnv4(x, packed(off, mask, 2, 9)[..., :50], **GEO)
    with pytest.raises(ValueError, match="group"):
        dt.dcnv3(x, off, mask, 3, 1, 1, 1, group=4)
    with pytest.raises(TypeError, match="dtype"):
        dt.dcnv3(x, off.float(), mask, **GEO)


# ---------------------------------------------------------------- InternImage's DCNv3 module

DCNV3_KEYS = {
    "dw_conv.0.weight": (8, 1, 3, 3),
    "dw_conv.0.bias": (8,),
    "dw_conv.1.1.weight": (8,),
    "dw_conv.1.1.bias": (8,),
    "offset.weight": (2 * 9 * 2, 8),
    "offset.bias": (2 * 9 * 2,),
    "mask.weight": (2 * 9, 8),
    "mask.bias": (2 * 9,),
    "input_proj.weight": (8, 8),
    "input_proj.bias": (8,),
    "output_proj.weight": (8, 8),
    "output_proj.bias": (8,),
}


def test_dcnv3_module_keys_and_strict_load():
    mod = dt.DCNv3(channels=8, group=2)
    assert {k: tuple(v.shape) for k, v in mod.state_dict().items()} == DCNV3_KEYS
    cfs = dt.DCNv3(channels=8, group=2, dw_kernel_size=5, center_feature_scale=True, remove_center=True)
    keys = {k: tuple(v.shape) for k, v in cfs.state_dict().items()}
    assert keys["center_feature_scale_proj_weight"] == (2, 8) and keys["center_feature_scale_proj_bias"] == (2,)
    assert keys["dw_conv.0.weight"] == (8, 1, 5, 5) and keys["offset.weight"] == (2 * 8 * 2, 8)
    bn = dt.DCNv3(channels=8, group=2, norm_layer="BN")
    assert "dw_conv.1.0.running_mean" in bn.state_dict()
    state = {k: torch.randn(shape) for k, shape in DCNV3_KEYS.items()}
    mod.load_state_dict(state, strict=True)


def test_dcnv3_module_at_init_is_a_3x3_average_of_the_projection():
    """Zero offsets and a uniform softmax (1/9): the op averages the 3x3 neighbourhood of
    input_proj(x) with zero padding, which avg_pool2d computes independently."""
    torch.manual_seed(0)
    mod = dt.DCNv3(channels=8, group=2).double()
    x = torch.randn(2, 5, 6, 8, dtype=torch.float64)
    proj = mod.input_proj(x).permute(0, 3, 1, 2)
    avg = F.avg_pool2d(proj, 3, stride=1, padding=1, count_include_pad=True).permute(0, 2, 3, 1)
    torch.testing.assert_close(mod(x), mod.output_proj(avg), rtol=1e-12, atol=1e-12)


def test_dcnv3_module_center_feature_scale_blends():
    """With the centre-feature-scale parameters at 0, sigmoid gives 1/2: half the op's
    output, half the projection."""
    torch.manual_seed(0)
    mod = dt.DCNv3(channels=8, group=2, center_feature_scale=True).double()
    x = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    proj = mod.input_proj(x)
    avg = F.avg_pool2d(proj.permute(0, 3, 1, 2), 3, 1, 1, count_include_pad=True).permute(0, 2, 3, 1)
    torch.testing.assert_close(mod(x), mod.output_proj(0.5 * avg + 0.5 * proj), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- DCNv4's module


def test_dcnv4_module_keys_and_strict_load():
    mod = dt.DCNv4(channels=32, group=2, dw_kernel_size=3, center_feature_scale=True)
    shapes = {k: tuple(v.shape) for k, v in mod.state_dict().items()}
    padded = math.ceil(3 * 2 * 9 / 8) * 8
    assert shapes == {
        "center_feature_scale_proj_weight": (2, 32),
        "center_feature_scale_proj_bias": (2,),
        "offset_mask_dw.weight": (32, 1, 3, 3),
        "offset_mask_dw.bias": (32,),
        "offset_mask.weight": (padded, 32),
        "offset_mask.bias": (padded,),
        "value_proj.weight": (32, 32),
        "value_proj.bias": (32,),
        "output_proj.weight": (32, 32),
        "output_proj.bias": (32,),
    }
    bare = dt.DCNv4(channels=32, group=2, without_pointwise=True, output_bias=False)
    assert list(bare.state_dict()) == ["offset_mask.weight", "offset_mask.bias"]
    mod.load_state_dict({k: torch.randn(s) for k, s in shapes.items()}, strict=True)


def test_dcnv4_module_forward_at_known_weights():
    """At init offset_mask is 0, so the output is exactly 0 (no softmax). With the mask
    bias at 1 and offsets 0 the op sums the 3x3 neighbourhood of value_proj(x): 9 times
    avg_pool2d with zero padding. Any group_channels (here 3) and an odd batch work."""
    torch.manual_seed(0)
    mod = dt.DCNv4(channels=6, group=2).double()
    x = torch.randn(3, 20, 6, dtype=torch.float64)  # (N, L, C), shape (4, 5)
    torch.testing.assert_close(mod(x, shape=(4, 5)), torch.zeros(3, 20, 6, dtype=torch.float64))
    with torch.no_grad():
        bias = mod.offset_mask.bias.view(-1)
        for g in range(2):
            bias[g * 27 + 18 : g * 27 + 27] = 1.0  # the P mask entries of group g
    proj = mod.value_proj(x).reshape(3, 4, 5, 6).permute(0, 3, 1, 2)
    total = 9 * F.avg_pool2d(proj, 3, 1, 1, count_include_pad=True)
    want = mod.output_proj(total.permute(0, 2, 3, 1).reshape(3, 20, 6))
    torch.testing.assert_close(mod(x, shape=(4, 5)), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="L = 20"):
        mod(x, shape=(4, 4))
