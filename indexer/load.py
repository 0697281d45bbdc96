"""Open a model (local HF directory, GGUF file or hub id) and read it into canonical weights.

    >>> from indexer.load import load_canonical
    >>> loaded = load_canonical("path/to/minilm")          # doctest: +SKIP
    >>> loaded.canonical.dims.n_layers, loaded.canonical.layer(0).W_Q.shape   # doctest: +SKIP
    (6, torch.Size([12, 384, 32]))

Safetensors checkpoints are read lazily, one tensor at a time (``SafetensorsSource``), so
canonicalising layer ``l`` reads only layer ``l``'s tensors. GGUF files are dequantized by
transformers into memory as a whole (the format is quantized block-wise; there is no cheap
per-tensor fp32 view), so their peak memory is the fp32 model.

torch and transformers are imported inside the functions that need them: importing this module
is free, and a missing package becomes one MissingDependency line.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .errors import BadCheckpoint, MissingDependency, ModelNotFound

if TYPE_CHECKING:
    from .canonical import Canonical

INDEX_EXTRA = "pip install 'zeropass[index]'"
# Files a hub download fetches: configs, tokenizers, safetensors weights (pickles only on request).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "merges.txt", "vocab.*"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "tokenizer.model", "spiece.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")


@dataclass
class Loaded:
    """A model opened for indexing: canonical weights plus what is needed to describe it."""

    canonical: "Canonical"
    tokenizer: Any  # a transformers tokenizer, or None when the checkpoint ships none
    config: Any  # the transformers PretrainedConfig
    provenance: dict = field(default_factory=dict)
    # source, path, format ("safetensors" | "gguf" | "pickle"), revision, weights_sha256
    # {file: hex}, architecture (HF class name), model_type, family (adapter name)


def require(module: str, hint: str = INDEX_EXTRA, why: str = "indexing"):
    """Import an optional dependency or raise MissingDependency saying how to install it."""
    try:
        return import_module(module)
    except ImportError as e:
        raise MissingDependency(f"{why} needs the {module!r} package ({e}); {hint}") from None


# --- tensor sources -------------------------------------------------------------------------

class SafetensorsSource:
    """Tensors of one or more .safetensors files, read one at a time through ``safe_open``.

    Only headers are read up front (names, shapes); data is read by ``get``. Sharded
    checkpoints (model.safetensors.index.json) are just several files.
    """

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.files = files
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        self._where[k] = f
                        self._shapes[k] = tuple(h.get_slice(k).get_shape())
            except Exception as e:  # safetensors raises its own SafetensorError; any is corrupt
                raise BadCheckpoint(
                    f"{f} is not a readable safetensors file ({_one_line(e)}); "
                    f"re-download or re-save the checkpoint"
                ) from None

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str):
        from safetensors import safe_open

        f = self._where[name]
        # Open per tensor: closing unmaps the file, so resident memory follows the tensors the
        # caller keeps (one layer), not every page of the file touched so far. A header parse
        # per tensor is cheap next to the read.
        try:
            with safe_open(str(f), framework="pt") as h:
                return h.get_tensor(name)
        except Exception as e:
            raise BadCheckpoint(f"cannot read tensor {name!r} from {f} ({_one_line(e)}); "
                                f"the file is truncated or corrupt, re-download it") from None


class StateDictSource:
    """Tensors already in memory (GGUF dequantized by transformers, or an allowed pickle)."""

    def __init__(self, state: dict):
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def get(self, name: str):
        return self._state[name]


# --- entry point ----------------------------------------------------------------------------

def load_canonical(model_ref: str, *, allow_pickle: bool = False, dtype=None) -> Loaded:
    """Open MODEL (local HF dir, ``.gguf`` file or hub id) as canonical weights.

    ``dtype`` defaults to ``torch.float32``. Raises ModelNotFound, BadCheckpoint,
    UnsupportedArchitecture or MissingDependency with a one-line message.
    """
    torch = require("torch")
    require("transformers")
    require("safetensors")
    dtype = dtype or torch.float32

    path = Path(os.path.expanduser(str(model_ref)))
    revision = None
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _load_gguf(model_ref, path, dtype)
    if path.is_file():
        raise BadCheckpoint(f"{model_ref} is a file; MODEL must be a model directory "
                            f"(with config.json) or a .gguf file")
    if not path.exists():
        if str(model_ref).lower().endswith(".gguf") or not _HUB_ID.match(str(model_ref)):
            raise ModelNotFound(f"no such file or directory: {model_ref}; pass a local model "
                                f"directory, a .gguf file or a Hugging Face hub id")
        path = _hub_download(str(model_ref), allow_pickle)
    m = _SNAPSHOT.search(str(path.resolve()))
    revision = m.group(1) if m else None
    return _load_dir(model_ref, path, allow_pickle=allow_pickle, dtype=dtype, revision=revision)


def _load_dir(model_ref, path: Path, *, allow_pickle, dtype, revision) -> Loaded:
    from .adapters import adapter_for

    config_file = path / "config.json"
    if not config_file.is_file():
        raise BadCheckpoint(f"{path} has no config.json, so it is not a Hugging Face model "
                            f"directory; pass the directory that holds config.json and the weights")
    try:
        raw = json.loads(config_file.read_text())
    except (ValueError, OSError) as e:
        raise BadCheckpoint(f"{config_file} is not valid JSON ({_one_line(e)}); "
                            f"re-download the checkpoint") from None
    if not isinstance(raw, dict):
        raise BadCheckpoint(f"{config_file} is not a JSON object (it holds a {type(raw).__name__}); "
                            f"re-download the checkpoint")
    adapter = adapter_for(raw.get("model_type"), raw.get("architectures"))

    files, fmt = _weight_files(path, allow_pickle)
    if fmt == "safetensors":
        source = SafetensorsSource(files)
    else:
        source = _pickle_source(files)

    transformers = require("transformers")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise BadCheckpoint(f"{config_file} could not be read by transformers "
                            f"({_one_line(e)}); check the file or upgrade transformers") from None
    canonical = adapter.adapt(source, config, dtype)
    tokenizer = _tokenizer(path)
    return Loaded(
        canonical=canonical, tokenizer=tokenizer, config=config,
        provenance={
            "source": str(model_ref), "path": str(path.resolve()), "format": fmt,
            "revision": revision,
            "weights_sha256": {f.name: _sha256(f) for f in files},
            "architecture": (raw.get("architectures") or [None])[0],
            "model_type": raw.get("model_type"), "family": adapter.FAMILY,
        },
    )


def _weight_files(path: Path, allow_pickle: bool) -> tuple[list[Path], str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, OSError) as e:
            raise BadCheckpoint(f"{index} is not a valid shard index ({_one_line(e)})") from None
        files = [path / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise BadCheckpoint(f"{path} is missing shards {missing} named in {index.name}; "
                                f"download the whole checkpoint")
        return files, "safetensors"
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files, "safetensors"
    pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt")) + sorted(path.glob("*.pth"))
    pickles = [p for p in pickles if p.name != "training_args.bin"]
    if pickles and not allow_pickle:
        raise BadCheckpoint(
            f"{path} has only pickle weights ({pickles[0].name}); unpickling can run arbitrary "
            f"code, so it is refused: convert to safetensors, or pass --allow-pickle "
            f"(allow_pickle=True) if you trust the source"
        )
    if pickles:
        return pickles, "pickle"
    raise BadCheckpoint(f"{path} has config.json but no weights (*.safetensors or "
                        f"pytorch_model.bin); download the weight files too")


def _pickle_source(files: list[Path]) -> StateDictSource:
    import torch

    state: dict = {}
    for f in files:
        try:
            # weights_only still limits what unpickling may build; mmap keeps memory lazy.
            part = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise BadCheckpoint(f"{f} could not be loaded as a weights pickle "
                                f"({_one_line(e)})") from None
        if isinstance(part, dict) and "state_dict" in part and isinstance(part["state_dict"], dict):
            part = part["state_dict"]
        if not isinstance(part, dict):
            raise BadCheckpoint(f"{f} does not hold a state dict (got {type(part).__name__})")
        state.update(part)
    return StateDictSource(state)


def _load_gguf(model_ref, path: Path, dtype) -> Loaded:
    require("gguf", hint="pip install gguf", why=f"reading the GGUF file {path.name}")
    require("accelerate", hint="pip install accelerate", why=f"reading the GGUF file {path.name}")
    transformers = require("transformers")
    from .adapters import adapter_for

    folder, name = str(path.parent), path.name
    try:
        config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise BadCheckpoint(f"{path} could not be read as GGUF ({_one_line(e)}); "
                            f"check the file or that transformers supports its architecture") from None
    adapter = adapter_for(getattr(config, "model_type", None), getattr(config, "architectures", None))
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except Exception as e:
        raise BadCheckpoint(f"{path} could not be dequantized ({_one_line(e)})") from None
    arch = type(model).__name__
    # The dequantized parameters are the checkpoint now; drop the module graph around them.
    source = StateDictSource({k: v.detach() for k, v in model.state_dict().items()})
    del model
    canonical = adapter.adapt(source, config, dtype)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise BadCheckpoint(f"the tokenizer in {path} could not be read ({_one_line(e)})") from None
    return Loaded(
        canonical=canonical, tokenizer=tokenizer, config=config,
        provenance={
            "source": str(model_ref), "path": str(path.resolve()), "format": "gguf",
            "revision": None, "weights_sha256": {name: _sha256(path)},
            "architecture": arch, "model_type": config.model_type, "family": adapter.FAMILY,
        },
    )


def _hub_download(repo_id: str, allow_pickle: bool) -> Path:
    hub = require("huggingface_hub", why=f"downloading {repo_id!r} from the hub")
    patterns = _HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
    try:
        return Path(hub.snapshot_download(repo_id=repo_id, allow_patterns=patterns))
    except Exception as e:
        raise ModelNotFound(
            f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face "
            f"hub ({type(e).__name__}: {_one_line(e)}); pass a local directory or .gguf file, "
            f"or check the id and the network"
        ) from None


def _tokenizer(path: Path):
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    transformers = require("transformers")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise BadCheckpoint(f"the tokenizer in {path} could not be loaded ({_one_line(e)}); "
                            f"fix or remove the tokenizer files") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
