"""Whole-model index of MiniLM and SmolLM2: time, peak RSS, dataset size, and how close the run is
to the machine's arithmetic limit.

    .venv/bin/python -m benchmarks.bench_index [--models minilm smollm2] [--db bench-out/db] [--json OUT]

Each model is indexed from scratch with the defaults (k = 50, 200 pairs, raw) by
`indexer.build.index_model` into one dataset (which bench_query then uses), each in a fresh child
process (peak RSS is its own). Dataset size = the model's files in the manifest plus its
vocabulary's tokens file. The arithmetic floor of the run is

    (FLOPs of the vector projections) / (measured fp32 GEMM rate)
  + (FLOPs of the screened circuit entries) / (measured bf16 GEMM rate)

both rates measured in this run on the shapes the indexer uses; floor / wall time says how much
of the run is the unavoidable matrix arithmetic (1.0 would be all of it).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


# name -> its own dataset? gpt2-small (random weights, the real GPT-2 vocabulary: issue 3's memory
# target) goes into a dataset of its own, so that bench_query's dataset holds real models only.
MODELS = {"minilm": False, "smollm2": False, "mpnet": False, "gpt2-small": True}


def model_ref(name: str) -> str:
    from indexer import packaged

    if name == "gpt2-small":
        from benchmarks.shapes import gpt2_shaped

        return str(gpt2_shaped("gpt2-small"))
    return str({"minilm": packaged.minilm_path, "smollm2": packaged.smollm2_gguf_path,
                "mpnet": packaged.mpnet_path}[name]())


def gemm_rates() -> dict:
    """fp32 (numpy, as the vector kernel uses) and bf16 (torch) GEMM rates in GFLOP/s."""
    rates = {}
    a = np.random.rand(667, 768).astype(np.float32)
    b = np.random.rand(768, 50257).astype(np.float32)
    out = np.empty((667, 50257), dtype=np.float32)
    np.matmul(a, b, out=out)
    t = time.perf_counter()
    for _ in range(3):
        np.matmul(a, b, out=out)
    rates["fp32"] = 3 * 2 * 667 * 768 * 50257 / (time.perf_counter() - t) / 1e9
    A = torch.randn(2048, 64).bfloat16()
    B = torch.randn(64, 8192).bfloat16()
    A @ B  # warm-up
    t = time.perf_counter()
    for _ in range(10):
        A @ B
    rates["bf16"] = 10 * 2 * 2048 * 64 * 8192 / (time.perf_counter() - t) / 1e9
    return rates


def _child(name: str, db: str) -> None:
    import indexer.kernels.pairs as pairs
    from indexer.build import index_model
    from indexer.load import load_canonical

    screened = {"entries_x_d": 0.0, "seconds": 0.0, "calls": 0}
    real = pairs.top_pairs

    def counting(A, B, *args, **kw):
        t = time.perf_counter()
        r = real(A, B, *args, **kw)
        screened["seconds"] += time.perf_counter() - t
        screened["entries_x_d"] += r.stats.get("entries_screened", 0) * A.shape[1]
        screened["calls"] += 1
        return r

    pairs.top_pairs = counting
    ref = model_ref(name)
    t = time.perf_counter()
    entry = index_model(ref, db, name=name, progress=lambda m: print(m, file=sys.stderr, flush=True))
    wall = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the reload below
    dims = load_canonical(ref).canonical.dims
    n_read = dims.d_ff * (2 if dims.gated else 1) + (dims.n_heads + 2 * dims.n_kv_heads) * dims.d_head
    n_write = dims.d_ff + dims.n_heads * dims.d_head + 2
    vector_flops = dims.n_layers * (n_read + n_write) * dims.d_model * dims.d_vocab * 2
    from schemas.layout import read_manifest

    manifest = read_manifest(Path(db))
    files = [f for fs in manifest["models"][name]["files"].values() for f in fs]
    files += manifest["vocabularies"][manifest["models"][name]["vocab_id"]]["files"]
    size = sum((Path(db) / f).stat().st_size for f in files)
    print(json.dumps({
        "model": name, "wall_s": wall, "peak_rss_mb": peak_mb,
        "dataset_mb": size / 2**20, "rows": entry["row_counts"], "vector_gflop": vector_flops / 1e9,
        "pair_screen_gflop": 2 * screened["entries_x_d"] / 1e9, "pair_seconds": screened["seconds"],
        "pair_calls": screened["calls"], "layers": dims.n_layers,
    }))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "DB"), help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--db", default="bench-out/db")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child)
        return {}
    rates = gemm_rates()
    print(f"measured GEMM rates: fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s", file=sys.stderr)
    results = {"gemm_gflops": rates, "models": []}
    from indexer.dataset import remove_model

    for name in args.models:
        db = Path(args.db) if not MODELS[name] else Path(args.db + "-" + name)
        if db.exists():
            remove_model(db, name)  # a clean build, not a resume
            (db / ".builds" / f"{name}.json").unlink(missing_ok=True)
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_index", "--child", name, str(db)],
                             stdout=subprocess.PIPE, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        floor = r["vector_gflop"] / rates["fp32"] + r["pair_screen_gflop"] / rates["bf16"]
        r["arithmetic_floor_s"] = floor
        r["floor_over_wall"] = floor / r["wall_s"]
        results["models"].append(r)
        print(f"{name}: {r['wall_s']:.0f}s wall ({r['pair_seconds']:.0f}s in {r['pair_calls']} circuit top-N calls), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, dataset {r['dataset_mb']:.0f} MB; arithmetic floor {floor:.0f}s "
              f"= {r['floor_over_wall']:.0%} of the run")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
