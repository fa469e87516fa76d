"""deformarray.torch: operators, autograd, torch.library registration, compile, modules.

Skipped when PyTorch is not installed. Shapes are tiny: the CPU kernels are the array
API's, tested in depth elsewhere; here we test the adapter.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import deformarray as da  # noqa: E402
import deformarray._api as _api  # noqa: E402
import deformarray.torch as dt  # noqa: E402
from deformarray.torch import _glue  # noqa: E402

GEOMETRIES = {
    # (n, c_in, h, w, c_out, groups, offset_groups, kernel, stride, padding, dilation, mask, bias)
    "v2_basic": (2, 4, 6, 7, 3, 1, 1, (3, 3), 1, 1, 1, True, True),
    "v1_groups_og_stride": (1, 4, 7, 6, 4, 2, 2, (2, 3), (2, 1), (0, 1), (1, 2), False, False),
    "v2_small": (1, 2, 4, 5, 2, 1, 1, (3, 3), 1, 1, 1, True, True),  # for gradcheck
}


def fractional_offsets(gen, shape, dtype=torch.float64):
    """Offsets whose fractional part lies in [0.2, 0.8]: the sample points stay away from
    the integer coordinates where the bilinear interpolation has kinks (for gradcheck)."""
    whole = torch.randint(-2, 2, shape, generator=gen).to(dtype)
    return whole + 0.2 + 0.6 * torch.rand(shape, generator=gen, dtype=dtype)


def make_conv_case(name, dtype=torch.float64, seed=0):
    n, c_in, h, w, c_out, groups, og, (kh, kw), stride, padding, dilation, use_mask, use_bias = GEOMETRIES[name]
    gen = torch.Generator().manual_seed(seed)
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    h_out = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    w_out = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    tensors = dict(
        input=torch.randn(n, c_in, h, w, generator=gen, dtype=dtype),
        offset=fractional_offsets(gen, (n, 2 * og * kh * kw, h_out, w_out), dtype),
        weight=torch.randn(c_out, c_in // groups, kh, kw, generator=gen, dtype=dtype),
        bias=torch.randn(c_out, generator=gen, dtype=dtype) if use_bias else None,
        mask=torch.rand(n, og * kh * kw, h_out, w_out, generator=gen, dtype=dtype) if use_mask else None,
    )
    params = dict(stride=stride, padding=padding, dilation=dilation)
    return tensors, params


def call_conv(tensors, params):
    t = tensors
    return dt.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], **params)


def as_numpy(tensors):
    return {k: None if v is None else v.detach().numpy() for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------
# Functions and autograd


@pytest.mark.parametrize("name", ["v2_basic", "v1_groups_og_stride"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deform_conv2d_matches_array_api(name, dtype):
    tensors, params = make_conv_case(name, dtype)
    leaves = {k: v.requires_grad_() for k, v in tensors.items() if v is not None}
    out = call_conv(tensors, params)
    arrays = as_numpy(tensors)
    expected = da.deform_conv2d(**arrays, **params)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out.detach().numpy(), expected)

    grad_out = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    out.backward(grad_out)
    grads = da.deform_conv2d_backward(grad_out.numpy(), **arrays, **params)
    for k, leaf in leaves.items():
        np.testing.assert_array_equal(leaf.grad.numpy(), getattr(grads, k), err_msg=k)


@pytest.mark.parametrize("name", ["v2_small", "v1_groups_og_stride"])
def test_deform_conv2d_gradcheck(name):
    tensors, params = make_conv_case(name, torch.float64, seed=2)
    names = [k for k, v in tensors.items() if v is not None]

    def f(*args):
        return call_conv({**tensors, **dict(zip(names, args))}, params)

    inputs = tuple(tensors[k].requires_grad_() for k in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_torchvision_signature():
    """Same parameter names and defaults as torchvision.ops.deform_conv2d / DeformConv2d."""
    sig = inspect.signature(dt.deform_conv2d)
    assert [(p.name, p.default) for p in sig.parameters.values()] == [
        ("input", inspect.Parameter.empty),
        ("offset", inspect.Parameter.empty),
        ("weight", inspect.Parameter.empty),
        ("bias", None),
        ("stride", (1, 1)),
        ("padding", (0, 0)),
        ("dilation", (1, 1)),
        ("mask", None),
    ]
    sig = inspect.signature(dt.DeformConv2d)
    assert [(p.name, p.default) for p in sig.parameters.values()] == [
        ("in_channels", inspect.Parameter.empty),
        ("out_channels", inspect.Parameter.empty),
        ("kernel_size", inspect.Parameter.empty),
        ("stride", 1),
        ("padding", 0),
        ("dilation", 1),
        ("groups", 1),
        ("bias", True),
    ]


def test_non_contiguous_and_channels_last():
    tensors, params = make_conv_case("v2_basic")
    expected = call_conv(tensors, params)
    t = dict(tensors)
    t["input"] = tensors["input"].to(memory_format=torch.channels_last)
    # a strided view of a larger tensor, and a transposed weight
    big = torch.zeros(
        (2,) + tuple(tensors["offset"].shape[1:3]) + (2 * tensors["offset"].shape[3],), dtype=torch.float64
    )
    big[..., ::2] = tensors["offset"]
    t["offset"] = big[..., ::2]
    t["weight"] = tensors["weight"].transpose(2, 3).contiguous().transpose(2, 3)
    t["mask"] = tensors["mask"].to(memory_format=torch.channels_last)
    assert not t["offset"].is_contiguous() and not t["input"].is_contiguous()
    assert not t["weight"].is_contiguous()
    leaves = [v.requires_grad_() for v in (t["input"], t["weight"])]
    out = call_conv(t, params)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()  # grad_output is an expanded (stride-0) tensor
    ref = da.deform_conv2d_backward(np.ones(out.shape), **as_numpy(tensors), **params)
    np.testing.assert_allclose(leaves[0].grad.numpy(), ref.input, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(leaves[1].grad.numpy(), ref.weight, rtol=1e-12, atol=1e-12)


def test_zero_copy_dlpack():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    a = _glue._to_array(x)
    assert isinstance(a, np.ndarray) and a.ctypes.data == x.data_ptr()
    assert a.strides == tuple(s * x.element_size() for s in x.stride())
    back = _glue._to_tensor(np.ones((2, 3)))
    assert back.dtype == torch.float64 and back.shape == (2, 3)


def test_empty_batch():
    x = torch.zeros(0, 2, 5, 5, requires_grad=True)
    off = torch.zeros(0, 18, 5, 5, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    out = dt.deform_conv2d(x, off, w, padding=1)
    assert out.shape == (0, 3, 5, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.all(w.grad == 0)


def test_errors_are_clear():
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(3, 2, 3, 3)
    with pytest.raises(TypeError, match="dtype"):
        dt.deform_conv2d(x, torch.zeros(1, 18, 5, 5, dtype=torch.float64), w, padding=1)
    with pytest.raises(ValueError, match="offset"):
        dt.deform_conv2d(x, torch.zeros(1, 9, 5, 5), w, padding=1)
    with pytest.raises(TypeError, match="stride"):
        dt.deform_conv2d(x, torch.zeros(1, 18, 5, 5), w, stride=1.5)


HUGE_ARGS = [
    ("stride", lambda x, off, w: dt.deform_conv2d(x, off, w, stride=2**63)),
    ("stride", lambda x, off, w: dt.deform_conv2d(x, off, w, stride=(1, 2**31))),
    ("padding", lambda x, off, w: dt.deform_conv2d(x, off, w, padding=2**63)),
    ("dilation", lambda x, off, w: dt.deform_conv2d(x, off, w, dilation=(2**64, 1))),
    ("padding", lambda x, off, w: dt.deform_conv2d(x, off, w, padding=-(2**63) - 1)),
    ("output_size", lambda x, off, w: dt.deform_roi_pool(x, torch.zeros(1, 5), None, 2**63)),
    ("output_size", lambda x, off, w: dt.deform_roi_pool(x, torch.zeros(1, 5), None, (2, 2**40))),
    ("sampling_ratio", lambda x, off, w: dt.deform_roi_pool(x, torch.zeros(1, 5), None, 2, 1.0, 2**63)),
    (
        "pooled_size",
        lambda x, off, w: dt.deform_psroi_pool(x, torch.zeros(1, 5), output_dim=2, group_size=1, pooled_size=2**63),
    ),
    (
        "part_size",
        lambda x, off, w: dt.deform_psroi_pool(
            x, torch.zeros(1, 5), output_dim=2, group_size=1, pooled_size=2, part_size=2**64
        ),
    ),
]


@pytest.mark.parametrize("named,call", HUGE_ARGS, ids=[f"{a[0]}_{i}" for i, a in enumerate(HUGE_ARGS)])
def test_huge_int_arguments_raise_value_error(named, call):
    """Ints beyond int64 would fail in the dispatcher (the schemas hold int64) with a message
    that names no argument: the functions refuse them first, as the array API does."""
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match=f"^{named} must be"):
        call(x, torch.zeros(1, 18, 1, 1), torch.randn(3, 2, 3, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_on_cpu_computes_in_float32(dtype):
    tensors, params = make_conv_case("v2_basic", torch.float32)
    half = {k: v.to(dtype).requires_grad_() for k, v in tensors.items()}
    out = call_conv(half, params)
    assert out.dtype == dtype
    ref = call_conv({k: v.detach().float() for k, v in half.items()}, params)
    torch.testing.assert_close(out.float(), ref.to(dtype).float(), rtol=0, atol=0)
    out.sum().backward()
    assert all(v.grad.dtype == dtype for v in half.values())


def test_autocast_runs_in_float32():
    """Under CPU autocast the operator sees float32 and returns input's dtype (torchvision)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), dt.ModulatedDeformConv2dPack(4, 3, 3, padding=1))
    x = torch.randn(2, 2, 6, 6)
    ref = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)  # conv2d's bfloat16 output feeds the deformable layer
        single = dt.deform_conv2d(x, torch.zeros(2, 18, 4, 4), torch.randn(3, 2, 3, 3))
    assert out.dtype == torch.bfloat16  # = the dtype of its input
    assert single.dtype == torch.float32  # float32 input: float32 out
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())


def test_deterministic_algorithms_select_deterministic_backward(monkeypatch):
    seen = []
    real = _api.deform_conv2d_backward

    def recording(*args, **kwargs):
        seen.append(kwargs.get("deterministic"))
        return real(*args, **kwargs)

    monkeypatch.setattr(_api, "deform_conv2d_backward", recording)
    tensors, params = make_conv_case("v1_groups_og_stride")
    tensors["input"].requires_grad_()
    call_conv(tensors, params).sum().backward()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        call_conv(tensors, params).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen == [None, True]  # None: deformarray's own default (set_deterministic)


# ---------------------------------------------------------------------------------------
# torch.library registration and torch.compile


def test_opcheck():
    tensors, params = make_conv_case("v2_basic")
    t = {k: v.requires_grad_() for k, v in tensors.items()}
    geo = [[1, 1], [1, 1], [1, 1]]
    op = torch.ops.deformarray.deform_conv2d.default
    torch.library.opcheck(op, (t["input"], t["offset"], t["weight"], t["bias"], *geo, t["mask"]))
    torch.library.opcheck(op, (t["input"], t["offset"], t["weight"], None, *geo, None))
    # The backward operator (not itself differentiable: no double backward)
    plain = {k: v.detach() for k, v in t.items()}
    grad_out = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.deformarray.deform_conv2d_backward.default,
        (grad_out, plain["input"], plain["offset"], plain["weight"], None, *geo, plain["mask"], True),
    )


def _tiny_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        dt.ModulatedDeformConv2dPack(4, 4, 3, padding=1, deform_groups=2),
        torch.nn.ReLU(),
        dt.DeformConv2dPack(4, 2, 3, padding=1, stride=2),
    )
    with torch.no_grad():  # non-zero offsets so the deformable paths are exercised
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d) and m.out_channels > 4:
                m.weight.normal_(0, 0.1)
    return net


def test_compile_fullgraph_forward_backward():
    net = _tiny_net()
    x = torch.randn(2, 2, 7, 7)
    ref = net(x)
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for p, g in zip(net.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_compiled_backward_follows_deterministic_algorithms(monkeypatch):
    """The flag is read when the backward is traced; switching it makes dynamo retrace."""
    seen = []
    real = _api.deform_conv2d_backward

    def recording(*args, **kwargs):
        seen.append(kwargs.get("deterministic"))
        return real(*args, **kwargs)

    monkeypatch.setattr(_api, "deform_conv2d_backward", recording)
    torch._dynamo.reset()
    compiled = torch.compile(dt.DeformConv2dPack(2, 2, 3, padding=1), fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 2, 5, 5)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        for flag in (False, True, False):
            torch.use_deterministic_algorithms(flag)
            compiled(x).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen == [None, True, None]


# ---------------------------------------------------------------------------------------
# Memory format: channels_last in, channels_last out (as torch.nn.functional.conv2d)

CL = torch.channels_last


def _significant_strides(t):
    """Strides of the dimensions of size > 1 (the others do not place any element)."""
    return tuple(st for st, sz in zip(t.stride(), t.shape) if sz > 1)


def _layouts(shape):
    """(name, tensor) pairs of one shape in several memory layouts."""
    t = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    yield "contiguous", t
    yield "channels_last", t.to(memory_format=CL)
    yield "nhcw", t.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    wide = torch.zeros(shape[:3] + (2 * shape[3],), dtype=torch.float64).to(memory_format=CL)
    wide[..., ::2] = t
    yield "channels_last_view", wide[..., ::2]


@pytest.mark.parametrize(
    "geometry",
    [(2, 3, 5, 6, 4, 3), (1, 1, 5, 5, 4, 3), (2, 3, 1, 1, 4, 1), (2, 3, 4, 4, 1, 3)],
    ids=["plain", "one_input_channel", "one_pixel", "one_output_channel"],
)
def test_output_memory_format_follows_conv2d(geometry):
    """For every layout of input and weight, the output has the strides of F.conv2d's output
    (channels_last when input or weight suggests it), ambiguous shapes included."""
    n, c, h, w, c_out, k = geometry
    for (xn, x), (wn, weight) in [(a, b) for a in _layouts((n, c, h, w)) for b in _layouts((c_out, c, k, k))]:
        ref = F.conv2d(x, weight, padding=k // 2)
        offset = torch.zeros(n, 2 * k * k, *ref.shape[2:], dtype=torch.float64)
        out = dt.deform_conv2d(x, offset, weight, padding=k // 2)
        assert _significant_strides(out) == _significant_strides(ref), (xn, wn, out.stride(), ref.stride())
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("which", ["input", "weight", "both"])
def test_channels_last_output_and_gradients(which):
    """channels_last input (or weight): channels_last output, input and weight gradients,
    with the values of the NCHW call, bit for bit."""
    tensors, params = make_conv_case("v2_basic")
    expected = call_conv(tensors, params)
    t = dict(tensors)
    for name in ("input", "weight") if which == "both" else (which,):
        t[name] = tensors[name].to(memory_format=CL)
    assert not t[which if which != "both" else "input"].is_contiguous()
    leaves = {k: v.detach().clone(memory_format=torch.preserve_format).requires_grad_() for k, v in t.items()}
    out = call_conv(leaves, params)
    assert out.is_contiguous(memory_format=CL) and not out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gi, gw = torch.autograd.grad(out, (leaves["input"], leaves["weight"]), grad_out)
    assert gi.is_contiguous(memory_format=CL) and not gi.is_contiguous()
    assert gw.is_contiguous(memory_format=CL) and not gw.is_contiguous()
    ref = da.deform_conv2d_backward(grad_out.numpy(), **as_numpy(tensors), **params)
    np.testing.assert_array_equal(gi.numpy(), ref.input)
    np.testing.assert_array_equal(gw.numpy(), ref.weight)


def test_channels_last_gradcheck():
    tensors, params = make_conv_case("v2_small", torch.float64, seed=2)
    tensors["input"] = tensors["input"].to(memory_format=CL)
    names = [k for k, v in tensors.items() if v is not None]

    def f(*args):
        return call_conv({**tensors, **dict(zip(names, args))}, params)

    inputs = tuple(tensors[k].requires_grad_() for k in names)
    assert f(*inputs).is_contiguous(memory_format=CL)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_channels_last_opcheck():
    """The fake kernels give the strides the real ones do (channels_last), forward and
    backward."""
    tensors, params = make_conv_case("v2_basic")
    t = {k: v.requires_grad_() for k, v in tensors.items()}
    x_cl = t["input"].detach().to(memory_format=CL).requires_grad_()
    geo = [[1, 1], [1, 1], [1, 1]]
    op = torch.ops.deformarray.deform_conv2d.default
    assert op(x_cl, t["offset"], t["weight"], t["bias"], *geo, t["mask"]).is_contiguous(memory_format=CL)
    torch.library.opcheck(op, (x_cl, t["offset"], t["weight"], t["bias"], *geo, t["mask"]))
    w_cl = t["weight"].detach().to(memory_format=CL).requires_grad_()
    torch.library.opcheck(op, (t["input"], t["offset"], w_cl, None, *geo, None))
    grad_out = torch.randn(2, 3, 6, 7, dtype=torch.float64).to(memory_format=CL)
    plain = {k: v.detach() for k, v in t.items()}
    torch.library.opcheck(
        torch.ops.deformarray.deform_conv2d_backward.default,
        (grad_out, x_cl.detach(), plain["offset"], plain["weight"], None, *geo, plain["mask"], False),
    )


def test_channels_last_compile_fullgraph():
    """A channels_last model and input under torch.compile(fullgraph=True): channels_last
    output, values and gradients of the eager run."""
    net = _tiny_net().to(memory_format=CL)
    x = torch.randn(2, 2, 7, 7).to(memory_format=CL)
    x_eager = x.clone().requires_grad_()
    ref = net(x_eager)
    assert ref.is_contiguous(memory_format=CL)
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    x_comp = x.clone().requires_grad_()
    out = compiled(x_comp)
    assert out.is_contiguous(memory_format=CL) and not out.is_contiguous()
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert x_comp.grad.is_contiguous(memory_format=CL)
    torch.testing.assert_close(x_comp.grad, x_eager.grad, rtol=0, atol=0)
    for p, g in zip(net.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Modules


def test_state_dict_keys():
    assert set(dt.DeformConv2d(4, 6, 3).state_dict()) == {"weight", "bias"}
    assert set(dt.DeformConv2d(4, 6, 3, bias=False).state_dict()) == {"weight"}
    assert dt.DeformConv2d(4, 6, (3, 2), groups=2).weight.shape == (6, 2, 3, 2)
    pack = dt.DeformConv2dPack(4, 6, 3, deform_groups=2)
    assert set(pack.state_dict()) == {"weight", "conv_offset.weight", "conv_offset.bias"}
    assert pack.conv_offset.weight.shape == (2 * 2 * 9, 4, 3, 3)
    mpack = dt.ModulatedDeformConv2dPack(4, 6, 3, deform_groups=2)
    assert set(mpack.state_dict()) == {"weight", "bias", "conv_offset.weight", "conv_offset.bias"}
    assert mpack.conv_offset.weight.shape == (3 * 2 * 9, 4, 3, 3)
    assert set(dt.ModulatedDeformConv2d(4, 6, 3).state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("modulated", [False, True])
def test_pack_at_init_is_plain_convolution(modulated):
    torch.manual_seed(0)
    cls = dt.ModulatedDeformConv2dPack if modulated else dt.DeformConv2dPack
    layer = cls(4, 6, 3, stride=(1, 2), padding=1, dilation=(2, 1), groups=2, deform_groups=2)
    layer.double()
    if layer.bias is not None:
        torch.nn.init.uniform_(layer.bias)
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    out = layer(x)
    scale = 0.5 if modulated else 1.0  # mask = sigmoid(0)
    conv = F.conv2d(x, layer.weight * scale, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    torch.testing.assert_close(out, conv, rtol=1e-12, atol=1e-12)


def test_deform_conv2d_module_forward_and_init():
    torch.manual_seed(0)
    layer = dt.DeformConv2d(4, 6, 3, padding=1, groups=2)
    bound = 1 / np.sqrt(2 * 9)  # kaiming_uniform(a=sqrt(5)) on fan_in = 2*3*3
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    x = torch.randn(1, 4, 5, 5)
    off = torch.randn(1, 2 * 9 * 2, 5, 5)  # two offset groups, inferred from offset
    out = layer(x, off)
    expected = dt.deform_conv2d(x, off, layer.weight, layer.bias, padding=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert "DeformConv2d(4, 6, kernel_size=(3, 3)" in repr(layer)


# ---------------------------------------------------------------------------------------
# RoI pooling (present when the array API has them)

needs_roi = pytest.mark.skipif(not hasattr(da, "deform_roi_pool"), reason="deformarray has no deform_roi_pool yet")
needs_psroi = pytest.mark.skipif(
    not hasattr(da, "deform_psroi_pool"), reason="deformarray has no deform_psroi_pool yet"
)

ROIS = [[0, 1.3, 2.2, 7.7, 8.1], [1, 0.5, 0.4, 9.6, 6.2], [0, 3.1, 3.3, 5.2, 9.9]]


@needs_roi
def test_deform_roi_pool_matches_array_api_and_gradcheck():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 10, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(ROIS, dtype=torch.float64)
    off = (0.3 * torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    mask = torch.rand(3, 1, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    kw = dict(output_size=(3, 3), spatial_scale=1.0, sampling_ratio=2, gamma=0.1)
    out = dt.deform_roi_pool(x, rois, off, mask=mask, **kw)
    np.testing.assert_array_equal(
        out.detach().numpy(),
        da.deform_roi_pool(x.detach().numpy(), rois.numpy(), off.detach().numpy(), mask=mask.detach().numpy(), **kw),
    )
    assert torch.autograd.gradcheck(lambda a, b, c: dt.deform_roi_pool(a, rois, b, mask=c, **kw), (x, off, mask))
    out = dt.deform_roi_pool(x, rois, None, 2, 0.5)  # mmcv's positional order
    assert out.shape == (3, 3, 2, 2)
    torch.library.opcheck(torch.ops.deformarray.deform_roi_pool.default, (x, rois, off, [3, 3], 1.0, 2, 0.1, mask))
    torch.library.opcheck(torch.ops.deformarray.deform_roi_pool.default, (x, rois, None, [2, 2], 0.5, 0, 0.1, None))


@needs_roi
@needs_psroi
def test_roi_poolings_return_nchw_for_channels_last_input():
    """As torchvision's roi_align (whose kernels allocate a contiguous output whatever the
    input's layout), the RoI poolings return contiguous NCHW, with the values of the NCHW
    call; the input gradient is contiguous too."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 8, 10, 12, generator=gen, dtype=torch.float64)
    rois = torch.tensor(ROIS, dtype=torch.float64)
    x_cl = x.to(memory_format=CL).requires_grad_()
    calls = [
        lambda a: dt.deform_roi_pool(a, rois, None, (3, 3), 1.0, 2),
        lambda a: dt.deform_psroi_pool(a, rois, output_dim=2, group_size=2, pooled_size=3, sample_per_part=2),
    ]
    for call in calls:
        out = call(x_cl)
        assert out.is_contiguous()
        torch.testing.assert_close(out, call(x), rtol=0, atol=0)
        (g,) = torch.autograd.grad(out.sum(), x_cl)
        assert g.is_contiguous()


@needs_roi
def test_roi_pool_modules():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64)
    rois = torch.tensor(ROIS, dtype=torch.float64)
    plain = dt.DeformRoIPool((2, 3), spatial_scale=1.0, sampling_ratio=2)
    expected = plain(x, rois)
    pack = dt.DeformRoIPoolPack((2, 3), 3, deform_fc_channels=8, sampling_ratio=2).double()
    assert set(pack.state_dict()) == {f"offset_fc.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    torch.testing.assert_close(pack(x, rois), expected)  # zero offsets at init
    mpack = dt.ModulatedDeformRoIPoolPack((2, 3), 3, deform_fc_channels=8, sampling_ratio=2).double()
    assert set(mpack.state_dict()) == (
        {f"offset_fc.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
        | {f"mask_fc.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    )
    torch.testing.assert_close(mpack(x, rois), 0.5 * expected)  # mask = sigmoid(0)
    mod = dt.ModulatedDeformRoIPool((2, 3), sampling_ratio=2)
    torch.testing.assert_close(mod(x, rois, None, torch.full((3, 1, 2, 3), 0.25, dtype=torch.float64)), 0.25 * expected)
    with pytest.raises(ValueError, match="output_channels"):
        pack(x[:, :2], rois)


@needs_psroi
def test_deform_psroi_pool_matches_array_api_and_gradcheck():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2 * 2 * 2, 9, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(ROIS, dtype=torch.float64)
    off = (0.3 * torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64)).requires_grad_()
    kw = dict(output_dim=2, group_size=2, pooled_size=2, sample_per_part=2, trans_std=0.1, spatial_scale=0.8)
    out = dt.deform_psroi_pool(x, rois, off, **kw)
    np.testing.assert_array_equal(
        out.detach().numpy(), da.deform_psroi_pool(x.detach().numpy(), rois.numpy(), off.detach().numpy(), **kw)
    )
    assert torch.autograd.gradcheck(lambda a, b: dt.deform_psroi_pool(a, rois, b, **kw), (x, off))
    module = dt.DeformPSRoIPool(**kw)
    torch.testing.assert_close(module(x, rois, off), out)
    assert module(x, rois).shape == (3, 2, 2, 2)
    torch.library.opcheck(torch.ops.deformarray.deform_psroi_pool.default, (x, rois, off, 2, 2, 2, None, 2, 0.1, 0.8))


# ---------------------------------------------------------------------------------------
# CUDA (run only where a GPU, CuPy and a CUDA build of PyTorch are present)


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("PyTorch sees no CUDA device")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_cuda_matches_cpu(dtype):
    _cuda_or_skip()
    tensors, params = make_conv_case("v2_basic", torch.float64)
    cpu = {k: v.requires_grad_() for k, v in tensors.items()}
    gpu = {k: v.detach().cuda().to(dtype).requires_grad_() for k, v in tensors.items()}
    out_cpu = call_conv(cpu, params)
    out_gpu = call_conv(gpu, params)
    assert out_gpu.device.type == "cuda" and out_gpu.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    scale = float(out_cpu.abs().max())
    torch.testing.assert_close(out_gpu.double().cpu(), out_cpu.detach(), rtol=tol, atol=tol * scale)
    out_cpu.sum().backward()
    out_gpu.sum().backward()
    for k in cpu:
        ref = cpu[k].grad
        torch.testing.assert_close(
            gpu[k].grad.double().cpu(), ref, rtol=tol, atol=tol * max(1.0, float(ref.abs().max())), msg=k
        )


@pytest.mark.gpu
def test_cuda_side_stream_and_determinism():
    _cuda_or_skip()
    tensors, params = make_conv_case("v2_basic", torch.float32)
    expected = call_conv({k: v.cuda() for k, v in tensors.items()}, params)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gpu = {k: v.cuda().requires_grad_() for k, v in tensors.items()}
        out = call_conv(gpu, params)
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            grads = []
            for _ in range(2):
                (g,) = torch.autograd.grad(call_conv(gpu, params).sum(), gpu["input"])
                grads.append(g)
        finally:
            torch.use_deterministic_algorithms(previous)
    stream.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(grads[0], grads[1])
