"""Step 2 of the GPU verdict: every operator x dtype x backward mode on the GPU (CuPy) against
the float64 references of refs.npz (computed on the CPU by make_refs.py).

One JSON line per check on stdout (``"ok": true/false``), a count last; exit 1 if any check
failed. ``--list`` only loads refs.npz and lists the checks (the dry run); ``--cpu`` runs the
float64 and float32 checks on NumPy arrays (the comparison logic, without a GPU; slow the
first time: Numba compiles).

Error measure: ||got - ref|| / ||ref|| over the whole array (METHOD.md), NaN never passes.
Bounds: float64 1e-9, float32 1e-4, float16 2e-2, bfloat16 1e-1 (the 16-bit inputs are
rounded before the call, so their error includes the inputs' rounding). Deterministic mode
must also give the same bits twice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parents[1]))

import cases  # noqa: E402

TOL = {"float64": 1e-9, "float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
DTYPES = tuple(TOL)
MODES = ("atomic", "deterministic")


def load(path: Path) -> dict[str, dict]:
    """{case: {"in": {...}, "out": array, "grad_output": array, "grad": {...}}}."""
    data = np.load(path)
    refs: dict[str, dict] = {}
    for key in data.files:
        name, kind, *rest = key.split("/")
        entry = refs.setdefault(name, {"in": {}, "grad": {}})
        if rest:
            entry[kind][rest[0]] = data[key]
        else:
            entry[kind] = data[key]
    missing = set(cases.STATIC) - set(refs)
    if missing:
        raise SystemExit(f"refs.npz lacks cases {sorted(missing)}: run make_refs.py")
    return refs


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float64)
    if got.shape != ref.shape:
        return float("inf")
    if not np.all(np.isfinite(got)):
        return float("nan")
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(got - ref) / (denom if denom > 0 else 1.0))


def np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def run_checks(refs: dict, dtypes: tuple, modes: tuple, xp, to_host) -> list[dict]:
    import deformarray

    results = []
    for name, (op, static) in cases.STATIC.items():
        ref = refs[name]
        for dtype in dtypes:
            dt = np_dtype(dtype)

            def cast(k, v, dt=dt):
                return xp.asarray(v if k in cases.INTEGER_ARGS else v.astype(dt))

            a = {k: cast(k, v) for k, v in ref["in"].items()}
            gy = xp.asarray(ref["grad_output"].astype(dt))
            t0 = time.perf_counter()
            try:
                y = to_host(getattr(deformarray, op)(**a, **static))
                err = rel_err(y, ref["out"])
                results.append(dict(case=name, dtype=dtype, what="forward", err=err, ok=bool(err <= TOL[dtype])))
            except Exception as exc:  # a failing call is a failed check, the others still run
                results.append(dict(case=name, dtype=dtype, what="forward", error=repr(exc)[:300], ok=False))
            for mode in modes:
                what = f"backward {mode}"
                try:
                    back = getattr(deformarray, op + "_backward")
                    g = cases.grads_of(back(gy, **a, **static, deterministic=mode == "deterministic"))
                    errs = {k: rel_err(to_host(v), ref["grad"][k]) for k, v in g.items()}
                    ok = set(errs) == set(ref["grad"]) and all(e <= TOL[dtype] for e in errs.values())
                    row = dict(case=name, dtype=dtype, what=what, err=errs, ok=bool(ok))
                    if mode == "deterministic":
                        g2 = cases.grads_of(back(gy, **a, **static, deterministic=True))
                        same = all(to_host(g2[k]).tobytes() == to_host(v).tobytes() for k, v in g.items())
                        row["bitwise_repeat"] = same
                        row["ok"] = bool(ok and same)
                    results.append(row)
                except Exception as exc:
                    results.append(dict(case=name, dtype=dtype, what=what, error=repr(exc)[:300], ok=False))
            results[-1]["seconds"] = round(time.perf_counter() - t0, 3)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("refs", nargs="?", default=str(HERE / "refs.npz"))
    parser.add_argument("--list", action="store_true", help="list the checks only (no GPU)")
    parser.add_argument("--cpu", action="store_true", help="float64 and float32 on NumPy arrays")
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=DTYPES)
    args = parser.parse_args(argv)
    refs = load(Path(args.refs))
    if args.list:
        n = 0
        for name in cases.STATIC:
            for dtype in args.dtypes:
                print(json.dumps(dict(case=name, dtype=dtype, checks=["forward", *(f"backward {m}" for m in MODES)])))
                n += 1 + len(MODES)
        print(f"{n} checks listed, {len(refs)} cases in {args.refs}")
        return 0
    if args.cpu:
        results = run_checks(refs, tuple(d for d in args.dtypes if d in ("float64", "float32")), MODES, np, np.asarray)
    else:
        import cupy

        def to_host(v):
            return cupy.asnumpy(v)

        results = run_checks(refs, tuple(args.dtypes), MODES, cupy, to_host)
    for r in results:
        print(json.dumps(r, default=str))
    bad = [r for r in results if not r["ok"]]
    print(f"smoke: {len(results) - len(bad)} of {len(results)} checks passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
