"""Fine-tuning deltas as a model of their own (Dar et al. 2023, §4).

``diff_canonical(base, tuned)`` is a :class:`Canonical` whose every vector parameter is
``θ_tuned − θ_base`` (W_Q, W_K, W_V, W_O, W_in, W_gate, W_out, their biases, W_pos) and whose
projection bases are the **tuned** model's: W_E, W_U and b_U are taken from ``tuned``, as the
paper projects the fine-tuning deltas with the fine-tuned model's embedding matrix. The norm
gains and biases are the tuned model's too: they are scalings of the residual stream, not
directions, so the folded variant folds the tuned gains into the delta's read side.

``zeropass diff`` stores it like any other model with ``variant = 'diff'``; a layer that
fine-tuning did not touch has an exactly-zero delta, and :func:`delta_top_tokens` reports it as
unchanged (None) rather than ranking tokens by scores that are all zero.

    >>> d = diff_models("runs/base", "runs/tuned")        # doctest: +SKIP
    >>> top = delta_top_tokens(d.canonical, layer=1, kind="ff_value", k=5)  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from .canonical import Canonical, Embeddings, ExpertFF, Experts, LayerWeights
from .errors import IncompatibleModels

# Fields of LayerWeights that are directions (or direction offsets) in residual space: subtracted.
# Mixture of experts: the routers (W_router, W_shared_gate) are read-side directions too, and
# each routed expert's ExpertFF is subtracted field by field (EXPERT_FIELDS), one expert at a time.
DELTA_FIELDS = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_gate",
                "b_Q", "b_K", "b_V", "b_O", "b_in", "b_gate", "b_out", "W_router", "W_shared_gate")
EXPERT_FIELDS = ("W_in", "W_out", "W_gate")


def _sub(name: str, a: Optional[torch.Tensor], b: Optional[torch.Tensor], where: str) -> Optional[torch.Tensor]:
    from .load import check_finite

    if a is None and b is None:
        return None
    if a is None or b is None:
        missing = "base" if a is None else "tuned"
        raise IncompatibleModels(f"{where}{name} exists in only one model (missing in {missing}); diff needs the same architecture")
    if a.shape != b.shape:
        raise IncompatibleModels(f"{where}{name} has shape {tuple(a.shape)} in base but {tuple(b.shape)} in tuned; diff needs the same dimensions")
    # Both inputs were checked when read; a difference of two finite float32 values can still overflow.
    return check_finite(b.to(torch.float32) - a.to(torch.float32), f"{where}{name} of the delta (tuned - base)",
                        "the two checkpoints differ by more than float32 can hold: one of them is damaged")


def check_compatible(base: Canonical, tuned: Canonical) -> None:
    """Raise IncompatibleModels unless base and tuned have the same architecture and dimensions."""
    if base.dims != tuned.dims:
        fields = [f.name for f in dataclasses.fields(base.dims) if getattr(base.dims, f.name) != getattr(tuned.dims, f.name)]
        detail = ", ".join(f"{f} {getattr(base.dims, f)} vs {getattr(tuned.dims, f)}" for f in fields)
        raise IncompatibleModels(f"base and tuned models differ ({detail}); diff needs the same architecture, dims and vocabulary")


def check_same_vocabulary(tok_base, tok_tuned, base_ref: str = "base", tuned_ref: str = "tuned") -> None:
    """Raise IncompatibleModels when both tokenizers are known and map pieces to ids differently."""
    if tok_base is not None and tok_tuned is not None and tok_base.get_vocab() != tok_tuned.get_vocab():
        raise IncompatibleModels(f"{base_ref} and {tuned_ref} have different vocabularies; diff needs the same tokenizer")


def diff_canonical(base: Canonical, tuned: Canonical) -> Canonical:
    """θ_tuned − θ_base for every vector parameter, on the tuned model's W_E / W_U (see module doc).

    Layers stay lazy: ``layer(l)`` reads layer ``l`` of both models and subtracts.
    """
    check_compatible(base, tuned)
    eb, et = base.embeddings, tuned.embeddings
    emb = Embeddings(
        W_E=et.W_E, W_U=et.W_U,
        W_pos=_sub("W_pos", eb.W_pos, et.W_pos, ""),
        b_U=et.b_U,
        ln_final_w=et.ln_final_w, ln_final_b=et.ln_final_b,
        ln_embed_w=et.ln_embed_w, ln_embed_b=et.ln_embed_b,
    )

    def layer(l: int) -> LayerWeights:
        lb, lt = base.layer(l), tuned.layer(l)
        if lb.act != lt.act:
            raise IncompatibleModels(f"layer {l} activation is {lb.act} in base but {lt.act} in tuned; diff needs the same architecture")
        fields = {f.name: getattr(lt, f.name) for f in dataclasses.fields(LayerWeights)}
        for name in DELTA_FIELDS:
            fields[name] = _sub(name, getattr(lb, name), getattr(lt, name), f"layer {l} ")
        fields["experts"] = _sub_experts(lb.experts, lt.experts, l)
        return LayerWeights(**fields)

    return Canonical(dims=tuned.dims, embeddings=emb, layer_fn=layer, parameters=list(tuned.parameters))


def _sub_experts(base: Optional[Experts], tuned: Optional[Experts], l: int) -> Optional[Experts]:
    """The routed experts' deltas, lazily: expert e is read from both models and subtracted when asked for."""
    if base is None and tuned is None:
        return None
    if base is None or tuned is None or len(base) != len(tuned):
        n = lambda x: 0 if x is None else len(x)  # noqa: E731
        raise IncompatibleModels(f"layer {l} has {n(base)} routed experts in base but {n(tuned)} in tuned; "
                                 f"diff needs the same architecture")

    def read(e: int) -> ExpertFF:
        b, t = base[e], tuned[e]
        return ExpertFF(**{f: _sub(f, getattr(b, f), getattr(t, f), f"layer {l} expert {e} ") for f in EXPERT_FIELDS})

    return Experts(len(tuned), read)


def diff_models(base_ref: str, tuned_ref: str, *, allow_pickle: bool = False, quiet: bool = False):
    """Load two checkpoints and return the delta as a ``Loaded`` (tuned tokenizer and config).

    The provenance is ``tuned.diff(base)`` (:class:`indexer.load.Provenance`): the tuned
    model's, with source ``"TUNED - BASE"`` and ``base`` set, so the index records what was
    subtracted from what. ``zeropass diff`` (``indexer.build.index_diff``) indexes this.
    """
    from .load import Loaded, load_canonical

    lb = load_canonical(base_ref, allow_pickle=allow_pickle, quiet=quiet)
    lt = load_canonical(tuned_ref, allow_pickle=allow_pickle, quiet=quiet)
    if lb.provenance.weights_sha256 == lt.provenance.weights_sha256:
        raise IncompatibleModels(f"{base_ref} and {tuned_ref} have byte-identical weight files: the delta is zero "
                                 f"everywhere and every ranking would be an arbitrary tie order; pass two different checkpoints")
    check_same_vocabulary(lb.tokenizer, lt.tokenizer, base_ref, tuned_ref)
    canonical = diff_canonical(lb.canonical, lt.canonical)
    return Loaded(canonical=canonical, tokenizer=lt.tokenizer, config=lt.config,
                  provenance=lt.provenance.diff(lb.provenance))


@dataclass
class DeltaTop:
    """Top tokens of the changed vectors of one (layer, kind) of a delta model."""

    layer: int
    kind: str
    units: torch.Tensor  # [n] indices of the vectors whose delta is non-zero, largest norm first
    norms: torch.Tensor  # [n] their norms
    top_ids: torch.Tensor  # [n, k] token ids, highest projection first
    top_scores: torch.Tensor  # [n, k]


def delta_top_tokens(delta: Canonical, layer: int, kind: str = "ff_value", k: int = 10) -> Optional[DeltaTop]:
    """Project the changed vectors of ``kind`` in ``layer`` to the vocabulary; None if all are exactly zero.

    kind: ``ff_value`` (rows of ΔW_out, scored on W_U), ``ff_key`` / ``ff_gate`` (columns of
    ΔW_in / ΔW_gate, scored on W_E), ``bias_ff_out`` (Δb_out on W_U). Vectors whose delta is
    exactly zero are left out, so an untouched layer gives None ("unchanged"), never a ranking.
    """
    lw = delta.layer(layer)
    e = delta.embeddings
    if kind == "ff_value":
        X, basis = lw.W_out, e.W_U
    elif kind == "ff_key":
        X, basis = lw.W_in.T, e.W_E.T
    elif kind == "ff_gate":
        if lw.W_gate is None:
            raise ValueError("ff_gate: this model has no gated MLP")
        X, basis = lw.W_gate.T, e.W_E.T
    elif kind == "bias_ff_out":
        if lw.b_out is None:
            return None
        X, basis = lw.b_out[None, :], e.W_U
    else:
        raise ValueError(f"kind must be ff_value, ff_key, ff_gate or bias_ff_out, got {kind!r}")
    norms = X.norm(dim=1)
    changed = torch.nonzero(norms > 0).flatten()
    if changed.numel() == 0:
        return None
    order = changed[torch.argsort(norms[changed], descending=True)]
    scores = X[order] @ basis
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return DeltaTop(layer, kind, order, norms[order], top.indices, top.values)
