"""Builders of the test datasets and checkpoints, public for tests and benchmarks alike.

``tests/conftest.py`` wraps them in session fixtures (``synthetic_db``, ``tiny_db``, through
``prebuilt``); ``benchmarks/`` calls them directly. Nothing here is a fixture, nothing is
private to the tests (docs/TESTING.md, "Shared builders"):

* ``build_synthetic``: three models written through ``indexer.dataset.Build`` with hand-planted,
  consistent rows (no torch): ``alpha`` and ``beta`` share a byte-level-style vocabulary with
  `` Paris``, ``Paris``, ``paris`` and awkward tokens (quotes, backslash, ``%``, ``_``, newline,
  emoji, whitespace); ``gamma`` has an odd WordPiece-style vocabulary. ``PLANTED`` says where
  the known answers are; ``synthetic_model`` writes one more such model.
* ``copying_gpt2`` / ``build_tiny``: real tiny random models indexed with
  ``indexer.build.index_model`` (a GPT-2 whose head L1.H2 is made to copy ``Paris``, and a BERT
  sharing its vocabulary).
* ``build_three``: a larger synthetic dataset (three models, two vocabularies of 20,000 tokens)
  for remote reads.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa

from indexer.tokens import normalise  # pure Python, no torch


# -- synthetic dataset -------------------------------------------------------------------------

SHARED_TOKENS = [
    ("<|endoftext|>", "<|endoftext|>", True),
    ("ĠParis", " Paris", False), ("Paris", "Paris", False), ("paris", "paris", False),
    ("Ġthe", " the", False), ("the", "the", False), ("ĠFrance", " France", False), ("ĠLondon", " London", False),
    ("ĠBerlin", " Berlin", False), ("O'Brien", "O'Brien", False), ("a\\b", "a\\b", False), ("100%", "100%", False),
    ("1000", "1000", False), ("snake_case", "snake_case", False), ("snakeXcase", "snakeXcase", False),
    ("lineĊbreak", "line\nbreak", False), ("ðŁĻĤ", "🙂", False), ("Ġ", " ", False), ("Ċ", "\n", False),
    ("ĠPar", " Par", False), ("is", "is", False), ("Ġcity", " city", False), ("Ġbig", " big", False),
    ("ĠCity", " City", False), ("Ġrun", " run", False),
] + [(f"Ġw{i}", f" w{i}", False) for i in range(25, 60)]

ODD_TOKENS = [
    ("[CLS]", "[CLS]", True), ("[SEP]", "[SEP]", True), ("paris", "paris", False), ("par", "par", False),
    ("##is", "##is", False), ("the", "the", False), ("france", "france", False), ("london", "london", False),
    ("city", "city", False), ("##s", "##s", False), ("big", "big", False), ("run", "run", False),
] + [(f"x{i}", f"x{i}", False) for i in range(12, 40)] + [(f"##y{i}", f"##y{i}", False) for i in range(40, 150)]

K, N_PAIRS, N_LAYERS, N_HEADS, D_HEAD, D_FF, N_CTX = 5, 6, 2, 2, 2, 3, 4


def _tid(vocab, text):
    return next(i for i, (_, t, _) in enumerate(vocab) if t == text)


def _vocab_table(vocab_id, vocab):
    return pa.table({
        "vocab_id": [vocab_id] * len(vocab), "token_id": pa.array(range(len(vocab)), pa.int32()),
        "piece": [p for p, _, _ in vocab], "token": [t for _, t, _ in vocab],
        "norm": [normalise(t) for _, t, _ in vocab], "special": [s for _, _, s in vocab]})


def _planted(vocab):
    """Token ids the random filler never uses, so planted answers stay the only ones."""
    words = {"paris", "o'brien", "a\\b", "100%", "snake_case", "line\nbreak", "🙂", ""}
    return {i for i, (_, t, s) in enumerate(vocab) if s or normalise(t) in words}


def synthetic_model(root, slug, vocab_id, vocab, seed, plant, ff_kinds=("ff_key", "ff_value"), n_ctx=N_CTX):
    """Write one synthetic model into dataset ``root`` through the real ``Build``. ``plant`` maps list keys to {rank: text} (see PLANTED)."""
    from indexer.dataset import Build

    rng = random.Random(seed)
    pool = [i for i in range(len(vocab)) if i not in _planted(vocab)]
    text = lambda i: vocab[i][1]  # noqa: E731

    def ranked(key, n):
        """n (token_id, rank) for list ``key``: planted entries at their ranks, random elsewhere."""
        fixed = {r: _tid(vocab, t) for r, t in plant.get(key, {}).items()}
        rest = [i for i in rng.sample(pool, n + len(fixed)) if i not in fixed.values()]
        return [(fixed[r] if r in fixed else rest.pop(), r) for r in range(1, n + 1)]

    b = Build(root, slug, {"synthetic": seed})
    for layer in range(N_LAYERS):
        vec = []
        units = [(kind, None, i, f"L{layer}.N{i}") for kind in ff_kinds for i in range(D_FF)]
        units += [(kind, h, d, f"L{layer}.H{h}.d{d}") for kind in "qkvo" for h in range(N_HEADS) for d in range(D_HEAD)]
        units += [("bias_attn_out", None, 0, f"L{layer}.attn_bias")]
        for kind, head, idx, unit in units:
            for side in ("top", "bottom"):
                for tid, r in ranked((slug, unit, kind, side), K):
                    score = (10.0 - r) if side == "top" else -(10.0 - r)
                    vec.append(dict(model=slug, layer=layer, kind=kind, head=head, idx=idx, unit=unit, side=side,
                                    rank=r, token_id=tid, token=text(tid), score=score + rng.random() * 0.1))
        b.write("vectors", pa.Table.from_pylist(vec), layer=layer)
        pairs, roles, heads = [], [], []
        for h in range(N_HEADS):
            unit = f"L{layer}.H{h}"
            for circuit in ("ov", "qk"):
                for side in ("top", "bottom"):
                    srcs = ranked((slug, unit, circuit, side, "src"), N_PAIRS)
                    dsts = ranked((slug, unit, circuit, side, "dst"), N_PAIRS)
                    for (s, r), (d, _) in zip(srcs, dsts):
                        sc = (100.0 - r) if side == "top" else -(100.0 - r)
                        pairs.append(dict(model=slug, layer=layer, head=h, circuit=circuit, side=side, rank=r,
                                          src_id=s, src=text(s), dst_id=d, dst=text(d), score=sc))
                    for role in (("source", "output") if circuit == "ov" else ("query", "key")):
                        for tid, r in ranked((slug, unit, role, side), K):
                            sc = (50.0 - r) if side == "top" else -(50.0 - r)
                            roles.append(dict(model=slug, layer=layer, head=h, circuit=circuit, role=role, side=side,
                                              rank=r, token_id=tid, token=text(tid), score=sc))
            heads.append(dict(model=slug, layer=layer, head=h, kv_head=h, unit=unit, ov_copying_score=rng.uniform(-1, 1),
                              ov_norm=rng.uniform(1, 2), qk_norm=None))
        b.write("pairs", pa.Table.from_pylist(pairs), layer=layer)
        b.write("head_tokens", pa.Table.from_pylist(roles), layer=layer)
        b.write("heads", pa.Table.from_pylist(heads), layer=layer)
    pos = []
    for p in range(n_ctx or 0):
        for side in ("top", "bottom"):
            for tid, r in ranked((slug, f"P{p}", "pos", side), K):
                pos.append(dict(model=slug, layer=None, kind="pos", head=None, idx=p, unit=f"P{p}", side=side, rank=r,
                                token_id=tid, token=text(tid), score=float(K - r)))
    if pos:
        b.write("vectors", pa.Table.from_pylist(pos), layer="pos")
    b.write("parameters", pa.Table.from_pylist([
        dict(model=slug, name="wte.weight", shape=[len(vocab), 4], layer=None, role="W_E", covered_by="embedding", reason=None),
        dict(model=slug, name="ln_f.weight", shape=[4], layer=None, role="ln_final_w", covered_by=None, reason="a scaling")]))
    b.commit(dict(source=f"synthetic:{slug}", revision=None, architecture="gpt2", hf_architecture=None,
                  n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_HEADS, d_model=4, d_head=D_HEAD, d_ff=D_FF,
                  d_vocab=len(vocab), n_ctx=n_ctx, tied=True, vocab_id=vocab_id, variant="raw", k=K, n_pairs=N_PAIRS,
                  settings=json.dumps({"synthetic": True}), weights_sha256="{}"), vocab_id, _vocab_table(vocab_id, vocab))


# Where the known answers are: (model, unit, list) -> {rank: token text}.
PLANTED = {
    "alpha": {
        # L1.H0 copies ' Paris': the top OV pair and both OV role lists at rank 1.
        ("alpha", "L1.H0", "ov", "top", "src"): {1: " Paris"}, ("alpha", "L1.H0", "ov", "top", "dst"): {1: " Paris"},
        ("alpha", "L1.H0", "source", "top"): {1: " Paris"}, ("alpha", "L1.H0", "output", "top"): {1: " Paris"},
        ("alpha", "L0.H1", "query", "top"): {4: "Paris"},
        ("alpha", "L0.N1", "ff_value", "top"): {1: " Paris", 2: " France", 3: " London", 4: " city", 5: " the"},
        ("alpha", "L1.N0", "ff_key", "top"): {1: "O'Brien", 2: "a\\b", 3: "100%", 4: "snake_case", 5: "line\nbreak"},
        ("alpha", "L1.N1", "ff_value", "top"): {1: "🙂", 3: " "},
        ("alpha", "L1.N2", "ff_key", "bottom"): {2: "paris"},
    },
    "beta": {
        ("beta", "L0.H0", "ov", "top", "src"): {3: "paris"},
        ("beta", "L1.N2", "ff_key", "top"): {2: "Paris", 4: " Paris"},
    },
    "gamma": {
        ("gamma", "L1.H1", "output", "top"): {2: "paris"},
        ("gamma", "L0.N0", "ff_value", "top"): {1: "paris", 2: "france", 3: "london", 4: "city", 5: "big"},
    },
}


def build_synthetic(root: Path) -> Path:
    """The dataset ``synthetic_db`` copies: alpha, beta (one vocabulary) and gamma (another)."""
    synthetic_model(root, "alpha", "vshared", SHARED_TOKENS, 1, PLANTED["alpha"])
    synthetic_model(root, "beta", "vshared", SHARED_TOKENS, 2, PLANTED["beta"])
    synthetic_model(root, "gamma", "vodd", ODD_TOKENS, 3, PLANTED["gamma"], ff_kinds=("ff_key", "ff_gate", "ff_value"), n_ctx=None)
    return root


# -- real tiny models --------------------------------------------------------------------------

COPY_WORD = "Paris"
COPY_LAYER, COPY_HEAD = 1, 2


def copying_gpt2(path: Path) -> Path:
    """A tiny GPT-2 whose head (1, 2) maps the embedding of COPY_WORD onto its own unembedding.

    W_V of the head reads the direction of e = W_E[Paris] and W_O writes it back scaled, so the
    OV circuit's largest entry is (Paris -> Paris) by a wide margin.
    """
    import torch

    from tests.tiny_models import N_HEADS as H, VOCAB, tiny_model

    model, tok = tiny_model("gpt2")
    d = model.config.n_embd
    dh = d // H
    tid = VOCAB.index(COPY_WORD)
    with torch.no_grad():
        e = model.transformer.wte.weight[tid].clone()
        u = e / e.norm()
        attn = model.transformer.h[COPY_LAYER].attn
        # Conv1D c_attn weight: (d, 3d) = [Q | K | V]; head h's V columns: 2d + h*dh .. 2d + (h+1)*dh.
        v0 = 2 * d + COPY_HEAD * dh
        attn.c_attn.weight[:, v0:v0 + dh] = 0
        attn.c_attn.weight[:, v0] = 30 * u
        # c_proj weight: (d, d); rows h*dh .. (h+1)*dh are the head's W_O.
        attn.c_proj.weight[COPY_HEAD * dh:(COPY_HEAD + 1) * dh, :] = 0
        attn.c_proj.weight[COPY_HEAD * dh, :] = 30 * u
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def build_tiny(base: Path) -> Path:
    """The two checkpoints under ``base`` and ``base/db`` indexing both (``tgpt2``, ``tbert``)."""
    from indexer.build import index_model
    from tests.tiny_models import save_tiny

    db = base / "db"
    index_model(str(copying_gpt2(base / "gpt2")), db, name="tgpt2", k=8, n_pairs=20, progress=None)
    index_model(str(save_tiny("bert", base / "bert")), db, name="tbert", k=8, n_pairs=20, progress=None)
    return db


BIG_VOCAB = 20000


def _big_model(root: Path, slug: str, vocab_id: str, vocab: pa.Table, seed: int, n_layers=4, d_ff=512, k=32):
    """A model with enough vectors that reading it whole would show (about 1.5 MB per table)."""
    from indexer.dataset import Build

    rng = np.random.default_rng(seed)
    texts = vocab.column("token").to_pylist()
    b = Build(root, slug, {"big": seed})
    for layer in range(n_layers):
        n = d_ff * 2 * 2 * k  # (ff_key, ff_value) x (top, bottom) x k
        idx = np.repeat(np.arange(d_ff), 4 * k)
        kind = np.tile(np.repeat(["ff_key", "ff_value"], 2 * k), d_ff)
        side = np.tile(np.repeat(["top", "bottom"], k), 2 * d_ff)
        rank = np.tile(np.arange(1, k + 1), 4 * d_ff)
        tid = rng.integers(1, BIG_VOCAB, n)
        b.write("vectors", pa.table({
            "model": [slug] * n, "layer": pa.array(np.full(n, layer), pa.int16()), "kind": kind,
            "head": pa.nulls(n, pa.int16()), "idx": pa.array(idx, pa.int32()),
            "unit": [f"L{layer}.N{i}" for i in idx], "side": side, "rank": pa.array(rank, pa.int32()),
            "token_id": pa.array(tid, pa.int32()), "token": [texts[t] for t in tid],
            "score": pa.array(rng.standard_normal(n), pa.float32())}), layer=layer)
    b.commit(dict(source=f"synthetic:{slug}", revision=None, architecture="gpt2", hf_architecture=None,
                  n_layers=n_layers, n_heads=1, n_kv_heads=1, d_model=8, d_head=8, d_ff=d_ff, d_vocab=BIG_VOCAB, n_ctx=None,
                  tied=True, vocab_id=vocab_id, variant="raw", k=k, n_pairs=0, settings="{}", weights_sha256="{}"),
             vocab_id, vocab)


def build_three(db: Path) -> Path:
    """The dataset of the remote byte-count tests and benchmarks: three models (two vocabularies of 20,000 tokens), 131,072 vector rows each (15.5 MB in all)."""
    words = ["Paris"] + [f"w{i}" for i in range(1, BIG_VOCAB)]
    vocab = lambda vid: pa.table({"vocab_id": [vid] * BIG_VOCAB, "token_id": pa.array(range(BIG_VOCAB), pa.int32()),  # noqa: E731
                                  "piece": words, "token": words, "norm": [normalise(w) for w in words],
                                  "special": [False] * BIG_VOCAB})
    _big_model(db, "one", "va", vocab("va"), 1)
    _big_model(db, "two", "va", vocab("va"), 2)
    _big_model(db, "three", "vb", vocab("vb"), 3)
    return db
