"""deformarray.torch's CUDA call path without a GPU: PyTorch's caching allocator and stream
for CuPy, TF32 following PyTorch, CUDA-graph capture refused, the cudagraph_unsafe tag.
torch.cuda and CuPy are stand-ins here (monkeypatched); tests/test_cuda_deform_conv.py
checks the same on a GPU."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest

torch = pytest.importorskip("torch")

import deformarray  # noqa: E402
import deformarray.torch  # noqa: E402
from deformarray.torch import _glue  # noqa: E402


class _FakeCupy:
    """The parts of CuPy that _glue._on_device uses, recording what it was given."""

    def __init__(self):
        self.events = []
        fake = self

        class Device:
            def __init__(self, index):
                fake.events.append(("device", index))

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class ExternalStream(Device):
            def __init__(self, ptr, index):
                fake.events.append(("stream", ptr, index))

        class PythonFunctionAllocator:
            def __init__(self, malloc, free):
                self._malloc, self._free = malloc, free

            def malloc(self, size):
                ptr = self._malloc(size, 0)
                fake.events.append(("malloc", size, ptr))
                self._free(ptr, 0)
                return ptr

        @contextlib.contextmanager
        def using_allocator(allocator):
            fake.allocator = allocator
            fake.events.append(("allocator",))
            yield

        self.cuda = types.SimpleNamespace(
            Device=Device,
            ExternalStream=ExternalStream,
            using_allocator=using_allocator,
            memory=types.SimpleNamespace(PythonFunctionAllocator=PythonFunctionAllocator),
        )


@pytest.fixture
def fake_cuda(monkeypatch):
    cupy = _FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    stream = types.SimpleNamespace(cuda_stream=0xABC)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index=None: stream)

    def alloc(size, device=None, stream=None):
        calls.append(("alloc", size, device, stream))
        return 0x1000

    monkeypatch.setattr(torch.cuda, "caching_allocator_alloc", alloc)
    monkeypatch.setattr(torch.cuda, "caching_allocator_delete", lambda ptr: calls.append(("delete", ptr)))
    return cupy, stream, calls


def test_cupy_allocates_from_torch_on_its_current_stream(fake_cuda):
    cupy, stream, calls = fake_cuda
    with _glue._on_device(torch.device("cuda", 0)):
        assert cupy.allocator(256) == 0x1000
    assert ("stream", 0xABC, 0) in cupy.events and ("allocator",) in cupy.events
    assert calls == [("alloc", 256, 0, stream), ("delete", 0x1000)]


def test_cpu_tensors_touch_nothing(fake_cuda):
    cupy, _, calls = fake_cuda
    with _glue._on_device(torch.device("cpu")):
        pass
    assert cupy.events == [] and calls == []


def test_capture_is_refused(fake_cuda, monkeypatch):
    cupy, _, calls = fake_cuda
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with _glue._on_device(torch.device("cuda", 0)):
            pytest.fail("entered while capturing")
    assert cupy.events == [] and calls == []


@pytest.mark.parametrize("allow", [False, True])
def test_tf32_follows_torch(fake_cuda, monkeypatch, allow):
    matmul = types.SimpleNamespace(allow_tf32=allow, fp32_precision="none")
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    deformarray.set_allow_tf32(not allow)  # the process-wide value is not what the adapter uses
    try:
        with _glue._on_device(torch.device("cuda", 0)):
            assert deformarray.get_allow_tf32() is allow
        assert deformarray.get_allow_tf32() is (not allow)
        matmul.fp32_precision = "tf32"
        with _glue._on_device(torch.device("cuda", 0)):
            assert deformarray.get_allow_tf32() is True
        matmul.fp32_precision = "ieee"
        with _glue._on_device(torch.device("cuda", 0)):
            assert deformarray.get_allow_tf32() is False
    finally:
        deformarray.set_allow_tf32(False)


def test_deform_conv_ops_carry_the_cudagraph_unsafe_tag():
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None:  # pragma: no cover
        pytest.skip("this PyTorch has no cudagraph_unsafe tag")
    assert _glue.OP_TAGS == (tag,)
    assert tag in torch.ops.deformarray.deform_conv2d.default.tags
    assert tag in torch.ops.deformarray.deform_conv2d_backward.default.tags
