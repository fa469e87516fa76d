"""SASS report: what NVRTC and ptxas make of every CUDA kernel, for sm_90 (H100 / H200), without a GPU.

For every kernel of ``deformarray.cuda._loader.KERNELS`` (one row per kernel and dtype) it
compiles the kernel file with NVRTC to a cubin for ``sm_90`` with the run-time build's own
options (``_loader.nvrtc_options()`` and what CuPy adds) plus ``--ptxas-options=-v``,
disassembles the cubin with ``nvdisasm`` and prints a markdown table:

* **regs**, **stack**, **spill** (bytes stored + loaded): ptxas's own report;
* **SASS**: instructions of the kernel, its internal subroutines (division routines) included;
* **hot loop**: instructions per iteration of the hot loop, the unroll factor found, and
  **/elem**: instructions per sampled element and channel (hot-loop instructions / unroll);
* **div64**: calls to the 64-bit integer division routines (``__cuda_sm20_div_s64``,
  ``div_u64``, ``rem_s64``, ``rem_u64``) in the whole kernel, and **in hot** those inside the
  hot loop; **div32 in hot**: inline 32-bit divisions in the hot loop (each starts with an
  ``I2F.U32.RP``, about 15-20 instructions).

**How the hot loop is found (a heuristic).** A loop is a backward branch (``BRA`` whose target
lies at or before it, a branch to itself excepted: that is the trap after ``EXIT``); its body
is the instructions from the target to the branch. An innermost loop holds no other loop.
The elements one iteration handles (the unroll factor U) come from its global-memory
accesses (``LDG``, ``STG``, ``REDG``, ``ATOMG``, ``LD``, ``ST``): the copies of an unrolled
loop over contiguous channels address one base register with growing immediate offsets
(``[R20.64]``, ``[R20.64+0x4]``, ...), so each base register counts its distinct offsets
(times the elements of a vector access), and the most common count over the base registers
is U (the smaller on a tie). The hot loop is the innermost loop with the most global-memory
instructions per element (the sampling loop over channels, not the zero fill beside it).
Where the compiler gave each copy its own address registers U reads 1, and the per-element
count is an upper bound: the grid-stride loops of the elementwise kernels read so, which is
why **/elem** is held against the target only for the sampling kernels. Checked by hand
against the SASS of deform_conv.cu at the commit in docs/cuda.md (im2col, col2im, coord_grad:
unrolled 4 times over channels in float32).

**Targets** (issue 14): no spills; no 64-bit division routine in any hot loop; at most 40
instructions per sampled element and channel in the deform_conv2d sampling kernels
(``SAMPLING``). ``--check`` exits 1 when one is missed.

Tools (not project dependencies): NVRTC through CuPy (``pip install cupy-cuda12x
nvidia-cuda-nvrtc-cu12``), and ``nvdisasm`` from the CUDA toolkit or from PyPI
(``pip install nvidia-cuda-nvdisasm``: the script finds the binary inside the package). CuPy
14.2's ``nvrtc.getCUBIN`` drops the cubin's last byte, so the cubin is read through NVRTC's
C API (ctypes on the libnvrtc CuPy loaded).

    python benchmarks/sass_report.py                       # float32 and float16, every file
    python benchmarks/sass_report.py --dtypes float32 --files deform_conv.cu --check
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deformarray.cuda import _loader  # noqa: E402

ARCH = "sm_90"
MAX_PER_ELEMENT = 40
# The deform_conv2d kernels that sample (the 40-instructions target applies to these).
SAMPLING = ("deform_conv_im2col", "deform_conv_col2im_atomic", "deform_conv_col2im_owned", "deform_conv_coord_grad")

_DIV64 = re.compile(r"__cuda_sm\d+_(div|rem)_[su]64")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*(?:/\*.*)?$")
_LABEL = re.compile(r"^(\.L_x_\d+|\$[^:\s]+|_Z\w+):\s*$")
_TARGET = re.compile(r"`\(([^)]+)\)")
_MEM = re.compile(r"^(LDG|STG|REDG|RED|ATOMG|ATOM|LD|ST)(\.|$)")


@dataclass
class Instr:
    addr: int
    text: str  # without the predicate

    @property
    def op(self) -> str:
        return self.text.split()[0] if self.text else ""


@dataclass
class Loop:
    start: int  # index of the first instruction
    end: int  # index of the backward branch
    mem_kinds: frozenset[str] = frozenset()
    mem_ops: int = 0  # global-memory instructions in the body
    unroll: int = 1

    def size(self) -> int:
        return self.end - self.start + 1


@dataclass
class KernelReport:
    file: str
    expr: str
    dtype: str
    regs: int = -1
    stack: int = -1
    spill: int = -1
    sass: int = 0
    loops: int = 0
    hot: Loop | None = None
    div64: int = 0
    div64_hot: int = 0
    div32_hot: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def kernel(self) -> str:
        return self.expr.split("<")[0]

    @property
    def sampling(self) -> bool:
        return any(self.kernel.startswith(s) for s in SAMPLING)

    @property
    def per_element(self) -> float | None:
        return None if self.hot is None else self.hot.size() / self.hot.unroll

    def misses(self) -> list[str]:
        out = []
        if self.spill > 0:
            out.append(f"{self.spill} spill bytes")
        if self.div64_hot:
            out.append("64-bit division in the hot loop")
        pe = self.per_element
        if self.sampling and pe is not None and pe > MAX_PER_ELEMENT:
            out.append(f"{pe:.0f} > {MAX_PER_ELEMENT} instructions per element")
        return out


# --------------------------------------------------------------------------------------
# Tools


def find_nvdisasm() -> str | None:
    found = shutil.which("nvdisasm")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvdisasm").is_file():
            return str(Path(home) / "bin" / "nvdisasm")
    try:
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        return None
    for base in getattr(nvidia, "__path__", []):
        for candidate in sorted(Path(base).glob("*/bin/nvdisasm")):
            return str(candidate)
    return None


def _libnvrtc() -> ctypes.CDLL:
    """The libnvrtc that CuPy loaded (read from the process's memory map)."""
    with open("/proc/self/maps") as maps:
        paths = sorted({line.split()[-1] for line in maps if "libnvrtc.so" in line and "/" in line})
    if not paths:
        raise RuntimeError("libnvrtc is not loaded (compile something through cupy.cuda.nvrtc first)")
    return ctypes.CDLL(paths[0])


def compile_cubin(filename: str, dtype: str) -> tuple[bytes, str, dict[str, str]]:
    """(cubin, ptxas log, {name expression: mangled name}) of ``filename`` for ``dtype``."""
    from cupy.cuda import nvrtc

    exprs = _loader.name_expressions(filename, dtype)
    prog = nvrtc.createProgram(_loader.read_source(filename), filename, [], [])
    try:
        for e in exprs:
            nvrtc.addNameExpression(prog, e)
        options = [
            *_loader.nvrtc_options(),
            *_loader.CUPY_ADDED_NVRTC_OPTIONS,
            f"-arch={ARCH}",
            "--ptxas-options=-v",
        ]
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC failed on {filename} ({dtype}): {exc}\n{nvrtc.getProgramLog(prog)}") from None
        log = nvrtc.getProgramLog(prog)
        lowered = {e: nvrtc.getLoweredName(prog, e) for e in exprs}
        lib = _libnvrtc()
        size = ctypes.c_size_t()
        handle = ctypes.c_void_p(prog)
        if lib.nvrtcGetCUBINSize(handle, ctypes.byref(size)) != 0:
            raise RuntimeError("nvrtcGetCUBINSize failed")
        buf = ctypes.create_string_buffer(size.value)
        if lib.nvrtcGetCUBIN(handle, buf) != 0:
            raise RuntimeError("nvrtcGetCUBIN failed")
        return buf.raw, log, lowered
    finally:
        nvrtc.destroyProgram(prog)


def ptxas_info(log: str) -> dict[str, tuple[int, int, int]]:
    """{mangled name: (registers, stack frame bytes, spill store + load bytes)} from ptxas -v."""
    out: dict[str, tuple[int, int, int]] = {}
    current = None
    stack = spill = 0
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            stack, spill = int(m.group(1)), int(m.group(2)) + int(m.group(3))
            continue
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            out[current] = (int(m.group(1)), stack, spill)
            stack = spill = 0
    return out


def disassemble(nvdisasm: str, cubin: bytes) -> dict[str, list[str]]:
    """{mangled kernel name: its lines of nvdisasm output, internal subroutines included}."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([nvdisasm, "-c", str(path)], check=True, capture_output=True, text=True).stdout
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        m = re.match(r"^\s*\.section\s+\.text\.(\S+?),", line)
        if m:
            current = out.setdefault(m.group(1), [])
            continue
        if current is not None:
            current.append(line)
    return out


# --------------------------------------------------------------------------------------
# Analysis


def _access_bytes(text: str, dtype: str) -> int:
    op = text.split()[0]
    for width, nbytes in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if width in op:
            return nbytes
    # RED.E.ADD.F64 / ATOMG.E.ADD.F64 (the atomics name their type, not a width)
    return 8 if ".F64" in op or ".64" in op or (dtype == "float64" and ".F" not in op and "RED" in op) else 4


def parse(lines: list[str]) -> tuple[list[Instr], dict[str, int], int]:
    """(the kernel's own instructions, {label: instruction index}, all instructions incl. subroutines)."""
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    total = 0
    in_sub = False
    for line in lines:
        m = _LABEL.match(line.strip())
        if m:
            name = m.group(1)
            if name.startswith("$") and "__internal" in name:
                in_sub = True
            labels.setdefault(name, len(instrs))
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        total += 1
        if in_sub:
            continue
        text = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())
        instrs.append(Instr(int(m.group(1), 16), text))
    return instrs, labels, total


_ADDRESS = re.compile(r"\[(R\d+)(?:\.64)?(?:\+(?:UR\d+\+?)?(0x[0-9a-f]+|-0x[0-9a-f]+))?\]")


def _elements(text: str, dtype: str) -> int:
    """Elements one memory access carries: its bytes over the element size (8 in float64
    kernels, 2 for 16-bit accesses, else 4)."""
    nbytes = _access_bytes(text, dtype)
    scalar = 8 if dtype == "float64" else (2 if nbytes == 2 else 4)
    return max(1, nbytes // scalar)


def unroll_factor(body: list[Instr], dtype: str) -> int:
    """Elements per iteration: each base register of the body's global accesses counts its
    distinct immediate offsets (the copies of an unrolled loop read ``[R20.64]``,
    ``[R20.64+0x4]``, ``[R20.64+0x8]``...) times the elements per access (vector accesses);
    the most common count over the bases wins, the smaller on a tie."""
    per_base: dict[str, set[str]] = {}
    width: dict[str, int] = {}
    for ins in body:
        if not _MEM.match(ins.op):
            continue
        m = _ADDRESS.search(ins.text)
        if not m:
            continue
        per_base.setdefault(m.group(1), set()).add(m.group(2) or "0")
        width[m.group(1)] = max(width.get(m.group(1), 1), _elements(ins.text, dtype))
    if not per_base:
        return 1
    counts = [len(offsets) * width[base] for base, offsets in per_base.items()]
    return max(1, min(set(counts), key=lambda c: (-counts.count(c), c)))


def loops(instrs: list[Instr], labels: dict[str, int], dtype: str) -> list[Loop]:
    found = []
    for i, ins in enumerate(instrs):
        if ins.op.split(".")[0] != "BRA":
            continue
        m = _TARGET.search(ins.text)
        if not m or m.group(1) not in labels:
            continue
        j = labels[m.group(1)]
        if j < i:  # j == i: the branch to itself after EXIT
            loop = Loop(j, i)
            kinds = set()
            for x in instrs[j : i + 1]:
                mm = _MEM.match(x.op)
                if mm:
                    kinds.add(mm.group(1))
                    loop.mem_ops += 1
            loop.mem_kinds = frozenset(kinds)
            loop.unroll = unroll_factor(instrs[j : i + 1], dtype)
            found.append(loop)
    return found


def innermost(all_loops: list[Loop]) -> list[Loop]:
    return [
        a
        for a in all_loops
        if not any(b is not a and a.start <= b.start and b.end <= a.end and b.size() < a.size() for b in all_loops)
    ]


def hot_loop(all_loops: list[Loop]) -> Loop | None:
    """The innermost loop with the most global-memory instructions per element (the sampling
    loop, not a zero fill beside it), the larger on a tie."""
    inner = innermost(all_loops)
    if not inner:
        return None
    return max(inner, key=lambda lp: (lp.mem_ops / lp.unroll, lp.size()))


def analyse(report: KernelReport, lines: list[str]) -> None:
    instrs, labels, total = parse(lines)
    report.sass = total
    found = loops(instrs, labels, report.dtype)
    report.loops = len(found)
    report.hot = hot_loop(found)
    calls = [(i, ins) for i, ins in enumerate(instrs) if ins.op.startswith("CALL")]
    report.div64 = sum(1 for _, ins in calls if _DIV64.search(ins.text))
    if report.hot is not None:
        lo, hi = report.hot.start, report.hot.end
        report.div64_hot = sum(1 for i, ins in calls if lo <= i <= hi and _DIV64.search(ins.text))
        report.div32_hot = sum(1 for ins in instrs[lo : hi + 1] if ins.op.startswith("I2F.U32.RP"))


def run(files: list[str], dtypes: list[str], nvdisasm: str) -> list[KernelReport]:
    reports = []
    for filename in files:
        for dtype in dtypes:
            cubin, log, lowered = compile_cubin(filename, dtype)
            info = ptxas_info(log)
            code = disassemble(nvdisasm, cubin)
            for expr, mangled in lowered.items():
                r = KernelReport(filename, expr, dtype)
                r.regs, r.stack, r.spill = info.get(mangled, (-1, -1, -1))
                if mangled in code:
                    analyse(r, code[mangled])
                else:
                    r.notes.append("not in the disassembly")
                reports.append(r)
    return reports


# --------------------------------------------------------------------------------------
# Output


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "kernels_cu"], capture_output=True, text=True
        ).stdout.strip()
        return head + (" + uncommitted kernels_cu changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(reports: list[KernelReport]) -> str:
    from cupy.cuda import nvrtc

    major, minor = nvrtc.getVersion()
    head = (
        f"SASS report, {ARCH}, NVRTC {major}.{minor}, {datetime.date.today().isoformat()}, commit {_commit()}. "
        f"Targets: no spills, no 64-bit division in a hot loop, <= {MAX_PER_ELEMENT} instructions per "
        "sampled element and channel in the deform_conv2d sampling kernels (marked *).\n\n"
    )
    rows = [
        "| kernel | dtype | regs | stack | spill | SASS | loops | hot loop (x unroll) | /elem | div64 (in hot) "
        "| div32 in hot | verdict |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in reports:
        hot = "-" if r.hot is None else f"{r.hot.size()} (x{r.hot.unroll})"
        pe = r.per_element
        per = "-" if pe is None else f"{pe:.1f}"
        miss = r.misses()
        verdict = ("MISS: " + "; ".join(miss)) if miss else "ok"
        name = r.kernel + (" *" if r.sampling else "")
        rows.append(
            f"| {name} | {r.dtype} | {r.regs} | {r.stack} | {r.spill} | {r.sass} | {r.loops} | {hot} | {per} "
            f"| {r.div64} ({r.div64_hot}) | {r.div32_hot} | {verdict} |"
        )
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", nargs="*", default=sorted(_loader.KERNELS), help="kernel files (default: all)")
    parser.add_argument("--dtypes", nargs="*", default=["float32", "float16"], choices=sorted(_loader.CTYPES))
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    nvdisasm = find_nvdisasm()
    if nvdisasm is None:
        print(
            "nvdisasm not found: install the CUDA toolkit or `pip install nvidia-cuda-nvdisasm` "
            "(not a project dependency), or put it on PATH",
            file=sys.stderr,
        )
        return 2
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception:
        print("NVRTC via CuPy is needed: pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12", file=sys.stderr)
        return 2
    reports = run(args.files, args.dtypes, nvdisasm)
    print(table(reports), end="")
    missed = [r for r in reports if r.misses()]
    if missed:
        print(f"\n{len(missed)} of {len(reports)} kernels miss a target.")
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
