"""Head pairs: zeropass vs the paper-notebook method, on the same heads.

    .venv/bin/python -m benchmarks.bench_paper [--heads 2] [--json OUT]

The notebook method, as the issue describes it (our own short implementation): build the head's
V x V matrix densely in fp32 (10 GB at V = 50257), then

* ``bisect``: bisect a threshold t (20 halvings between the matrix's min and max, stopping once
  N <= count(M >= t) <= 2N), keep the entries >= t, sort them in fp32, take the first N;
* ``sample``: score 10,000 uniformly sampled entries and keep the N largest of those.

zeropass runs ``indexer.kernels.pairs.top_pairs`` on the same float64 factors. Each method runs
in a fresh child process so its peak RSS is its own. Recall = |approx top-N ∩ exact top-N| / N
(the exact answer is zeropass's, which the tests pin to a dense float64 reference).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.shapes import CACHE

N = 200
SAMPLES = 10_000


def head_factors(which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) float64 factors of a benchmark head, cached on disk so children load them fast."""
    path = CACHE / "heads" / f"{which}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        from benchmarks.bench_pairs import gpt2_random_heads, smollm2_heads

        if which.startswith("rand"):
            heads = gpt2_random_heads(int(which.split(".")[0][4:]) + 1)
        else:
            heads = smollm2_heads(20)
        for name, A, B in heads:
            torch.save((A, B), CACHE / "heads" / f"{name}.pt")
    return torch.load(path)


def bisect(A: torch.Tensor, B: torch.Tensor, n: int = N, halvings: int = 20) -> torch.Tensor:
    M = A.float() @ B.float().T  # the dense V x V matrix
    lo, hi = float(M.min()), float(M.max())
    t = lo
    for _ in range(halvings):
        mid = (lo + hi) / 2
        count = int(torch.count_nonzero(M >= mid))
        if count < n:
            hi = mid
        else:
            lo, t = mid, mid
            if count <= 2 * n:
                break
    flat = M.reshape(-1)
    idx = torch.nonzero(flat >= t).squeeze(1)
    order = torch.argsort(flat[idx], descending=True, stable=True)[:n]
    return idx[order]


def sample(A: torch.Tensor, B: torch.Tensor, n: int = N, samples: int = SAMPLES) -> torch.Tensor:
    M = A.float() @ B.float().T
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, M.numel(), (samples,), generator=g)
    vals = M.reshape(-1)[idx]
    return idx[torch.argsort(vals, descending=True, stable=True)[:n]]


def zeropass(A: torch.Tensor, B: torch.Tensor, n: int = N) -> torch.Tensor:
    from indexer.kernels.pairs import top_pairs

    r = top_pairs(A, B, n, 50)
    return r.top_rows * B.shape[0] + r.top_cols


def _child(method: str, which: str) -> None:
    A, B = head_factors(which)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    idx = {"bisect": bisect, "sample": sample, "zeropass": zeropass}[method](A, B)
    elapsed = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"method": method, "head": which, "seconds": elapsed, "peak_rss_mb": peak / 1024,
                      "above_factors_mb": (peak - base) / 1024, "idx": idx.tolist()}))


def compare(heads: list[str]) -> dict:
    rows = []
    for which in heads:
        head_factors(which)  # build the cache outside the timed children
        got = {}
        for method in ("zeropass", "bisect", "sample"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_paper", "--child", method, which],
                                 capture_output=True, text=True, check=True)
            got[method] = json.loads(out.stdout.strip().splitlines()[-1])
        exact = set(got["zeropass"]["idx"])
        for method, r in got.items():
            r["recall"] = len(exact & set(r["idx"])) / len(exact)
            rows.append({key: v for key, v in r.items() if key != "idx"})
            print(f"{which} {method}: {r['seconds']:.2f}s, peak {r['peak_rss_mb']:.0f} MB "
                  f"({r['above_factors_mb']:.0f} MB above the factors), recall {r['recall']:.3f}", file=sys.stderr, flush=True)
    summary = {}
    for method in ("zeropass", "bisect", "sample"):
        rs = [r for r in rows if r["method"] == method]
        summary[method] = {key: statistics.median(r[key] for r in rs) for key in ("seconds", "above_factors_mb", "recall")}
    for method in ("bisect", "sample"):
        summary[method]["time_ratio"] = summary[method]["seconds"] / summary["zeropass"]["seconds"]
        summary[method]["memory_ratio"] = summary[method]["above_factors_mb"] / max(1.0, summary["zeropass"]["above_factors_mb"])
    return {"rows": rows, "summary": summary}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "HEAD"), help=argparse.SUPPRESS)
    ap.add_argument("--heads", nargs="*", default=["rand0.qk", "rand1.ov", "L5.H3.ov", "L12.H5.qk"])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child)
        return {}
    result = compare(args.heads)
    s = result["summary"]
    for m in ("bisect", "sample"):
        print(f"paper-notebook {m}: {s[m]['time_ratio']:.1f}x zeropass's time, {s[m]['memory_ratio']:.0f}x its memory, "
              f"recall of the exact top-{N} {s[m]['recall']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
