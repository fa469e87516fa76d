"""DistributedDataParallel with deformarray.torch modules: two CPU processes (gloo) give
the same gradients as one process on the concatenated batch."""

from __future__ import annotations

import datetime

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

import deformarray.torch as dt  # noqa: E402

WORLD_SIZE = 2
PER_RANK = 2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.ReLU(),
        dt.DeformConv2dPack(4, 4, 3, padding=1, deform_groups=2),
        torch.nn.ReLU(),
        dt.ModulatedDeformConv2dPack(4, 3, 3, padding=1, stride=2),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    ).double()
    with torch.no_grad():  # non-zero offsets, so that the offset gradients matter too
        for m in net.modules():
            if isinstance(m, (dt.DeformConv2dPack, dt.ModulatedDeformConv2dPack)):
                m.conv_offset.weight.normal_(0, 0.2)
    return net


def _batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD_SIZE * PER_RANK, 2, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (WORLD_SIZE * PER_RANK,), generator=gen)
    return x, y


def _grads(net: torch.nn.Module) -> dict:
    return {name: p.grad.detach().clone() for name, p in net.named_parameters()}


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        net = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        x, y = _batch()
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        loss = torch.nn.functional.cross_entropy(ddp(x[part]), y[part])
        loss.backward()  # DDP averages the gradients over the ranks
        if rank == 0:
            torch.save(_grads(net), out_file)
        # both ranks done before either tears down: a rank leaving early once made gloo's
        # threads in the other call std::terminate (SIGABRT) in CI
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_match_single_process(tmp_path, monkeypatch):
    # Keep the two workers from oversubscribing the machine's cores
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out_file = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(str(tmp_path / "init"), out_file), nprocs=WORLD_SIZE, join=True)
    ddp_grads = torch.load(out_file)

    net = _model()
    x, y = _batch()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    expected = _grads(net)

    assert set(ddp_grads) == set(expected)
    assert any("conv_offset" in k for k in expected)
    for name, g in expected.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(ddp_grads[name], g, rtol=1e-10, atol=1e-12, msg=name)
