"""Benchmark multi-scale deformable attention: the same as ``deformarray bench --op msda``.

    python benchmarks/bench_msda.py [--repeat 5] [--dtype float32] [--json] ...
    python benchmarks/bench_msda.py --msda-shapes "N,Lq,M,D,L,P,H,W;..."   # Lq may be S

ms_deform_attn, forward and forward + backward, on Deformable DETR's decoder (N=2, 300
queries) and encoder (N=1, one query per pixel of the 800x1216 image's pyramid) sizes,
against the torch grid_sample composition (Deformable DETR's ms_deform_attn_core_pytorch)
when torch is importable. The sizes and the logic live in ``deformarray/bench/msda.py`` so
that the installed command works from a wheel; this script only forwards its arguments.
"""

import sys

from deformarray.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "msda", *sys.argv[1:]]))
