"""zeropass indexer: checkpoint -> canonical weights -> projections -> Parquet dataset.

Imports torch lazily where it can; ``query`` never imports this package at import time.
"""
