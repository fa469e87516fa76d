"""A/B of Numba's threading layers for the CPU backend: TBB (deformarray's choice, fork-safe)
against GNU OpenMP (Numba's default on Linux, the layer before TBB was chosen).

    python benchmarks/threading_layer.py [--rounds 2] [--repeat 3] [--op conv|roi|all] [--layers omp,tbb]

Runs ``deformarray bench --json`` in fresh processes, alternating the layers (omp, tbb,
omp, tbb, ...), so that a slow spell of the shared machine hits both; each process times
ours and its baseline interleaved. Prints, per case and phase, the median over all runs of
each layer of the ratio ours / baseline (same process) with its range, and the tbb/omp
ratio of the medians of our times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def one_run(layer: str, op: str, repeat: int) -> dict:
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer, DEFORMARRAY_QUIET="1")
    cmd = [sys.executable, "-m", "deformarray", "bench", "--op", op, "--repeat", str(repeat), "--json"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    try:
        report = json.loads(run.stdout)  # exit status 1 when a row has an error: still a report
    except json.JSONDecodeError:
        raise SystemExit(f"{layer}: bench failed: {run.stderr[-2000:]}") from None
    got = report["environment"]["numba_threading_layer"]
    if got != layer:
        raise SystemExit(f"asked for {layer}, ran on {got}")
    return report


def label(row: dict) -> str:
    shape = ",".join(str(v) for v in row["shape"].values())
    return f"{row['op']} {row.get('variant') or ''} {shape}".replace("  ", " ")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="processes per layer (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds inside each process (default 3)")
    ap.add_argument("--op", default="conv", choices=("conv", "roi", "all"))
    ap.add_argument("--layers", default="omp,tbb", help="layers to compare, the first is the base (default omp,tbb)")
    args = ap.parse_args()
    layers = args.layers.split(",")
    times: dict[tuple[str, str, str], list[float]] = {}
    ratios: dict[tuple[str, str, str], list[float]] = {}
    for r in range(args.rounds):
        for layer in layers:
            print(f"round {r + 1}/{args.rounds}: {layer}", file=sys.stderr, flush=True)
            for row in one_run(layer, args.op, args.repeat)["results"]:
                ours = row["ours"]
                ref = next((n for n in ("dense", "torchvision") if n in row), None)
                for ph in ("fwd", "fwdbwd"):
                    times.setdefault((label(row), ph, layer), []).extend(ours.get(f"{ph}_times_ms", []))
                    if ref is not None:
                        base = row[ref].get(f"{ph}_times_ms", [])
                        mine = ours.get(f"{ph}_times_ms", [])
                        ratios.setdefault((label(row), ph, layer), []).extend(
                            a / b for a, b in zip(mine, base) if b > 0
                        )
    cases = sorted({(c, ph) for c, ph, _ in times}, key=lambda k: (k[0], k[1] != "fwd"))
    base = layers[0]
    head = ["case", "phase"] + [f"{la} ms (range)" for la in layers] + [f"{la} / {base}" for la in layers[1:]]
    head += [f"ratio to baseline, {la}" for la in layers]
    print(" | ".join(head))
    for case, ph in cases:
        cells = [case, ph]
        med = {}
        for layer in layers:
            t = times[(case, ph, layer)]
            med[layer] = statistics.median(t)
            cells.append(f"{med[layer]:.2f} ({min(t):.2f}-{max(t):.2f})")
        cells += [f"{med[la] / med[base]:.2f}x" for la in layers[1:]]
        for layer in layers:
            q = ratios.get((case, ph, layer))
            cells.append(f"{statistics.median(q):.2f}x ({min(q):.2f}-{max(q):.2f})" if q else "-")
        print(" | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
