"""Benchmarks for rla_ext: a CLI (``python -m benchmarks``) and pytest-benchmark suites.

Both build their cases with the same setup functions (``benchmarks.cases``, ``benchmarks.block``,
``benchmarks.model_step``), so a number in the report and a number in the suite measure the same
thing. Results are data first (results.json), then a markdown table and a plot.
"""
