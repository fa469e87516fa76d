"""Write refs.npz: every smoke case's float64 inputs, output, grad_output and gradients from
the NumPy backend. Run from the repository root after a change to the CPU numbers:

    PYTHONPATH=. python benchmarks/gpu_verdict/make_refs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parents[1]))  # deformarray: PYTHONPATH first

import cases  # noqa: E402

import deformarray  # noqa: E402


def main() -> int:
    out: dict[str, np.ndarray] = {}
    for name, (op, static) in cases.STATIC.items():
        a = cases.arrays(name)
        y = getattr(deformarray, op)(**a, **static)
        gy = np.random.default_rng(1).standard_normal(y.shape)
        g = cases.grads_of(getattr(deformarray, op + "_backward")(gy, **a, **static))
        for k, v in a.items():
            out[f"{name}/in/{k}"] = v
        out[f"{name}/out"] = np.asarray(y)
        out[f"{name}/grad_output"] = gy
        for k, v in g.items():
            out[f"{name}/grad/{k}"] = np.asarray(v)
    path = HERE / "refs.npz"
    np.savez_compressed(path, **out)
    print(f"{path}: {len(out)} arrays, {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
