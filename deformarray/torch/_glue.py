"""The glue every operator family of ``deformarray.torch`` shares: tensors to arrays and
back through DLPack (no copy), the device and stream context, the one-dtype rule and the
half types on the CPU, the call of an array-API function on tensors, int and pair
arguments checked before the int64 schemas, the deterministic flag, autocast registration
and the cast back to the input's dtype, and the shape check of the RoI poolings' fake
kernels. No operator is registered here.
"""

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _config
from .._validate import check_int_range

_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------
# Crossing between tensors and arrays (DLPack, no copy)


def _to_array(t: Tensor | None) -> Any:
    """The NumPy (CPU) or CuPy (CUDA) view of a tensor, sharing its memory and strides."""
    if t is None:
        return None
    t = t.detach()  # DLPack refuses tensors that require grad; detach() copies nothing
    kind = t.device.type
    if kind == "cpu":
        return np.from_dlpack(t)
    if kind == "cuda":
        import cupy

        try:
            return cupy.from_dlpack(t)
        except Exception:  # a CuPy without DLPack bfloat16: carry the bits as int16
            if t.dtype != torch.bfloat16:
                raise
            import ml_dtypes

            return cupy.from_dlpack(t.view(torch.int16)).view(ml_dtypes.bfloat16)
    raise TypeError(f"deformarray.torch supports CPU and CUDA tensors, got a tensor on {t.device}")


def _to_tensor(a: Any) -> Tensor:
    """A tensor sharing the memory of a NumPy or CuPy array (the array stays alive)."""
    if isinstance(a, np.ndarray):
        return torch.from_dlpack(a)
    try:
        return torch.from_dlpack(a)
    except Exception:  # bfloat16 CuPy array that DLPack cannot carry: as int16 bits
        if getattr(a.dtype, "name", "") != "bfloat16":
            raise
        import cupy

        return torch.from_dlpack(a.view(cupy.int16)).view(torch.bfloat16)


def _op_tags() -> tuple:
    """Tags for every ``deformarray`` custom operator: ``cudagraph_unsafe`` where this
    PyTorch has it (the CUDA operators allocate from PyTorch's caching allocator through
    CuPy and refuse CUDA-graph capture, see ``_on_device``), so that torch.compile's CUDA
    graphs leave them out instead of capturing them."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    return (tag,) if tag is not None else ()


OP_TAGS = _op_tags()


def _torch_allows_tf32() -> bool:
    """Whether PyTorch lets float32 CUDA matmuls use TF32: ``torch.backends.cuda.matmul``'s
    ``fp32_precision`` ("tf32" / "ieee") where set, else ``allow_tf32``."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision == "tf32":
        return True
    if precision == "ieee":
        return False
    return bool(matmul.allow_tf32)


def _check_not_capturing() -> None:
    """RuntimeError while the current CUDA stream is capturing a CUDA graph: the operators
    allocate their workspace per call (and some read back to the host), which a graph replay
    would not redo."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "deformarray.torch operators cannot be captured in a CUDA graph (they allocate their "
            "workspace on every call): run them outside torch.cuda.graph / make_graphed_callables, "
            "or let torch.compile split the graph around them (they carry the cudagraph_unsafe tag)"
        )


def _torch_allocator(index: int, stream: Any) -> Callable:
    """A CuPy allocator that takes memory from PyTorch's caching allocator on device
    ``index`` and ``stream``, so that ``torch.cuda.memory_allocated`` and friends see the
    operators' workspace and outputs and PyTorch reuses the memory after them."""
    import cupy

    def malloc(size: int, device_id: int) -> int:
        return int(torch.cuda.caching_allocator_alloc(size, device_id, stream))

    def free(ptr: int, device_id: int) -> None:
        torch.cuda.caching_allocator_delete(ptr)

    return cupy.cuda.memory.PythonFunctionAllocator(malloc, free).malloc


@contextmanager
def _on_device(device: torch.device) -> Iterator[None]:
    """On CUDA: make the tensor's device and PyTorch's current stream CuPy's current ones,
    so the kernels are ordered with the surrounding PyTorch work, with no synchronisation;
    allocate from PyTorch's caching allocator on that stream; follow PyTorch's TF32 setting
    for float32 products; refuse CUDA-graph capture."""
    if device.type != "cuda":
        yield
        return
    import cupy

    _check_not_capturing()
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index)
    with (
        cupy.cuda.Device(index),
        cupy.cuda.ExternalStream(stream.cuda_stream, index),
        cupy.cuda.using_allocator(_torch_allocator(index, stream)),
        _config.allow_tf32(_torch_allows_tf32()),
    ):
        yield


def _common_dtype(tensors: Mapping[str, Tensor | None]) -> torch.dtype:
    """The one floating dtype shared by the given tensors (None skipped), else TypeError."""
    present = {k: v for k, v in tensors.items() if v is not None}
    (first_name, first), *_ = present.items()
    for name, t in present.items():
        if t.dtype != first.dtype:
            raise TypeError(f"all tensors must share one dtype: {first_name} is {first.dtype}, {name} is {t.dtype}")
    return first.dtype


def _call_array_api(fn: Callable, tensors: dict[str, Tensor | None], **kwargs) -> Any:
    """Call the array function ``fn(**tensors, **kwargs)`` on array views of the tensors.

    Every tensor must share one dtype (TypeError otherwise, as the array API). Half types on
    the CPU are computed in float32 (the CPU kernels have float32/float64 only) and cast back.
    Returns the result (one array or a named tuple of arrays/None) as tensors of that dtype.
    """
    dtype = _common_dtype(tensors)
    device = next(t for t in tensors.values() if t is not None).device
    if device.type == "cpu" and dtype in _HALF:
        tensors = {k: None if v is None else v.float() for k, v in tensors.items()}
    with _on_device(device):
        arrays = {k: _to_array(v) for k, v in tensors.items()}
        result = fn(**arrays, **kwargs)

        def back(a: Any) -> Tensor | None:
            if a is None:
                return None
            t = _to_tensor(a)
            return t if t.dtype == dtype else t.to(dtype)

        if isinstance(result, tuple):
            # named tuples of gradients keep their type
            return type(result)(*(back(a) for a in result))  # type: ignore[arg-type]
        return back(result)


def _static_shapes(*tensors: Tensor | None) -> bool:
    """True when every shape is made of plain ints (no symbolic sizes under torch.compile)."""
    return all(isinstance(s, int) for t in tensors if t is not None for s in t.shape)


def _int_arg(value: Any, name: str, minimum: int, maximum: int | None = None, shown: Any = None) -> int:
    """An int argument of an operator, in the array API's range: the operators' schemas hold
    int64, so a larger value would fail in the dispatcher before any check could name it."""
    v = int(value)
    shown = value if shown is None else shown
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {shown!r}")
    if maximum is None:
        check_int_range(v, name, shown)
    else:
        check_int_range(v, name, shown, maximum)
    return v


def _pair_list(value: Any, name: str, minimum: int) -> list[int]:
    """An int or a pair of ints as a two-int list (the operators' ``int[]`` arguments), each
    at least ``minimum`` and at most 2**31 - 1 (the array API's errors)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return [_int_arg(value, name, minimum, shown=value)] * 2
    if isinstance(value, (tuple, list)) and len(value) == 2:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [_int_arg(v, name, minimum, shown=value) for v in value]
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def _empty_like_nothing(like: Tensor) -> Tensor:
    """Placeholder output for a gradient that does not exist (an absent bias or mask):
    custom operators return tensors, so it is an empty tensor the autograd formula drops."""
    return like.new_empty((0,))


def _grad_or_nothing(grad: Tensor | None, like: Tensor) -> Tensor:
    """A backward operator's output for one gradient: contiguous, or (absent argument) the
    empty placeholder."""
    return _empty_like_nothing(like) if grad is None else grad.contiguous()


def _fake_grad_or_nothing(arg: Tensor | None, like: Tensor) -> Tensor:
    """What ``_grad_or_nothing`` gives, in a fake kernel: shaped as the argument ``arg``."""
    return like.new_empty((0,)) if arg is None else torch.empty_like(arg, memory_format=torch.contiguous_format)


def _deterministic_flag() -> bool:
    """What the backward operators receive: True when PyTorch asks for deterministic
    algorithms; False means "deformarray's own default" (``set_deterministic``)."""
    return torch.are_deterministic_algorithms_enabled()


def _register_autocast(op: Any) -> None:
    """Under autocast, run ``op`` in float32 (like torchvision's deformable operators)."""
    for device_type in ("cpu", "cuda"):
        try:
            op.register_autocast(device_type, torch.float32)
        except (ValueError, RuntimeError):  # a build without that autocast backend
            pass
        except AttributeError:  # PyTorch < 2.5: no register_autocast (mixed dtypes raise)
            return


def _cast_back(out: Tensor, input: Tensor) -> Tensor:
    """Under autocast the operator ran in float32: return the dtype of ``input``."""
    return out if out.dtype == input.dtype else out.to(input.dtype)


def _roi_out_shape(input: Tensor, rois: Tensor, ph: Any, pw: Any) -> tuple:
    """The output shape ``(R, C, ph, pw)`` of a RoI pooling as its fake kernel sees it
    (deform_roi_pool and deform_psroi_pool share it)."""
    # Only what shapes tell: the values of rois (batch indices, order) are checked when the
    # operator runs, as they cannot be read while tracing.
    if input.dim() != 4:
        raise ValueError(f"input must have shape (N, C, H, W), got {tuple(input.shape)}")
    if rois.dim() != 2 or (_static_shapes(rois) and rois.shape[1] != 5):
        raise ValueError(
            f"rois must have shape (R, 5) with rows [batch_index, x1, y1, x2, y2], got {tuple(rois.shape)}"
        )
    return (rois.shape[0], input.shape[1], ph, pw)
