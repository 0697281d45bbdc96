"""Benchmarks: each prints ratios measured in one run (docs/BENCHMARKS.md, ``make bench``)."""
import indexer  # noqa: F401  (first, so that its OpenBLAS setting precedes numpy's import)
