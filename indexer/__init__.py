"""zeropass indexer: checkpoint -> canonical weights -> projections -> Parquet dataset.

Imports torch lazily where it can; ``query`` never imports this package at import time.
"""
import os

# Before numpy loads OpenBLAS: its idle threads sleep after a GEMM instead of spinning ~0.1 s on the
# cores that the top-k selection needs next (indexer/kernels/vectors.py). No effect if numpy was
# imported first; the `zeropass` CLI sets it in query/__init__.py.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def _one_malloc_arena() -> None:
    """glibc allocates for every thread of this process from one arena. Set here, before torch
    starts its threads: each thread that allocates otherwise grows an arena of its own whose freed
    blocks no other thread reuses, and the circuit threads of a 7B-shaped build (memory first)
    peaked at 4.68 GB with them against 4.01 GB with one (docs/BENCHMARKS.md §11, seventh round;
    set later, from inside the build, it did not help: torch's threads had their arenas by then).
    Measured with it: the 7B-shaped circuits 160 s a layer against 174 s, SmolLM2 layers 0-5 70.4 s
    (one run each: no slowdown seen, none measured alternating)."""
    if os.environ.get("MALLOC_ARENA_MAX"):  # the user's choice, read by glibc itself
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc
        pass


_one_malloc_arena()
