"""What every adapter shares: the tensor source it reads, checkpoint-name resolution, and the
declarative table that accounts for every checkpoint tensor (the ``parameters`` table).

An adapter is a function ``adapt(source, config, dtype, family) -> Canonical``. It never holds
more than one layer's tensors: ``Canonical.layer_fn`` reads layer ``l`` from the source on demand.
Adapters read through a ``Reader``, convert with ``linear_in`` / ``linear_out`` (nn.Linear) or
``split_heads_in`` / ``split_heads_out`` (Conv1D), pick W_U with ``unembedding`` and end with
``finish``, which checks every layer against the config before anything is projected.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Optional, Protocol

from ..canonical import Canonical, Dims, Embeddings, ParamRole


class TensorSource(Protocol):
    """A checkpoint opened for reading one tensor at a time."""

    def keys(self) -> list[str]:
        """Every tensor name in the checkpoint, in a stable order."""

    def get(self, name: str):
        """The tensor ``name`` (a fresh ``torch.Tensor`` in the stored dtype)."""

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of ``name`` without reading its data."""


# Reasons used by several families, worded once so the parameters table reads consistently.
NORM = "a scaling (LayerNorm/RMSNorm gain or bias), folded in the `folded` variant"
HEAD_BIAS = "a bias in head/neuron space, not a residual direction"
ROTARY = "rotary-embedding frequencies (a buffer, no learned direction)"
MASK = "a causal-mask buffer, not a learned weight"
POSITION_IDS = "position-id buffer (0..n_ctx-1), not a learned weight"
LOGIT_BIAS = "a bias in vocabulary space (a constant per-token logit offset), not a direction"


@dataclass(frozen=True)
class Rule:
    """One pattern of checkpoint names (after the prefix is stripped) and how it is covered.

    ``pattern`` is a regex matched against the whole stripped name; a ``(?P<layer>\\d+)`` group
    fills ``ParamRole.layer``.
    """

    pattern: str
    role: str
    covered_by: Optional[str] = None
    reason: Optional[str] = None


class Names:
    """Resolves canonical suffixes to full checkpoint names, tolerating a wrapper prefix.

    Checkpoints of the same family differ in how the base model is nested: ``bert.``,
    ``model.``, ``transformer.``, ``gpt_neox.``, ``mpnet.`` or nothing at all. We find the prefix
    from one anchor tensor every checkpoint of the family has (e.g. the token embeddings), and
    read heads that live outside the base model (``lm_head.``, ``cls.``, ``embed_out.``)
    by their unprefixed name.
    """

    def __init__(self, keys: Iterable[str], anchors: Iterable[str], family: str):
        from ..errors import BadCheckpoint

        self.keys = list(keys)
        self._set = set(self.keys)
        for anchor in anchors:
            hits = [k for k in self.keys if k == anchor or k.endswith("." + anchor)]
            if hits:
                # The shortest hit is the base model's own tensor (not e.g. a copy in a head).
                hit = min(hits, key=len)
                self.prefix = hit[: len(hit) - len(anchor)]
                self.anchor = anchor
                break
        else:
            raise BadCheckpoint(
                f"checkpoint has no {' / '.join(anchors)} tensor, so it is not a {family} "
                f"checkpoint (keys start {self.keys[:3]}); check config.json's model_type"
            )

    def base(self, suffix: str) -> Optional[str]:
        """Full name of a base-model tensor, or None if absent."""
        name = self.prefix + suffix
        return name if name in self._set else None

    def head(self, name: str) -> Optional[str]:
        """Full name of a tensor outside the base model (LM head etc.), or None if absent."""
        return name if name in self._set else None

    def need(self, suffix: str) -> str:
        from ..errors import BadCheckpoint

        name = self.base(suffix)
        if name is None and suffix.endswith((".weight", ".bias")):
            # TF-converted BERT-era checkpoints name LayerNorm parameters gamma / beta.
            old = suffix.rsplit(".", 1)[0] + (".gamma" if suffix.endswith(".weight") else ".beta")
            name = self.base(old)
        if name is None:
            raise BadCheckpoint(
                f"checkpoint is missing tensor {self.prefix + suffix!r}; it is truncated or not "
                f"the architecture its config.json names"
            )
        return name

    def strip(self, name: str) -> str:
        return name[len(self.prefix):] if self.prefix and name.startswith(self.prefix) else name


def account(source: TensorSource, names: Names, rules: list[Rule], family: str) -> list[ParamRole]:
    """One ParamRole per checkpoint tensor, in checkpoint order (first matching rule wins)."""
    compiled = [(re.compile(r.pattern), r) for r in rules]
    out = []
    for key in source.keys():
        stripped = names.strip(key)
        for rx, rule in compiled:
            m = rx.fullmatch(stripped) or rx.fullmatch(key)
            if m:
                layer = m.groupdict().get("layer")
                out.append(ParamRole(
                    name=key, shape=tuple(source.shape(key)), role=rule.role,
                    covered_by=rule.covered_by, reason=rule.reason,
                    layer=int(layer) if layer is not None else None,
                ))
                break
        else:
            # Never drop a tensor silently: an unknown one is listed and says so.
            out.append(ParamRole(
                name=key, shape=tuple(source.shape(key)), role="unknown", covered_by=None,
                reason=f"not recognised by the {family} adapter; not projected",
            ))
    return out


def cfg(config, *names, default=None):
    """The first attribute of ``config`` among ``names`` that is set (HF families differ)."""
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def head_dim(config, d_model: int, n_heads: int) -> int:
    """``config.head_dim`` when set, else ``d_model // n_heads``, refused when it does not divide.

    A head count that does not divide the width is an inconsistent config.json: HF would fail
    somewhere in a reshape; we say which numbers disagree.
    """
    from ..errors import BadCheckpoint

    explicit = cfg(config, "head_dim")
    if explicit is not None:
        return explicit
    if not isinstance(n_heads, int) or n_heads < 1 or not isinstance(d_model, int) or d_model % n_heads:
        raise BadCheckpoint(
            f"config.json is inconsistent: d_model {d_model} is not a multiple of n_heads {n_heads} "
            f"(and no head_dim is given); fix config.json to match the checkpoint"
        )
    return d_model // n_heads


class Reader:
    """A family's tensors by suffix (through ``Names``), in the canonical dtype, contiguous.

    ``shapes_only()`` makes every read an empty ``meta`` tensor of the stored shape, so an
    adapter's own layer function can be run on every layer up front to check the checkpoint
    against config.json from the headers alone, without reading any data.
    """

    def __init__(self, source: TensorSource, names: Names, dtype):
        self.source, self.names, self.dtype = source, names, dtype
        self._meta = False

    def read(self, name: str):
        """The tensor with the full checkpoint name ``name``."""
        import torch

        if self._meta:
            return torch.empty(self.source.shape(name), dtype=self.dtype, device="meta")
        return self.source.get(name).to(self.dtype).contiguous()

    def dtype_empty(self, *shape):
        """An empty tensor of ``shape`` (a zero-width FF: a MoE layer without a shared expert)."""
        import torch

        return torch.empty(shape, dtype=self.dtype, device="meta" if self._meta else "cpu")

    def need(self, suffix: str):
        """A base-model tensor that must exist (BadCheckpoint naming it otherwise)."""
        return self.read(self.names.need(suffix))

    def opt(self, suffix: str):
        """A base-model tensor, or None when the checkpoint has none (optional biases etc.)."""
        name = self.names.base(suffix)
        return None if name is None else self.read(name)

    def head(self, name: str):
        """A tensor outside the base model (``lm_head.weight``...), or None when absent."""
        full = self.names.head(name)
        return None if full is None else self.read(full)

    @contextmanager
    def shapes_only(self):
        self._meta = True
        try:
            yield self
        finally:
            self._meta = False


def linear_in(w, n_heads: int, d_head: int):
    """nn.Linear weight [n_heads * d_head, d_model] (out, in) -> [n_heads, d_model, d_head]."""
    return split_heads_in(w.T, n_heads, d_head)


def linear_out(w, n_heads: int, d_head: int):
    """nn.Linear weight [d_model, n_heads * d_head] (out, in) -> [n_heads, d_head, d_model]."""
    return split_heads_out(w.T, n_heads, d_head)


def split_heads_in(w, n_heads: int, d_head: int):
    """[d_model, n_heads * d_head] (row-vector, x @ w; Conv1D) -> [n_heads, d_model, d_head]."""
    d_model = w.shape[0]
    return w.reshape(d_model, n_heads, d_head).permute(1, 0, 2).contiguous()


def split_heads_out(w, n_heads: int, d_head: int):
    """[n_heads * d_head, d_model] (row-vector; Conv1D) -> [n_heads, d_head, d_model]."""
    return w.reshape(n_heads, d_head, w.shape[-1]).contiguous()


def unembedding(reader: Reader, W_E, head: str, config, tied_default: bool):
    """(W_U [d_model, d_vocab], tied): the LM head ``head`` transposed, or W_E.T when the config
    ties them or the checkpoint has no such head (HF would initialise it at random; projecting
    on W_E is the only meaningful reading)."""
    name = reader.names.head(head)
    tied = name is None or bool(getattr(config, "tie_word_embeddings", tied_default))
    # A transposed view, not a copy: the projectors read it as it is (kernels/vectors.py).
    return (W_E.T if tied else reader.read(name).T), tied


def finish(reader: Reader, dims: Dims, embeddings: Embeddings, layer, rules: list[Rule],
           conventions: Optional[dict] = None) -> Canonical:
    """The adapter's ``Canonical``, once every layer is shown to fit ``dims``.

    ``layer(l)`` is run on every layer with shapes only (no data is read), so a checkpoint that
    contradicts its config.json (head counts, head_dim, widths, missing layers) is one
    BadCheckpoint line now instead of a reshape traceback in the middle of a build.
    """
    from ..errors import BadCheckpoint

    parameters = account(reader.source, reader.names, rules, dims.architecture)

    def names(role: str, layer: Optional[int]) -> list:  # for messages: which tensors hold a role
        return [p.name for p in parameters if p.role == role and p.layer == layer]

    embeddings.check(dims, names)
    with reader.shapes_only():
        for l in range(dims.n_layers):
            try:
                lw = layer(l)
            except RuntimeError as e:  # a reshape / split that the stored shapes do not allow
                raise BadCheckpoint(
                    f"layer {l}'s tensors do not match config.json ({dims.describe()}): "
                    f"{' '.join(str(e).split())[:200]}; fix config.json or the checkpoint"
                ) from None
            lw.check(dims, l, names)
    return Canonical(dims=dims, embeddings=embeddings, layer_fn=checked_layer_fn(layer, dims.n_layers),
                     parameters=parameters,
                     conventions=dict(conventions or {}))


def checked_layer_fn(fn, n_layers: int):
    """Wrap a layer reader so an out-of-range layer is a clear IndexError, not a KeyError."""

    def layer(l: int):
        if not 0 <= l < n_layers:
            raise IndexError(f"layer {l} out of range: the model has layers 0..{n_layers - 1}")
        return fn(l)

    return layer
