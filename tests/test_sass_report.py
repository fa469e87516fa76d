"""benchmarks/sass_report.py: its SASS analysis on hand-written listings, and (where NVRTC and
nvdisasm are installed) one real kernel file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "sass_report.py"
_spec = importlib.util.spec_from_file_location("sass_report", _PATH)
assert _spec is not None and _spec.loader is not None
sass = importlib.util.module_from_spec(_spec)
sys.modules["sass_report"] = sass
_spec.loader.exec_module(sass)

# A grid-stride loop around a channel loop unrolled 4 times (four offsets of one base
# register per stream), a zero fill beside it, a 64-bit division in the outer loop, and the
# division routine after the kernel's own code.
LISTING = """
_Zkernel:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0010*/                   MOV R6, 0x30 ;
        /*0020*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64) ;
.L_x_2:
        /*0030*/                   STG.E desc[UR4][R8.64], RZ ;
        /*0040*/               @P1 BRA `(.L_x_2) ;
.L_x_3:
        /*0050*/                   LDG.E.CONSTANT R10, desc[UR4][R20.64] ;
        /*0060*/                   LDG.E.CONSTANT R11, desc[UR4][R20.64+0x4] ;
        /*0070*/                   LDG.E.CONSTANT R12, desc[UR4][R20.64+0x8] ;
        /*0080*/                   LDG.E.CONSTANT R13, desc[UR4][R20.64+0xc] ;
        /*0090*/                   FMUL R10, R10, R2 ;
        /*00a0*/                   FMUL R11, R11, R2 ;
        /*00b0*/                   FMUL R12, R12, R2 ;
        /*00c0*/                   FMUL R13, R13, R2 ;
        /*00d0*/                   STG.E desc[UR4][R28.64], R10 ;
        /*00e0*/                   STG.E desc[UR4][R28.64+0x4], R11 ;
        /*00f0*/                   STG.E desc[UR4][R28.64+0x8], R12 ;
        /*0100*/                   STG.E desc[UR4][R28.64+0xc], R13 ;
        /*0110*/                   I2F.U32.RP R4, R2 ;
        /*0120*/              @!P0 BRA `(.L_x_3) ;
        /*0130*/               @P2 BRA `(.L_x_1) ;
        /*0140*/                   EXIT ;
.L_x_9:
        /*0150*/                   BRA `(.L_x_9) ;
        .weak           $__internal_0_$__cuda_sm20_div_s64
$__internal_0_$__cuda_sm20_div_s64:
        /*0160*/                   IMAD.MOV.U32 R14, RZ, RZ, R2 ;
        /*0170*/                   RET.REL.NODEC R6 `(_Zkernel) ;
"""


def test_loops_unroll_and_hot_loop():
    instrs, labels, total = sass.parse(LISTING.splitlines())
    assert total == 24 and len(instrs) == 22  # the division routine is counted, not analysed
    loops = sass.loops(instrs, labels, "float32")
    assert len(loops) == 3  # the branch to itself after EXIT is no loop
    inner = sass.innermost(loops)
    assert sorted(lp.size() for lp in inner) == [2, 14]
    hot = sass.hot_loop(loops)
    assert hot is not None and hot.size() == 14 and hot.unroll == 4


def test_report_counts_divisions_and_per_element():
    r = sass.KernelReport("deform_conv.cu", "deform_conv_im2col_i64<float>", "float32")
    sass.analyse(r, LISTING.splitlines())
    assert (r.div64, r.div64_hot, r.div32_hot) == (1, 0, 1)
    assert r.per_element == 14 / 4
    assert r.sampling and r.misses() == []
    r.spill = 8
    r.div64_hot = 1
    assert r.misses() == ["8 spill bytes", "64-bit division in the hot loop"]


def test_vector_accesses_count_their_elements():
    body = [sass.Instr(0, "LDG.E.128.CONSTANT R4, desc[UR4][R20.64]"), sass.Instr(16, "STG.E.128 desc[UR4][R8.64], R4")]
    assert sass.unroll_factor(body, "float32") == 4
    assert sass.unroll_factor(body, "float64") == 2


def test_ptxas_log():
    log = """ptxas info    : Compiling entry function '_Zk' for 'sm_90'
ptxas info    : Function properties for _Zk
ptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 72 registers, used 0 barriers
"""
    assert sass.ptxas_info(log) == {"_Zk": (72, 16, 12)}


def test_real_kernel_file():
    """roi_pool.cu for sm_90 through NVRTC and nvdisasm (skipped where either is missing)."""
    pytest.importorskip("cupy")
    if sass.find_nvdisasm() is None:
        pytest.skip("nvdisasm not installed (pip install nvidia-cuda-nvdisasm)")
    try:
        reports = sass.run(["roi_pool.cu"], ["float32"], sass.find_nvdisasm())
    except Exception as exc:  # pragma: no cover - NVRTC missing
        pytest.skip(f"NVRTC unavailable: {exc}")
    assert {r.kernel for r in reports} == set(sass._loader.KERNELS["roi_pool.cu"])
    for r in reports:
        assert r.regs > 0 and r.spill >= 0 and r.sass > 0, r
    assert "| roi_pool_forward | float32 |" in sass.table(reports)
