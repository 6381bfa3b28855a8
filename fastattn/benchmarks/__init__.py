"""fastattn's benchmark suites (pytest-benchmark), shipped inside the package.

The suites used to live in the repository's top-level ``benchmarks/`` folder (DESIGN.md
section 3); they moved here so that ``python -m fastattn bench`` works from an installed
wheel, with no source checkout, as issue 21 asks. ``benchmarks/`` keeps the committed
results (``benchmarks/results/``) and a thin ``benchmarks/run.py`` for developers.

    python -m fastattn bench [-k EXPR] [--out JSON] [--plot PNG] [--tiny]
    python -m fastattn bench --report JSON [--plot PNG] [--readme]

Modules: ``plugin`` (the pytest plugin: timing, GB/s / TFLOP/s, progress events, metadata),
``meta`` (machine, versions and commit of a run), ``report`` (table, plot, README block),
``runner`` (runs pytest quietly in a subprocess and draws the progress), ``bench_*.py``
(the suites; named bench_*, not test_*, so the test suite never collects them).
"""
