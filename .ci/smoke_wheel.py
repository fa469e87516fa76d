"""Smoke test of an installed deformarray wheel, run from outside the source tree.

.ci/run builds the wheel, installs it into a fresh venv and runs this file from a temporary
directory, so ``import deformarray`` can only find the installed copy. Checks: the package
and its kernel sources come from site-packages, one forward/backward pair gives the
numbers of a plain convolution at zero offsets, and the console script answers.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np

import deformarray as da
from deformarray.cuda import _loader

installed = Path(da.__file__).resolve()
venv_site = Path(sys.prefix).resolve()
assert "site-packages" in installed.parts and venv_site in installed.parents, (
    f"deformarray imported from {installed}, not from the wheel installed in {venv_site}"
)

# Every kernel file named by the loader ships inside the wheel (plus the shared header).
kernel_dir = resources.files("deformarray.kernels_cu")
for name in [*_loader.KERNELS, "common.cuh"]:
    text = kernel_dir.joinpath(name).read_text()
    assert "__global__" in text or name.endswith(".cuh"), f"{name} looks empty"
    # the loader's own reader (inlines the package headers) must work on the installed files
    assert not re.search(r'^\s*#\s*include\s*"', _loader.read_source(name), re.M), f"{name}: header not inlined"

# Zero offsets and a unit mask: deform_conv2d is the plain convolution (checked by direct sums).
rng = np.random.default_rng(0)
x = rng.standard_normal((1, 3, 6, 7))
w = rng.standard_normal((2, 3, 3, 3))
off = np.zeros((1, 18, 6, 7))
y = da.deform_conv2d(x, off, w, padding=1)
xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
dense = np.zeros_like(y)
for i in range(6):
    for j in range(7):
        dense[0, :, i, j] = np.tensordot(w, xp[0, :, i : i + 3, j : j + 3], axes=3)
np.testing.assert_allclose(y, dense, rtol=1e-12, atol=1e-12)
grads = da.deform_conv2d_backward(np.ones_like(y), x, off, w, padding=1)
# with grad_output = 1, each output channel's weight gradient is the sum of all input patches
patch_sums = np.array(
    [[[xp[0, c, ki : ki + 6, kj : kj + 7].sum() for kj in range(3)] for ki in range(3)] for c in range(3)]
)
np.testing.assert_allclose(grads.weight, np.broadcast_to(patch_sums, w.shape), rtol=1e-12)
assert grads.input.shape == x.shape and grads.offset.shape == off.shape

out = subprocess.run(["deformarray", "info"], capture_output=True, text=True, check=True).stdout
assert "deformarray" in out and str(installed.parent) in out, out
print(f"wheel smoke test passed: deformarray {da.__version__} from {installed.parent}")
print(sys.version.split()[0], "numpy", np.__version__)
