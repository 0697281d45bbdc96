"""Parameter alignment in embedding space (indexer/align.py, docs/ALIGN.md)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from indexer.align import (
    TokenMap,
    align,
    correlate,
    correlate_direct,
    format_layer_table,
    grams,
    head_similarity,
    shared_vocabulary,
    to_table,
    _whiten_heads,
)
from indexer.canonical import Canonical, Dims, Embeddings, LayerWeights
from indexer.errors import IncompatibleModels
from tests.tiny_models import PieceTokenizer


def random_canonical(seed=0, n_layers=4, d_model=64, n_heads=4, d_ff=256, d_vocab=2000, gated=False, tied=True) -> Canonical:
    """A canonical model with Gaussian weights: distinct random vectors have near-zero correlation."""
    g = torch.Generator().manual_seed(seed)
    d_head = d_model // n_heads

    def r(*shape):
        return torch.randn(*shape, generator=g) / np.sqrt(shape[-2] if len(shape) > 1 else 1)

    W_E = torch.randn(d_vocab, d_model, generator=g)
    emb = Embeddings(W_E=W_E, W_U=W_E.T.clone() if tied else torch.randn(d_model, d_vocab, generator=g), W_pos=torch.randn(32, d_model, generator=g))
    layers = [
        LayerWeights(
            W_Q=r(n_heads, d_model, d_head), W_K=r(n_heads, d_model, d_head), W_V=r(n_heads, d_model, d_head),
            W_O=r(n_heads, d_head, d_model), W_in=r(d_model, d_ff), W_out=r(d_ff, d_model),
            W_gate=r(d_model, d_ff) if gated else None,
            b_in=torch.randn(d_ff, generator=g), b_out=torch.randn(d_model, generator=g),
        )
        for _ in range(n_layers)
    ]
    dims = Dims("test", n_layers, n_heads, n_heads, d_model, d_head, d_ff, d_vocab, 32, tied, gated, "pre")
    return Canonical(dims, emb, layers.__getitem__)


def rotate_and_permute(A: Canonical, seed=1):
    """A' = A in a rotated residual basis, with heads and FF neurons permuted: the same function.

    Returns (A', truth_ff, truth_heads): truth_*[layer][i] is the index in A' of A's unit i.
    """
    g = torch.Generator().manual_seed(seed)
    d = A.dims.d_model
    R, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    e = A.embeddings
    emb = Embeddings(W_E=e.W_E @ R, W_U=R.T @ e.W_U, W_pos=e.W_pos @ R)
    layers, truth_ff, truth_heads = [], {}, {}
    for l in range(A.dims.n_layers):
        lw = A.layer(l)
        pf = torch.randperm(A.dims.d_ff, generator=g)  # new neuron j is old neuron pf[j]
        ph = torch.randperm(A.dims.n_heads, generator=g)
        truth_ff[l] = torch.argsort(pf).numpy()
        truth_heads[l] = torch.argsort(ph).numpy()
        rot_in = lambda W: torch.einsum("ed,hek->hdk", R, W)  # Rᵀ W per head
        layers.append(
            LayerWeights(
                W_Q=rot_in(lw.W_Q)[ph], W_K=rot_in(lw.W_K)[ph], W_V=rot_in(lw.W_V)[ph], W_O=(lw.W_O @ R)[ph],
                W_in=(R.T @ lw.W_in)[:, pf], W_out=(lw.W_out @ R)[pf],
                W_gate=None if lw.W_gate is None else (R.T @ lw.W_gate)[:, pf],
                b_in=lw.b_in[pf], b_out=lw.b_out @ R,
            )
        )
    return Canonical(A.dims, emb, layers.__getitem__), truth_ff, truth_heads


def test_gram_correlation_matches_dense_reference():
    rng = np.random.default_rng(0)
    V, da, db = 500, 24, 40
    E_a, E_b = rng.normal(size=(V, da)) + 0.3, rng.normal(size=(V, db)) - 0.2
    X_a, X_b = rng.normal(size=(da, 30)), rng.normal(size=(db, 50))
    X_a[:, 3] = 0.0  # a dead neuron: correlation defined as 0
    got = correlate(X_a, X_b, grams(E_a, E_b))
    want = correlate_direct(E_a, X_a, E_b, X_b)
    np.testing.assert_allclose(got, want, atol=1e-5)  # V-long sums run in float32
    assert np.all(got[3] == 0.0)


def test_head_similarity_is_invariant_within_the_head():
    rng = np.random.default_rng(1)
    V, d, dh = 400, 32, 8
    E = rng.normal(size=(V, d))
    g = grams(E, E)
    W = rng.normal(size=(3, d, dh))
    M = rng.normal(size=(dh, dh))  # any invertible map of the head's coordinates
    W2 = W[[2, 0, 1]] @ M
    S = head_similarity(_whiten_heads(W, g.G_aa), _whiten_heads(W2, g.G_bb), g.G_ab)
    np.testing.assert_allclose(S[[0, 1, 2], [1, 2, 0]], 1.0, atol=1e-8)
    assert S[0, 0] < 0.9


def test_rotation_is_recovered_in_embedding_space_not_in_raw_space(record_property):
    """Numbers: `pytest -rP tests/test_align.py -k rotation` (printed), or in the assertion message."""
    A = random_canonical()
    B, truth_ff, truth_heads = rotate_and_permute(A)
    emb = align(A, B, baseline=True)
    raw = emb.baseline
    ident = [(l, l) for l in range(A.dims.n_layers)]
    emb_layers = sum(p in ident for p in emb.layer_match)
    raw_layers = sum(p in ident for p in raw.layer_match)
    emb_ff, emb_heads = emb.unit_recovery(truth_ff, truth_heads)
    raw_ff, raw_heads = raw.unit_recovery(truth_ff, truth_heads)
    def margin(r):  # mean score of the true layer pairs minus the best wrong pair per layer
        S = r.layer_scores["layer"]
        off = np.where(np.eye(len(S), dtype=bool), -np.inf, S).max(axis=1)
        return float((np.diag(S) - off).mean())

    report = (
        f"embedding space: layers {emb_layers}/{A.dims.n_layers} (margin {margin(emb):+.3f}), "
        f"neurons {emb_ff:.1%}, heads {emb_heads:.1%}; "
        f"raw space: layers {raw_layers}/{A.dims.n_layers} (margin {margin(raw):+.3f}), "
        f"neurons {raw_ff:.1%}, heads {raw_heads:.1%}"
    )
    record_property("alignment", report)
    assert emb_layers == A.dims.n_layers and emb_ff >= 0.99 and emb_heads >= 0.99, report
    assert raw_ff < 0.1 and raw_heads < 0.75 and margin(raw) < 0.05 < 0.5 < margin(emb), report
    # The matched units are the same vectors in another basis: correlation 1.
    assert min(m["ff"].score.min() for m in emb.units.values()) > 1 - 1e-6, report
    print(report)


def test_gated_gqa_models_align_and_table_has_schema():
    A = random_canonical(seed=3, n_layers=2, d_model=32, n_heads=4, d_ff=64, d_vocab=300, gated=True, tied=False)
    A.dims = Dims("test", 2, 4, 2, 32, 8, 64, 300, 32, False, True, "pre")
    # GQA: K/V have n_kv_heads=2 heads; query head h reads kv head h // 2.
    base = A.layer_fn
    A.layer_fn = lambda l: LayerWeights(**{**base(l).__dict__, "W_K": base(l).W_K[:2], "W_V": base(l).W_V[:2]})
    B = random_canonical(seed=4, n_layers=3, d_model=48, n_heads=6, d_ff=96, d_vocab=320, gated=True, tied=False)
    tm = TokenMap(np.arange(250), np.arange(10, 260), "normalised-text", 300, 320)
    r = align(A, B, token_map=tm, baseline=True)
    assert r.baseline is None  # widths differ: no raw baseline
    assert "ff_gate" in r.kinds and r.n_tokens == 250
    assert len(r.layer_match) == 2 and len({lb for _, lb in r.layer_match}) == 2
    t = to_table(r, "a", "b")
    from schemas import TABLES

    assert t.schema.equals(TABLES["alignments"].schema, check_metadata=False)
    assert t.num_rows > 0 and set(t.column("level").to_pylist()) == {"layer", "unit"}
    text = format_layer_table(r)
    assert "layer_a" in text and "250 shared tokens" in text


def test_vocabulary_size_mismatch_is_a_typed_error():
    A = random_canonical(n_layers=1, d_vocab=100, d_ff=16)
    B = random_canonical(n_layers=1, d_vocab=120, d_ff=16)
    with pytest.raises(IncompatibleModels, match="token_map"):
        align(A, B)
    with pytest.raises(IncompatibleModels, match="d_model"):
        align(A, random_canonical(n_layers=1, d_model=32, d_ff=16, d_vocab=100), space="raw")


def test_shared_vocabulary_same_ids_and_normalised_text():
    a = PieceTokenizer(["[CLS]", "the", "Paris", "cat", "the"])
    assert shared_vocabulary(a, a, 5, 8).how == "same-ids"
    b = PieceTokenizer(["<s>", "Ġparis", "dog", "ĠThe", "Ġcat"], special=[0])
    tm = shared_vocabulary(a, b, 5, 5)
    assert tm.how == "normalised-text"
    assert list(zip(tm.ids_a, tm.ids_b)) == [(1, 3), (2, 1), (3, 4)]
    with pytest.raises(IncompatibleModels):
        shared_vocabulary(a, PieceTokenizer(["x", "y"]), 5, 2)


@pytest.mark.integration
@pytest.mark.slow
def test_minilm_vs_mpnet_layers_align_by_depth():
    """Two separately trained encoders (6 x 384 vs 12 x 768) over their shared vocabulary."""
    from indexer.errors import ModelNotFound
    from indexer.packaged import minilm_path, mpnet_path

    try:
        a, b = str(minilm_path()), str(mpnet_path())
    except ModelNotFound as e:
        pytest.skip(str(e))
    from indexer.align import align_models

    r, table = align_models(a, b, name_a="minilm", name_b="mpnet")
    text = format_layer_table(r)
    assert r.token_map_how == "normalised-text" and r.n_tokens > 29000, text
    assert r.baseline is None  # widths differ: no raw baseline
    assert len(r.layer_match) == 6
    assert r.matched_b(0) == 0, text
    # Depth order is (mostly) preserved: Spearman correlation of layer_a with matched layer_b.
    b_layers = np.array([lb for _, lb in r.layer_match])
    ranks = np.argsort(np.argsort(b_layers))
    rho = 1 - 6 * float(((ranks - np.arange(6)) ** 2).sum()) / (6 * 35)
    assert rho > 0.8, text
    assert table.num_rows > 6 * 12 * 9
    print(text)


def test_align_models_on_tiny_checkpoints(tmp_path):
    """The loading path end to end: same tokenizer -> same ids; raw baseline present (equal widths)."""
    from indexer.align import align_models
    from tests.tiny_models import save_tiny

    a = save_tiny("gpt2", tmp_path / "a", seed=1)
    b = save_tiny("gpt2", tmp_path / "b", seed=2)
    r, table = align_models(str(a), str(b))
    assert r.token_map_how == "same-ids" and r.model_a == "a" and r.baseline is not None
    assert set(table.column("space").to_pylist()) == {"embedding", "raw"}
    assert table.column("level").to_pylist().count("layer") == 2 * 2 * 2 * (len(r.kinds) + 2)
