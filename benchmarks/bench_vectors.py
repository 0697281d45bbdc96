"""Vector projections: zeropass vs the bare matrix products, and vs the LM-Debugger method.

    .venv/bin/python -m benchmarks.bench_vectors [--repeats 3] [--json OUT]

On a GPT-2-small-shaped model (random weights, the real GPT-2 vocabulary), measured in one run:

1. overhead ratio = (all vector projections of all layers, with top-k/bottom-k selection and
   building the Arrow tables that are written) / (the bare matrix products of the same shapes,
   through the same GEMM into a reused buffer). Target <= 1.3.
2. the LM-Debugger method for FF values (project every FF value vector of every layer, stack all
   scores, then take the top-k) vs zeropass's FF values, each in a fresh child process so peak
   RSS is its own: wall-time ratio and peak-RSS ratio.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch


def _load():
    from benchmarks.shapes import gpt2_shaped
    from indexer.load import load_canonical

    return load_canonical(str(gpt2_shaped("gpt2-small")))


def overhead(repeats: int) -> dict:
    """Ratio of all vector projections to the bare GEMMs of the same shapes."""
    import tempfile

    from indexer.build import _ModelWriter
    from indexer.dataset import Build
    from indexer.kernels.vectors import _matmul_into

    loaded = _load()
    model = loaded.canonical
    layers = [model.layer(l) for l in range(model.dims.n_layers)]
    emb = model.embeddings
    read_basis = emb.W_E.T.contiguous()
    write_basis = emb.W_U.contiguous()
    token_text = __import__("pyarrow").array([f"t{i}" for i in range(model.dims.d_vocab)])

    def shapes(lw):
        d = model.dims.d_model
        return [
            (lw.W_in.T, read_basis), (lw.W_out, write_basis),
            (lw.W_Q.transpose(1, 2).reshape(-1, d), read_basis), (lw.W_K.transpose(1, 2).reshape(-1, d), read_basis),
            (lw.W_V.transpose(1, 2).reshape(-1, d), read_basis), (lw.W_O.reshape(-1, d), write_basis),
        ]

    with tempfile.TemporaryDirectory() as tmp:
        writer = _ModelWriter(model, Build(tmp, "bench", {}), token_text, k=50, n_pairs=0, device="cpu")
        block = writer.read.block
        buf = torch.empty(block, model.dims.d_vocab)

        def bare():
            for lw in layers:
                for X, basis in shapes(lw):
                    for s in range(0, X.shape[0], block):
                        e = min(X.shape[0], s + block)
                        _matmul_into(X[s:e], basis, buf[: e - s])

        def ours():
            rows = 0
            for l, lw in enumerate(layers):
                rows += writer.vectors(l, lw).num_rows
            return rows

        bare_t, ours_t = [], []
        for _ in range(repeats):  # interleaved so both see the same machine state
            t = time.perf_counter(); bare(); bare_t.append(time.perf_counter() - t)
            t = time.perf_counter(); rows = ours(); ours_t.append(time.perf_counter() - t)
    return {
        "bare_gemm_s": statistics.median(bare_t),
        "zeropass_s": statistics.median(ours_t),
        "ratio": statistics.median(ours_t) / statistics.median(bare_t),
        "rows": rows,
    }


def _child(method: str) -> None:
    """Run one side of the LM-Debugger comparison and print its time and peak RSS."""
    loaded = _load()
    model = loaded.canonical
    W_outs = [model.layer(l).W_out for l in range(model.dims.n_layers)]
    W_U = model.embeddings.W_U.contiguous()
    t = time.perf_counter()
    if method == "lmdebugger":
        # The peers' offline step: every FF value's scores for every layer, stacked, then top-k.
        scores = torch.cat([W @ W_U for W in W_outs])  # [n_layers * d_ff, d_vocab]
        top = torch.topk(scores, 50, dim=1)
        bot = torch.topk(scores, 50, dim=1, largest=False)
        checksum = int(top.indices[:, 0].sum() + bot.indices[:, 0].sum())
    else:
        from indexer.kernels.vectors import Projector

        p = Projector(W_U, 50)
        checksum = 0
        for W in W_outs:
            r = p(W)
            checksum += int(r.top_idx[:, 0].sum() + r.bot_idx[:, 0].sum())
    elapsed = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": method, "seconds": elapsed, "peak_rss_mb": peak_mb, "checksum": checksum}))


def versus_lmdebugger(repeats: int) -> dict:
    runs: dict[str, list[dict]] = {"lmdebugger": [], "zeropass": []}
    for _ in range(repeats):
        for method in runs:
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_vectors", "--child", method],
                                 capture_output=True, text=True, check=True)
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {m: {key: statistics.median(r[key] for r in rs) for key in ("seconds", "peak_rss_mb")} for m, rs in runs.items()}
    assert runs["lmdebugger"][0]["checksum"] == runs["zeropass"][0]["checksum"], "the two methods disagree"
    return {
        "lmdebugger": med["lmdebugger"], "zeropass": med["zeropass"],
        "time_ratio": med["lmdebugger"]["seconds"] / med["zeropass"]["seconds"],
        "rss_ratio": med["lmdebugger"]["peak_rss_mb"] / med["zeropass"]["peak_rss_mb"],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["lmdebugger", "zeropass"], help=argparse.SUPPRESS)
    ap.add_argument("--skip-lmdebugger", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child)
        return {}
    torch.set_num_threads(torch.get_num_threads())
    result = {"overhead": overhead(args.repeats)}
    o = result["overhead"]
    print(f"vector projections, GPT-2-small shape: zeropass {o['zeropass_s']:.2f}s / bare GEMM {o['bare_gemm_s']:.2f}s "
          f"= {o['ratio']:.2f}x  ({o['rows']:,} rows)")
    if not args.skip_lmdebugger:
        r = result["lmdebugger"] = versus_lmdebugger(args.repeats)
        print(f"FF values of all layers: LM-Debugger method {r['lmdebugger']['seconds']:.2f}s, "
              f"{r['lmdebugger']['peak_rss_mb']:.0f} MB peak; zeropass {r['zeropass']['seconds']:.2f}s, "
              f"{r['zeropass']['peak_rss_mb']:.0f} MB peak -> time ratio {r['time_ratio']:.2f}x, RSS ratio {r['rss_ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
