"""Projection kernels: vector top-k (vectors.py) and exact factored top-N (pairs.py); their CPU
inner loops compiled with numba (compiled_select.py, compiled_folds.py)."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import types
from typing import Optional


@functools.lru_cache(maxsize=None)
def compiled(name: str) -> Optional[types.ModuleType]:
    """The compiled-kernel module ``indexer.kernels.<name>``, or None where it can't be had: numba
    not installed, or numba unable to load here (its disk cache needs a writable directory: the
    package's ``__pycache__`` or the user's cache). Callers then run the torch path, whose results
    are the same (docs/DESIGN.md §3)."""
    if importlib.util.find_spec("numba") is None:
        return None
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except (ImportError, RuntimeError, OSError):
        return None


def compile_all() -> None:
    """Compile every compiled kernel once, for the argument types the indexer gives it, into
    numba's disk cache: ``make venv`` runs it, so that the test suite's many processes load the
    kernels (~0.4 s) instead of each compiling its own (~10 s, all at once on a fresh clone)."""
    import torch

    from .pairs import top_pairs
    from .vectors import Projector

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 600, 8, dtype=torch.float64, generator=g)
    top_pairs(A, B, 20, 5, compiled_folds=compiled("compiled_folds") is not None)
    Projector(torch.randn(8, 1000, generator=g), 5)(torch.randn(3, 8, generator=g))
