"""GPU check for indexer.kernels.pairs: CPU and CUDA give identical results, and the time for a
whole GPT-2-medium-shaped model (24 layers × 16 heads, d_model 1024, d_head 64, V 50257; qk and
ov per head = 768 matrices) on the GPU. Prints one JSON object.

    python -m benchmarks.gpu_check                # on a CUDA machine, < 5 min on an H100
    python -m benchmarks.gpu_check --device cpu --layers 1 --heads 2 --vocab 3000   # dry run
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from indexer.kernels.pairs import top_pairs

KEYS = ["top_rows", "top_cols", "bot_rows", "bot_cols", "row_top_idx", "row_bot_idx",
        "col_top_idx", "col_bot_idx"]
VALS = ["top_vals", "bot_vals", "row_top_vals", "row_bot_vals", "col_top_vals", "col_bot_vals"]


def compare(a, b) -> dict:
    same = all(torch.equal(getattr(a, k).cpu(), getattr(b, k).cpu()) for k in KEYS)
    same = same and a.self_top1_frac == b.self_top1_frac
    err = max(float((getattr(a, k).cpu() - getattr(b, k).cpu()).abs().amax()) if getattr(a, k).numel() else 0.0
              for k in VALS)
    return dict(identical=same, max_abs_val_diff=err)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-head", type=int, default=64)
    ap.add_argument("--samples", type=int, default=3, help="matrices also run on the CPU")
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop timing after this long")
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    V, d, dh = args.vocab, args.d_model, args.d_head
    out = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               shape=dict(layers=args.layers, heads=args.heads, vocab=V, d_model=d, d_head=dh))

    W_E = torch.randn(V, d, generator=g, device=dev, dtype=torch.float64) * 0.02
    W_U = W_E.T

    def factors(layer, head):
        s = torch.Generator(device=dev).manual_seed(1000 * layer + head)
        W = [torch.randn(d, dh, generator=s, device=dev, dtype=torch.float64) * 0.02 for _ in range(4)]
        return {"qk": (W_E @ W[0], W_E @ W[1]), "ov": (W_E @ W[2], (W[3].T @ W_U).T)}

    # 1. CPU vs device on a sample: random heads, plus a structured (heavy-tailed, copying-like)
    #    head so that the pruned path and the self-ambiguity path are compared too.
    checks = []
    samples = [("L0.H0.qk", *factors(0, 0)["qk"]), ("L0.H0.ov", *factors(0, 0)["ov"])]
    gs = torch.Generator(device=dev).manual_seed(7)
    Vs = min(V, 20000)
    A = torch.randn(Vs, dh, generator=gs, device=dev, dtype=torch.float64)
    A = A * torch.exp(torch.randn(Vs, 1, generator=gs, device=dev, dtype=torch.float64))
    samples.append(("structured", A, A + 0.3 * torch.randn(Vs, dh, generator=gs, device=dev, dtype=torch.float64)))
    for name, A, B in samples[: args.samples]:
        t0 = time.perf_counter()
        r_dev = top_pairs(A, B, 200, 50, device=args.device)
        t1 = time.perf_counter()
        r_cpu = top_pairs(A.cpu(), B.cpu(), 200, 50, device="cpu")
        t2 = time.perf_counter()
        checks.append(dict(matrix=name, **compare(r_dev, r_cpu), device_s=round(t1 - t0, 3),
                           cpu_s=round(t2 - t1, 3), frac_screened=r_dev.stats["frac_entries_screened"]))
        print(json.dumps(checks[-1]), flush=True)
    out["checks"] = checks
    out["all_identical"] = all(c["identical"] for c in checks)

    # 2. The whole model on the device.
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    done = 0
    for layer in range(args.layers):
        for head in range(args.heads):
            for A, B in factors(layer, head).values():
                top_pairs(A, B, 200, 50, device=args.device)
                done += 1
            if time.perf_counter() - t0 > args.budget_s:
                break
        else:
            continue
        break
    if dev.type == "cuda":
        torch.cuda.synchronize()
        out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    total = time.perf_counter() - t0
    n_all = 2 * args.layers * args.heads
    out.update(matrices_done=done, matrices_total=n_all, seconds=round(total, 2),
               seconds_per_matrix=round(total / max(1, done), 4),
               projected_all_s=round(total / max(1, done) * n_all, 1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
