"""Benchmark the deformable RoI pooling operators: the same as ``deformarray bench --op roi``.

    python benchmarks/bench_roi_pool.py [--repeat 9] [--dtype float32] [--json] ...
    python benchmarks/bench_roi_pool.py --roi-shapes "N,C,H,W,R;..." --psroi-shapes "N,K,H,W,R;..."

deform_roi_pool (offset; offset + mask) and deform_psroi_pool (class offsets; no offset),
forward and forward + backward, against torchvision's ``roi_align(aligned=True)`` /
``ps_roi_align`` of the same sizes when torchvision is importable. The sizes and the logic
live in ``deformarray/bench/roi.py`` so that the installed command works from a wheel; this
script only forwards its arguments.
"""

import sys

from deformarray.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "roi", *sys.argv[1:]]))
