"""Reading dictionaries (sparse autoencoders, transcoders) from their files: one small module per
format, each turning a folder into a :class:`Dictionary` whose tensors are read block by block.

* ``saelens``: ``cfg.json`` + ``sae_weights.safetensors`` (SAELens);
* ``gemma_scope``: ``params.npz`` (Gemma Scope, layer and site from the path or flags);
* ``sparsify``: ``cfg.json`` + ``sae.safetensors`` (EleutherAI sparsify; folder ``layers.8[.mlp]``).

Never pickle: a ``.pt`` / ``.bin`` dictionary is refused unless ``allow_pickle`` (then read whole).
:func:`find_dictionaries` takes a folder of one dictionary or of many (a whole release).
docs/DICTIONARIES.md describes the formats and conventions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from schemas.format import first_line

from ..errors import BadCheckpoint, ZeropassError


class BadDictionary(BadCheckpoint):
    """A dictionary's files cannot be read or do not fit the model (the message says which and why)."""


class UnknownHook(BadDictionary):
    """The dictionary's hook names no site zeropass can project (see docs/DICTIONARIES.md)."""


class NoDictionary(ZeropassError, FileNotFoundError):
    """The path or hub id holds no dictionary of a known format."""


# Sites: where a dictionary reads and writes. Residual-space sites read and write d_model vectors;
# `z` reads / writes the heads' concatenated values (n_heads x d_head); a transcoder reads the MLP
# input and writes the MLP output (both d_model).
RESIDUAL_SITES = ("resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out")
SITES = RESIDUAL_SITES + ("z", "transcoder")

_SAELENS_HOOK = re.compile(r"^blocks\.(\d+)\.(?:attn\.)?hook_(resid_pre|resid_mid|resid_post|mlp_out|attn_out|z)$")


def parse_hook(hook: str, *, transcoder: bool = False) -> tuple[int, str]:
    """(layer, site) of a TransformerLens hook name, e.g. ``blocks.8.hook_resid_pre`` -> (8, resid_pre)."""
    m = _SAELENS_HOOK.match(str(hook))
    if not m:
        raise UnknownHook(f"hook {hook!r} is not one zeropass can project: use blocks.L.hook_resid_pre, "
                          f"hook_resid_mid, hook_resid_post, hook_mlp_out, hook_attn_out or attn.hook_z")
    return int(m.group(1)), ("transcoder" if transcoder else m.group(2))


@dataclass
class Dictionary:
    """One dictionary: its identity and lazy readers of its tensors.

    ``decoder(a, b)`` -> rows a..b of W_dec ([b - a, d_in] float32); ``encoder(a, b)`` -> the
    encoder directions of features a..b as rows ([b - a, d_in], i.e. columns of W_enc);
    ``vector(name)`` -> a per-feature vector (``b_enc``, ``threshold``) or None.
    """

    path: Path
    format: str
    hook: str
    layer: int
    site: str
    d_in: int
    d_sae: int
    architecture: str
    config: dict
    files: list[Path]
    decoder: Callable[[int, int], "object"]
    encoder: Callable[[int, int], "object"]
    vector: Callable[[str], "object"]
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.format} {self.architecture} dictionary, {self.d_sae} features at {self.hook} (layer {self.layer}, {self.site})"


def open_dictionary(path: Path, *, allow_pickle: bool = False, layer: Optional[int] = None,
                    site: Optional[str] = None) -> Dictionary:
    """The dictionary in folder (or ``params.npz`` file) ``path``, whatever its format."""
    from . import gemma_scope, saelens, sparsify

    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        return gemma_scope.read(path, layer=layer, site=site)
    if not path.is_dir():
        raise NoDictionary(f"{path} is neither a dictionary folder nor a params.npz file")
    if (path / "params.npz").is_file():
        return gemma_scope.read(path / "params.npz", layer=layer, site=site)
    if (path / "sae_weights.safetensors").is_file():
        return saelens.read(path, layer=layer, site=site)
    if (path / "sae.safetensors").is_file():
        return sparsify.read(path, layer=layer, site=site)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".ckpt"))
    if pickles and (path / "cfg.json").is_file():
        if not allow_pickle:
            raise BadDictionary(f"{path} holds only pickled weights ({', '.join(pickles)}): loading a pickle can run "
                                f"code; convert it to safetensors, or pass --allow-pickle if you trust its source")
        return saelens.read(path, layer=layer, site=site, pickle_file=path / pickles[0])
    raise NoDictionary(f"{path} holds no dictionary: expected cfg.json + sae_weights.safetensors (SAELens), "
                       f"params.npz (Gemma Scope) or cfg.json + sae.safetensors (sparsify)")


def is_dictionary(path: Path) -> bool:
    path = Path(path)
    return any((path / f).is_file() for f in ("params.npz", "sae_weights.safetensors", "sae.safetensors")) or \
        ((path / "cfg.json").is_file() and any(p.suffix in (".pt", ".pth") for p in path.iterdir()))


def find_dictionaries(root: Path) -> list[Path]:
    """``root`` itself when it is one dictionary, else every dictionary folder below it (sorted)."""
    root = Path(root)
    if root.is_file() or is_dictionary(root):
        return [root]
    if not root.is_dir():
        raise NoDictionary(f"{root} does not exist: give a dictionary folder, a folder of them, or a hub id org/repo/sub/folder")
    found = sorted({p for p in root.rglob("*") if p.is_dir() and not p.name.startswith(".") and is_dictionary(p)})
    if not found:
        raise NoDictionary(f"{root} holds no dictionary: expected cfg.json + sae_weights.safetensors (SAELens), "
                           f"params.npz (Gemma Scope) or cfg.json + sae.safetensors (sparsify) in it or below it")
    return found


def read_json(path: Path) -> dict:
    import json

    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BadDictionary(f"{path} is not readable JSON ({first_line(e)}): the download is damaged") from None
    if not isinstance(cfg, dict):
        raise BadDictionary(f"{path} is not a JSON object")
    return cfg


class SafetensorsTensors:
    """Lazy access to the tensors of one safetensors file: shapes from the header, slices on demand."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        try:
            self._f = safe_open(str(path), framework="pt")
            self.names = set(self._f.keys())
            self.shapes = {n: tuple(self._f.get_slice(n).get_shape()) for n in self.names}
        except Exception as e:  # safetensors raises its own SafetensorError for a damaged header
            raise BadDictionary(f"{path} is not a readable safetensors file ({first_line(e)}): "
                                f"the file is truncated or damaged") from None

    def rows(self, name: str, a: int, b: int):
        return self._read(name, lambda s: s[a:b])

    def cols(self, name: str, a: int, b: int):
        return self._read(name, lambda s: s[:, a:b])

    def whole(self, name: str):
        return self._read(name, lambda s: s[:])

    def _read(self, name: str, take):
        try:
            return take(self._f.get_slice(name)).float()
        except Exception as e:
            raise BadDictionary(f"{self.path}: tensor {name} cannot be read ({first_line(e)}): "
                                f"the file is truncated or damaged") from None
