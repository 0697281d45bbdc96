"""zeropass indexer: checkpoint -> canonical weights -> projections -> Parquet dataset.

Imports torch lazily where it can; ``query`` never imports this package at import time.
"""
import os

# Before numpy loads OpenBLAS: its idle threads sleep after a GEMM instead of spinning ~0.1 s on the
# cores that the top-k selection needs next (indexer/kernels/vectors.py). No effect if numpy was
# imported first; the `zeropass` CLI sets it in query/__init__.py.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def _malloc_settings() -> None:
    """Two glibc allocator settings, made here, before torch starts its threads and before the
    build allocates (each was measured not to help when made later, from inside the build). They
    apply to every process that imports ``indexer``, and matter where memory goes first (Llama-2-7B
    shapes, docs/BENCHMARKS.md §11); either one in the environment (``MALLOC_ARENA_MAX``,
    ``MALLOC_MMAP_THRESHOLD_``, read by glibc itself) wins:

    - One arena for every thread: each thread that allocates otherwise grows an arena of its own
      whose freed blocks no other thread reuses; the 7B-shaped circuit threads peaked at 4.68 GB
      with them against 4.01 GB with one (seventh round; circuits 160 s a layer against 174 s).
    - Blocks from 4 MB on get a mapping of their own, handed back to the OS when freed. By default
      that threshold follows the largest block freed so far (up to 32 MB) and smaller blocks are
      carved from the heap, where gaps freed between live blocks stay resident: a 7B-shaped
      layer's circuits crept from 3.1 to 3.7-3.9 GB through its 32 heads, and stay under the
      vectors' 3.04 GB with the threshold fixed (eighth round; circuits' seconds unchanged).
      SmolLM2's layers 0-5: the same wall time (61.7 / 51.9 s against 65.3 / 51.0 s, alternating)
      for ~5 s more system time (pages of such blocks are faulted in afresh), 1.85 GB peak
      against 2.0."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if not os.environ.get("MALLOC_ARENA_MAX"):
            libc.mallopt(-8, 1)  # M_ARENA_MAX
        if not os.environ.get("MALLOC_MMAP_THRESHOLD_"):
            libc.mallopt(-3, 4 * 2**20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


_malloc_settings()
