"""The operator families of ``deformarray bench``, in the order they run and are reported.

A family is a module with the names of ``common.Family`` (``conv.py``, ``roi.py``,
``msda.py``). Adding one: write its module on the model of ``roi.py`` (it imports ``common``
only) and add it to ``FAMILIES`` below. The command line (``--op``, its shape options and help), the run, the
tables, the JSON and the chart pick it up from here.
"""

from __future__ import annotations

from . import conv, dcn, msda, roi
from .common import Family

FAMILIES: tuple[Family, ...] = (conv, roi, msda, dcn)

NAMES = tuple(family.NAME for family in FAMILIES)  # the --op values; --op all runs them in this order


def family_of(row: dict) -> Family:
    """The family a result row belongs to (by its "op")."""
    for family in FAMILIES:
        if row["op"] in family.ROW_OPS:
            return family
    raise ValueError(f"no operator family has rows of {row['op']!r}")
