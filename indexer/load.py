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

import contextlib
import dataclasses
import io
import json
import os
import re
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, Optional

from schemas.format import file_sha256

from .errors import BadCheckpoint, MissingDependency, ModelNotFound, NonFiniteWeights, ZeropassError

if TYPE_CHECKING:
    from .canonical import Canonical

INDEX_EXTRA = "pip install 'zeropass[index]'"
# Files a hub download fetches: configs, tokenizers, safetensors weights (pickles only on request).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "merges.txt", "vocab.*"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "tokenizer.model", "spiece.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")


@dataclass(frozen=True)
class Provenance:
    """Where a model's weights came from; the ``models`` row and the build fingerprint are read
    from its attributes (a misspelt one is an AttributeError, not a silent None).

    >>> p = load_canonical("path/to/gpt2").provenance      # doctest: +SKIP
    >>> p.hf_architecture, p.family, p.format              # doctest: +SKIP
    ('GPT2LMHeadModel', 'gpt2', 'safetensors')
    """

    source: str  # MODEL as given (a path, .gguf file or hub id); "TUNED - BASE" for a diff
    path: str  # the resolved local directory or .gguf file that was read
    format: str  # "safetensors" | "gguf" | "pickle"
    family: str  # the adapter that read it ("gpt2", "llama", ...): models.architecture
    # weight file name -> sha256 of its bytes (read-only; left out of hash(), a mapping has none)
    weights_sha256: Mapping[str, str] = dataclasses.field(hash=False)
    revision: Optional[str] = None  # hub commit, when read from a hub-cache snapshot
    hf_architecture: Optional[str] = None  # Hugging Face class, e.g. "GPT2LMHeadModel"
    model_type: Optional[str] = None  # config.json's model_type
    base: Optional["Provenance"] = None  # a diff's base model (what was subtracted)

    def __post_init__(self):
        object.__setattr__(self, "weights_sha256", MappingProxyType(dict(self.weights_sha256)))

    def diff(self, base: "Provenance") -> "Provenance":
        """The provenance of ``self - base`` (a fine-tuning delta): this model's, with ``base``."""
        return dataclasses.replace(self, source=f"{self.source} - {base.source}", base=base)

    def as_dict(self) -> dict:
        """Plain JSON-ready data (``base`` nested the same way, or None)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["weights_sha256"] = dict(sorted(self.weights_sha256.items()))
        out["base"] = self.base.as_dict() if self.base is not None else None
        return out


@dataclass
class Loaded:
    """A model opened for indexing: canonical weights plus what is needed to describe it."""

    canonical: "Canonical"
    tokenizer: Any  # a transformers tokenizer, or None when the checkpoint ships none
    config: Any  # the transformers PretrainedConfig
    provenance: Provenance


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
                    names = list(h.keys())
                    shapes = [tuple(h.get_slice(k).get_shape()) for k in names]
            except Exception as e:  # safetensors raises its own SafetensorError; any is corrupt
                raise BadCheckpoint(
                    f"{f} is not a readable safetensors file ({_one_line(e)}); "
                    f"re-download or re-save the checkpoint"
                ) from None
            for k, shape in zip(names, shapes):
                if k in self._where:
                    # Two files with the same tensor (e.g. a leftover shard of an older save next
                    # to model.safetensors): which one is the model is not ours to guess.
                    raise BadCheckpoint(f"tensor {k!r} is in both {self._where[k].name} and {f.name}; "
                                        f"remove the file that does not belong to this checkpoint")
                self._where[k] = f
                self._shapes[k] = shape

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
                tensor = h.get_tensor(name)
        except Exception as e:
            raise BadCheckpoint(f"cannot read tensor {name!r} from {f} ({_one_line(e)}); "
                                f"the file is truncated or corrupt, re-download it") from None
        return check_finite(tensor, f"tensor {name!r} in {f.name}", _DAMAGED)


class StateDictSource:
    """Tensors already in memory (GGUF dequantized by transformers, or an allowed pickle)."""

    def __init__(self, state: dict):
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def get(self, name: str):
        return check_finite(self._state[name], f"tensor {name!r}", _DAMAGED)


_DAMAGED = "the checkpoint is damaged: re-download it, or fix the run that wrote it"


def check_finite(tensor, what: str, fix: str):
    """``tensor`` unchanged, or NonFiniteWeights naming ``what`` and how many values are NaN/Inf.

    Every tensor read from a checkpoint passes here, one at a time as the adapters read them
    (memory stays bounded by a layer): a NaN would make every score it touches NaN, rank tokens
    arbitrarily and, in LAPACK's eigen-solvers, print MKL errors on stdout.
    """
    import torch

    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return tensor
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int(torch.isinf(tensor).sum())
    counts = " and ".join(f"{n} {word}" for n, word in ((n_nan, "NaN"), (n_inf, "Inf")) if n)
    plural = "" if n_nan + n_inf == 1 else "s"
    raise NonFiniteWeights(f"{what} has {counts} value{plural} (of {tensor.numel():,}); {fix}")


# --- entry point ----------------------------------------------------------------------------

def load_canonical(model_ref: str, *, allow_pickle: bool = False, dtype=None, quiet: bool = False) -> Loaded:
    """Open MODEL (local HF dir, ``.gguf`` file or hub id) as canonical weights.

    ``dtype`` defaults to ``torch.float32``. ``quiet`` also hides the progress bar transformers
    draws while it dequantizes a GGUF file (its own tqdm, which its logging settings miss).
    Raises ModelNotFound, BadCheckpoint (NonFiniteWeights among them), UnsupportedArchitecture
    or MissingDependency with a one-line message; a layer's tensors are checked when it is read.
    """
    torch = require("torch")
    require("transformers")
    require("safetensors")
    dtype = dtype or torch.float32

    if not str(model_ref).strip():
        raise ModelNotFound("MODEL is empty; pass a local model directory, a .gguf file or a Hugging Face hub id")
    path = Path(os.path.expanduser(str(model_ref)))
    if path.is_file() and path.suffix.lower() == ".gguf":
        with _transformers_quiet():
            return _load_gguf(model_ref, path, dtype, quiet)
    if path.exists() and not path.is_dir():
        raise BadCheckpoint(f"{model_ref} is a file; MODEL must be a model directory "
                            f"(with config.json) or a .gguf file")
    if not path.exists():
        if str(model_ref).lower().endswith(".gguf") or not _HUB_ID.match(str(model_ref)):
            raise ModelNotFound(f"no such file or directory: {model_ref}; pass a local model "
                                f"directory, a .gguf file or a Hugging Face hub id")
        path = _hub_download(str(model_ref), allow_pickle)
    m = _SNAPSHOT.search(str(path.resolve()))
    revision = m.group(1) if m else None
    with _transformers_quiet():
        return _load_dir(model_ref, path, allow_pickle=allow_pickle, dtype=dtype, revision=revision)


@contextlib.contextmanager
def _transformers_quiet():
    """Keep transformers' warnings and progress bars off stderr while it reads configs, tokenizers
    and GGUF files: what matters about a checkpoint is raised by our own checks as one line (a
    config with vocab_size 0 drew three warnings before our error), and ``-q`` must mean quiet."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load_dir(model_ref, path: Path, *, allow_pickle, dtype, revision) -> Loaded:
    from .adapters import adapter_for

    _refuse_special_files(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise BadCheckpoint(f"{path} has no config.json, so it is not a Hugging Face model "
                            f"directory; pass the directory that holds config.json and the weights")
    try:
        raw = json.loads(config_file.read_text())
    except (ValueError, OSError) as e:
        raise BadCheckpoint(f"{config_file} is not valid JSON ({_one_line(e)}); "
                            f"re-download the checkpoint") from None
    model_type, hf_architecture = _config_identity(raw, config_file)
    adapter = adapter_for(model_type, raw.get("architectures"))

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
    canonical = _adapt(adapter, source, config, dtype, where=str(path))
    tokenizer = _tokenizer(path)
    provenance = Provenance(
        source=str(model_ref), path=str(path.resolve()), format=fmt, family=adapter.FAMILY,
        weights_sha256={f.name: file_sha256(f) for f in files}, revision=revision,
        hf_architecture=hf_architecture, model_type=model_type,
    )
    return Loaded(canonical=canonical, tokenizer=tokenizer, config=config, provenance=provenance)


# What a model directory's readers (ours, transformers', tokenizers') may open.
_READ_SUFFIXES = {".json", ".safetensors", ".bin", ".pt", ".pth", ".txt", ".model"}


def _refuse_special_files(path: Path) -> None:
    """BadCheckpoint for a checkpoint file that is a FIFO, device or directory: opening a FIFO
    blocks until someone writes to it, so the load would hang instead of failing."""
    for f in sorted(path.iterdir()):
        if f.suffix in _READ_SUFFIXES and not f.is_file():
            kind = "a directory" if f.is_dir() else "a dangling link" if not f.exists() else "not a regular file"
            raise BadCheckpoint(f"{f} is {kind}; a checkpoint's files must be regular files: replace or remove it")


def _config_identity(raw, config_file: Path) -> tuple[str, Optional[str]]:
    """(model_type, first of architectures) of a parsed config.json, or BadCheckpoint."""
    if not isinstance(raw, dict):
        raise BadCheckpoint(f"{config_file} is not a JSON object (it holds a {type(raw).__name__}); "
                            f"re-download the checkpoint's config.json")
    model_type = raw.get("model_type")
    if model_type is None:
        raise BadCheckpoint(f"{config_file} has no model_type, so the architecture is unknown; "
                            f"add it (e.g. \"model_type\": \"gpt2\") or re-download config.json")
    if not isinstance(model_type, str):
        raise BadCheckpoint(f"{config_file}: model_type must be a string, not {model_type!r}; "
                            f"fix config.json")
    archs = raw.get("architectures")
    first = archs[0] if isinstance(archs, list) and archs else archs
    return model_type, first if isinstance(first, str) else None


def _adapt(adapter, source, config, dtype, where: str) -> "Canonical":
    """``adapter.adapt``, with torch errors and a layer count that contradicts the checkpoint as
    one BadCheckpoint line.

    An adapter only reshapes and transposes, so a torch error inside it means the tensors do
    not have the shapes config.json gives (a lying safetensors header, a config.json of another
    model). The adapter checks every tensor's shape upfront (``adapters.base.finish``).
    """
    try:
        canonical = adapter.adapt(source, config, dtype)
    except ZeropassError:
        raise
    except (RuntimeError, ValueError, ZeroDivisionError) as e:
        raise _shape_error(where, "the model", e) from None
    dims = canonical.dims  # sizes are positive (Dims refuses others)
    # config.json's layer count against the checkpoint's layer tensors: a smaller count would
    # index part of the model without a word, a larger one (or 10**12) fail deep inside the build.
    found = {p.layer for p in canonical.parameters if p.layer is not None}
    if not found or max(found) + 1 != dims.n_layers:
        have = f"tensors of layers 0-{max(found)}" if found else "no layer tensors"
        raise BadCheckpoint(f"{where}: config.json says {dims.n_layers} layers but the checkpoint has {have}; "
                            f"the weights and config.json do not belong together")
    # Every tensor's shape was checked against config.json by the adapter (adapters.base.finish);
    # what is left to guard is an adapter's torch error on the data of a layer.
    read_layer = canonical.layer_fn

    def layer(l: int):
        try:
            return read_layer(l)
        except (ZeropassError, IndexError):
            raise
        except (RuntimeError, ValueError, ZeroDivisionError) as e:
            raise _shape_error(where, f"layer {l}", e) from None

    return dataclasses.replace(canonical, layer_fn=layer)


def _shape_error(where: str, what: str, e: BaseException) -> BadCheckpoint:
    return BadCheckpoint(f"{where}: {what} cannot be read with the dimensions config.json gives ({_one_line(e)}); "
                         f"the weights and config.json do not belong together (or the file's header is wrong)")


def _weight_files(path: Path, allow_pickle: bool) -> tuple[list[Path], str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise BadCheckpoint(f"{index} is not a valid shard index ({_one_line(e)})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise BadCheckpoint(f"{index} is not a valid shard index (weight_map must map tensor names "
                                f"to file names); re-download it")
        shards = sorted(set(weight_map.values()))
        # A shard is a file of this directory: a name with a path in it could read (and hash)
        # files elsewhere on the machine, e.g. another model's weights.
        escaping = [s for s in shards if Path(s).name != s or s in (".", "..")]
        if escaping:
            raise BadCheckpoint(f"{index} names shards outside {path} ({escaping[0]!r}); "
                                f"shards must be plain file names in the model directory")
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


class _PlainArrays:
    """numpy, except that ``memmap`` returns a plain ndarray view of the map (same pages, read
    lazily from the file). gguf's reader slices its map once per header field part (147k times
    for SmolLM2's tokenizer arrays), and every slice of an ``np.memmap`` runs memmap's Python
    ``__array_finalize__``: 3.4 s -> 1.1 s to read SmolLM2's header with plain views."""

    def __init__(self):
        import numpy

        self._numpy = numpy

    def __getattr__(self, name):
        return getattr(self._numpy, name)

    def memmap(self, *args, **kwargs):
        return self._numpy.memmap(*args, **kwargs).view(self._numpy.ndarray)


@contextlib.contextmanager
def _one_gguf_parse():
    """Within the block, ``gguf.GGUFReader`` of a file already read returns that reader, and
    ``gguf.get_tensor_name_map`` of an (architecture, layer count) already asked returns that map.

    transformers parses the whole GGUF header (metadata, the tokenizer's 49k-entry arrays, the
    tensor index) in every ``from_pretrained``: for the config, the model's config, the weights
    and the tokenizer, 4 parses of 2-8 s each for SmolLM2 on this project's 2-core machine. And
    it builds gguf's tensor-name map (every name of every layer of the architecture) once per
    submodule of the model while it walks the module tree: 397 times for SmolLM2. The reader is
    a read-only memory map of the file and the map is not changed after it is built, so one of
    each serves every call (transformers imports both names from ``gguf`` at each call, which is
    what is swapped). Measured on SmolLM2: the same tensors and tokenizer, load 32 s -> 14 s
    (docs/BENCHMARKS.md §11).

    The one reader is built over plain array views of the map (``_PlainArrays``), and each
    header value transformers converts to Python (``_gguf_parse_value``, 150k per parse of
    SmolLM2's header, every one of the four parses) is converted once: the parts are the one
    reader's own arrays, alive for the whole block, so their ids are stable keys."""
    import gguf
    import gguf.gguf_reader as gguf_reader
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    real_numpy, real_parse = gguf_reader.np, hf_gguf._gguf_parse_value
    readers: dict = {}
    maps: dict = {}
    parsed: dict = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            gguf_reader.np = _PlainArrays()
            try:
                readers[key] = real_reader(path, mode)
            finally:
                gguf_reader.np = real_numpy
        return readers[key]

    def tensor_name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = real_map(arch, n_blocks)
        return maps[arch, n_blocks]

    def parse_value(part, types):
        key = (id(part), tuple(types))
        if key not in parsed:
            parsed[key] = (part, real_parse(part, types))  # the part is held: its id stays its own
        return parsed[key][1]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, tensor_name_map
    hf_gguf._gguf_parse_value = parse_value
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map
        hf_gguf._gguf_parse_value = real_parse


def _load_gguf(model_ref, path: Path, dtype, quiet: bool) -> Loaded:
    require("gguf", hint="pip install gguf", why=f"reading the GGUF file {path.name}")
    require("accelerate", hint="pip install accelerate", why=f"reading the GGUF file {path.name}")
    with _one_gguf_parse():
        return _load_gguf_parsed_once(model_ref, path, dtype, quiet)


def _load_gguf_parsed_once(model_ref, path: Path, dtype, quiet: bool) -> Loaded:
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
        # tqdm picks sys.stderr when the bar is created: redirecting it hides the bar and nothing else.
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except Exception as e:
        raise BadCheckpoint(f"{path} could not be dequantized ({_one_line(e)})") from None
    arch = type(model).__name__
    # The dequantized parameters are the checkpoint now; drop the module graph around them.
    source = StateDictSource({k: v.detach() for k, v in model.state_dict().items()})
    del model
    canonical = _adapt(adapter, source, config, dtype, where=str(path))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise BadCheckpoint(f"the tokenizer in {path} could not be read ({_one_line(e)})") from None
    provenance = Provenance(
        source=str(model_ref), path=str(path.resolve()), format="gguf", family=adapter.FAMILY,
        weights_sha256={name: file_sha256(path)}, hf_architecture=arch, model_type=config.model_type,
    )
    return Loaded(canonical=canonical, tokenizer=tokenizer, config=config, provenance=provenance)


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


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
