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
