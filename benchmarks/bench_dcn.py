"""Benchmark DCNv3 / DCNv4: the same as ``deformarray bench --op dcn``.

    python benchmarks/bench_dcn.py [--repeat 5] [--dtype float32] [--json] ...
    python benchmarks/bench_dcn.py --dcn-shapes "N,H,W,C,G[,K];..."

dcnv3 and dcnv4, forward and forward + backward, at InternImage-T's four stage sizes (3x3,
padding 1, channels 64-512 in groups of 16) and DCNv4's benchmark size (56x56, G=4, D=32;
N=4 instead of 64 on the CPU), against the torch grid_sample composition (InternImage's
dcnv3_core_pytorch) when torch is importable. The sizes and the logic live in
``deformarray/bench/dcn.py`` so that the installed command works from a wheel; this script
only forwards its arguments.
"""

import sys

from deformarray.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "dcn", *sys.argv[1:]]))
