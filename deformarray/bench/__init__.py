"""The benchmark behind ``deformarray bench`` (and ``benchmarks/bench_*.py``), in a package
so that the installed command works from a wheel. Private: its names may change.

Modules, and the only direction their imports go (tests/test_repository.py fails on a
cycle, function-level imports included):

    common  <-  conv, roi, msda, dcn  <-  registry  <-  report, plot  <-  deformarray.cli

* ``common.py``: what every family shares: the interleaved measurement (``measure_all``,
  ``ratios_of``), memory meters, optional imports and the GPU, machine load, progress,
  ``Options``, ``Step``, the table helpers, and ``Family``, the interface of a family.
* ``conv.py`` (deform_conv2d), ``roi.py`` (deform_roi_pool and deform_psroi_pool),
  ``msda.py`` (ms_deform_attn against the torch grid_sample composition), ``dcn.py``
  (dcnv3 / dcnv4 against InternImage's grid_sample composition): one operator
  family each: its shapes and command-line sizes, inputs, contenders, rows and
  tables.
* ``registry.py``: ``FAMILIES``, the families in the order they run and are reported.
* ``report.py``: ``run(opts)`` and ``format_report(report)``, through the registry.
* ``plot.py``: ``--plot``, the report as a bar chart (matplotlib).

A new operator family is one new module (on the model of ``roi.py``, importing ``common``
only) and one entry in ``registry.FAMILIES``.
"""
