"""Gemma Scope dictionaries: ``params.npz`` with ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in],
``b_enc``, ``b_dec``, ``threshold`` (JumpReLU).

Layer and site come from the path, as the hub lays the release out
(``gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71/params.npz``): ``layer_N`` gives the
layer, the release's ``-res`` / ``-mlp`` / ``-att`` / ``-transcoders`` suffix the site
(``resid_post``, ``mlp_out``, ``z``, ``transcoder``); ``--layer`` / ``--site`` override both.

Bounded memory: ``numpy.load(..., mmap_mode=...)`` does not map the members of a zip file, so
each member is opened on its own. A member stored uncompressed (how the releases are written) is
memory-mapped at its offset inside the zip file, so reading a block of rows or columns touches
only those bytes; a compressed member has no random access and is read whole (one tensor).
"""
from __future__ import annotations

import re
import struct
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from schemas.format import first_line

from . import BadDictionary, Dictionary, UnknownHook

_LAYER = re.compile(r"^layer_(\d+)$")
_RELEASE_SITES = (("transcoder", "transcoder"), ("-res", "resid_post"), ("-mlp", "mlp_out"), ("-att", "z"))


def read(path: Path, *, layer: Optional[int] = None, site: Optional[str] = None) -> Dictionary:
    arrays = NpzArrays(path)
    for name in ("W_enc", "W_dec"):
        if name not in arrays.names:
            raise BadDictionary(f"{path} has no array {name}: not a Gemma Scope dictionary")
    d_in, d_sae = arrays.shape("W_enc")
    if arrays.shape("W_dec") != (d_sae, d_in):
        raise BadDictionary(f"{path}: W_dec is {list(arrays.shape('W_dec'))}, must be [d_sae, d_in] = [{d_sae}, {d_in}]")
    parts = [p for p in Path(path).resolve().parts]
    if layer is None:
        layer = next((int(m.group(1)) for p in reversed(parts) if (m := _LAYER.match(p))), None)
    if site is None:
        site = next((s for p in reversed(parts) for key, s in _RELEASE_SITES if key in p.lower()), None)
    if layer is None or site is None:
        raise UnknownHook(f"{path}: layer and site cannot be told from the path (expected e.g. "
                          f"gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71): give --layer and --site")
    return Dictionary(
        path=Path(path).parent, format="gemma-scope", hook=f"layer_{layer}/{site}", layer=layer, site=site,
        d_in=d_in, d_sae=d_sae, architecture="jumprelu" if "threshold" in arrays.names else "standard",
        config={"path": "/".join(parts[-4:])}, files=[Path(path)],
        decoder=lambda a, b: arrays.block("W_dec", a, b, axis=0),
        encoder=lambda a, b: arrays.block("W_enc", a, b, axis=1).T,
        vector=lambda name: arrays.block(name, 0, None, axis=0) if name in arrays.names else None,
    )


class NpzArrays:
    """The arrays of an ``.npz`` file, each opened alone (memory-mapped when stored uncompressed)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with zipfile.ZipFile(self.path) as z:
                self._info = {i.filename[:-4]: i for i in z.infolist() if i.filename.endswith(".npy")}
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise BadDictionary(f"{path} is not a readable npz file ({e}): the file is truncated or damaged") from None
        self.names = set(self._info)
        self._arrays: dict[str, np.ndarray] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._array(name).shape)

    def block(self, name: str, a: int, b: Optional[int], axis: int):
        import torch

        arr = self._array(name)
        part = arr[a:b] if axis == 0 else arr[:, a:b]
        return torch.from_numpy(np.array(part, dtype=np.float32))

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = self._open(self._info[name])
        return self._arrays[name]

    def _open(self, info: zipfile.ZipInfo) -> np.ndarray:
        try:
            if info.compress_type == zipfile.ZIP_STORED:
                with open(self.path, "rb") as f:
                    f.seek(info.header_offset)
                    local = f.read(30)
                    if len(local) < 30 or local[:4] != b"PK\x03\x04":
                        raise ValueError("bad local header")
                    n_name, n_extra = struct.unpack("<HH", local[26:30])
                    start = info.header_offset + 30 + n_name + n_extra
                    f.seek(start)
                    version = np.lib.format.read_magic(f)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, fortran, dtype = read_header(f)
                    offset = f.tell()
                if offset + int(np.prod(shape)) * dtype.itemsize > self.path.stat().st_size:
                    raise ValueError("the array ends past the end of the file")
                return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape,
                                 order="F" if fortran else "C")
            with zipfile.ZipFile(self.path) as z, z.open(info) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise BadDictionary(f"{self.path}: array {info.filename} cannot be read ({first_line(e)}): "
                                f"the file is truncated or damaged") from None
