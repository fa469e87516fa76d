"""Cold-start time of the CPU backend: the first call in a fresh Python process.

Runs a child process twice with the same, initially empty Numba cache directory:
the first run compiles every kernel (what a new installation pays once), the second
loads them from the cache (what every later process pays). Each child reports the time
of ``import deformarray``, of its first forward and of its first backward (float32).

    python benchmarks/cold_start.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, time
t0 = time.perf_counter()
import numpy as np
import deformarray as da
t1 = time.perf_counter()
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 16, 32, 32), dtype=np.float32)
w = rng.standard_normal((16, 16, 3, 3), dtype=np.float32)
off = rng.standard_normal((2, 18, 32, 32)).astype(np.float32)
m = rng.uniform(0, 1, (2, 9, 32, 32)).astype(np.float32)
y = da.deform_conv2d(x, off, w, None, 1, 1, 1, m)
t2 = time.perf_counter()
da.deform_conv2d_backward(np.ones_like(y), x, off, w, None, 1, 1, 1, m)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_forward_s": t2 - t1, "first_backward_s": t3 - t2}))
"""


def run_child(cache_dir: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as cache_dir:
        rows = [("empty cache (compiles)", run_child(cache_dir)), ("warm cache (fresh process)", run_child(cache_dir))]
    print(f"{'first call in a fresh process':30s} {'import s':>9s} {'1st fwd s':>10s} {'1st bwd s':>10s}")
    for label, r in rows:
        print(f"{label:30s} {r['import_s']:9.2f} {r['first_forward_s']:10.2f} {r['first_backward_s']:10.2f}")


if __name__ == "__main__":
    main()
