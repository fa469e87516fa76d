"""The host emulation refuses kernel arguments that do not match the kernel's C++ parameters.

CuPy passes a NumPy scalar with its own width and an array as a bare pointer, whatever the
kernel declares: a mismatch is silent on a GPU (a wrong value, garbage, a crash). The
emulation (``tests/cuda_emulation.py``) reads each kernel's parameter list from the host
compiler and checks every launch against it; these tests feed it deliberate mismatches.
"""

from __future__ import annotations

import numpy as np
import pytest

from deformarray.cuda import _loader

cuda_emulation = pytest.importorskip("cuda_emulation")

if cuda_emulation.compiler() is None:  # pragma: no cover
    pytest.skip("no host C++ compiler (g++) for the kernel emulation", allow_module_level=True)

KernelArgumentError = cuda_emulation.KernelArgumentError

# roi_pool_from_acc<T>(const acc_t<T>* src, T* dst, i64 n): small and stable.
KERNEL = "roi_pool_from_acc"


@pytest.fixture(scope="module")
def be():
    return cuda_emulation.EmulatedBackend("roi_pool.cu")


def test_signature_is_the_instantiated_parameter_list(be):
    assert be.signature(KERNEL, np.float32) == ("*f4", "*f4", "i8")
    assert be.signature(KERNEL, np.float64) == ("*f8", "*f8", "i8")
    assert be.signature(KERNEL, np.float16) == ("*f4", "*h2", "i8")  # float32 accumulator


@pytest.mark.parametrize("filename", sorted(_loader.KERNELS))
def test_every_parameter_type_is_one_the_emulation_passes(filename):
    """No kernel takes a parameter type the check cannot describe (a struct by value, say)."""
    be = cuda_emulation.EmulatedBackend(filename)
    for expr, params in be._signatures.items():
        assert params, expr
        for code in params:
            assert code.lstrip("*") in cuda_emulation._CPP_NAMES or code == "*v0", (expr, code)


def test_matching_arguments_run(be):
    src = np.array([1.5, -2.25, 3.0], np.float32)
    dst = np.zeros(3, np.float16)
    be.launch(KERNEL, np.float16, 3, (src, dst, np.int64(3)))
    np.testing.assert_array_equal(dst, src.astype(np.float16))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.int32(3), r"argument 2 \(long long \(i64\)\) got numpy.int32 \(int\)"),  # width
        (np.float64(3), r"argument 2 \(long long \(i64\)\) got numpy.float64 \(double\)"),  # int vs float
        (3, r"argument 2 \(long long \(i64\)\) got 3"),  # a Python int has no width
        (np.zeros(1, np.int64), r"argument 2 .* is a scalar parameter, got a pointer"),
    ],
)
def test_mismatched_scalar_is_refused(be, bad, message):
    src, dst = np.zeros(3, np.float32), np.zeros(3, np.float32)
    with pytest.raises(KernelArgumentError, match=message):
        be.launch(KERNEL, np.float32, 3, (src, dst, bad))


def test_mismatched_pointer_is_refused(be):
    src, dst = np.zeros(3, np.float32), np.zeros(3, np.float32)
    with pytest.raises(KernelArgumentError, match=r"argument 0 \(float\*\) got an array of float64"):
        be.launch(KERNEL, np.float32, 3, (src.astype(np.float64), dst, np.int64(3)))
    with pytest.raises(KernelArgumentError, match=r"argument 1 \(float\*\) is a pointer parameter, got int64"):
        be.launch(KERNEL, np.float32, 3, (src, np.int64(0), np.int64(3)))
    with pytest.raises(KernelArgumentError, match="non-contiguous"):
        be.launch(KERNEL, np.float32, 3, (np.zeros(6, np.float32)[::2], dst, np.int64(3)))


def test_argument_count_and_empty_launches_are_checked(be):
    src, dst = np.zeros(3, np.float32), np.zeros(3, np.float32)
    with pytest.raises(KernelArgumentError, match="2 arguments for 3 parameters"):
        be.launch(KERNEL, np.float32, 3, (src, dst))
    with pytest.raises(KernelArgumentError, match="got numpy.int32"):
        be.launch(KERNEL, np.float32, 0, (src, dst, np.int32(0)))  # nothing to do, still checked


def test_null_pointer_and_integer_signedness():
    """``be.null`` stands for a null pointer; int64 arrays pass for ``unsigned long long*``
    (the same bits: the deterministic paths' atomic counters)."""
    assert cuda_emulation._compatible("i8", "u8")
    assert not cuda_emulation._compatible("i4", "i8")
    assert not cuda_emulation._compatible("f8", "i8")
    assert not cuda_emulation._compatible("h2", "b2")
    be = cuda_emulation.EmulatedBackend("roi_pool.cu")
    assert be.check_arguments(f"{KERNEL}<float>", (be.null, be.null, np.int64(0)))[:2] == [None, None]
