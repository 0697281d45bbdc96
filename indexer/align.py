"""Align the parameters of two models in embedding space (Dar et al. 2023, §5).

Two models that were trained separately have unrelated residual bases, so their raw weights
cannot be compared. Projected onto a shared vocabulary they can: a neuron of model A and a neuron
of model B that "mean" the same thing have correlated projections over the vocabulary.

For a read-side vector ``x`` (FF key or gate, column of W_Q/W_K/W_V) the projection is
``E x`` with ``E = W_E`` restricted to the shared vocabulary (``[V, d_model]``); for a write-side
vector ``w`` (FF value, row of W_O) it is ``U w`` with ``U = W_U.T``. The Pearson correlation over
the vocabulary between a projection of A and one of B only needs three small Gram matrices::

    corr(E_A x, E_B y) = xᵀ G_AB y / sqrt(xᵀ G_AA x · yᵀ G_BB y),
    G_AB = E_Aᵀ E_B − V μ_A μ_Bᵀ   (μ = column means of E over the shared vocabulary)

so every pair of vectors costs ``O(d_model)`` instead of ``O(V)``, and no ``V``-length projection
is ever materialised (``benchmarks/bench_align.py`` measures the difference). The raw-parameter
baseline is the same computation with ``E = I`` (Pearson over the ``d_model`` coordinates).

Scores (definitions repeated in docs/ALIGN.md):

* neuron / head-dimension similarity: ``|ρ|``; a vector with a zero projection scores 0.
* head similarity per kind (q, k, v, o): the mean canonical correlation between the two heads'
  ``d_head``-dimensional subspaces of projections. A head is only defined up to an invertible
  map of its ``d_head`` coordinates (W_Q M with W_K M⁻ᵀ leaves QK unchanged), and canonical
  correlations are invariant to exactly that.
* layer score per kind: mean over A's units of the best (max) similarity over B's units in
  the layer (no matching needed, so it is cheap for every layer pair). The layer aggregate
  (kind ``layer``) is the mean of the per-kind layer scores; ``layer_excess`` is the aggregate
  double-centred over the layer-pair matrix (minus its row and column means, plus the grand
  mean): how much better a pair scores than its two layers score against everything.
* layers are matched one-to-one by the Hungarian algorithm on ``layer_excess``; within each
  matched pair, neurons are matched on the mean of their ff_key/ff_gate/ff_value similarities
  (kind ``ff``) and heads on the mean of their q/k/v/o similarities (kind ``head``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import numpy as np

from schemas.kinds import FF_KINDS, HEAD_DIM_KINDS, READ_KINDS
from schemas.tokens import normalise
from schemas.units import head_unit, neuron_unit

from .canonical import Canonical, LayerWeights
from .errors import IncompatibleModels

Space = Literal["embedding", "raw"]

# A vector whose projection has (relative) variance below this is treated as zero.
_EPS = 1e-10


# --------------------------------------------------------------------------------------------
# Vocabulary


@dataclass(frozen=True)
class TokenMap:
    """Rows of W_E (columns of W_U) that A and B share, in matching order."""

    ids_a: np.ndarray  # [n_shared] int64
    ids_b: np.ndarray  # [n_shared] int64
    how: str  # "same-ids" (identical vocabularies) or "normalised-text"
    n_vocab_a: int
    n_vocab_b: int

    @property
    def n_shared(self) -> int:
        return int(self.ids_a.shape[0])

    @classmethod
    def identity(cls, n: int) -> "TokenMap":
        ids = np.arange(n, dtype=np.int64)
        return cls(ids, ids, "same-ids", n, n)


def _token_texts(tokenizer, n: int) -> list[Optional[str]]:
    """Normalised text of ids 0..n-1; None for special tokens, empty and unknown ids."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    out: list[Optional[str]] = []
    for i, piece in enumerate(pieces):
        if piece is None or i in special:
            out.append(None)
            continue
        text = normalise(tokenizer.convert_tokens_to_string([piece]))
        out.append(text or None)
    return out


def shared_vocabulary(tok_a, tok_b, n_vocab_a: int, n_vocab_b: int) -> TokenMap:
    """Match the vocabularies of two tokenizers.

    Identical piece → id mappings share ids directly (every row ``< min(n_vocab)`` is used).
    Otherwise tokens are intersected on their normalised text (``schemas.tokens.normalise``, as
    in the ``tokens.norm`` column), special tokens left out; when several ids of one vocabulary share a text, the lowest id
    stands for it. ``n_vocab_*`` are the rows of each W_E (may exceed the tokenizer's size).
    """
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va == vb:
        n = min(n_vocab_a, n_vocab_b, max(va.values()) + 1)
        ids = np.arange(n, dtype=np.int64)
        return TokenMap(ids, ids, "same-ids", n_vocab_a, n_vocab_b)
    ta = _token_texts(tok_a, min(n_vocab_a, len(tok_a)))
    tb = _token_texts(tok_b, min(n_vocab_b, len(tok_b)))
    first_b: dict[str, int] = {}
    for j, t in enumerate(tb):
        if t is not None and t not in first_b:
            first_b[t] = j
    seen: set[str] = set()
    ia, ib = [], []
    for i, t in enumerate(ta):
        if t is None or t in seen or t not in first_b:
            continue
        seen.add(t)
        ia.append(i)
        ib.append(first_b[t])
    if not ia:
        raise IncompatibleModels("the two vocabularies share no token text; alignment needs a shared vocabulary")
    return TokenMap(np.asarray(ia, np.int64), np.asarray(ib, np.int64), "normalised-text", n_vocab_a, n_vocab_b)


# --------------------------------------------------------------------------------------------
# Correlation through Gram matrices


@dataclass
class Grams:
    """Centred Gram matrices of the two bases of one side (read or write), float64."""

    G_aa: np.ndarray  # [d_a, d_a]
    G_bb: np.ndarray  # [d_b, d_b]
    G_ab: np.ndarray  # [d_a, d_b]
    n_rows: int  # V (shared tokens), or d_model for the raw baseline


def grams(E_a: np.ndarray, E_b: np.ndarray) -> Grams:
    """``G = EᵀE − V μ μᵀ`` for both bases and across them; E_a [V, d_a], E_b [V, d_b], same rows.

    Computed as ``(E − μ)ᵀ(E' − μ')``, the same matrix: centring first avoids the cancellation of
    the uncentred form, so the V-long sums can run in float32 (4x faster here); the small
    results are float64.
    """
    V = E_a.shape[0]
    mu_a = np.asarray(E_a, dtype=np.float64).mean(0)
    mu_b = np.asarray(E_b, dtype=np.float64).mean(0)
    C_a = (np.asarray(E_a, dtype=np.float32) - mu_a.astype(np.float32))
    C_b = (np.asarray(E_b, dtype=np.float32) - mu_b.astype(np.float32))
    G_aa = (C_a.T @ C_a).astype(np.float64)
    G_bb = (C_b.T @ C_b).astype(np.float64)
    G_ab = (C_a.T @ C_b).astype(np.float64)
    return Grams(G_aa, G_bb, G_ab, V)


def raw_grams(d: int) -> Grams:
    """The raw-space baseline: E = I, so the correlation is Pearson over the d coordinates."""
    C = np.eye(d) - np.full((d, d), 1.0 / d)
    return Grams(C, C, C, d)


def _normalise(X: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Scale the columns of X [d, n] to unit projected standard deviation; zero columns stay 0."""
    X = np.asarray(X, dtype=np.float64)
    var = np.einsum("dn,dn->n", G @ X, X)
    scale = np.where(var > _EPS * max(float(var.max(initial=0.0)), 1e-300), 1.0 / np.sqrt(np.maximum(var, 1e-300)), 0.0)
    return X * scale


def correlate(X_a: np.ndarray, X_b: np.ndarray, g: Grams) -> np.ndarray:
    """Pearson correlations over the vocabulary of every column of X_a [d_a, n_a] with every column of X_b [d_b, n_b].

    Returns ``[n_a, n_b]`` float64. Example, with E_a, E_b sharing rows::

        >>> C = correlate(W_in_a, W_in_b, grams(W_E_a, W_E_b))   # FF keys
    """
    A = _normalise(X_a, g.G_aa)
    B = _normalise(X_b, g.G_bb)
    return (A.T @ g.G_ab) @ B


def correlate_direct(E_a: np.ndarray, X_a: np.ndarray, E_b: np.ndarray, X_b: np.ndarray) -> np.ndarray:
    """The dense reference for :func:`correlate`: materialise the projections [V, n] and correlate them."""
    P_a = np.asarray(E_a) @ np.asarray(X_a)
    P_b = np.asarray(E_b) @ np.asarray(X_b)
    P_a = P_a - P_a.mean(0)
    P_b = P_b - P_b.mean(0)
    na = np.linalg.norm(P_a, axis=0)
    nb = np.linalg.norm(P_b, axis=0)
    P_a = P_a / np.where(na > 0, na, 1.0)
    P_b = P_b / np.where(nb > 0, nb, 1.0)
    return P_a.T @ P_b


def _whiten_heads(W: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Per head, a basis T [d, d_head] of its projected subspace with Tᵀ G T = I (zero columns for a deficient rank).

    W: [n_heads, d, d_head] (columns are the head's vectors).
    """
    W = np.asarray(W, dtype=np.float64)
    S = W.transpose(0, 2, 1) @ (G @ W)  # [h, d_head, d_head]
    vals, vecs = np.linalg.eigh(S)
    top = vals.max(axis=1, keepdims=True)
    inv = np.where(vals > _EPS * np.maximum(top, 1e-300), 1.0 / np.sqrt(np.maximum(vals, 1e-300)), 0.0)
    return (W @ vecs) * inv[:, None, :]


def head_similarity(T_a: np.ndarray, T_b: np.ndarray, G_ab: np.ndarray) -> np.ndarray:
    """Mean canonical correlation of every head pair; T_* from :func:`_whiten_heads`. Returns [h_a, h_b]."""
    return _canonical_corr(T_a.transpose(0, 2, 1) @ G_ab, T_b)


def _canonical_corr(P_a: np.ndarray, T_b: np.ndarray) -> np.ndarray:
    """Mean canonical correlation per head pair from P_a = T_aᵀ G_ab [h_a, k_a, d_b] and T_b [h_b, d_b, k_b]."""
    h_a, k_a, d_b = P_a.shape
    h_b, _, k_b = T_b.shape
    # One GEMM for all head pairs, then cut into [h_a, h_b, k_a, k_b] blocks.
    M = (P_a.reshape(h_a * k_a, d_b) @ T_b.transpose(1, 0, 2).reshape(d_b, h_b * k_b))
    M = M.reshape(h_a, k_a, h_b, k_b).transpose(0, 2, 1, 3)
    sv = np.linalg.svd(M, compute_uv=False)  # [h_a, h_b, min(k_a, k_b)]
    return np.clip(sv, 0.0, 1.0).mean(axis=-1)


# --------------------------------------------------------------------------------------------
# Per-layer vectors


def _layer_vectors(lw: LayerWeights, n_heads: int, kv_of) -> dict[str, np.ndarray]:
    """The vectors of one layer by kind, as columns: neurons [d, n], heads [n_heads, d, d_head]."""
    def np_(t):
        return t.detach().to("cpu").double().numpy()

    out: dict[str, np.ndarray] = {
        "ff_key": np_(lw.W_in),
        "ff_value": np_(lw.W_out).T,
    }
    if lw.W_gate is not None:
        out["ff_gate"] = np_(lw.W_gate)
    kv = [kv_of(h) for h in range(n_heads)]
    out["q"] = np_(lw.W_Q)
    out["k"] = np_(lw.W_K)[kv]
    out["v"] = np_(lw.W_V)[kv]
    out["o"] = np_(lw.W_O).transpose(0, 2, 1)
    return out


@dataclass
class _Prepared:
    """One layer's vectors, normalised (neurons) or whitened (heads), ready to correlate."""

    neurons: dict[str, np.ndarray]  # kind -> [d, n] float32 (A side: already multiplied by G_ab -> [n, d_b])
    heads: dict[str, np.ndarray]  # kind -> [n_heads, d, d_head] float64 (A side: T_aᵀ G_ab -> [h, d_head, d_b])


def _prepare(vecs: dict[str, np.ndarray], kinds: Sequence[str], g_read: Grams, g_write: Grams, side: str) -> _Prepared:
    neurons, heads = {}, {}
    for kind in kinds:
        g = g_read if kind in READ_KINDS else g_write
        G_self = g.G_aa if side == "a" else g.G_bb
        X = vecs[kind]
        if kind in FF_KINDS:
            Xn = _normalise(X, G_self)
            neurons[kind] = (Xn.T @ g.G_ab).astype(np.float32) if side == "a" else Xn.astype(np.float32)
        else:
            T = _whiten_heads(X, G_self)
            heads[kind] = T.transpose(0, 2, 1) @ g.G_ab if side == "a" else T
    return _Prepared(neurons, heads)


def _similarities(pa_: _Prepared, pb: _Prepared, kinds: Sequence[str]) -> dict[str, np.ndarray]:
    out = {}
    for kind in kinds:
        if kind in FF_KINDS:
            out[kind] = np.abs(pa_.neurons[kind] @ pb.neurons[kind])
        else:
            out[kind] = _canonical_corr(pa_.heads[kind], pb.heads[kind])
    return out


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class UnitMatch:
    """Hungarian matching of the units (neurons or heads) of one matched layer pair."""

    kind: str  # "ff" (neurons) or "head"
    idx_a: np.ndarray  # [n] unit indices in A's layer
    idx_b: np.ndarray  # [n] matched unit indices in B's layer
    score: np.ndarray  # [n] combined similarity of each matched pair
    per_kind: dict[str, np.ndarray]  # kind -> [n] similarity of each matched pair for that kind
    best_b: np.ndarray  # [n_units_a] argmax over B's units (may differ from the matching)
    best_score: np.ndarray  # [n_units_a]


@dataclass
class AlignResult:
    """Everything :func:`align` computed; :func:`to_table` turns it into `alignments` rows."""

    space: Space
    kinds: tuple[str, ...]
    n_layers_a: int
    n_layers_b: int
    d_model_a: int
    d_model_b: int
    n_tokens: int  # rows the correlations run over: shared vocabulary, or d_model for `raw`
    token_map_how: str  # "same-ids", "normalised-text" or "raw"
    layer_scores: dict[str, np.ndarray]  # kind (and "layer") -> [n_layers_a, n_layers_b]
    layer_match: list[tuple[int, int]]  # Hungarian pairs (layer_a, layer_b), sorted by layer_a
    units: dict[tuple[int, int], dict[str, UnitMatch]] = field(default_factory=dict)  # (la, lb) -> {"ff", "head"}
    baseline: Optional["AlignResult"] = None  # the raw-space result, when widths agree
    model_a: str = "A"
    model_b: str = "B"

    def matched_b(self, layer_a: int) -> Optional[int]:
        """The layer of B matched to ``layer_a``, or None (when A is deeper than B)."""
        return dict(self.layer_match).get(layer_a)

    def unit_recovery(self, truth_ff: dict[int, np.ndarray], truth_heads: dict[int, np.ndarray]) -> tuple[float, float]:
        """Fraction of neurons and heads matched to a known ground truth (per A layer: B index of each A unit)."""
        ok_ff = tot_ff = ok_h = tot_h = 0
        for la, lb in self.layer_match:
            m = self.units.get((la, lb))
            if not m:
                continue
            ff, hd = m["ff"], m["head"]
            ok_ff += int((truth_ff[la][ff.idx_a] == ff.idx_b).sum() if lb == la else 0)
            tot_ff += len(truth_ff[la])
            ok_h += int((truth_heads[la][hd.idx_a] == hd.idx_b).sum() if lb == la else 0)
            tot_h += len(truth_heads[la])
        return ok_ff / max(tot_ff, 1), ok_h / max(tot_h, 1)


# --------------------------------------------------------------------------------------------
# The alignment


def _check_token_map(A: Canonical, B: Canonical, token_map: Optional[TokenMap]) -> TokenMap:
    Va, Vb = A.dims.d_vocab, B.dims.d_vocab
    if token_map is None:
        if Va != Vb:
            raise IncompatibleModels(
                f"vocabulary sizes differ ({Va} vs {Vb}); pass token_map=shared_vocabulary(tok_a, tok_b, {Va}, {Vb})"
            )
        return TokenMap.identity(Va)
    if token_map.ids_a.shape != token_map.ids_b.shape or token_map.n_shared == 0:
        raise IncompatibleModels("token_map must pair the same, non-zero number of ids of A and of B")
    if token_map.ids_a.max() >= Va or token_map.ids_b.max() >= Vb:
        raise IncompatibleModels(f"token_map names ids beyond the vocabularies ({Va}, {Vb})")
    return token_map


def align(
    A: Canonical,
    B: Canonical,
    *,
    token_map: Optional[TokenMap] = None,
    space: Space = "embedding",
    match_units: bool = True,
    baseline: bool = False,
) -> AlignResult:
    """Align the layers, neurons and heads of A with those of B (see the module docstring).

    ``token_map`` pairs the shared vocabulary rows (None: same ids, equal vocabulary sizes);
    ``space="raw"`` runs the raw-parameter baseline (equal d_model required); ``baseline=True``
    also runs it and attaches it as ``result.baseline`` when the widths agree.

    >>> r = align(minilm, mpnet, token_map=shared_vocabulary(tok_a, tok_b, 30522, 30527))
    >>> r.layer_match[:2]
    [(0, 0), (1, 2)]
    """
    da, db = A.dims.d_model, B.dims.d_model
    if space == "raw":
        if da != db:
            raise IncompatibleModels(f"raw-space alignment needs equal d_model, got {da} and {db}; use space='embedding'")
        g_read = g_write = raw_grams(da)
        n_tokens, how = da, "raw"
    elif space == "embedding":
        tm = _check_token_map(A, B, token_map)
        ea, eb = A.embeddings, B.embeddings
        g_read = grams(ea.W_E.detach().cpu().numpy()[tm.ids_a], eb.W_E.detach().cpu().numpy()[tm.ids_b])
        if A.dims.tied and B.dims.tied:
            g_write = g_read
        else:
            g_write = grams(ea.W_U.detach().cpu().numpy()[:, tm.ids_a].T, eb.W_U.detach().cpu().numpy()[:, tm.ids_b].T)
        n_tokens, how = tm.n_shared, tm.how
    else:
        raise ValueError(f"space must be 'embedding' or 'raw', got {space!r}")

    kinds = tuple(k for k in FF_KINDS + HEAD_DIM_KINDS if not (k == "ff_gate" and not (A.dims.gated and B.dims.gated)))
    La, Lb = A.dims.n_layers, B.dims.n_layers

    prep_b = [
        _prepare(_layer_vectors(B.layer(l), B.dims.n_heads, B.dims.kv_head), kinds, g_read, g_write, "b") for l in range(Lb)
    ]
    scores = {k: np.zeros((La, Lb)) for k in kinds}
    prep_a: list[_Prepared] = []
    for la in range(La):
        pa_ = _prepare(_layer_vectors(A.layer(la), A.dims.n_heads, A.dims.kv_head), kinds, g_read, g_write, "a")
        prep_a.append(pa_)
        for lb in range(Lb):
            for kind, S in _similarities(pa_, prep_b[lb], kinds).items():
                scores[kind][la, lb] = float(S.max(axis=1).mean())
    scores["layer"] = agg = np.mean([scores[k] for k in kinds], axis=0)
    # Some layers of B score high against every layer of A (their vectors lie along the
    # embedding's dominant directions, which every projection shares). Matching on the
    # double-centred aggregate asks which pairs score above what their rows and columns score
    # anyway; for a square matrix this changes nothing, for L_a != L_b it removes the bias.
    scores["layer_excess"] = agg - agg.mean(0, keepdims=True) - agg.mean(1, keepdims=True) + agg.mean()

    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(scores["layer_excess"], maximize=True)
    layer_match = sorted(zip(rows.tolist(), cols.tolist()))

    result = AlignResult(
        space=space, kinds=kinds, n_layers_a=La, n_layers_b=Lb, d_model_a=da, d_model_b=db,
        n_tokens=n_tokens, token_map_how=how, layer_scores=scores, layer_match=layer_match,
    )
    if match_units:
        for la, lb in layer_match:
            S = _similarities(prep_a[la], prep_b[lb], kinds)
            result.units[(la, lb)] = {
                "ff": _match_units("ff", S, [k for k in kinds if k in FF_KINDS]),
                "head": _match_units("head", S, [k for k in kinds if k in HEAD_DIM_KINDS]),
            }
    if baseline and space == "embedding" and da == db:
        result.baseline = align(A, B, space="raw", match_units=match_units)
    return result


def _match_units(kind: str, S: dict[str, np.ndarray], kinds: Sequence[str]) -> UnitMatch:
    from scipy.optimize import linear_sum_assignment

    combined = np.mean([S[k] for k in kinds], axis=0)
    ia, ib = linear_sum_assignment(combined, maximize=True)
    best = combined.argmax(axis=1)
    return UnitMatch(
        kind=kind,
        idx_a=ia,
        idx_b=ib,
        score=combined[ia, ib],
        per_kind={k: S[k][ia, ib] for k in kinds},
        best_b=best,
        best_score=combined[np.arange(combined.shape[0]), best],
    )


# --------------------------------------------------------------------------------------------
# Output: the `alignments` table and a terminal table


def _unit_name(kind: str, layer: int, idx: int) -> str:
    """Neuron (ff kinds, matching kind ``ff``) or head (q/k/v/o, matching kind ``head``) unit of an alignment row."""
    return neuron_unit(layer, idx) if kind in FF_KINDS or kind == "ff" else head_unit(layer, idx)


def to_table(result: AlignResult, model_a: Optional[str] = None, model_b: Optional[str] = None):
    """Rows of the `alignments` table (schemas.TABLES['alignments']) for a result and its baseline."""
    import pyarrow as pa

    from schemas import TABLES

    schema = TABLES["alignments"].schema
    cols: dict[str, list] = {name: [] for name in schema.names}
    ma = model_a or result.model_a
    mb = model_b or result.model_b

    def add(r: AlignResult, kind, level, la, lb, ia, ib, score, matched):
        cols["model_a"].append(ma)
        cols["model_b"].append(mb)
        cols["space"].append(r.space)
        cols["kind"].append(kind)
        cols["level"].append(level)
        cols["layer_a"].append(la)
        cols["layer_b"].append(lb)
        cols["idx_a"].append(ia)
        cols["idx_b"].append(ib)
        cols["unit_a"].append(None if ia is None else _unit_name(kind, la, ia))
        cols["unit_b"].append(None if ib is None else _unit_name(kind, lb, ib))
        cols["score"].append(float(score))
        cols["matched"].append(bool(matched))
        cols["n_tokens"].append(r.n_tokens)

    for r in (result, result.baseline):
        if r is None:
            continue
        matched = set(r.layer_match)
        for kind in (*r.kinds, "layer", "layer_excess"):
            S = r.layer_scores[kind]
            for la in range(r.n_layers_a):
                for lb in range(r.n_layers_b):
                    add(r, kind, "layer", la, lb, None, None, S[la, lb], (la, lb) in matched)
        for (la, lb), ms in sorted(r.units.items()):
            for m in ms.values():
                for j in range(len(m.idx_a)):
                    ia, ib = int(m.idx_a[j]), int(m.idx_b[j])
                    add(r, m.kind, "unit", la, lb, ia, ib, m.score[j], True)
                    for k, s in m.per_kind.items():
                        add(r, k, "unit", la, lb, ia, ib, s[j], True)
                    if m.best_b[ia] != ib:
                        add(r, m.kind, "unit", la, lb, ia, int(m.best_b[ia]), m.best_score[ia], False)
    return pa.table(cols, schema=schema)


def format_layer_table(result: AlignResult) -> str:
    """A readable terminal table: one line per layer of A, its matched layer of B and the scores."""
    r, base = result, result.baseline
    kinds = r.kinds
    head = f"{r.model_a} -> {r.model_b}  ({r.space} space"
    head += f", {r.n_tokens} shared tokens, {r.token_map_how})" if r.space == "embedding" else f", {r.n_tokens} coordinates)"
    lines = [head]
    hdr = ["layer_a", "layer_b", "score", "excess"] + list(kinds) + ["best_b", "ff_match", "head_match"]
    if base is not None:
        hdr += ["raw_b", "raw_score"]
    rows = [hdr]
    for la in range(r.n_layers_a):
        lb = r.matched_b(la)
        S, X = r.layer_scores["layer"], r.layer_scores["layer_excess"]
        best = int(X[la].argmax())
        row = [str(la), "-" if lb is None else str(lb), "-" if lb is None else f"{S[la, lb]:.3f}",
               "-" if lb is None else f"{X[la, lb]:+.4f}"]
        row += ["-" if lb is None else f"{r.layer_scores[k][la, lb]:.3f}" for k in kinds]
        row.append(str(best))
        m = r.units.get((la, lb)) if lb is not None else None
        row.append(f"{m['ff'].score.mean():.3f}" if m else "-")
        row.append(f"{m['head'].score.mean():.3f}" if m else "-")
        if base is not None:
            bl = base.matched_b(la)
            row += ["-" if bl is None else str(bl), "-" if bl is None else f"{base.layer_scores['layer'][la, bl]:.3f}"]
        rows.append(row)
    widths = [max(len(x[i]) for x in rows) for i in range(len(hdr))]
    for x in rows:
        lines.append("  ".join(c.rjust(w) for c, w in zip(x, widths)))
    lines.append(
        "score: mean over kinds of (mean over A's units of the best |rho| / head canonical correlation in B's layer); "
        "excess: score double-centred over all layer pairs (the matching criterion); best_b: argmax of excess; "
        "ff_match/head_match: mean similarity of Hungarian-matched neurons/heads"
    )
    return "\n".join(lines)


def align_models(ref_a: str, ref_b: str, *, name_a: Optional[str] = None, name_b: Optional[str] = None, match_units: bool = True):
    """Load two models, align them in embedding space (plus the raw baseline when widths agree).

    Returns ``(AlignResult, pyarrow.Table)``; the table has the `alignments` schema.
    """
    from .load import load_canonical

    la, lb = load_canonical(ref_a), load_canonical(ref_b)
    A, B = la.canonical, lb.canonical
    if la.tokenizer is None or lb.tokenizer is None:
        tm = None  # no tokenizer to match on: same ids, equal vocabulary sizes required
    else:
        tm = shared_vocabulary(la.tokenizer, lb.tokenizer, A.dims.d_vocab, B.dims.d_vocab)
    result = align(A, B, token_map=tm, match_units=match_units, baseline=True)
    result.model_a = name_a or _slug(ref_a)
    result.model_b = name_b or _slug(ref_b)
    if result.baseline is not None:
        result.baseline.model_a, result.baseline.model_b = result.model_a, result.model_b
    return result, to_table(result)


def _slug(ref: str) -> str:
    """A checkpoint path's last part as a model name; glob characters and backslashes become '-'
    (the name is a directory of the alignments table, and manifest paths may not hold them)."""
    import os
    import re

    return re.sub(r"[*?\[\]\\]", "-", os.path.basename(os.path.normpath(str(ref))) or str(ref))
