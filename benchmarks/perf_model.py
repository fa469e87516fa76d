"""Performance MODEL of deform_conv2d on an H200: time floors per kernel from bytes, FLOPs and
instruction issue. A MODEL, not a measurement: nothing here ran on a GPU.

For each shape of the benchmark's GPU section (``deformarray.bench.conv.DEFAULT_GPU_SHAPES``:
N, C_in, H, W, C_out; 3x3 kernel, padding 1, stride 1, one offset group, mask and bias) and
dtype, each step of the forward and backward gets three floors, and its modelled time is the
largest (METHOD.md's "two numbers", plus an issue term for the index arithmetic):

* **bytes / HBM bandwidth**: each array a step reads or writes crosses HBM once (the four
  corner reads of a sample point and the columns' neighbours hit L2: the input is read once);
* **FLOPs / rate** of the unit doing them: FP32 on the CUDA cores, TF32 or FP16/BF16 on the
  tensor cores;
* **thread instructions / issue rate** for the sampling kernels: elements (point x channel)
  times instructions per element.

Contenders, by their kernel structure:

* **ours**: deformarray's CUDA backend as in ``kernels_cu/deform_conv.cu`` (channels-last copy,
  one thread per sample point looping over channels, columns in the input's dtype, GEMMs on
  tensor cores for 16-bit, atomic col2im into a float32 accumulator). Instructions per
  element are ``benchmarks/sass_report.py``'s figures for the hot loops (``OURS_INSTR``);
* **torchvision**: ``torchvision.ops.deform_conv2d``'s CUDA kernels: im2col with one thread per
  (channel, pixel) that recomputes the sample point and its bilinear weights for every
  channel, columns in the input's dtype, ``at::addmm`` products, col2im with ``atomicAdd`` in
  the input's dtype (16-bit atomics for float16), a coordinate kernel looping over channels,
  and im2col run again in the backward for the weight gradient. Its instructions per element
  (``TV_INSTR``) are an ASSUMPTION from that structure (no SASS of torchvision here);
* **cuDNN conv2d**: the dense 3x3 convolution of the same shape (forward only): its FLOPs on
  the tensor cores (float16, or TF32 when allowed) and its input, weight and output bytes.

The rates (``H200``) are the datasheet's and this workplace's measurements
(/work/.library/device/H200.md, KINDS.md); atomics' contention, occupancy, launch gaps,
wave quantisation and cuBLAS efficiency are not modelled, so every time is a floor: real
kernels run slower, and the model's ratios say where the floors lie, not who wins.

    python benchmarks/perf_model.py            # markdown table on stdout
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deformarray.bench.conv import DEFAULT_GPU_SHAPES  # noqa: E402

K = 9  # 3x3

# H200 SXM. HBM: 4.3 TB/s measured here (device-to-device copy, read + write counted;
# datasheet 4.8). FP16/BF16 dense: 790 TFLOP/s measured here (datasheet 989). FP32 (CUDA
# cores) 67 and TF32 dense 495 TFLOP/s: datasheet. Issue: 132 SMs x 4 schedulers x 32 lanes
# x 1.98 GHz (the clock read here under load) thread-instructions per second.
H200 = {
    "hbm": 4.3e12,
    "fp32": 67e12,
    "tf32": 495e12,
    "fp16": 790e12,
    "issue": 132 * 4 * 32 * 1.98e9,
}

# Instructions per sampled element (point x channel) in the hot loops: ours from
# benchmarks/sass_report.py (sm_90, NVRTC 12.9; see docs/cuda.md for the commit),
# torchvision's an ASSUMPTION: each element reloads its point's offsets and mask and
# recomputes the bilinear weights and corner indices (about the cost of our per-point
# preamble plus the per-channel loads: ~60 for im2col and col2im, ~80 for the coordinate
# kernel, which also recomputes per channel and reduces).
OURS_INSTR = {
    "float32": {"im2col": 20.8, "col2im": 26.5, "coord": 27.0},
    "float16": {"im2col": 25.8, "col2im": 26.5, "coord": 37.0},
}
TV_INSTR = {"im2col": 60.0, "col2im": 60.0, "coord": 80.0}


@dataclass
class Step:
    name: str
    bytes: float = 0.0
    flops: float = 0.0
    unit: str = "fp32"
    instrs: float = 0.0

    def time(self, rates: dict) -> float:
        return max(self.bytes / rates["hbm"], self.flops / rates[self.unit], self.instrs / rates["issue"])

    def bound(self, rates: dict) -> str:
        terms = {
            "bytes": self.bytes / rates["hbm"],
            self.unit: self.flops / rates[self.unit],
            "issue": self.instrs / rates["issue"],
        }
        return max(terms, key=lambda k: terms[k])


def _gemm_unit(dtype: str, tf32: bool) -> str:
    return "fp16" if dtype == "float16" else ("tf32" if tf32 else "fp32")


def ours(shape: tuple, dtype: str, tf32: bool) -> tuple[list[Step], list[Step]]:
    n, c, h, w, co = shape
    t, a = (2 if dtype == "float16" else 4), 4
    p = h * w
    e = n * p * K * c  # sampled elements (point x channel)
    img, out = n * c * h * w, n * co * p
    coords = n * 3 * K * p  # offsets (2K) and mask (K) per pixel
    unit = _gemm_unit(dtype, tf32)
    ins = OURS_INSTR[dtype]
    gemm_flops = 2.0 * n * p * K * c * co
    fwd = [
        Step("to_channels_last", bytes=2 * img * t),
        Step("im2col", bytes=img * t + coords * t + e * t, instrs=e * ins["im2col"]),
        Step("GEMM cols x W", bytes=e * t + out * a, flops=gemm_flops, unit=unit),
        Step("store_output", bytes=out * a + out * t),
    ]
    bwd = [
        Step("to_channels_last", bytes=2 * img * t),
        Step("im2col (again)", bytes=img * t + coords * t + e * t, instrs=e * ins["im2col"]),
        Step("gather_grad_output", bytes=2 * out * t),
        Step("GEMM grad_W", bytes=e * t + out * t, flops=gemm_flops, unit=unit),
        Step("GEMM grad_cols", bytes=out * t + e * a, flops=gemm_flops, unit=unit),
        Step("coord_grad", bytes=img * t + coords * t + e * a + coords * t, instrs=e * ins["coord"]),
        Step("col2im_atomic", bytes=e * a + coords * t + 2 * img * a, instrs=e * ins["col2im"]),
        Step("from_channels_last", bytes=img * a + img * t),
    ]
    return fwd, bwd


def torchvision(shape: tuple, dtype: str, tf32: bool) -> tuple[list[Step], list[Step]]:
    n, c, h, w, co = shape
    t = 2 if dtype == "float16" else 4
    p = h * w
    e = n * p * K * c
    img, out = n * c * h * w, n * co * p
    coords = n * 3 * K * p
    unit = _gemm_unit(dtype, tf32)
    gemm_flops = 2.0 * n * p * K * c * co
    fwd = [
        Step("im2col", bytes=img * t + coords * t + e * t, instrs=e * TV_INSTR["im2col"]),
        Step("addmm W x cols", bytes=e * t + out * t, flops=gemm_flops, unit=unit),
    ]
    bwd = [
        Step("GEMM W^T x grad_out", bytes=out * t + e * t, flops=gemm_flops, unit=unit),
        Step("col2im_coord", bytes=img * t + coords * 2 * t + e * t, instrs=e * TV_INSTR["coord"]),
        Step("col2im (atomicAdd)", bytes=e * t + coords * t + 2 * img * t, instrs=e * TV_INSTR["col2im"]),
        Step("im2col (again)", bytes=img * t + coords * t + e * t, instrs=e * TV_INSTR["im2col"]),
        Step("GEMM grad_out x cols^T", bytes=out * t + e * t, flops=gemm_flops, unit=unit),
    ]
    return fwd, bwd


def cudnn(shape: tuple, dtype: str, tf32: bool) -> list[Step]:
    n, c, h, w, co = shape
    t = 2 if dtype == "float16" else 4
    flops = 2.0 * n * h * w * K * c * co
    nbytes = (n * c * h * w + co * c * K + n * co * h * w) * t
    return [Step("conv2d", bytes=nbytes, flops=flops, unit=_gemm_unit(dtype, tf32))]


def total(steps: list[Step], rates: dict) -> float:
    return sum(s.time(rates) for s in steps)


def table(tf32: bool = False, rates: dict = H200) -> str:
    head = (
        "MODEL, not a measurement: H200 time floors (ms) from bytes (HBM 4.3 TB/s), FLOPs "
        f"(FP32 67, TF32 495, FP16 790 TFLOP/s; float32 GEMMs in {'TF32' if tf32 else 'strict FP32'}) and "
        "instruction issue; 3x3, padding 1, mask and bias. fwd+bwd = forward + backward (atomic). "
        "tv = torchvision's kernel structure (its instructions per element assumed). "
        "Ratios > 1: the model has ours faster.\n\n"
    )
    rows = [
        "| N,C,H,W,Co | dtype | ours fwd | ours fwd+bwd | tv fwd | tv fwd+bwd | cuDNN fwd | "
        "tv/ours fwd+bwd | ours fwd / cuDNN | ours bound by |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for dtype in ("float32", "float16"):
        for shape in DEFAULT_GPU_SHAPES:
            of, ob = ours(shape, dtype, tf32)
            tf, tb = torchvision(shape, dtype, tf32)
            o_f, o_fb = total(of, rates), total(of + ob, rates)
            t_f, t_fb = total(tf, rates), total(tf + tb, rates)
            d_f = total(cudnn(shape, dtype, tf32), rates)
            heavy = max(of + ob, key=lambda s: s.time(rates))
            rows.append(
                f"| {','.join(map(str, shape))} | {dtype} | {o_f * 1e3:.3f} | {o_fb * 1e3:.3f} | {t_f * 1e3:.3f} "
                f"| {t_fb * 1e3:.3f} | {d_f * 1e3:.3f} | {t_fb / o_fb:.2f} | {o_f / d_f:.1f} "
                f"| {heavy.name}: {heavy.bound(rates)} |"
            )
    return head + "\n".join(rows) + "\n"


def steps_table(shape: tuple, dtype: str, tf32: bool = False, rates: dict = H200) -> str:
    """Per-step floors of one shape (MODEL), for the docs."""
    of, ob = ours(shape, dtype, tf32)
    tf, tb = torchvision(shape, dtype, tf32)
    rows = [
        f"MODEL, per step, {','.join(map(str, shape))} {dtype}:\n",
        "| contender | step | MB moved | GFLOP | G thread-instr | floor (ms) | bound by |",
        "|---|---|--:|--:|--:|--:|---|",
    ]
    for who, steps in (("ours", of + ob), ("torchvision", tf + tb), ("cuDNN", cudnn(shape, dtype, tf32))):
        for s in steps:
            rows.append(
                f"| {who} | {s.name} | {s.bytes / 1e6:.0f} | {s.flops / 1e9:.1f} | {s.instrs / 1e9:.2f} "
                f"| {s.time(rates) * 1e3:.3f} | {s.bound(rates)} |"
            )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="deform_conv2d performance MODEL for an H200 (not a measurement)")
    parser.add_argument("--tf32", action="store_true", help="float32 GEMMs (ours, torchvision, cuDNN) in TF32")
    parser.add_argument("--steps", action="store_true", help="also the per-step table of the largest shape")
    args = parser.parse_args(argv)
    print(table(args.tf32), end="")
    if args.steps:
        print()
        for dtype in ("float32", "float16"):
            print(steps_table(DEFAULT_GPU_SHAPES[1], dtype, args.tf32))
    return 0


if __name__ == "__main__":
    sys.exit(main())
