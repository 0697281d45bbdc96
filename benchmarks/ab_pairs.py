"""An older circuit kernel against the working tree's, on the same real SmolLM2 circuits.

    .venv/bin/python -m benchmarks.ab_pairs REV [--heads 9] [--threads 1]

REV is a git revision whose ``indexer/kernels/pairs.py`` is the old kernel. Each circuit runs
once with each kernel, alternating which goes first, in one process: on a VM whose speed moves
by 10-80 % between runs minutes apart this is the comparison that holds (docs/BENCHMARKS.md
§11). Prints the seconds of each side, their ratio, and exits 1 unless every result (entries,
role lists, self fraction) is identical.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

import indexer.kernels.pairs as new_kernel
from benchmarks.bench_pairs import same, smollm2_heads

ROOT = Path(__file__).resolve().parent.parent


def old_kernel(rev: str):
    """The module ``indexer/kernels/pairs.py`` as it was at ``rev``, imported under another name."""
    return kernel_from_source(subprocess.run(["git", "show", f"{rev}:indexer/kernels/pairs.py"], cwd=ROOT,
                                             check=True, capture_output=True, text=True).stdout)


def kernel_from_source(src: str):
    """A pairs kernel module from its source text, imported as ``pairs_old``."""
    src = src.replace("from ..profile import", "from indexer.profile import")
    src = src.replace("from . import ", "from indexer.kernels import ")  # e.g. `compiled` (seventh round on)
    module = types.ModuleType("pairs_old")
    sys.modules["pairs_old"] = module  # dataclasses look their module up by name
    exec(compile(src, "pairs_old.py", "exec"), module.__dict__)
    return module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev")
    ap.add_argument("--heads", type=int, default=9, help="heads spread across the layers (2 circuits each)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    old = old_kernel(args.rev)
    seconds = {"old": 0.0, "new": 0.0}
    different = []
    for i, (name, A, B) in enumerate(smollm2_heads(args.heads)):
        sides = [("old", old), ("new", new_kernel)]
        results = {}
        for label, kernel in sides if i % 2 else sides[::-1]:
            t = time.perf_counter()
            results[label] = kernel.top_pairs(A, B)
            seconds[label] += time.perf_counter() - t
        if not same(results["old"], results["new"]):
            different.append(name)
    print(f"{args.rev} {seconds['old']:.2f} s, working tree {seconds['new']:.2f} s: "
          f"{seconds['old'] / seconds['new']:.3f}x; {2 * args.heads - len(different)}/{2 * args.heads} identical"
          + (f" (different: {', '.join(different)})" if different else ""))
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
