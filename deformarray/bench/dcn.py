"""DCNv3 / DCNv4 rows of ``deformarray bench`` (``--op dcn``; also behind
``benchmarks/bench_dcn.py``).

``dcnv3`` and ``dcnv4`` forward, and forward then their ``_backward``, against what users
run without a compiled kernel: the ``grid_sample`` composition of InternImage's
``dcnv3_core_pytorch`` (pad the input, reference points plus the dilation grid times
offset_scale, plus offset * offset_scale / [W_pad, H_pad], one ``grid_sample`` on
``(N*G, D, H_pad, W_pad)``, mask-weighted sum over the points), on the same arrays, forward
under ``torch.no_grad`` and forward+backward through autograd (gradients of input, offset
and mask; of input and offset_mask for ``dcnv4``: what our backward returns). DCNv4 ships
no PyTorch path: its composition unpacks ``offset_mask`` into offset and mask, then runs
the same one.

Sizes: a 3x3 kernel, stride 1, padding 1, dilation 1, offset_scale 1 at InternImage-T's
four stages (channels 64, 128, 256, 512 in groups of 4, 8, 16, 32: D = 16; 56x56, 28x28,
14x14, 7x7 for a 224x224 image; N=1), and DCNv4's own benchmark shape (56x56, G=4, D=32,
C=128) with N=4 instead of its 64 on the CPU (N=64 on the GPU). Every row times both
operators: ``dcnv3`` with separate offset and mask, ``dcnv4`` with DCNv4's packed
offset_mask (per group 2P offsets then P masks, padded with zeros to a multiple of 8).
Inputs: input standard normal, offsets standard normal (in pixels), mask a softmax over the
P points of each group, grad_output standard normal.

- CPU rows (numpy arrays): the composition on CPU torch (same thread count as Numba);
  without torch our times alone, with a note.
- GPU rows (cupy arrays): the composition on CUDA torch over the same buffers (zero-copy
  through DLPack); without CUDA torch our times alone.

Timing, meters, progress and table helpers are ``common``'s. This module is one operator
family: it provides the names of ``common.Family``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import common as C
from .common import Impl, Options, Progress, ShapeOption, Step

DCNV3, DCNV4 = "dcnv3", "dcnv4"
OPS = (DCNV3, DCNV4)
FIELDS = ("N", "H", "W", "C", "G")  # then K, optional (default 3)
DEFAULT_K = 3
OFFSET_SCALE = 1.0
PACK = 8  # DCNv4 pads offset_mask's last axis to a multiple of 8


class DcnShape(NamedTuple):
    n: int
    h: int
    w: int
    c: int
    g: int  # groups; D = C // G channels each
    k: int = DEFAULT_K  # a k x k kernel, stride 1, padding k // 2, dilation 1
    variant: str = "given"  # what the size is: "stage 1" (InternImage-T), "DCNv4 bench", ...

    @property
    def d(self) -> int:
        return self.c // self.g

    @property
    def p(self) -> int:
        return self.k * self.k

    @property
    def padding(self) -> int:
        return self.k // 2

    def out_hw(self) -> tuple[int, int]:
        return self.h + 2 * self.padding - self.k + 1, self.w + 2 * self.padding - self.k + 1

    def packed(self) -> int:
        """DCNv4's offset_mask channels: 3*G*P rounded up to a multiple of 8."""
        return -(-3 * self.g * self.p // PACK) * PACK


# InternImage-T (channels 64, groups [4, 8, 16, 32]): D = 16 at every stage, 224x224 image
STAGES = (
    DcnShape(1, 56, 56, 64, 4, variant="stage 1"),
    DcnShape(1, 28, 28, 128, 8, variant="stage 2"),
    DcnShape(1, 14, 14, 256, 16, variant="stage 3"),
    DcnShape(1, 7, 7, 512, 32, variant="stage 4"),
)
# DCNv4's benchmark: N=64, 56x56, G=4, D=32 (C=128); N=4 on 2 CPU cores, 64 on the GPU
DCNV4_BENCH = DcnShape(4, 56, 56, 128, 4, variant="DCNv4 bench")
DEFAULT_CPU_SHAPES = (*STAGES, DCNV4_BENCH)
DEFAULT_GPU_SHAPES = (*STAGES, DCNV4_BENCH._replace(n=64))


def parse_dcn_shapes(text: str) -> list[DcnShape]:
    """``"N,H,W,C,G[,K];..."`` -> shapes (K default 3); ValueError with the offending item
    otherwise."""
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        parts = [p.strip() for p in item.split(",")]
        if len(parts) not in (len(FIELDS), len(FIELDS) + 1) or not all(p.isdigit() for p in parts):
            raise ValueError(
                f"expected {len(FIELDS)} or {len(FIELDS) + 1} positive integers {','.join(FIELDS)}[,K], got {item!r}"
            )
        values = [int(p) for p in parts]
        if min(values) < 1:
            raise ValueError(f"every size must be at least 1, got {item!r}")
        n, h, w, c, g = values[:5]
        shape = DcnShape(n, h, w, c, g, values[5] if len(values) > 5 else DEFAULT_K)
        if shape.c % shape.g:
            raise ValueError(f"C must be a multiple of G (C = G*D), got {item!r}")
        shapes.append(shape)
    if not shapes:
        raise ValueError("no shape given")
    return shapes


# ---------------------------------------------------------------------------------------
# The family's names (common.Family)
# ---------------------------------------------------------------------------------------


NAME = "dcn"
OPERATORS = f"{DCNV3} and {DCNV4}"
SUMMARY = "DCNv3 / DCNv4"
DESCRIPTION = (
    f"{DCNV3} and {DCNV4} (InternImage-T's stages and DCNv4's benchmark size) against the torch grid_sample "
    "composition (InternImage's dcnv3_core_pytorch, when torch is importable)"
)
ROWS = "the dcnv3 / dcnv4 rows"
ROW_OPS: tuple[str, ...] = OPS
CONTENDERS: tuple[str, ...] = ("ours", "composition")
SHAPE_OPTIONS: tuple[ShapeOption, ...] = (
    ShapeOption(
        "--dcn-shapes",
        parse_dcn_shapes,
        '"N,H,W,C,G[,K];..."',
        f"{DCNV3} / {DCNV4} sizes: N images of HxW with C = G*D channels in G groups, a KxK kernel "
        "(default 3), stride 1, padding K//2; both operators on each (default: InternImage-T's stages "
        "1,56,56,64,4; 1,28,28,128,8; 1,14,14,256,16; 1,7,7,512,32 and DCNv4's benchmark size "
        "4,56,56,128,4 (N=64 there; on GPU 64))",
    ),
)


def settings() -> dict:
    """The fixed parameters of the rows, for the JSON report (under "dcn")."""
    return {
        "dcn": {
            "geometry": "KxK kernel, stride 1, padding K//2, dilation 1, offset_scale 1",
            "input": "standard normal",
            "offset": "standard normal (pixels)",
            "mask": "softmax over the P points of each group of standard normal logits",
            "offset_mask": f"DCNv4's packing: per group 2P offsets then P masks, zero-padded to a multiple of {PACK}",
            "grad_output": "standard normal",
            "reference": "torch grid_sample composition of dcnv3_core_pytorch (bilinear, zeros, align_corners=False)",
        }
    }


@dataclass
class DcnCase:
    backend: str  # "numpy" | "cupy"
    op: str  # "dcnv3" | "dcnv4"
    shape: DcnShape
    dtype: str

    def shape_dict(self) -> dict:
        s = self.shape
        h_out, w_out = s.out_hw()
        return {
            "N": s.n,
            "H": s.h,
            "W": s.w,
            "C": s.c,
            "G": s.g,
            "D": s.d,
            "K": s.k,
            "P": s.p,
            "stride": 1,
            "padding": s.padding,
            "H_out": h_out,
            "W_out": w_out,
            "offset_mask_channels": s.packed(),
        }


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------


class DcnInputs(NamedTuple):
    input: Any  # (N, H, W, G*D)
    offset: Any  # (N, H_out, W_out, G*P*2)
    mask: Any  # (N, H_out, W_out, G*P)
    offset_mask: Any  # (N, H_out, W_out, packed): the same offsets and masks, DCNv4's layout
    grad_output: Any  # (N, H_out, W_out, G*D)

    def map(self, fn: Callable[[Any], Any]) -> DcnInputs:
        return DcnInputs(*(fn(a) for a in self))


def pack_offset_mask(offset: np.ndarray, mask: np.ndarray, g: int, packed: int) -> np.ndarray:
    """DCNv4's offset_mask from DCNv3's offset and mask: per group its 2P offsets, then its P
    masks; zeros up to ``packed`` channels."""
    n, h, w, _ = mask.shape
    om = np.concatenate([offset.reshape(n, h, w, g, -1), mask.reshape(n, h, w, g, -1)], -1).reshape(n, h, w, -1)
    return np.pad(om, [(0, 0)] * 3 + [(0, packed - om.shape[-1])])


def make_inputs(shape: DcnShape, dtype: str, seed: int = 0) -> DcnInputs:
    """Random NumPy arguments of one call in ``dtype`` (drawn in float32, then cast: the same
    numbers for every dtype)."""
    rng = np.random.default_rng(seed)
    n, g, p = shape.n, shape.g, shape.p
    h_out, w_out = shape.out_hw()
    x = rng.standard_normal((n, shape.h, shape.w, shape.c), dtype=np.float32)
    offset = rng.standard_normal((n, h_out, w_out, g * p * 2), dtype=np.float32)
    logits = rng.standard_normal((n, h_out, w_out, g, p), dtype=np.float32)
    mask = np.exp(logits - logits.max(-1, keepdims=True))
    mask = (mask / mask.sum(-1, keepdims=True)).reshape(n, h_out, w_out, g * p)
    grad_output = rng.standard_normal((n, h_out, w_out, shape.c), dtype=np.float32)
    om = pack_offset_mask(offset, mask, g, shape.packed())
    return DcnInputs(*(np.ascontiguousarray(a, dtype=dtype) for a in (x, offset, mask, om, grad_output)))


# ---------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------


def _geometry(shape: DcnShape) -> dict:
    return dict(
        kernel_size=shape.k, stride=1, padding=shape.padding, dilation=1, group=shape.g, offset_scale=OFFSET_SCALE
    )


def ours_impl(op: str, shape: DcnShape, a: DcnInputs, sync: Callable[[], None], meter: Callable | None) -> Impl:
    """Our operator on whatever array type ``a`` holds; fwd+bwd = forward, then backward."""
    import deformarray as da

    geo = _geometry(shape)
    if op == DCNV3:

        def fwd():
            return da.dcnv3(a.input, a.offset, a.mask, **geo)

        def bwd():
            return da.dcnv3_backward(a.grad_output, a.input, a.offset, a.mask, **geo)

    else:

        def fwd():
            return da.dcnv4(a.input, a.offset_mask, **geo)

        def bwd():
            return da.dcnv4_backward(a.grad_output, a.input, a.offset_mask, **geo)

    def fwdbwd():
        y = fwd()
        return y, tuple(bwd())

    return Impl("ours", f"deformarray.{op}", fwd, fwdbwd, sync, meter)


def grid_sample_composition(torch: Any, shape: DcnShape) -> Callable:
    """``(input, offset, mask) -> (N, H_out, W_out, G*D)`` the way InternImage's
    ``dcnv3_core_pytorch`` computes it (stride 1, dilation 1, ``shape``'s kernel and
    padding): pad the input, reference points of the padded image plus the kernel's
    dilation grid times offset_scale, normalised by the padded size, plus offset *
    offset_scale / [W_pad, H_pad]; one ``grid_sample`` on ``(N*G, D, H_pad, W_pad)`` at
    ``2*loc - 1``; the mask-weighted sum over the points.

    Two liberties that change no timing: the reference points and the grid are built in
    the input's dtype (InternImage: float32, whatever the input) and broadcast over N
    (InternImage: ``repeat``); the padding goes on the axes it names (InternImage swaps
    pad_h and pad_w, harmless when they are equal, as here)."""
    F = torch.nn.functional
    g, d, k, p, pad = shape.g, shape.d, shape.k, shape.p, shape.padding
    ext = (k - 1) // 2  # (dilation * (k - 1)) // 2

    def composition(input, offset, mask):
        n, h, w, c = input.shape
        _, h_out, w_out, _ = offset.shape
        dtype, device = input.dtype, input.device
        x = F.pad(input, [0, 0, pad, pad, pad, pad])  # (N, H_pad, W_pad, C)
        hp, wp = h + 2 * pad, w + 2 * pad
        # reference points (the window centres) of the padded image, normalised
        ref_y = torch.linspace(ext + 0.5, ext + 0.5 + (h_out - 1), h_out, dtype=dtype, device=device) / hp
        ref_x = torch.linspace(ext + 0.5, ext + 0.5 + (w_out - 1), w_out, dtype=dtype, device=device) / wp
        ref_y, ref_x = torch.meshgrid(ref_y, ref_x, indexing="ij")
        ref = torch.stack((ref_x, ref_y), -1).reshape(1, h_out, w_out, 1, 2)
        # the kernel's taps, x-major (point i*k + j, i along the width), repeated per group
        taps = torch.linspace(-ext, -ext + (k - 1), k, dtype=dtype, device=device)
        gx, gy = torch.meshgrid(taps, taps, indexing="ij")
        grid = torch.stack((gx / wp, gy / hp), -1).reshape(-1, 1, 2).repeat(1, g, 1).permute(1, 0, 2)
        grid = grid.reshape(1, 1, 1, g * p, 2)
        norm = torch.tensor([wp, hp], dtype=dtype, device=device).repeat(g * p)
        loc = (ref + grid * OFFSET_SCALE).flatten(3, 4) + offset * OFFSET_SCALE / norm
        grids = 2 * loc - 1
        # (N, H_pad, W_pad, G*D) -> (N*G, D, H_pad, W_pad)
        img = x.reshape(n, hp * wp, c).transpose(1, 2).reshape(n * g, d, hp, wp)
        # (N, H_out, W_out, G*P*2) -> (N*G, H_out*W_out, P, 2)
        grid_ = grids.reshape(n, h_out * w_out, g, p, 2).transpose(1, 2).flatten(0, 1)
        # (N*G, D, H_out*W_out, P)
        samples = F.grid_sample(img, grid_, mode="bilinear", padding_mode="zeros", align_corners=False)
        m = mask.reshape(n, h_out * w_out, g, p).transpose(1, 2).reshape(n * g, 1, h_out * w_out, p)
        out = (samples * m).sum(-1).view(n, c, h_out * w_out)
        return out.transpose(1, 2).reshape(n, h_out, w_out, c).contiguous()

    return composition


def dcnv4_composition(torch: Any, shape: DcnShape) -> Callable:
    """``(input, offset_mask) -> output``: DCNv4's packed offset_mask unpacked into DCNv3's
    offset and mask, then ``grid_sample_composition`` (DCNv4 ships no PyTorch path)."""
    v3 = grid_sample_composition(torch, shape)
    g, p = shape.g, shape.p

    def composition(input, offset_mask):
        n, h_out, w_out, _ = offset_mask.shape
        groups = offset_mask[..., : 3 * g * p].reshape(n, h_out, w_out, g, 3 * p)
        offset = groups[..., : 2 * p].reshape(n, h_out, w_out, g * p * 2)
        mask = groups[..., 2 * p :].reshape(n, h_out, w_out, g * p)
        return v3(input, offset, mask)

    return composition


def composition_impl(
    op: str,
    shape: DcnShape,
    torch: Any,
    t: DcnInputs,
    sync: Callable[[], None] = C.noop,
    meter: Callable | None = None,
) -> Impl:
    """The grid_sample composition on torch tensors (CPU or CUDA); autograd w.r.t. input,
    offset and mask (``dcnv3``) or input and offset_mask (``dcnv4``)."""
    device = "CUDA" if t.input.is_cuda else "CPU"
    label = f"grid_sample composition (torch {torch.__version__}, {device})"
    args: tuple
    if op == DCNV3:
        fn, args = grid_sample_composition(torch, shape), (t.input, t.offset, t.mask)
    else:
        fn, args = dcnv4_composition(torch, shape), (t.input, t.offset_mask)
    return C.torch_autograd_impl("composition", label, torch, fn, args, t.grad_output, sync, meter)


def cpu_builder(torch: Any | None) -> Callable:
    """``build((op, shape), inputs)``: ours and, with torch, the composition on CPU."""
    return C.composition_builder(ours_impl, composition_impl, torch)


def gpu_builder(cupy: Any, torch: Any | None) -> Callable:
    """``torch``: CUDA torch, or None (our rows alone)."""
    return C.composition_builder(ours_impl, composition_impl, torch, cupy)


# ---------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------


def run_case(case: DcnCase, build: Callable, repeat: int, progress: Progress) -> dict:
    """Measure ours and the composition for one case, interleaved; ratios are ours / composition."""

    def impls() -> list[Impl]:
        return build((case.op, case.shape), make_inputs(case.shape, case.dtype))

    return C.composition_row(case.op, case, row_label, impls, repeat, progress)


def _cases(backend: str, dtypes: tuple, shapes: list[DcnShape]) -> list[DcnCase]:
    """Per dtype, per shape, both operators (a shape's two rows are adjacent)."""
    return [DcnCase(backend, op, s, d) for d in dtypes for s in shapes for op in OPS]


def _shapes(opts: Options, defaults: tuple) -> list[DcnShape]:
    return list(opts.shapes.get("dcn_shapes") or defaults)


def cpu_steps(opts: Options, torch: Any | None, torch_reason: str, notes: list) -> list[Step]:
    if torch is None:
        notes.append(f"{torch_reason}: no grid_sample composition for the CPU {DCNV3} / {DCNV4} rows")
    build = cpu_builder(torch)
    cases = _cases("numpy", (opts.dtype or "float32",), _shapes(opts, DEFAULT_CPU_SHAPES))
    return [Step("numpy", functools.partial(run_case, c, build)) for c in cases]


def gpu_steps(opts: Options, cupy: Any, torch: Any | None, tv: Any | None) -> list[Step]:
    """The composition needs CUDA torch only (not torchvision); without it, our rows alone
    (``common.gpu_references`` has said why)."""
    cuda_torch = torch if torch is not None and torch.cuda.is_available() else None
    build = gpu_builder(cupy, cuda_torch)
    dtypes = (opts.dtype,) if opts.dtype else C.DEFAULT_GPU_DTYPES
    cases = _cases("cupy", dtypes, _shapes(opts, DEFAULT_GPU_SHAPES))
    return [Step("cupy", functools.partial(run_case, c, build)) for c in cases]


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def shape_text(row: dict) -> str:
    s = row["shape"]
    return f"{s['N']},{s['H']}x{s['W']},{s['C']},{s['G']},{s['K']}x{s['K']}"


def row_label(row: dict) -> str:
    return f"{row['backend']} {row['op']} ({row['variant']}) {shape_text(row)} {row['dtype']}"


def chart_label(row: dict) -> tuple[str, str]:
    variant = {"given": "", "DCNv4 bench": "v4 bench"}.get(row["variant"], row["variant"])
    return f"{row['op']} {variant}".strip(), shape_text(row)


_LEAD = [("case", lambda r: r["variant"]), ("op", lambda r: r["op"]), ("N,HxW,C,G,KxK", shape_text)]


TITLE = f"DCNv3 / DCNv4 ({DCNV3}, {DCNV4}; stride 1, padding K//2; stage k = InternImage-T's stage k)"


def format_sections(rows: list[dict], gpu_name: str | None) -> list[str]:
    """The CPU and GPU dcnv3 / dcnv4 tables (lines), empty when no such row ran."""
    gradients = "input, offset and mask gradients; dcnv4: input and offset_mask"
    return C.composition_sections(rows, gpu_name, TITLE, _LEAD, gradients)
