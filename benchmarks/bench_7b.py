"""7B-class checkpoints in bounded memory (issue 12): peak RSS and time of `zeropass index` on
synthetic checkpoints with real model shapes.

    .venv/bin/python -m benchmarks.bench_7b                       # 7B: 2 vs 4 layers, 8B: 1 layer
    .venv/bin/python -m benchmarks.bench_7b --shapes llama2-7b --layers 2,4 --pairs 0   # memory only, quick
    .venv/bin/python -m benchmarks.bench_7b --shapes llama2-7b --layers 32 --device cuda --compare-cpu-layer 0

A checkpoint is written once per (shape, layers) under ``--cache`` (default bench-out/7b): bf16,
sharded safetensors with ``model.safetensors.index.json``, random weights (N(0, 0.02)) written
shard by shard (the embeddings, then one shard per layer), so the writer never holds more than
one layer. No tokenizer: tokens are named by id, which costs the indexer nothing it would not
otherwise spend.

Each index run is a fresh child process (`python -m benchmarks.bench_7b --child ...`) that runs
`indexer.build.index_model` and reports its own peak RSS (VmHWM from /proc/self/status, and
ru_maxrss), wall time, the load time and per layer the seconds spent in the vector projections
and in the head circuits (pairs, role lists, metrics), and where its peak was reached (a thread
samples the resident set every 50 ms: ``sampled_peak_at`` names the layer's half, or the head being
finished, or the build's last progress line). The projected whole-model time is
load + n_layers x the mean per-layer time of the largest run + the by-token sort scaled by layers.

Targets (docs/BENCHMARKS.md): 7B-shaped peak RSS <= 4 GB (issue 24; 6 GB before it) and 2 vs 4
layers within 10 %;
8B-shaped (V 128256, 8 kv heads), one layer, <= 8 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SHAPES = {
    # name: Llama config fields
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, tie_word_embeddings=False),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, tie_word_embeddings=False),
    # a dry run of the script itself (seconds): `--shapes smoke --layers 1,2 --compare-cpu-layer 0`
    "smoke": dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, tie_word_embeddings=False),
}
TARGET_GB = {"llama2-7b": 4.0, "llama3-8b": 8.0, "smoke": 1.0}
FULL_LAYERS = {"llama2-7b": 32, "llama3-8b": 32, "smoke": 2}


def build_checkpoint(root: Path, shape: str, n_layers: int) -> Path:
    """A Llama checkpoint of ``shape`` with ``n_layers`` layers at ``root`` (reused when complete)."""
    import torch
    from safetensors.torch import save_file

    path = root / f"{shape}-{n_layers}l"
    if (path / "model.safetensors.index.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    c = SHAPES[shape]
    d, V, h, kv, f = (c["hidden_size"], c["vocab_size"], c["num_attention_heads"], c["num_key_value_heads"],
                      c["intermediate_size"])
    e = d // h
    g = torch.Generator().manual_seed(0)

    def rand(*shape_):
        return (torch.randn(*shape_, generator=g) * 0.02).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    total = 0

    def shard(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()

    n_shards = n_layers + 2
    shard(f"model-00001-of-{n_shards:05d}.safetensors",
          {"model.embed_tokens.weight": rand(V, d), "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)})
    shard(f"model-00002-of-{n_shards:05d}.safetensors", {"lm_head.weight": rand(V, d)})
    for l in range(n_layers):
        p = f"model.layers.{l}."
        shard(f"model-{l + 3:05d}-of-{n_shards:05d}.safetensors", {
            p + "self_attn.q_proj.weight": rand(h * e, d), p + "self_attn.k_proj.weight": rand(kv * e, d),
            p + "self_attn.v_proj.weight": rand(kv * e, d), p + "self_attn.o_proj.weight": rand(d, h * e),
            p + "mlp.gate_proj.weight": rand(f, d), p + "mlp.up_proj.weight": rand(f, d),
            p + "mlp.down_proj.weight": rand(d, f),
            p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
        })
    config = dict(c, model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=n_layers,
                  rms_norm_eps=1e-5, max_position_embeddings=4096, hidden_act="silu", torch_dtype="bfloat16",
                  rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    # The index file last: its presence marks a complete checkpoint.
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return path


def child(args) -> None:
    """One index run in this process; prints one JSON line with its own peak RSS and timings."""
    import torch

    from indexer import build

    per_layer: dict[int, dict] = {}
    # Time the two halves of a layer: wrap the writer's own methods (timing only, same code runs).
    Writer = build._ModelWriter
    vectors, heads = Writer.vectors, Writer._heads

    # Where the peak is reached: a sampler thread reads the resident set every 50 ms and keeps
    # its largest value with the stage the build was in then (VmHWM alone says how high, not when).
    stage = {"now": "load", "peak": (0, "load")}

    def sample() -> None:
        while True:
            rss = _rss() or 0
            if rss > stage["peak"][0]:
                stage["peak"] = (rss, stage["now"])
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()

    def timed(fn, what):
        def run(self, l, lw, **options):
            t = time.perf_counter()
            stage["now"] = f"layer {l} {what[:-2]}"
            out = fn(self, l, lw, **options)
            per_layer.setdefault(l, {})[what] = time.perf_counter() - t
            # The peak so far after each half: shows which half of which layer set it.
            per_layer[l][what.replace("_s", "_peak_gb")] = round((_hwm() or 0) / 1e9, 3)
            return out
        return run

    Writer.vectors, Writer._heads = timed(vectors, "vectors_s"), timed(heads, "circuits_s")
    finish_head = Writer._finish_head

    def finishing(self, l, lw, h, *rest):
        stage["now"] = f"layer {l} circuits, finishing head {h}"
        return finish_head(self, l, lw, h, *rest)

    Writer._finish_head = finishing
    events: list[tuple[str, float]] = []
    peaks: list[tuple[str, float, int | None]] = []
    t0 = time.perf_counter()

    def progress(m: str) -> None:
        events.append((m, time.perf_counter() - t0))
        peaks.append((m, events[-1][1], _hwm()))
        stage["now"] = m[:80]
        print(m, file=sys.stderr, flush=True)

    build.index_model(args.child, args.db, name="m", k=args.k, n_pairs=args.pairs, device=args.device,
                      layers=args.only_layers, progress=progress)
    wall = time.perf_counter() - t0
    load = next((t for m, t in events if m.startswith("loaded ")), None)
    load_peak = next((p for m, _, p in peaks if m.startswith("loaded ")), None)
    sort = next((float(m.rsplit(" in ", 1)[1].rstrip("s")) for m, _ in events if "vectors_by_token" in m), None)
    hwm = _hwm()
    print(json.dumps({
        "peak_rss_bytes": hwm, "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "wall_s": wall, "load_s": load, "peak_after_load_bytes": load_peak, "by_token_sort_s": sort, "per_layer": per_layer,
        "threads": torch.get_num_threads(), "device": args.device,
        "sampled_peak_bytes": stage["peak"][0], "sampled_peak_at": stage["peak"][1],
    }))


def _rss() -> int | None:
    """This process's resident set now (VmRSS), in bytes; None off Linux."""
    return _status_bytes("VmRSS:")


def _hwm() -> int | None:
    """This process's peak resident set so far (VmHWM), in bytes; None off Linux."""
    return _status_bytes("VmHWM:")


def _status_bytes(field: str) -> int | None:
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith(field)), None)


def run_index(path: Path, db: Path, *, k: int, pairs: int, device: str, only_layers: str | None = None) -> dict:
    """`index_model` on ``path`` in a fresh child process; its JSON report."""
    import shutil

    shutil.rmtree(db, ignore_errors=True)
    cmd = [sys.executable, "-m", "benchmarks.bench_7b", "--child", str(path), "--db", str(db), "--k", str(k),
           "--pairs", str(pairs), "--device", device]
    if only_layers is not None:
        cmd += ["--only-layers", only_layers]
    r = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"index of {path} failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarise(shape: str, n_layers: int, rep: dict) -> dict:
    layers = rep["per_layer"]
    vec = [v.get("vectors_s", 0.0) for v in layers.values()]
    cir = [v.get("circuits_s", 0.0) for v in layers.values()]
    mean_layer = (sum(vec) + sum(cir)) / max(len(layers), 1)
    full = FULL_LAYERS[shape]
    sort_full = (rep["by_token_sort_s"] or 0.0) * full / max(n_layers, 1)
    return {
        "shape": shape, "layers": n_layers, "peak_rss_gb": round(rep["peak_rss_bytes"] / 1e9, 3),
        "target_gb": TARGET_GB[shape], "wall_s": round(rep["wall_s"], 1), "load_s": round(rep["load_s"] or 0, 1),
        "vectors_s_per_layer": round(sum(vec) / max(len(vec), 1), 1),
        "circuits_s_per_layer": round(sum(cir) / max(len(cir), 1), 1),
        "by_token_sort_s": rep["by_token_sort_s"],
        "projected_full_model_s": round((rep["load_s"] or 0) + full * mean_layer + sort_full),
        "device": rep["device"], "threads": rep["threads"],
        "peak_after_load_gb": round((rep.get("peak_after_load_bytes") or 0) / 1e9, 3),
        "peak_by_layer_gb": {l: [v.get("vectors_peak_gb"), v.get("circuits_peak_gb")] for l, v in layers.items()},
        "sampled_peak_gb": round((rep.get("sampled_peak_bytes") or 0) / 1e9, 3), "sampled_peak_at": rep.get("sampled_peak_at"),
    }


def compare_with_cpu(path: Path, cache: Path, layer: int, gpu_db: Path, k: int, pairs: int) -> dict:
    """Layer ``layer`` indexed on the CPU, compared table by table with the GPU dataset (as gpu_check_index)."""
    from benchmarks.gpu_check_index import compare_datasets

    cpu_db = cache / "db-cpu-compare"
    run_index(path, cpu_db, k=k, pairs=pairs, device="cpu", only_layers=str(layer))
    return compare_datasets(cpu_db, gpu_db, layers=[layer])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="llama2-7b,llama3-8b", help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--layers", default=None, help="comma list of layer counts (default: 2,4 for llama2-7b, 1 for llama3-8b)")
    ap.add_argument("--pairs", type=int, default=200, help="--pairs of the index runs (0: memory and vectors only, quick)")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compare-cpu-layer", type=int, default=None,
                    help="after a --device cuda run, index this layer on the CPU and compare the tables")
    ap.add_argument("--cache", default=str(REPO / "bench-out" / "7b"))
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--db", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only-layers", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    cache = Path(args.cache)
    results = []
    for shape in args.shapes.split(","):
        counts = [int(x) for x in (args.layers or ("2,4" if shape == "llama2-7b" else "1")).split(",")]
        for n in counts:
            t = time.perf_counter()
            path = build_checkpoint(cache, shape, n)
            print(f"[{shape} x {n}] checkpoint ready in {time.perf_counter() - t:.0f}s: {path}", file=sys.stderr)
            db = cache / f"db-{shape}-{n}"
            row = summarise(shape, n, run_index(path, db, k=args.k, pairs=args.pairs, device=args.device))
            row["pairs"] = args.pairs
            if args.compare_cpu_layer is not None:
                row["compare_cpu"] = compare_with_cpu(path, cache, args.compare_cpu_layer, db, args.k, args.pairs)
            print(json.dumps(row), flush=True)
            results.append(row)
        peaks = [r["peak_rss_gb"] for r in results if r["shape"] == shape]
        if len(peaks) > 1:
            growth = max(peaks) / min(peaks) - 1
            print(json.dumps({"shape": shape, "peak_growth": round(growth, 3), "within_10pct": growth <= 0.10}))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "1")
    main()
