"""ONNX export (docs/deployment.md): plain ``torch.onnx.export`` of models using
deformarray.torch writes the standard ``DeformConv`` for deform_conv2d, which ONNX Runtime
runs with deformarray's numbers, and ``deformarray``-domain nodes for the other operators
(their inputs and attributes checked here, and the ONNX checker passing); an
``ExportedProgram`` holding the ``deformarray::`` operators exports through
``deformarray.torch.onnx``. Each test exports one model holding several cases (an export
costs seconds, a case in it almost nothing)."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # what torch.onnx.export(dynamo=True) builds with

import deformarray.torch as dt  # noqa: E402
import deformarray.torch.onnx as dto  # noqa: E402
from deformarray.torch import _onnx_nodes  # noqa: E402


def _export(model, args, **kwargs):
    program = torch.onnx.export(model.eval(), args, dynamo=True, verbose=False, **kwargs)
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _run(proto, args):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(args)
    return session.run(None, {n: a.detach().numpy() for n, a in zip(names, args)})


def _nodes(proto, op_type):
    return [n for n in proto.graph.node if n.op_type == op_type]


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _attr_types(node):
    return {a.name: onnx.AttributeProto.AttributeType.Name(a.type) for a in node.attribute}


def _opsets(proto):
    return {o.domain: o.version for o in proto.opset_import}


def _close(got, want, rtol=1e-4):
    """float32 within ``rtol`` relative to the largest magnitude of the reference."""
    want = np.asarray(want)
    assert got.shape == want.shape
    scale = max(float(np.abs(want).max()), 1e-30)
    assert float(np.abs(got - want).max()) <= rtol * scale


# ---------------------------------------------------------------------------------------
# deform_conv2d -> ONNX DeformConv, run by ONNX Runtime

# (N, C_in, C_out, H, W, (kh, kw), stride, padding, dilation, groups, offset_groups, mask, bias)
CONV_CASES = [
    (2, 4, 6, 7, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True),
    (1, 4, 6, 9, 7, (3, 3), (2, 1), (0, 2), (1, 2), 2, 2, False, True),
    (2, 4, 3, 8, 8, (2, 3), (2, 2), (1, 1), (2, 2), 1, 4, True, False),
    (1, 4, 8, 6, 5, (1, 1), (1, 2), (0, 0), (1, 1), 4, 2, False, False),
    (1, 6, 4, 5, 6, (3, 2), (1, 1), (2, 1), (2, 1), 2, 3, True, False),
]


def _out_size(size, k, s, p, d):
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


class _ConvCases(torch.nn.Module):
    """Every case of CONV_CASES in one model: inputs x, offset (and mask) per case."""

    def __init__(self, cases, generator):
        super().__init__()
        self.cases = cases
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        for _, c_in, c_out, _, _, (kh, kw), *_, groups, _, _, bias in cases:
            self.weights.append(torch.randn(c_out, c_in // groups, kh, kw, generator=generator))
            self.biases.append(torch.randn(c_out, generator=generator) if bias else torch.zeros(0))

    def forward(self, *inputs):
        outs, it = [], iter(inputs)
        for i, (*_, stride, padding, dilation, _, _, mask, bias) in enumerate(self.cases):
            x, offset = next(it), next(it)
            m = next(it) if mask else None
            b = self.biases[i] if bias else None
            outs.append(dt.deform_conv2d(x, offset, self.weights[i], b, stride, padding, dilation, m))
        return tuple(outs)


def _conv_inputs(cases, generator, scale=2.0):
    """Random inputs; offsets of about ``scale`` pixels carry many points out of the image."""
    inputs = []
    for n, c_in, _, h, w, (kh, kw), stride, padding, dilation, _, og, mask, _ in cases:
        ho = _out_size(h, kh, stride[0], padding[0], dilation[0])
        wo = _out_size(w, kw, stride[1], padding[1], dilation[1])
        inputs.append(torch.randn(n, c_in, h, w, generator=generator))
        inputs.append(scale * torch.randn(n, 2 * og * kh * kw, ho, wo, generator=generator))
        if mask:
            inputs.append(torch.rand(n, og * kh * kw, ho, wo, generator=generator))
    return inputs


def test_deform_conv2d_exports_as_onnx_deform_conv_and_onnxruntime_agrees():
    g = torch.Generator().manual_seed(0)
    model = _ConvCases(CONV_CASES, g)
    inputs = _conv_inputs(CONV_CASES, g)
    proto = _export(model, tuple(inputs))
    assert _opsets(proto)[""] >= 19
    assert "deformarray" not in _opsets(proto)  # nothing of deformarray's own domain
    nodes = _nodes(proto, "DeformConv")
    assert len(nodes) == len(CONV_CASES)
    assert all(n.domain == "" for n in nodes)
    for node, case in zip(nodes, CONV_CASES):
        _, c_in, _, _, _, kernel, stride, padding, dilation, groups, og, mask, bias = case
        assert _attrs(node) == dict(
            dilations=list(dilation),
            group=groups,
            kernel_shape=list(kernel),
            offset_group=og,
            pads=[padding[0], padding[1], padding[0], padding[1]],
            strides=list(stride),
        )
        # X, W, offset, B, mask; an absent B before a mask is the empty name, trailing ones are left out
        assert len(node.input) == (5 if mask else 4 if bias else 3)
        assert (node.input[3] != "") == bias if len(node.input) > 3 else not bias
    with torch.no_grad():
        want = model(*inputs)
    got = _run(proto, inputs)
    for g_, w_ in zip(got, want):
        _close(g_, w_.numpy())


def test_deform_conv_modules_export_and_onnxruntime_agrees():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.v1 = dt.DeformConv2dPack(3, 4, 3, padding=1, deform_groups=1)
            self.v2 = dt.ModulatedDeformConv2dPack(4, 6, 3, stride=2, padding=2, dilation=2, deform_groups=2, bias=True)
            self.tv = dt.DeformConv2d(6, 4, (3, 2), padding=(1, 0), groups=2, bias=False)
            for pack in (self.v1, self.v2):  # zero-initialised offsets would sample the grid only
                torch.nn.init.normal_(pack.conv_offset.weight, std=0.3)

        def forward(self, x, offset, mask):
            y = self.v2(self.v1(x))
            return self.tv(y, offset, mask), self.tv(y, offset)

    net = Net()
    x = torch.randn(2, 3, 9, 10, generator=g)
    with torch.no_grad():
        y = net.v2(net.v1(x))
    ho, wo = y.shape[2], y.shape[3] - 1
    offset = 2 * torch.randn(2, 2 * 3 * 6, ho, wo, generator=g)  # 3 offset groups
    mask = torch.rand(2, 3 * 6, ho, wo, generator=g)
    proto = _export(net, (x, offset, mask))
    nodes = _nodes(proto, "DeformConv")
    assert [(_attrs(n)["group"], _attrs(n)["offset_group"], len(n.input)) for n in nodes] == [
        (1, 1, 3),  # DeformConv2dPack: no bias (mmcv's default), no mask
        (1, 2, 5),  # ModulatedDeformConv2dPack: bias and mask
        (2, 3, 5),  # DeformConv2d(bias=False) with a mask: B is the empty name
        (2, 3, 3),  # ... without
    ]
    assert nodes[2].input[3] == ""
    with torch.no_grad():
        want = net(x, offset, mask)
    for g_, w_ in zip(_run(proto, (x, offset, mask)), want):
        _close(g_, w_.numpy())


def test_onnxruntime_conventions_at_the_border_and_beyond():
    """Where the sampling points fall at the image's edge or outside it, ONNX Runtime's
    DeformConv gives deformarray's numbers (torchvision's rules: a point at y <= -1 or
    y >= H, likewise x, samples 0; inside, the corners outside count 0), NaN offsets
    sample 0 in both; one difference: an infinite mask value at a point inside the image
    gives +-inf in ONNX Runtime (the sampled value times the mask) and NaN in deformarray
    where one of the point's four corners weighs 0 (a point on a row or column of the
    grid), as deformarray multiplies the mask into each corner's weight."""

    class Conv(torch.nn.Module):
        def forward(self, x, offset, weight, mask):
            return dt.deform_conv2d(x, offset, weight, mask=mask)

    h = w = 5
    x = torch.randn(1, 1, h, w, generator=torch.Generator().manual_seed(2))
    weight = torch.ones(1, 1, 1, 1)
    ones = torch.ones(1, 1, h, w)
    proto = _export(Conv(), (x, torch.zeros(1, 2, h, w), weight, ones))

    rows = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    cols = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    # Every output (i, j) samples row `target` (then column `target`): the offsets are target - i
    targets = [-1.5, -1.0, -0.999, -0.5, -1e-3, 0.0, 0.5, h - 1.5, h - 1.0, h - 1 + 1e-3, h - 0.5, h - 1e-3, h, h + 0.5]
    targets += [float("nan"), float("inf"), -float("inf"), 1e10, -1e10, 2.0**31 + 0.5]
    for target in targets:
        for offset in (
            torch.stack([target - rows, torch.zeros(h, w)])[None],
            torch.stack([torch.zeros(h, w), target - cols])[None],
        ):
            want = Conv()(x, offset, weight, ones).numpy()
            (got,) = _run(proto, (x, offset, weight, ones))
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            _close(got, want, rtol=1e-6)

    mask = torch.ones(1, 1, h, w)
    mask[0, 0, 0, 0] = float("nan")
    mask[0, 0, 1, 1] = float("inf")
    mask[0, 0, 2, 2] = -float("inf")
    # on the grid (a corner weight 0), between pixels (all four corners weigh), outside
    for shift in (0.0, 0.25, -3.0):
        offset = torch.full((1, 2, h, w), shift)
        want = Conv()(x, offset, weight, mask).numpy()
        (got,) = _run(proto, (x, offset, weight, mask))
        finite = np.isfinite(mask.numpy())
        _close(got[finite], want[finite], rtol=1e-6)
        assert np.isnan(got[0, 0, 0, 0]) and np.isnan(want[0, 0, 0, 0])  # a NaN mask: NaN in both
        infinite = np.array([got[0, 0, 1, 1], got[0, 0, 2, 2]]), np.array([want[0, 0, 1, 1], want[0, 0, 2, 2]])
        signs = np.sign([float(x[0, 0, 1, 1]), -float(x[0, 0, 2, 2])]) * np.inf
        if shift == 0.0:  # deformarray: the mask times each corner's weight, 0 * inf is NaN
            np.testing.assert_array_equal(infinite, [signs, [np.nan, np.nan]])
        elif shift == 0.25:  # +-inf in both
            np.testing.assert_array_equal(infinite[0], infinite[1])
            assert np.isinf(infinite[0]).all()
        else:  # outside: the sampled 0 times inf, NaN in both
            np.testing.assert_array_equal(infinite, np.full((2, 2), np.nan))


def test_opset_below_19_is_refused_by_the_helper():
    with pytest.raises(ValueError, match="opset 19"):
        dto.export(torch.nn.Identity(), (torch.zeros(1),), opset_version=18)
    with pytest.raises(ValueError, match="dynamo=True"):
        dto.export(torch.nn.Identity(), (torch.zeros(1),), dynamo=False)


# ---------------------------------------------------------------------------------------
# The other operators: nodes of the deformarray domain


class _Others(torch.nn.Module):
    """deform_roi_pool (with offset and mask, and without), deform_psroi_pool, ms_deform_attn
    (geometry as graph inputs, and as constants), dcnv3 and dcnv4 in one model."""

    def forward(
        self, x, rois, offset, mask, ps_x, ps_offset, value, shapes, starts, locations, weights, x3, o3, m3, om4
    ):
        return (
            dt.deform_roi_pool(x, rois, offset, (3, 2), spatial_scale=0.5, sampling_ratio=2, gamma=0.2, mask=mask),
            dt.deform_roi_pool(x, rois, output_size=3),
            dt.deform_psroi_pool(
                ps_x, rois, ps_offset, output_dim=2, group_size=2, pooled_size=3, sample_per_part=2, spatial_scale=0.5
            ),
            dt.ms_deform_attn(value, shapes, starts, locations, weights),
            dt.ms_deform_attn(value, [[4, 4], [2, 2]], [0, 16], locations, weights),
            dt.dcnv3(x3, o3, m3, kernel_size=3, stride=(2, 1), padding=1, dilation=(1, 2), group=2, offset_scale=0.5),
            dt.dcnv4(x3, om4, kernel_size=(3, 1), padding=(1, 0), group=2, group_channels=2, remove_center=True),
        )


def _others_inputs():
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 6.0], [1, 0.0, 2.0, 5.0, 7.0]])
    shapes = torch.tensor([[4, 4], [2, 2]])
    starts = torch.tensor([0, 16])
    return (
        r(2, 4, 8, 8),
        rois,
        r(2, 2, 3, 2),
        u(2, 1, 3, 2),
        r(2, 8, 8, 8),
        r(2, 2, 3, 3),
        r(1, 20, 2, 3),
        shapes,
        starts,
        u(1, 5, 2, 2, 3, 2),
        u(1, 5, 2, 2, 3),
        r(1, 5, 5, 4),
        r(1, 3, 3, 2 * 9 * 2),
        u(1, 3, 3, 2 * 9),
        r(1, 5, 5, 16),
    )


EXPECTED_OTHERS = [
    # (op_type, number of inputs, attributes with their ONNX types)
    (
        "DeformRoIPool",
        4,
        dict(
            output_size=([3, 2], "INTS"), spatial_scale=(0.5, "FLOAT"), sampling_ratio=(2, "INT"), gamma=(0.2, "FLOAT")
        ),
    ),
    (
        "DeformRoIPool",
        2,
        dict(
            output_size=([3, 3], "INTS"), spatial_scale=(1.0, "FLOAT"), sampling_ratio=(0, "INT"), gamma=(0.1, "FLOAT")
        ),
    ),
    (
        "DeformPSRoIPool",
        3,
        dict(
            output_dim=(2, "INT"),
            group_size=(2, "INT"),
            pooled_size=(3, "INT"),
            part_size=(3, "INT"),
            sample_per_part=(2, "INT"),
            trans_std=(0.1, "FLOAT"),
            spatial_scale=(0.5, "FLOAT"),
        ),
    ),
    ("MultiScaleDeformableAttention", 5, {}),
    ("MultiScaleDeformableAttention", 5, {}),
    (
        "DCNv3",
        3,
        dict(
            kernel_size=([3, 3], "INTS"),
            stride=([2, 1], "INTS"),
            padding=([1, 1], "INTS"),
            dilation=([1, 2], "INTS"),
            group=(2, "INT"),
            group_channels=(2, "INT"),
            offset_scale=(0.5, "FLOAT"),
            remove_center=(0, "INT"),
        ),
    ),
    (
        "DCNv4",
        2,
        dict(
            kernel_size=([3, 1], "INTS"),
            stride=([1, 1], "INTS"),
            padding=([1, 0], "INTS"),
            dilation=([1, 1], "INTS"),
            group=(2, "INT"),
            group_channels=(2, "INT"),
            offset_scale=(1.0, "FLOAT"),
            remove_center=(1, "INT"),
        ),
    ),
]


def _check_others(proto, want_shapes, skip=0):
    """The nodes of _Others in ``proto``, whose first ``skip`` inputs and outputs are not theirs."""
    assert _opsets(proto)["deformarray"] == _onnx_nodes.DOMAIN_VERSION == 1
    nodes = [n for n in proto.graph.node if n.domain == "deformarray"]
    assert [n.op_type for n in nodes] == [e[0] for e in EXPECTED_OTHERS]
    graph_inputs = [i.name for i in proto.graph.input][skip:]
    constants = {i.name: i for i in proto.graph.initializer}
    constants.update({o: n for n in proto.graph.node if n.op_type == "Constant" for o in n.output})
    for node, (op_type, n_inputs, attrs) in zip(nodes, EXPECTED_OTHERS):
        assert len(node.input) == n_inputs, op_type
        assert all(name in graph_inputs or name in constants for name in node.input), op_type
        got = _attrs(node)
        assert set(got) == set(attrs), op_type
        assert _attr_types(node) == {k: t for k, (_, t) in attrs.items()}, op_type
        for k, (v, _) in attrs.items():
            assert got[k] == pytest.approx(v), (op_type, k)
    # the node inputs are the operators' tensors in order
    x, rois, offset, mask, ps_x, ps_offset, value, shapes, starts, locations, weights, x3, o3, m3, om4 = graph_inputs
    assert list(nodes[0].input) == [x, rois, offset, mask]
    assert list(nodes[1].input) == [x, rois]
    assert list(nodes[2].input) == [ps_x, rois, ps_offset]
    assert list(nodes[3].input) == [value, shapes, starts, locations, weights]
    assert nodes[4].input[0] == value and list(nodes[4].input[3:]) == [locations, weights]
    assert list(nodes[5].input) == [x3, o3, m3]
    assert list(nodes[6].input) == [x3, om4]
    # the geometry given as lists: int64 constants holding the values
    for name, values in zip(nodes[4].input[1:3], ([[4, 4], [2, 2]], [0, 16])):
        c = constants[name]
        array = onnx.numpy_helper.to_array(c if isinstance(c, onnx.TensorProto) else c.attribute[0].t)
        assert array.dtype == np.int64 and array.tolist() == values
    # output shapes and dtypes as deformarray's
    outputs = proto.graph.output[skip:]
    assert len(outputs) == len(want_shapes)
    for out, shape in zip(outputs, want_shapes):
        assert [d.dim_value for d in out.type.tensor_type.shape.dim] == list(shape)
        assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


# the outputs' shapes (no eager call: the export needs the fake kernels only, and a first
# call of the CPU kernels would compile them, which takes longer than the export)
OTHERS_SHAPES = [(2, 4, 3, 2), (2, 4, 3, 3), (2, 2, 3, 3), (1, 5, 6), (1, 5, 6), (1, 3, 3, 4), (1, 5, 5, 4)]


def test_other_operators_export_as_deformarray_domain_nodes():
    proto = _export(_Others(), _others_inputs())
    _check_others(proto, OTHERS_SHAPES)


def test_exported_program_with_deformarray_operators_exports_through_the_helper():
    """torch.export.export keeps the deformarray:: operators; deformarray.torch.onnx.export
    turns them into the same nodes (DECOMPOSITIONS), and ONNX Runtime runs the DeformConv."""
    assert set(dto.DECOMPOSITIONS) == {
        getattr(torch.ops.deformarray, name).default
        for name in ("deform_conv2d", "deform_roi_pool", "deform_psroi_pool", "ms_deform_attn", "dcnv3", "dcnv4")
    }

    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = dt.ModulatedDeformConv2dPack(3, 4, 3, padding=1, bias=True)
            torch.nn.init.normal_(self.conv.conv_offset.weight, std=0.3)
            self.others = _Others()

        def forward(self, y, *inputs):
            return (self.conv(y), *self.others(*inputs))

    y = torch.randn(1, 3, 6, 7, generator=torch.Generator().manual_seed(4))
    inputs = (y, *_others_inputs())
    model = Both().eval()
    ep = torch.export.export(model, inputs)
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.deformarray.deform_conv2d.default in targets
    assert torch.ops.deformarray.dcnv4.default in targets
    proto = dto.export(ep, verbose=False).model_proto
    onnx.checker.check_model(proto, full_check=True)
    _check_others(proto, OTHERS_SHAPES, skip=1)
    (conv,) = _nodes(proto, "DeformConv")
    assert _attrs(conv)["kernel_shape"] == [3, 3] and len(conv.input) == 5

    # ONNX Runtime runs the DeformConv part: the graph cut after it
    cut = onnx.utils.Extractor(proto).extract_model([proto.graph.input[0].name], [proto.graph.output[0].name])
    (got,) = _run(cut, (y,))
    with torch.no_grad():
        _close(got, model.conv(y).numpy())


def test_importing_deformarray_torch_imports_nothing_of_onnx():
    code = (
        "import sys, deformarray.torch\n"
        "print(sorted(m for m in ('torch.onnx', 'onnx', 'onnxscript', 'onnxruntime') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert not _onnx_nodes.exporting()  # outside torch.onnx.export
