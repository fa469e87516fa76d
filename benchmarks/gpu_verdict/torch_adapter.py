"""Step 3 of the GPU verdict: deformarray.torch on CUDA. One JSON line per check, a count
last; exit 1 if a check failed. The references are refs.npz's deform_conv2d case (float64,
CPU). Checks: float32 / float16 / bfloat16 forward and backward; channels_last input; a side
stream; torch.compile; CUDA-graph capture (expected: refused with a clear RuntimeError; a
capture that succeeds is recorded, with whether its replay matched)."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parents[1]))

from smoke import TOL, load, rel_err  # noqa: E402

RESULTS: list[dict] = []


def check(name: str):
    def wrap(fn):
        try:
            row = fn() or {}
            row.setdefault("ok", True)
        except Exception as exc:
            row = {"ok": False, "error": repr(exc)[:300], "where": traceback.format_exc(limit=3)[-600:]}
        row["check"] = name
        RESULTS.append(row)
        print(json.dumps(row, default=str), flush=True)
        return fn

    return wrap


def main() -> int:
    import torch

    import deformarray.torch as dt

    ref = load(HERE / "refs.npz")["deform_conv2d"]
    names = ("input", "offset", "weight", "bias", "mask")
    dev = torch.device("cuda")

    def tensors(dtype, channels_last=False):
        ts = {k: torch.tensor(ref["in"][k], dtype=dtype, device=dev, requires_grad=True) for k in names}
        if channels_last:
            ts["input"] = ts["input"].detach().to(memory_format=torch.channels_last).requires_grad_(True)
        return ts

    def run(ts, fn=dt.deform_conv2d):
        y = fn(ts["input"], ts["offset"], ts["weight"], ts["bias"], padding=1, mask=ts["mask"])
        y.backward(torch.tensor(ref["grad_output"], dtype=y.dtype, device=dev))
        torch.cuda.synchronize()
        errs = {"out": rel_err(y.detach().double().cpu().numpy(), ref["out"])}
        for k in names:
            errs[k] = rel_err(ts[k].grad.double().cpu().numpy(), ref["grad"][k])
        return errs

    for dtype, tol in (
        (torch.float32, TOL["float32"]),
        (torch.float16, TOL["float16"]),
        (torch.bfloat16, TOL["bfloat16"]),
    ):

        @check(f"dtype {dtype}")
        def _(dtype=dtype, tol=tol):
            errs = run(tensors(dtype))
            return {"err": errs, "ok": all(e <= tol for e in errs.values())}

    @check("channels_last float32")
    def _():
        errs = run(tensors(torch.float32, channels_last=True))
        return {"err": errs, "ok": all(e <= TOL["float32"] for e in errs.values())}

    @check("side stream float32")
    def _():
        s = torch.cuda.Stream()
        ts = tensors(torch.float32)
        with torch.cuda.stream(s):
            errs = run(ts)
        torch.cuda.synchronize()
        return {"err": errs, "ok": all(e <= TOL["float32"] for e in errs.values())}

    @check("torch.compile float32")
    def _():
        fn = torch.compile(dt.deform_conv2d)
        errs = run(tensors(torch.float32), fn)
        return {"err": errs, "ok": all(e <= TOL["float32"] for e in errs.values())}

    @check("CUDA graph capture")
    def _():
        ts = {k: v.detach() for k, v in tensors(torch.float32).items()}
        g = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(g):
                y = dt.deform_conv2d(ts["input"], ts["offset"], ts["weight"], ts["bias"], padding=1, mask=ts["mask"])
        except RuntimeError as exc:
            msg = str(exc)
            return {"outcome": "refused", "message": msg[:300], "ok": "CUDA graph" in msg}
        g.replay()
        torch.cuda.synchronize()
        err = rel_err(y.double().cpu().numpy(), ref["out"])
        return {"outcome": "captured", "replay_err": err, "ok": err <= TOL["float32"]}

    bad = [r for r in RESULTS if not r["ok"]]
    print(f"torch adapter: {len(RESULTS) - len(bad)} of {len(RESULTS)} checks passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
