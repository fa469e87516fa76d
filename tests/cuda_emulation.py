"""Run the CUDA backend's launch code and kernels on the CPU, for machines without a GPU.

The kernels of ``kernels_cu/*.cu`` are plain C++ apart from a few CUDA built-ins, so this
helper compiles them with the host C++ compiler (``g++``) after a small prelude that
defines those built-ins for one host "thread": ``blockIdx = threadIdx = 0``,
``blockDim = gridDim = 1``, every grid-stride loop walks its whole range serially (forwards,
or backwards inside :meth:`EmulatedBackend.reversed_threads`), and ``atomicAdd`` is a plain
add. :class:`EmulatedBackend` then plays the part of the
``CupyBackend`` of ``deformarray/cuda/_launch.py`` for ``deform_conv.py``, ``roi_pool.py`` and
``psroi_pool.py`` with NumPy arrays (one instance per ``.cu`` file), so the real chunking,
GEMM, sort and kernel-argument code of those modules runs unchanged. Inside
:meth:`EmulatedBackend.metered` the launch code's allocations are counted (the workspace
tests); with ``DFA_EMULATION_SANITIZE=1`` the kernels are built with AddressSanitizer and UBSan.

Every launch's arguments are checked against the kernel's C++ parameter list, as the host
compiler sees it after macros, typedefs and the template's instantiation
(:meth:`EmulatedBackend.check_arguments`): CuPy passes a NumPy scalar with its own width and an
array as a bare pointer whatever the kernel declares, so an ``np.int64`` for an ``int``, an
``np.float64`` for a ``float``, a float64 array for a ``float*`` or a scalar for a pointer would
break on a GPU (or read garbage) without a word. Here it raises :class:`KernelArgumentError`,
and each scalar is passed with the declared width.

What this does not check: anything specific to the GPU (NVRTC itself is covered by
tests/test_nvrtc_compile.py; true concurrency, memory coalescing, CuPy's own functions and
cuBLAS are not covered at all; a dependence on the order of the threads is, see
:func:`assert_thread_order_free`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path

import numpy as np

from deformarray.cuda import _loader

_PRELUDE = r"""
#define DFA_HOST_EMULATION 1
#include <cmath>
#include <type_traits>
#define __global__
#define __device__
#define __forceinline__ inline
struct dfa_dim3 { unsigned int x, y, z; };
static const dfa_dim3 blockIdx = {0, 0, 0}, threadIdx = {0, 0, 0};
static const dfa_dim3 blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
inline float __uint_as_float(unsigned int u) { float f; __builtin_memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; __builtin_memcpy(&u, &f, 4); return u; }
template <typename V> inline V atomicAdd(V* address, V value) { V old = *address; *address = old + value; return old; }
// Every kernel loops with DFA_GRID_STRIDE_LOOP, whose iterations run in different GPU
// threads in no fixed order. Here they run one after another, forwards or (when the
// backend sets dfa_emulation_reverse) backwards, so a kernel whose result depends on
// the order of its threads (one iteration reading what another wrote, a sum whose order
// is left to the scheduler) shows up as a difference between the two orders.
extern "C" { int dfa_emulation_reverse = 0; }
#define DFA_GRID_STRIDE_LOOP(i, n)                                                         \
    for (long long dfa_step_ = 0, i = dfa_emulation_reverse ? (n) - 1 : 0; dfa_step_ < (n); \
         ++dfa_step_, i += dfa_emulation_reverse ? -1 : 1)
"""


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


# DFA_EMULATION_SANITIZE=1 builds the kernels with AddressSanitizer and UBSan, so that an
# out-of-bounds access (silent corruption on a GPU) or undefined behaviour stops the test;
# the process must then preload the ASan runtime (.ci/run shows how).
_SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def _flags() -> list[str]:
    extra = _SANITIZE if os.environ.get("DFA_EMULATION_SANITIZE") == "1" else []
    return ["-std=c++17", "-O2", "-shared", "-fPIC", "-Wno-unknown-pragmas", *extra]


# Appended after the kernel source: for every kernel instantiation, a function that writes
# its C++ parameter list as the compiler sees it (macros expanded, typedefs and templates
# resolved), one code per parameter: "i4" int, "i8" long long, "u8" unsigned long long,
# "f4" float, "f8" double, "h2" / "b2" dfa::half / dfa::bfloat16, "*" before a pointer's
# element type ("*f4" float* or const float*), "?N" any other type of N bytes.
_SIGNATURE_CODE = r"""
template <typename X> void dfa_sig_one(char*& p) {
    typedef typename std::remove_cv<X>::type U;
    if constexpr (std::is_pointer<U>::value) {
        *p++ = '*';
        dfa_sig_one<typename std::remove_pointer<U>::type>(p);
        return;
    } else if constexpr (std::is_void<U>::value) {
        *p++ = 'v';
        *p++ = '0';
        return;
    } else {
        char kind = '?';
        if constexpr (std::is_same<U, dfa::half>::value) kind = 'h';
        else if constexpr (std::is_same<U, dfa::bfloat16>::value) kind = 'b';
        else if constexpr (std::is_floating_point<U>::value) kind = 'f';
        else if constexpr (std::is_integral<U>::value) kind = std::is_signed<U>::value ? 'i' : 'u';
        *p++ = kind;
        const int size = static_cast<int>(sizeof(U));
        if (size >= 10) *p++ = static_cast<char>('0' + size / 10 % 10);
        *p++ = static_cast<char>('0' + size % 10);
    }
}
template <typename... A> void dfa_sig(void (*)(A...), char* p) {
    ((dfa_sig_one<A>(p), *p++ = ','), ...);
    *p = 0;
}
"""


def _build(filename: str) -> tuple[ctypes.CDLL, list[str]]:
    exprs = [e for per_dtype in _loader.all_name_expressions()[filename].values() for e in per_dtype]
    table = ",\n".join(f"  reinterpret_cast<void*>(&{e})" for e in exprs)
    signatures = ",\n".join(f"  [](char* p) {{ dfa_sig(&{e}, p); }}" for e in exprs)
    source = (
        _PRELUDE
        + _loader.read_source(filename)
        + f'\n#line 1 "emulation_table"\nextern "C" void* dfa_kernels[] = {{\n{table}\n}};\n'
        + _SIGNATURE_CODE
        + f'extern "C" {{ void (*dfa_signatures[])(char*) = {{\n{signatures}\n}}; }}\n'
    )
    flags = _flags()
    digest = hashlib.sha256((source + " ".join(flags)).encode()).hexdigest()[:16]
    build_dir = Path(tempfile.gettempdir()) / "deformarray-emulation"
    build_dir.mkdir(exist_ok=True)
    lib_path = build_dir / f"{Path(filename).stem}-{digest}.so"
    if not lib_path.exists():
        src_path = build_dir / f"{Path(filename).stem}-{digest}.cpp"
        src_path.write_text(source)
        tmp = lib_path.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            [compiler(), *flags, "-o", str(tmp), str(src_path)],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(tmp, lib_path)
    return ctypes.CDLL(str(lib_path)), exprs


def _signatures(lib: ctypes.CDLL, exprs: list[str]) -> dict[str, tuple[str, ...]]:
    """``{name expression: parameter codes}`` (see ``_SIGNATURE_CODE``) of every kernel of ``lib``."""
    writer = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
    table = (writer * len(exprs)).in_dll(lib, "dfa_signatures")
    out = {}
    for expr, write in zip(exprs, table):
        buf = ctypes.create_string_buffer(4096)
        write(buf)
        out[expr] = tuple(code for code in buf.value.decode().split(",") if code)
    return out


# C++ spelling of each parameter code, for error messages.
_CPP_NAMES = {
    "i4": "int",
    "i8": "long long (i64)",
    "u4": "unsigned int",
    "u8": "unsigned long long",
    "f4": "float",
    "f8": "double",
    "h2": "dfa::half",
    "b2": "dfa::bfloat16",
}

# ctypes type of each scalar parameter code (pointers travel as c_void_p): the declared width.
_CTYPES = {
    "i4": ctypes.c_int32,
    "i8": ctypes.c_int64,
    "u4": ctypes.c_uint32,
    "u8": ctypes.c_uint64,
    "f4": ctypes.c_float,
    "f8": ctypes.c_double,
}


def _cpp_name(code: str) -> str:
    if code.startswith("*"):
        return _cpp_name(code[1:]) + "*"
    return _CPP_NAMES.get(code, f"a {code[1:]}-byte type")


def _dtype_code(dtype: np.dtype) -> str:
    """The parameter code of a NumPy dtype (element type of an array, or a scalar's type)."""
    if dtype.name == "float16":
        return "h2"
    if dtype.name == "bfloat16":
        return "b2"
    if dtype.kind in "iuf":
        return f"{dtype.kind}{dtype.itemsize}"
    return f"?{dtype.itemsize}"


def _compatible(got: str, declared: str) -> bool:
    """Whether a value of code ``got`` may be passed for a parameter (or element) of code
    ``declared``: the same code, or integers of the same width whose signedness differs (the
    same bits: the launch code keeps counters that kernels ``atomicAdd`` as
    ``unsigned long long`` in int64 arrays, and values below 2**63 read the same either way)."""
    if got == declared:
        return True
    return got[0] in "iu" and declared[0] in "iu" and got[1:] == declared[1:]


class KernelArgumentError(TypeError):
    """A kernel argument that does not match the kernel's C++ parameter (width, int vs float,
    pointer vs scalar, element type, or the number of arguments)."""


class EmulatedBackend:
    """NumPy arrays + host-compiled kernels, with the interface of ``deformarray.cuda._launch.CupyBackend``."""

    def __init__(self, filename: str = "deform_conv.cu") -> None:
        lib, exprs = _build(filename)
        table = (ctypes.c_void_p * len(exprs)).in_dll(lib, "dfa_kernels")
        self._lib = lib  # keep loaded
        self._ptrs = dict(zip(exprs, table))
        self._signatures = _signatures(lib, exprs)
        self._fns: dict[str, object] = {}
        self.xp = np
        self.null = np.uint64(0)
        self._reverse = ctypes.c_int.in_dll(lib, "dfa_emulation_reverse")

    @contextlib.contextmanager
    def reversed_threads(self):
        """Within this block every kernel visits its grid-stride indices last to first."""
        self._reverse.value = 1
        try:
            yield
        finally:
            self._reverse.value = 0

    def device(self, arr):
        return contextlib.nullcontext()

    def argsort_stable(self, a):
        return self.xp.argsort(a, kind="stable")

    @contextlib.contextmanager
    def metered(self):
        """Within this block the launch code allocates through a :class:`MeteredNumpy`,
        which it yields: the arrays the code creates, and their peak."""
        meter = MeteredNumpy()
        self.xp = meter
        try:
            yield meter
        finally:
            self.xp = np

    def to_host(self, a):
        return np.asarray(a)

    def signature(self, kernel: str, dtype) -> tuple[str, ...]:
        """Parameter codes of one kernel instantiation as the C++ compiler sees them
        (``_SIGNATURE_CODE`` lists the codes)."""
        return self._signatures[_loader.name_expression(kernel, _loader.dtype_name(dtype))]

    def check_arguments(self, expr: str, args: tuple) -> list:
        """The ctypes values of ``args`` for kernel ``expr``, each checked against the kernel's
        C++ parameter: an array (or the backend's ``null``) for a pointer, whose element type
        matches the pointer's; for a scalar parameter a NumPy scalar of exactly its type and
        width (``np.int32`` for ``int``, ``np.int64`` for ``long long``, ``np.float32`` for
        ``float``...), as CuPy passes a NumPy scalar with its own width whatever the kernel
        declares. Anything else raises :class:`KernelArgumentError`."""
        params = self._signatures[expr]
        if len(args) != len(params):
            raise KernelArgumentError(f"{expr}: {len(args)} arguments for {len(params)} parameters")
        values = []
        for i, (a, code) in enumerate(zip(args, params)):
            where = f"{expr}: argument {i} ({_cpp_name(code)})"
            if code.startswith("*"):
                if a is self.null:
                    values.append(None)
                    continue
                if not isinstance(a, np.ndarray):
                    raise KernelArgumentError(f"{where} is a pointer parameter, got {type(a).__name__} {a!r}")
                if code != "*v0" and not _compatible(_dtype_code(a.dtype), code[1:]):
                    raise KernelArgumentError(f"{where} got an array of {a.dtype} ({_cpp_name(_dtype_code(a.dtype))})")
                if not a.flags.c_contiguous:
                    raise KernelArgumentError(f"{where}: non-contiguous array argument")
                values.append(a.ctypes.data)
            elif code in _CTYPES:
                if isinstance(a, np.ndarray) or a is self.null:
                    raise KernelArgumentError(f"{where} is a scalar parameter, got a pointer")
                if not isinstance(a, np.generic) or not _compatible(_dtype_code(a.dtype), code):
                    got = repr(a)
                    if isinstance(a, np.generic):
                        got = f"numpy.{a.dtype} ({_cpp_name(_dtype_code(a.dtype))})"
                    raise KernelArgumentError(f"{where} got {got}")
                values.append(a.item())  # ctypes converts it to the declared width
            else:
                raise KernelArgumentError(f"{where}: the emulation cannot pass this parameter type")
        return values

    def launch(self, kernel: str, dtype, total: int, args: tuple) -> None:
        expr = _loader.name_expression(kernel, _loader.dtype_name(dtype))
        # Checked before the early return, so that an empty launch's arguments are checked too.
        values = self.check_arguments(expr, args)
        if total <= 0:
            return
        fn = self._fns.get(expr)
        if fn is None:
            types = [ctypes.c_void_p if c.startswith("*") else _CTYPES[c] for c in self._signatures[expr]]
            fn = self._fns[expr] = ctypes.CFUNCTYPE(None, *types)(self._ptrs[expr])
        fn(*values)


def assert_thread_order_free(be, run, names, atomic=(), rtol=1e-5, check_applied=True):
    """Run ``run() -> (out, grads)`` with the kernels' threads forwards and backwards.

    The output and every gradient named in ``names`` but not in ``atomic`` must be the same
    bits in both orders: on a GPU the threads of a launch run in any order, so a result that
    depends on it is a race. Gradients in ``atomic`` are sums left to the scheduler (float
    ``atomicAdd``): they may differ only by rounding, and at least one must differ in its
    bits, which shows the reversal took effect (``check_applied=False`` skips that check,
    for 16-bit results whose rounding may hide the order).
    """
    out, grads = run()
    with be.reversed_threads():
        out_r, grads_r = run()
    assert out.tobytes() == out_r.tobytes(), "output depends on the thread order"
    reordered = False
    for name, a, b in zip(names, grads, grads_r):
        if a is None:
            assert b is None, name
        elif name in atomic:
            np.testing.assert_allclose(b.astype(np.float64), a.astype(np.float64), rtol=rtol, atol=rtol, err_msg=name)
            reordered |= a.tobytes() != b.tobytes()
        else:
            assert a.tobytes() == b.tobytes(), f"grad {name} depends on the thread order"
    assert reordered or not atomic or not check_applied, "the reversed order changed no atomic sum: was it applied?"


class MeteredNumpy:
    """NumPy for the launch code, counting the bytes of the arrays it creates while they live.

    ``empty`` / ``zeros`` / ``ascontiguousarray`` / ``asarray`` (the launch code's
    allocations, as on a GPU through CuPy's pool) and the scan's and the sort's results are
    counted from creation until the array (or the last view of it) is freed; ``peak`` is the
    most alive at once. Temporaries of operators (``a += b @ c``, ``a.sum()``) are not
    counted: the launch code makes only weight- and channel-sized ones.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def __getattr__(self, name):
        return getattr(np, name)

    def _count(self, arr):
        self.live += arr.nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(arr, self._release, arr.nbytes)
        return arr

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def empty(self, *args, **kwargs):
        return self._count(np.empty(*args, **kwargs))

    def zeros(self, *args, **kwargs):
        return self._count(np.zeros(*args, **kwargs))

    def ascontiguousarray(self, a, *args, **kwargs):
        out = np.ascontiguousarray(a, *args, **kwargs)
        return out if out is a or out.base is a else self._count(out)

    def asarray(self, a, *args, **kwargs):
        # the launch code passes host arrays here: on a GPU, a copy to the device
        return self._count(np.array(a, *args, copy=True, **kwargs))

    def cumsum(self, *args, **kwargs):
        return self._count(np.cumsum(*args, **kwargs))

    def argsort(self, *args, **kwargs):
        return self._count(np.argsort(*args, **kwargs))


def workspace_bound(limit):
    """``deformarray.workspace_limit(limit)``, or no change when ``limit`` is None."""
    import deformarray

    return contextlib.nullcontext() if limit is None else deformarray.workspace_limit(limit)
