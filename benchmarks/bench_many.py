"""Helper latency and indexing cost as a dataset grows to hundreds of models (issue 16).

    python -m benchmarks.bench_many [--sizes 1,20,200] [--repeat 7] [--out bench-out/many] [--compact]

Models are copies of one tiny 2-layer GPT-2 (``tests.tiny_models.save_tiny("gpt2")``, vocabulary
of the tiny tokenizer): the point is the per-model and per-file overhead, not the data volume.
A dataset of N models is built as: N-1 copies, then model number N indexed for real through
``indexer.build.index_model`` (its wall time is "index last"). Copy i is made through the real
writer path: a ``Build`` per copy writes the first model's partitions with ``model`` rewritten,
and ``Build.commit`` publishes it (manifest + catalog), so a copy costs what a commit costs.

For each helper: cold = first call in a new process (median of 3 processes), warm = median of
--repeat calls on one open Dataset; measured on the dataset as built ("plain"), then again after
`zeropass compact` ("compacted"). Ratios are against the 1-model dataset (plain). Prints a table
and, last, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HELPERS = {
    "heads": lambda d: d.heads("the"),
    "neurons": lambda d: d.neurons("the"),
    "similar": lambda d: d.similar("m0000", "L1.N3", d.model_names()[-1]),
    "show": lambda d: d.show("m0000", "L1.H0"),
    "tokens": lambda d: d.tokens("the cat is"),
    "models": lambda d: d.models(),
    "heads(1 model)": lambda d: d.heads("the", model="m0000"),
}


def checkpoint(out: Path, vocab: str) -> Path:
    """The model that is copied: a tiny 2-layer GPT-2 (d_model 32, 4 heads, random weights) with
    the real GPT-2 vocabulary (``gpt2``: ``benchmarks.shapes`` "gpt2-tiny", cached there) or the
    64-word test vocabulary (``tiny``, saved under ``out``)."""
    if vocab == "tiny":
        from tests.tiny_models import save_tiny

        return save_tiny("gpt2", out / "tiny-gpt2")
    from benchmarks.shapes import gpt2_shaped

    return gpt2_shaped("gpt2-tiny")


def _copy_model(root: Path, src_slug: str, slug: str, manifest: dict) -> None:
    """Publish a copy of model ``src_slug`` as ``slug`` through Build.write + Build.commit."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from indexer.dataset import Build

    entry = manifest["models"][src_slug]
    b = Build(root, slug, {"copy_of": src_slug}, origin=f"/bench/copy/{slug}")
    model_row = None
    for table, files in entry["files"].items():
        if table == "vectors_by_token":
            continue  # rebuilt by commit from the vectors partitions
        for f in files:
            t = pq.read_table(root / f)
            t = t.set_column(t.schema.get_field_index("model"), "model", pa.array([slug] * t.num_rows, t.schema.field("model").type))
            if table == "models":
                model_row = t.to_pylist()[0]
                continue
            keys = {p.split("=", 1)[0]: p.split("=", 1)[1] for p in f.split("/")[1:-1] if "=" in p}
            keys.pop("model", None)
            b.write(table, t, **{k: int(v) if v.isdigit() else v for k, v in keys.items()})
    model_row.pop("created_at", None)
    b.commit(model_row, entry["vocab_id"], None)


def build(root: Path, n: int, ckpt: Path) -> float:
    """Dataset of ``n`` models at ``root``; returns the seconds it took to index the last one."""
    from indexer.build import index_model
    from schemas.layout import read_manifest

    shutil.rmtree(root, ignore_errors=True)
    first = "m0000" if n > 1 else None
    if first:
        index_model(str(ckpt), root, name=first, progress=None)
        manifest = read_manifest(root)
        for i in range(1, n - 1):
            _copy_model(root, first, f"m{i:04d}", manifest)
    t = time.perf_counter()
    index_model(str(ckpt), root, name=f"m{n - 1:04d}", progress=None)
    return time.perf_counter() - t


def _cold(db: Path, name: str) -> float:
    code = (f"import sys,time; sys.path.insert(0,{str(ROOT)!r}); from benchmarks.bench_many import HELPERS; "
            f"from query import Dataset; t=time.perf_counter(); d=Dataset({str(db)!r}); HELPERS[{name!r}](d); "
            f"print((time.perf_counter()-t)*1000)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.split()[-1])


def measure(db: Path, repeat: int) -> dict:
    from query import Dataset

    out = {}
    with Dataset(db) as ds:
        for name, fn in HELPERS.items():
            fn(ds)
            times, cpu = [], []
            for _ in range(repeat):
                t, c = time.perf_counter(), time.process_time()
                fn(ds)
                times.append((time.perf_counter() - t) * 1000)
                cpu.append((time.process_time() - c) * 1000)  # every thread of this process: robust to other load
            out[name] = {"warm_ms": statistics.median(times), "warm_cpu_ms": statistics.median(cpu)}
    for name in HELPERS:
        out[name]["cold_ms"] = statistics.median(_cold(db, name) for _ in range(3))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,20,200")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", default="bench-out/many")
    p.add_argument("--vocab", choices=("gpt2", "tiny"), default="gpt2",
                   help="gpt2: the real 50,257-token GPT-2 vocabulary (a token is in ~0.1%% of the top-50 lists, "
                        "as in real models); tiny: the 64-word test vocabulary (k 50 of 64: every token is in "
                        "most lists, so an answer grows with the number of models)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(out, args.vocab)
    results = {}
    for n in (int(s) for s in args.sizes.split(",")):
        db = out / f"db{n}"
        index_s = build(db, n, ckpt)
        files = sum(1 for _ in db.rglob("*.parquet"))
        plain = measure(db, args.repeat)
        from indexer.compact import compact

        t = time.perf_counter()
        compact(db)
        compact_s = time.perf_counter() - t
        results[n] = {"index_last_s": index_s, "compact_s": compact_s, "parquet_files": files,
                      "plain": plain, "compacted": measure(db, args.repeat)}
        print(f"{n} models: index last {index_s:.2f} s, {files} parquet files, compact {compact_s:.2f} s",
              file=sys.stderr, flush=True)
    print(render(results))
    print(json.dumps({"results": results}))
    return 0


def render(results: dict) -> str:
    """A Markdown table: per helper and size, warm / cold ms plain and compacted, and the ratio of
    the compacted warm median to the 1-model one."""
    results = {int(n): r for n, r in results.items()}
    base = results[min(results)]["plain"]
    head = "| helper | " + " | ".join(f"{n} models: warm plain / compacted (x of 1 model) | warm CPU compacted | "
                                      f"cold plain / compacted" for n in results) + " |"
    lines = [head, "|---|" + "---:|---:|---:|" * len(results)]
    for name in HELPERS:
        row = f"| {name} |"
        for r in results.values():
            p, c = r["plain"][name], r["compacted"][name]
            row += (f" {p['warm_ms']:.0f} / **{c['warm_ms']:.0f}** ms ({c['warm_ms'] / base[name]['warm_ms']:.1f}x) |"
                    f" {c.get('warm_cpu_ms', float('nan')):.0f} ms |"
                    f" {p['cold_ms']:.0f} / {c['cold_ms']:.0f} ms |")
        lines.append(row)
    first = results[min(results)]["index_last_s"]
    lines.append("| index the last model |" + "".join(f" {r['index_last_s']:.2f} s ({r['index_last_s'] / first:.1f}x) | | |"
                                                     for r in results.values()))
    lines.append("| `zeropass compact` |" + "".join(f" {r['compact_s']:.2f} s | | |" for r in results.values()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
