"""`zeropass index`: canonical weights -> projections -> a model in the dataset.

One layer at a time (memory stays bounded by a layer and its score buffers), each layer's
partitions written as soon as they are computed, so a killed build resumes where it stopped.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import numbers
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import pyarrow as pa
import torch

from schemas.kinds import KIND, READ
from schemas.units import bias_unit, head_dim_unit, head_unit, neuron_unit, position_unit, router_unit

from .canonical import Canonical
from .dataset import Build, ZEROPASS_VERSION, check_writable, checkpoint_origin, dataset_lock, origin_of
from .errors import ZeropassError
from .kernels.vectors import Projector, TopK
from .profile import phase, profiling, set_layer
from .tokens import numbered_vocabulary, vocabulary
from .variants import VARIANTS, fold
from .vocab_filter import allowed_ids, check_filter, check_filter_name, filter_suffix, restrict

if TYPE_CHECKING:
    from .load import Provenance

Progress = Callable[[str], None]


class BadOption(ZeropassError, ValueError):
    """An index option has a value that cannot be used."""


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Options land in int32 columns (models.k, models.n_pairs, ranks); anything larger is a typo.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
_LAYER_PART = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", re.ASCII)
_SLUG_MAX = 64


def layer_ranges(spec: Optional[str]) -> Optional[list[tuple[int, int]]]:
    """The ``--layers`` syntax alone (None or ``all``: every layer), checked before any loading."""
    if spec is None or str(spec).strip() == "all":
        return None
    if not str(spec).strip():
        raise BadOption(f"--layers {spec!r} is empty: leave it out for every layer, or give e.g. 0-5 or 0,3,7")
    ranges = []
    for part in str(spec).split(","):
        m = _LAYER_PART.fullmatch(part)
        if not m:
            raise BadOption(f"--layers {spec!r} is not a layer list: use e.g. 0-5 or 0,3,7 (layers count from 0)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi:
            raise BadOption(f"--layers {spec!r} has the reversed range {lo}-{hi}: write {hi}-{lo}")
        ranges.append((lo, hi))
    return ranges


def parse_layers(spec: Optional[str], n_layers: int) -> list[int]:
    """``"0-5"``, ``"0,3,7"``, ``"2"`` or None / ``"all"`` (every layer) -> sorted layer indices."""
    ranges = layer_ranges(spec)
    if ranges is None:
        return list(range(n_layers))
    layers: set[int] = set()
    for lo, hi in ranges:
        if hi >= n_layers:
            raise BadOption(f"--layers {spec!r} is outside 0-{n_layers - 1}: the model has {n_layers} layers")
        layers.update(range(lo, hi + 1))
    return sorted(layers)


def default_slug(model_ref: str, suffix: str = "") -> str:
    """A valid model name from a path or hub id, ``suffix`` included:
    ``/x/SmolLM2-135M.Q4_1.gguf`` -> ``smollm2-135m-q4_1``; at most 64 characters."""
    name = Path(str(model_ref).rstrip("/")).name
    name = re.sub(r"\.gguf$", "", name, flags=re.I)
    slug = re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-_")
    slug = slug[: _SLUG_MAX - len(suffix)].rstrip("-_") or "model"
    return slug + suffix


def check_slug(slug: str) -> str:
    """``slug`` if it is a valid model name (it names directories: no path, no dots first)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", slug, flags=re.ASCII):
        raise BadOption(f"--name {slug!r} is not a valid model name: use letters, digits, '-', '_' or '.' "
                        f"(ASCII, starting with a letter or digit, at most {_SLUG_MAX})")
    return slug


@dataclasses.dataclass(frozen=True)
class IndexOptions:
    """How a model is indexed: the options `index_model`, `index_diff` and `index_canonical` share.

    Checked once, when made (BadOption), so that an unusable value is refused before a model
    that takes minutes to load is loaded. ``series`` / ``step``: the training-checkpoint series
    it belongs to (``models.series`` / ``models.step``, set by `zeropass index-many`).
    ``vocab_filter``: ``alpha``, ``words`` or a word-list file: lists over those tokens only
    (indexer/vocab_filter.py). ``replace``: replace a model of the same name indexed from
    another checkpoint (without it, NameTaken). ``progress``: where progress lines go (None: nowhere).
    ``profile``: print on stderr, at the end, the seconds of each phase and layer beside each GEMM
    phase's arithmetic floor (indexer/profile.py).

    >>> IndexOptions(k=10, layers="0-3").n_pairs
    200
    """

    k: int = 50
    n_pairs: int = 200
    variant: str = "raw"
    device: str = "cpu"
    layers: Optional[str] = None
    allow_pickle: bool = False
    replace: bool = False
    vocab_filter: Optional[str] = None
    series: Optional[str] = None
    step: Optional[int] = None
    progress: Optional[Progress] = stderr_progress
    profile: bool = False

    def __post_init__(self) -> None:
        k, n_pairs, device = self.k, self.n_pairs, self.device
        if not _whole(k) or not 1 <= k <= INT32_MAX:
            raise BadOption(f"--k {k} must be a whole number from 1 to {INT32_MAX} "
                            f"(more than the vocabulary size keeps the whole vocabulary)")
        if not _whole(n_pairs) or not 0 <= n_pairs <= INT32_MAX:
            raise BadOption(f"--pairs {n_pairs} must be a whole number from 0 (no pairs) to {INT32_MAX}")
        if self.variant not in VARIANTS:
            raise BadOption(f"--variant {self.variant!r} is unknown: use one of {', '.join(VARIANTS)}")
        m = re.fullmatch(r"cpu|cuda(?::([0-9]{1,4}))?", device, flags=re.ASCII) if isinstance(device, str) else None
        if not m:
            raise BadOption(f"--device {device!r} is unknown: use cpu, cuda or cuda:N")
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise BadOption("--device cuda was asked for but torch sees no GPU here: use --device cpu")
            if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
                raise BadOption(f"--device {device} does not exist: torch sees {torch.cuda.device_count()} GPU(s), "
                                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        layer_ranges(self.layers)
        step = self.step
        if step is not None and (not _whole(step) or not 0 <= step <= INT64_MAX):  # models.step: found only at the write
            raise BadOption(f"step {step} must be a whole number from 0 to {INT64_MAX} (models.step is a 64-bit integer)")
        check_filter(self.vocab_filter)

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


def _options(options: Optional[IndexOptions], changes: dict) -> IndexOptions:
    """``options`` (default: IndexOptions()) with the keyword arguments a caller gave instead; checked."""
    return dataclasses.replace(options or IndexOptions(), **changes) if changes or options is None else options


def index_model(model_ref: str, db: str | Path, options: Optional[IndexOptions] = None, *,
                name: Optional[str] = None, **changes) -> dict:
    """Index one checkpoint into the dataset at ``db``; returns its manifest entry.

    ``options``: an IndexOptions; its fields can be given as keywords too (``k=10``), which
    replace those of ``options``. ``name``: the model's name in the dataset; by default from
    ``model_ref``, with the suffix ``-alpha`` / ``-words`` / ``-list`` for a ``vocab_filter``.

    A model of the same name from another checkpoint is refused (NameTaken) unless ``replace``.

    >>> index_model("path/to/minilm", "zeropass-db", name="minilm", k=20)  # doctest: +SKIP
    """
    from .load import load_canonical

    options = _options(options, changes)
    slug = check_slug(default_slug(model_ref, filter_suffix(options.vocab_filter)) if name is None else name)
    check_writable(Path(db))
    with profiling(options.profile, report=stderr_progress):
        t = time.perf_counter()
        with phase("load/dequantise"):
            loaded = load_canonical(model_ref, allow_pickle=options.allow_pickle, quiet=options.progress is None)
        options.say(f"loaded {model_ref} in {time.perf_counter() - t:.1f}s: {_describe(loaded.canonical.dims)}")
        return index_canonical(loaded.canonical, loaded.tokenizer, db, slug=slug, provenance=loaded.provenance,
                               options=options)


def index_diff(base_ref: str, tuned_ref: str, db: str | Path, options: Optional[IndexOptions] = None, *,
               name: Optional[str] = None, **changes) -> dict:
    """Index theta_tuned - theta_base as its own model (variant ``diff``), see indexer/diff.py.

    ``options`` / ``changes`` as for `index_model`; the difference is indexed as it is (no
    ``variant``), over the whole vocabulary (no ``vocab_filter``) and outside any series.
    """
    from .diff import diff_models

    options = _options(options, changes)
    unused = [f"{f}={getattr(options, f)!r}" for f in ("variant", "vocab_filter", "series", "step")
              if getattr(options, f) != getattr(_DEFAULTS, f)]
    if unused:
        raise BadOption(f"a diff takes no {', '.join(unused)}: it is indexed raw, as the variant diff")
    slug = check_slug(default_slug(tuned_ref, "-diff") if name is None else name)
    check_writable(Path(db))
    delta = diff_models(base_ref, tuned_ref, allow_pickle=options.allow_pickle, quiet=options.progress is None)
    options.say(f"loaded {base_ref} and {tuned_ref}: {_describe(delta.canonical.dims)}")
    return index_canonical(delta.canonical, delta.tokenizer, db, slug=slug, provenance=delta.provenance,
                           options=options, variant="diff")


def _whole(v) -> bool:
    """An integer (numpy's too), not a bool, a float or a string."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


_DEFAULTS = IndexOptions()


def _effective_sizes(k: int, n_pairs: int, d_vocab: int, say: Progress, slug: str) -> tuple[int, int]:
    """``--k`` and ``--pairs`` clamped to what a vocabulary of ``d_vocab`` tokens can fill.

    A top list longer than the vocabulary would only repeat it, so k is clamped to d_vocab (the
    top and the bottom list then each rank the whole vocabulary, in opposite orders) and n_pairs
    to d_vocab² (every entry of the V x V circuit). Said once on stderr; settings keep both.
    """
    k_eff, pairs_eff = min(k, d_vocab), min(n_pairs, d_vocab * d_vocab)
    clamped = [f"--{opt} {asked} to {got}" for opt, asked, got in (("k", k, k_eff), ("pairs", n_pairs, pairs_eff))
               if got != asked]
    if clamped:
        say(f"[{slug}] clamped {' and '.join(clamped)}: the vocabulary has {d_vocab} tokens "
            f"(a list holds at most every token, a circuit {d_vocab}x{d_vocab} entries)")
    return k_eff, pairs_eff


def index_canonical(model: Canonical, tokenizer, db: str | Path, *, slug: str, provenance: "Provenance",
                    options: IndexOptions = _DEFAULTS, variant: Optional[str] = None) -> dict:
    """Project a canonical model into the dataset at ``db`` under the name ``slug``.

    ``k`` and ``n_pairs`` larger than the vocabulary allows are clamped (``_effective_sizes``):
    ``models.k`` / ``models.n_pairs`` hold what was used, ``settings`` both.

    ``variant``: what ``models.variant`` records when not ``options.variant`` (`index_diff`: ``diff``).
    """
    k, n_pairs, layers, device, replace = options.k, options.n_pairs, options.layers, options.device, options.replace
    series, step, vocab_filter, variant = options.series, options.step, options.vocab_filter, variant or options.variant
    root = Path(db)
    say = options.say
    dims = model.dims
    layer_list = parse_layers(layers, dims.n_layers)
    k_asked, n_pairs_asked = int(k), int(n_pairs)
    if variant == "folded":
        with phase("canonicalise and fold"):
            model = fold(model)
    if tokenizer is not None:
        vocab_id, tokens = vocabulary(tokenizer, dims.d_vocab)
    else:
        say("no tokenizer found: tokens are named by id (<123>)")
        vocab_id, tokens = numbered_vocabulary(dims.d_vocab)
    allowed, filter_record = None, None
    check_filter_name(Path(db), slug, vocab_filter)
    if vocab_filter is not None:
        allowed, filter_record = allowed_ids(vocab_filter, tokens)
        model = restrict(model, allowed)  # lists over the allowed tokens; positions mapped back below
        say(f"[{slug}] --vocab-filter {vocab_filter}: {allowed.size:,} of {dims.d_vocab:,} tokens allowed")
    k, n_pairs = _effective_sizes(k_asked, n_pairs_asked, model.dims.d_vocab, say, slug)
    settings = {
        "k": k, "k_requested": k_asked, "n_pairs": n_pairs, "n_pairs_requested": n_pairs_asked,
        "variant": variant, "layers": layer_list, "device": device,
        "base": provenance.base.as_dict() if provenance.base is not None else None,
        # What `raw` leaves unapplied (Gemma's sqrt(d_model) embedding multiplier, softcapping, ...).
        "conventions": dict(model.conventions),
    }
    if filter_record is not None:  # absent when unfiltered, so unfiltered builds keep their fingerprint
        settings["vocab_filter"] = filter_record
    fingerprint = {
        "settings": {key: v for key, v in settings.items() if key != "device"},
        "weights": dict(provenance.weights_sha256),
        "source": provenance.source,
        "zeropass_version": ZEROPASS_VERSION,
    }
    token_text = tokens.column("token").combine_chunks()

    origin = origin_of(provenance)
    check_writable(root)
    with dataset_lock(root), profiling(options.profile, report=stderr_progress):
        build = Build(root, slug, json.loads(json.dumps(fingerprint, default=str)), origin=origin, replace=replace)
        if build.resumed:
            say(f"resuming the unfinished build of {slug} ({len(build.done)} partitions already written)")
        writer = _ModelWriter(model, build, token_text, k=k, n_pairs=n_pairs, device=device, allowed=allowed)
        t0 = time.perf_counter()
        if dims.n_ctx is not None and model.embeddings.W_pos is not None and not build.has("vectors", layer="pos"):
            build.write("vectors", writer.position_vectors(), layer="pos")
        if not build.has("parameters"):
            build.write("parameters", _parameters_table(model, slug))
        try:
            for i, l in enumerate(layer_list):
                t_layer = time.perf_counter()
                set_layer(l)
                writer.layer(l)
                _release_freed_memory()
                set_layer(None)
                elapsed = time.perf_counter() - t0
                eta = elapsed / (i + 1) * (len(layer_list) - i - 1)
                say(f"[{slug}] layer {l} done ({i + 1}/{len(layer_list)}) in {time.perf_counter() - t_layer:.1f}s, "
                    f"elapsed {_hms(elapsed)}, ETA {_hms(eta)}")
        except BaseException:  # an error or Ctrl-C: circuit worker processes stop now
            writer.close(cancel=True)
            raise
        writer.close()  # every layer waited for its circuits
        model_row = {
            "source": provenance.source,
            "revision": provenance.revision,
            "architecture": dims.architecture,
            "hf_architecture": provenance.hf_architecture,
            "n_layers": dims.n_layers, "n_heads": dims.n_heads, "n_kv_heads": dims.n_kv_heads,
            "d_model": dims.d_model, "d_head": dims.d_head, "d_ff": dims.d_ff, "d_vocab": dims.d_vocab,
            "n_ctx": dims.n_ctx, "tied": dims.tied, "vocab_id": vocab_id, "variant": variant,
            "series": series, "step": step, "k": k, "n_pairs": n_pairs,
            "settings": json.dumps(settings, sort_keys=True, default=str),
            "weights_sha256": json.dumps(dict(provenance.weights_sha256), sort_keys=True),
        }
        t_sort = time.perf_counter()
        build.write_by_token()
        say(f"[{slug}] vectors_by_token (all vectors sorted by token) written in {time.perf_counter() - t_sort:.1f}s")
        entry = build.commit(model_row, vocab_id, tokens,
                             rebuild_args=_rebuild_args(provenance, slug, k, n_pairs, variant, layer_list, dims.n_layers)
                             + (["--vocab-filter", vocab_filter] if vocab_filter is not None else []))
    say(f"[{slug}] indexed in {_hms(time.perf_counter() - t0)}: "
        + ", ".join(f"{t} {n:,}" for t, n in entry["row_counts"].items()))
    if build.removed_dictionaries:
        say(f"[{slug}] removed its dictionaries {', '.join(build.removed_dictionaries)}: they were projected through the "
            f"weights it had before (index them again with `zeropass index-sae PATH --model {slug}`)")
    return dict(entry, model=slug, removed_dictionaries=build.removed_dictionaries)


def _rebuild_args(provenance: Provenance, slug: str, k: int, n_pairs: int, variant: str, layer_list: list[int],
                  n_layers: int) -> list[str]:
    """The command line (without --db) that rebuilds this model: `zeropass check` prints it."""
    def where(prov: Provenance) -> str:  # an absolute path works from any directory; a hub id as is
        return checkpoint_origin(prov) or str(prov.source)

    base = provenance.base
    if variant == "diff" and base is not None:
        args = ["diff", where(base), where(provenance)]
    else:
        args = ["index", where(provenance), "--variant", variant]
    args += ["--name", slug, "--k", str(k), "--pairs", str(n_pairs)]
    if layer_list != list(range(n_layers)):
        args += ["--layers", ",".join(map(str, layer_list))]
    if provenance.format == "pickle":
        args.append("--allow-pickle")
    return args


def _release_freed_memory() -> None:
    """Hand memory freed by the last layer back to the OS (glibc keeps it otherwise, and the
    peak RSS then creeps up layer by layer instead of staying bounded by one layer)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _describe(dims) -> str:
    kv = f"/{dims.n_kv_heads} kv" if dims.n_kv_heads != dims.n_heads else ""
    return (f"{dims.architecture}, {dims.n_layers} layers x {dims.n_heads}{kv} heads, d_model {dims.d_model}, "
            f"d_ff {dims.d_ff}, vocabulary {dims.d_vocab}")


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _parameters_table(model: Canonical, slug: str) -> pa.Table:
    from schemas import TABLES

    rows = [
        {"model": slug, "name": p.name, "shape": list(p.shape), "layer": p.layer, "role": p.role,
         "covered_by": p.covered_by, "reason": p.reason}
        for p in model.parameters
    ]
    return pa.Table.from_pylist(rows, schema=TABLES["parameters"].schema)


class _ModelWriter:
    """Computes and writes one model's partitions; holds the projection bases once."""

    def __init__(self, model: Canonical, build: Build, token_text: pa.Array, *, k: int, n_pairs: int, device: str,
                 allowed: Optional[np.ndarray] = None):
        # --vocab-filter: the model's bases hold the allowed tokens only; list positions are
        # token ids through ``allowed`` (and texts through the cut ``token_text``).
        self.allowed = allowed
        if allowed is not None:
            token_text = token_text.take(pa.array(allowed))
        self.model, self.build, self.token_text = model, build, token_text
        self.k, self.n_pairs, self.device = k, n_pairs, device
        emb = model.embeddings
        # Tied embeddings (and the folded variant only when no final gain changed W_U): one basis
        # serves both sides, which saves a V x d_model copy here and a float64 one for circuits.
        self.same_basis = emb.W_U.shape == emb.W_E.T.shape and torch.equal(emb.W_U, emb.W_E.T)
        self.read = Projector(emb.W_E.T, k, device)  # scores = W_E @ r
        self.write_side = self.read if self.same_basis else Projector(emb.W_U, k, device)  # scores = w @ W_U
        self._E64: Optional[torch.Tensor] = None
        self._U64T: Optional[torch.Tensor] = None
        self._processes = None  # CircuitProcesses, once a layer's circuits choose them (_circuit_processes)
        if device == "cpu":
            # Bounded memory (issue 12): the projectors hold W_E^T / W_U as float32 [d_model, d_vocab];
            # point the model's embeddings at them (equal values) so W_E's own float32 copy can be
            # freed (2 GB at V 128256), and build the float64 circuit factors from them block by
            # block (_factor) instead of holding float64 copies of both bases (8 GB at V 128256).
            model.embeddings = dataclasses.replace(emb, W_E=self.read.basis.T, W_U=self.write_side.basis)

    def _ids(self, positions: np.ndarray) -> np.ndarray:
        """Token ids (int32) of basis positions: the same numbers, or through ``allowed`` under a vocabulary filter."""
        positions = np.asarray(positions)
        return (positions if self.allowed is None else self.allowed[positions]).astype(np.int32)

    # -- vectors ---------------------------------------------------------------------------

    def _projector(self, kind: str) -> Projector:
        """The basis a kind is scored on (schemas/kinds.py): W_E for read-side kinds, W_U for write-side."""
        return self.read if KIND[kind].side == READ else self.write_side

    def position_vectors(self) -> pa.Table:
        W_pos = self.model.embeddings.W_pos
        n = W_pos.shape[0]
        return self._vector_table("pos", None, None, np.arange(n), [position_unit(p) for p in range(n)],
                                  self._projector("pos")(W_pos))

    _HEAD_TABLES = ("pairs", "head_tokens", "heads")

    def layer(self, l: int) -> None:
        """Write layer ``l``'s partitions that are not on disk yet, then record it complete."""
        if self.build.layer_done(l):
            return
        with phase("canonicalise and fold"):
            lw = self.model.layer(l)
        vectors = None if self.build.has("vectors", layer=l) else self.vectors(l, lw)
        # The heads read attention alone: the MLP goes before their circuits run, which is where
        # a layer's peak is (Llama-2-7B shapes: 541 MB of float32 less, docs/BENCHMARKS.md §11).
        lw = lw.attention_only()

        def write_vectors() -> None:
            nonlocal vectors
            if vectors is not None:
                self.build.write("vectors", vectors, layer=l)
                vectors = None

        if not all(self.build.has(t, layer=l) for t in self._HEAD_TABLES):
            if self._circuit_processes(lw) is None:
                # The circuits never use the projectors' score buffers (128 MB each): freed while
                # circuit threads run, they leave room for the second circuit (docs/PAIRS.md). Worker
                # processes hold their circuits elsewhere: the buffers stay for the next layer.
                self.read.release_buffer()
                self.write_side.release_buffer()
            # the three head tables come from one pass: all or none; the vectors are written
            # while the first head's circuits run
            self._heads(l, lw, on_first_circuits=write_vectors)
        write_vectors()
        self.build.mark_layer_done(l, ("vectors",) + self._HEAD_TABLES)

    def vectors(self, l: int, lw) -> pa.Table:
        """Top/bottom-k tokens of every vector-shaped parameter of layer ``l``."""
        parts = self._ff_tables(l, lw, None)  # dense FF, or a MoE layer's shared expert (expert null)
        if lw.experts is not None:
            # Mixture of experts: one expert read and projected at a time (memory: one expert).
            for e in range(len(lw.experts)):
                parts += self._ff_tables(l, lw.experts[e], e)
            n_e = lw.W_router.shape[1]
            parts.append(self._vector_table("router", l, None, np.arange(n_e), [router_unit(l, e) for e in range(n_e)],
                                            self._projector("router")(lw.W_router.T), experts=np.arange(n_e)))
            if lw.W_shared_gate is not None:
                parts.append(self._vector_table("router", l, None, np.zeros(1, dtype=np.int64), [router_unit(l, None)],
                                                self._projector("router")(lw.W_shared_gate.T)))
        for kind, W in (("q", lw.W_Q), ("k", lw.W_K), ("v", lw.W_V), ("o", lw.W_O)):
            reads = KIND[kind].side == READ
            n_h, d_head = W.shape[0], (W.shape[2] if reads else W.shape[1])
            # read side: columns of W[h] ([d_model, d_head]); write side: rows of W_O[h].
            X = W.transpose(1, 2).reshape(n_h * d_head, -1) if reads else W.reshape(n_h * d_head, -1)
            heads = np.repeat(np.arange(n_h), d_head)
            idx = np.tile(np.arange(d_head), n_h)
            units = [head_dim_unit(l, h, j) for h, j in zip(heads, idx)]
            parts.append(self._vector_table(kind, l, heads, idx, units, self._projector(kind)(X)))
        for kind, b in (("bias_attn_out", lw.b_O), ("bias_ff_out", lw.b_out)):
            if b is not None:
                parts.append(self._vector_table(kind, l, None, np.zeros(1, dtype=np.int64), [bias_unit(l, kind)],
                                                self._projector(kind)(b[None, :])))
        return pa.concat_tables(parts)

    def _ff_tables(self, l: int, ff, expert: Optional[int]) -> list:
        """FF key / gate / value tables of a dense MLP or of one expert (``ff``: LayerWeights or ExpertFF)."""
        d_ff = ff.W_in.shape[1]
        if d_ff == 0:  # a MoE layer without a shared expert
            return []
        units = [neuron_unit(l, i, expert) for i in range(d_ff)]
        idx = np.arange(d_ff)
        experts = None if expert is None else np.full(d_ff, expert)
        parts = []
        # FF vectors as rows: keys and gates are columns of W_in / W_gate, values rows of W_out.
        for kind, X in (("ff_key", ff.W_in.T), ("ff_gate", None if ff.W_gate is None else ff.W_gate.T), ("ff_value", ff.W_out)):
            if X is not None:
                parts.append(self._vector_table(kind, l, None, idx, units, self._projector(kind)(X), experts=experts))
        return parts

    def _vector_table(self, kind: str, layer, heads, idx, units: list[str], topk: TopK, experts=None) -> pa.Table:
        """``experts``: per unit, its routed expert (``vectors.expert``); None: null for every row."""
        with phase("vector tables"):
            return self._vector_columns(kind, layer, heads, idx, units, topk, experts)

    def _vector_columns(self, kind: str, layer, heads, idx, units: list[str], topk: TopK, experts) -> pa.Table:
        n, k = topk.top_idx.shape
        rows_per_unit = 2 * k
        total = n * rows_per_unit
        unit_of_row = np.repeat(np.arange(n), rows_per_unit)
        token_ids = np.concatenate([topk.top_idx.cpu().numpy(), topk.bot_idx.cpu().numpy()], axis=1).reshape(-1)
        scores = np.concatenate([topk.top_val.cpu().numpy(), topk.bot_val.cpu().numpy()], axis=1).reshape(-1)
        side_idx = np.tile(np.repeat(np.array([0, 1], dtype=np.int32), k), n)
        rank = np.tile(np.tile(np.arange(1, k + 1, dtype=np.int32), 2), n)
        cols = {
            "model": pa.DictionaryArray.from_arrays(pa.array(np.zeros(total, dtype=np.int32)), pa.array([self.build.slug])),
            "layer": pa.array(np.full(total, layer, dtype=np.int16)) if layer is not None else pa.nulls(total, pa.int16()),
            "kind": pa.DictionaryArray.from_arrays(pa.array(np.zeros(total, dtype=np.int32)), pa.array([kind])),
            "head": pa.array(np.asarray(heads, dtype=np.int16)[unit_of_row]) if heads is not None else pa.nulls(total, pa.int16()),
            "expert": pa.array(np.asarray(experts, dtype=np.int16)[unit_of_row]) if experts is not None else pa.nulls(total, pa.int16()),
            "idx": pa.array(np.asarray(idx, dtype=np.int32)[unit_of_row]),
            "unit": pa.DictionaryArray.from_arrays(pa.array(unit_of_row.astype(np.int32)), pa.array(units)),
            "side": pa.DictionaryArray.from_arrays(pa.array(side_idx), pa.array(["top", "bottom"])),
            "rank": pa.array(rank),
            "token_id": pa.array(self._ids(token_ids)),
            "token": pa.DictionaryArray.from_arrays(pa.array(token_ids.astype(np.int32)), self.token_text),
            "score": pa.array(scores.astype(np.float32)),
        }
        return pa.table(cols)

    # -- heads -----------------------------------------------------------------------------

    _FACTOR_ROWS = 2048  # vocabulary rows per float64 block in _factors (64 MB at d_model 4096)
    _FACTOR_BYTES = 256 * 2**20  # at most this much of factors from one pass over the basis
    _PIPELINE_BYTES = 128 * 2**20  # a head's factors up to this: two heads in flight (_heads)

    def _factors(self, side: str, Ws: list) -> list:
        """float64 ``W_E @ W`` (side "E") or ``W_U^T @ W`` (side "U") for each W [d_model, d_head]
        of ``Ws``, in one pass over the basis: exact float64 products (docs/DESIGN.md §3). On a GPU
        from float64 bases built once; on the CPU from the float32 projector bases, converted one
        block of vocabulary rows at a time."""
        V, d_model = self.model.embeddings.W_E.shape
        flops = 2 * V * d_model * sum(W.shape[1] for W in Ws)
        with phase("circuit factors", flops=flops, dtype="fp64"):
            return self._factor_product(side, Ws)

    def _factor_product(self, side: str, Ws: list) -> list:
        W64 = torch.cat([W.to(self.device, torch.float64) for W in Ws], dim=1)
        widths = [W.shape[1] for W in Ws]
        if self.device != "cpu":
            E, UT = self._factors_base()
            return list(((E if side == "E" else UT) @ W64).split(widths, dim=1))
        basis = (self.read if side == "E" else self.write_side).basis  # [d_model, d_vocab] float32
        V = basis.shape[1]
        # Each block as W^T [widths, d_model] @ basis block [d_model, rows], written transposed:
        # the BLAS runs this wide shape about 2x faster than the tall [rows, d_model] @ [d_model,
        # d_head], and one pass for several factors converts each basis block once (measured on
        # SmolLM2's factors, docs/BENCHMARKS.md §11). Every output is a float64 dot product of the
        # same numbers; the factors came out bit for bit those of one tall GEMM per factor here.
        WT = W64.T.contiguous()
        outs = [torch.empty(V, w, dtype=torch.float64) for w in widths]
        for i in range(0, V, self._FACTOR_ROWS):
            j = min(V, i + self._FACTOR_ROWS)
            block = WT @ basis[:, i:j].to(torch.float64)
            for out, part in zip(outs, block.split(widths, dim=0)):
                out[i:j] = part.T
        return outs

    def _factor_bytes(self, lw) -> int:
        """Bytes of one float64 circuit factor [d_vocab, d_head]."""
        return self.model.embeddings.W_E.shape[0] * lw.W_Q.shape[2] * 8

    def _group_factors(self, lw, kv: int, heads: list) -> Callable[[tuple], torch.Tensor]:
        """The factors of one kv group's heads, keyed ("E_K",), ("E_V",), ("E_Q", h), ("OU", h), in
        as few passes over each basis as ``_FACTOR_BYTES`` allows (one for SmolLM2's groups: 5 and
        3 factors; one per factor for Llama-3-8B's 131 MB factors). Lazily, in that order: a
        factor is built when first asked for, with the next ones of its side that fit."""
        per_pass = max(1, self._FACTOR_BYTES // self._factor_bytes(lw))
        queues = {"E": [(("E_K",), lw.W_K[kv]), (("E_V",), lw.W_V[kv])] + [(("E_Q", h), lw.W_Q[h]) for h in heads],
                  "U": [(("OU", h), lw.W_O[h].T) for h in heads]}  # (W_O W_U)^T = W_U^T W_O^T
        ready: dict = {}

        def get(key):
            side = "U" if key[0] == "OU" else "E"
            while key not in ready:
                batch, queues[side] = queues[side][:per_pass], queues[side][per_pass:]
                ready.update(zip([k for k, _ in batch], self._factors(side, [W for _, W in batch])))
            return ready.pop(key) if key[0] in ("E_Q", "OU") else ready[key]

        return get

    def _factors_base(self):
        """float64 W_E and W_U^T, built once (GPU only, see _factors)."""
        if self._E64 is None:
            emb = self.model.embeddings
            self._E64 = emb.W_E.to(self.device, torch.float64)
            self._U64T = self._E64 if self.same_basis else emb.W_U.T.to(self.device, torch.float64).contiguous()
        return self._E64, self._U64T

    def _heads(self, l: int, lw, on_first_circuits: Callable[[], None] = lambda: None) -> None:
        """Head tables of layer ``l``: per head its factors, both circuits and its metrics.

        A pipeline (docs/PAIRS.md "Speed"): a head's two circuits run on the circuit workers
        (``submit_top_pairs``) while this thread builds the next head's factors (float64 GEMMs),
        then it finishes the older head (waits for its circuits, computes its metrics, makes its
        rows). At most two heads are in flight (one at 7B shapes); beside their factors, those of
        the current kv group built ahead are alive (``_group_factors``: ``_FACTOR_BYTES`` a side).
        ``on_first_circuits`` runs once the first head's circuits are submitted (the layer's
        vectors are written then, beside them)."""
        from schemas import TABLES

        from .kernels.pairs import submit_top_pairs as threads_submit

        dims = self.model.dims
        dev = self.device
        parts: dict = {"pairs": [], "head_tokens": [], "heads": []}
        in_flight: collections.deque = collections.deque()
        heads_in_flight = self._heads_in_flight(lw)
        processes = self._circuit_processes(lw)
        submit_top_pairs = processes.submit if processes is not None else threads_submit
        # Only the current kv head's factors are held here (heads of a kv group are consecutive):
        # keeping every kv head's E_K and E_V held 2 GB at Llama-2-7B and Llama-3-8B shapes
        # (issue 12); heads in flight hold their own group's until they are finished.
        factors_of, factor = None, None
        try:
            for h in range(dims.n_heads):
                kv = dims.kv_head(h)
                if kv != factors_of:  # the last group's factors go with its closure (unless in flight)
                    factor = self._group_factors(lw, kv, [g for g in range(h, dims.n_heads) if dims.kv_head(g) == kv])
                    factors_of = kv
                E_K, E_V, A_qk, B_ov = factor(("E_K",)), factor(("E_V",)), factor(("E_Q", h)), factor(("OU", h))
                circuits = {}
                if self.n_pairs > 0:
                    circuits = {"qk": submit_top_pairs(A_qk, E_K, self.n_pairs, self.k, square=True, device=dev),
                                "ov": submit_top_pairs(E_V, B_ov, self.n_pairs, self.k, square=True, device=dev)}
                in_flight.append((h, kv, {"E_Q": A_qk, "E_K": E_K, "E_V": E_V, "OU": B_ov}, circuits))
                del E_K, E_V, A_qk, B_ov
                if h == 0:
                    on_first_circuits()
                if len(in_flight) >= heads_in_flight:
                    self._finish_head(l, lw, *in_flight.popleft(), parts, heads_in_flight == 1)
            while in_flight:
                self._finish_head(l, lw, *in_flight.popleft(), parts, heads_in_flight == 1)
        except BaseException:
            # Queued circuits are dropped; running ones end on their own (a thread can't be stopped).
            for *_, circuits in in_flight:
                for future in circuits.values():
                    future.cancel()
            raise
        for table, rows in parts.items():
            if table == "heads":
                data = pa.Table.from_pylist(rows, schema=TABLES[table].schema)
            else:
                data = pa.concat_tables(rows) if rows else pa.Table.from_pylist([], schema=TABLES[table].schema)
            self.build.write(table, data, layer=l)

    # A factor from this size on (V x d_head x 8 bytes; SmolLM2 and GPT-2: 25 MB) makes a circuit
    # long enough (~0.5 s) that worker processes pay for their start (~2 s, once per build).
    _PROCESS_FACTOR_BYTES = 16 * 2**20

    def _heads_in_flight(self, lw) -> int:
        """Two heads in flight overlap one head's factors with the other's circuits; where a
        head's four factors pass _PIPELINE_BYTES (Llama-2-7B: 4 x 33 MB) the memory goes first:
        one head is in flight (its factors, then its circuits) and freed memory is given back
        after each head (_finish_head's trim; with the allocator settings of indexer/__init__.py):
        the 7B-shaped peak stays put."""
        return 2 if 4 * self._factor_bytes(lw) <= self._PIPELINE_BYTES else 1

    def _circuit_processes(self, lw):
        """The worker processes this build's circuits run on, or None for the circuit threads
        (docs/PAIRS.md "Circuits in worker processes"): processes on the CPU for circuits of at
        least ``_PROCESS_FACTOR_BYTES`` when memory does not come first (a worker process holds a
        torch of its own, ~0.2 GB, which the 7B-shaped bound has no room for);
        ``ZEROPASS_CIRCUIT_WORKERS=threads`` or ``processes`` overrides. Started once a build."""
        from .kernels.pairs import CircuitProcesses

        if self._processes is None and self.n_pairs > 0:
            choice = os.environ.get("ZEROPASS_CIRCUIT_WORKERS", "auto")
            if choice not in ("auto", "threads", "processes"):
                raise ZeropassError(f"ZEROPASS_CIRCUIT_WORKERS must be auto, threads or processes, not {choice!r}")
            auto = self._heads_in_flight(lw) == 2 and self._factor_bytes(lw) >= self._PROCESS_FACTOR_BYTES
            if self.device == "cpu" and (choice == "processes" or (choice == "auto" and auto)):
                self._processes = CircuitProcesses()
        return self._processes

    def close(self, cancel: bool = False) -> None:
        """Stop the circuit worker processes, if any (``cancel``: the build failed or was interrupted)."""
        if self._processes is not None:
            self._processes.close(cancel)
            self._processes = None

    def _finish_head(self, l: int, lw, h: int, kv: int, factors: dict, circuits: dict, parts: dict,
                     trim: bool) -> None:
        """Wait for head ``h``'s circuits, then its pair / role rows and its metrics row; ``trim``:
        give the memory the circuits freed back to the OS."""
        from .kernels.head_metrics import head_metrics

        with phase("waiting for the circuits"):
            results = {circuit: future.result() for circuit, future in circuits.items()}
        for circuit, res in results.items():
            with phase("head tables"):
                parts["pairs"].append(self._pair_table(l, h, circuit, res))
                parts["head_tokens"].append(self._role_table(l, h, circuit, res))
        emb = self.model.embeddings
        metrics = head_metrics(emb.W_E, emb.W_U, lw.W_Q[h], lw.W_K[kv], lw.W_V[kv], lw.W_O[h],
                               results.get("ov"), results.get("qk"), factors=factors)
        parts["heads"].append(dict(metrics, model=self.build.slug, layer=l, head=h, kv_head=kv, unit=head_unit(l, h)))
        if trim:
            # Each circuit worker allocates in a glibc arena of its own, which keeps what a circuit
            # freed: without a trim per head the 7B-shaped peak crept up head by head within a
            # layer (3.9 -> 4.8 GB over one layer's 64 circuits, docs/BENCHMARKS.md §11). Only
            # where memory goes first: the pages given back are faulted in again by the next
            # circuits (SmolLM2: +9 s of system time over six layers).
            _release_freed_memory()

    def _pair_table(self, l: int, h: int, circuit: str, res) -> pa.Table:
        sides = [("top", res.top_rows, res.top_cols, res.top_vals), ("bottom", res.bot_rows, res.bot_cols, res.bot_vals)]
        src = np.concatenate([s[1].cpu().numpy() for s in sides]).astype(np.int32)
        dst = np.concatenate([s[2].cpu().numpy() for s in sides]).astype(np.int32)
        score = np.concatenate([s[3].cpu().numpy() for s in sides]).astype(np.float64)
        side = np.concatenate([np.full(len(s[1]), i, dtype=np.int32) for i, s in enumerate(sides)])
        rank = np.concatenate([np.arange(1, len(s[1]) + 1, dtype=np.int32) for s in sides])
        n = len(src)
        return pa.table({
            "model": pa.array([self.build.slug] * n, pa.string()),
            "layer": pa.array(np.full(n, l, dtype=np.int16)),
            "head": pa.array(np.full(n, h, dtype=np.int16)),
            "circuit": pa.array([circuit] * n, pa.string()),
            "side": pa.DictionaryArray.from_arrays(pa.array(side), pa.array(["top", "bottom"])),
            "rank": pa.array(rank),
            "src_id": pa.array(self._ids(src)),
            "src": pa.DictionaryArray.from_arrays(pa.array(src), self.token_text),
            "dst_id": pa.array(self._ids(dst)),
            "dst": pa.DictionaryArray.from_arrays(pa.array(dst), self.token_text),
            "score": pa.array(score),
        })

    def _role_table(self, l: int, h: int, circuit: str, res) -> pa.Table:
        row_role, col_role = ("query", "key") if circuit == "qk" else ("source", "output")
        lists = [
            (row_role, "top", res.row_top_idx, res.row_top_vals), (row_role, "bottom", res.row_bot_idx, res.row_bot_vals),
            (col_role, "top", res.col_top_idx, res.col_top_vals), (col_role, "bottom", res.col_bot_idx, res.col_bot_vals),
        ]
        ids = np.concatenate([x[2].cpu().numpy() for x in lists]).astype(np.int32)
        n = len(ids)
        return pa.table({
            "model": pa.array([self.build.slug] * n, pa.string()),
            "layer": pa.array(np.full(n, l, dtype=np.int16)),
            "head": pa.array(np.full(n, h, dtype=np.int16)),
            "circuit": pa.array([circuit] * n, pa.string()),
            "role": pa.array([x[0] for x in lists for _ in range(len(x[2]))], pa.string()),
            "side": pa.array([x[1] for x in lists for _ in range(len(x[2]))], pa.string()),
            "rank": pa.array(np.concatenate([np.arange(1, len(x[2]) + 1, dtype=np.int32) for x in lists])),
            "token_id": pa.array(self._ids(ids)),
            "token": pa.DictionaryArray.from_arrays(pa.array(ids), self.token_text),
            "score": pa.array(np.concatenate([x[3].cpu().numpy() for x in lists]).astype(np.float64)),
        })
