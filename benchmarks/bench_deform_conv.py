"""Benchmark deform_conv2d against a dense convolution: ``deformarray bench --op conv``.

    python benchmarks/bench_deform_conv.py [--shapes "N,C,H,W,Co;..."] [--repeat 5] [--json] ...

The logic lives in ``deformarray.bench`` (this family: ``deformarray/bench/conv.py``) so that
the installed command works from a wheel; this script only forwards its arguments.
"""

import sys

from deformarray.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "conv", *sys.argv[1:]]))
