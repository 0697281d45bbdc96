"""zeropass indexer: checkpoint -> canonical weights -> projections -> Parquet dataset.

Imports torch lazily where it can; ``query`` never imports this package at import time.
"""
import os

# Before numpy loads OpenBLAS: its idle threads sleep after a GEMM instead of spinning ~0.1 s on the
# cores that the top-k selection needs next (indexer/kernels/vectors.py). No effect if numpy was
# imported first; the `zeropass` CLI sets it in query/__init__.py.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
