"""What verifying each file's sha256 when a dataset is opened costs (query/verify.py).

    python benchmarks/bench_verify.py [--repeat 5]

Dataset: the three-model dataset of tests/builders.py ``build_three`` (15.5 MB in 20 files).
For each: the median of --repeat runs of

* open: ``Dataset(db)`` (the manifest, the views' first footers, and the files' check);
* open + helper: the same, then ``neurons("w123", model="two")`` (a first `zeropass` command);

cold = no verified-digest record (every file hashed), warm = the record on disk in a new process's
state (one stat per file), off = the check skipped (the code before it). Figures go into
docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from query import Dataset, verify
    from tests.builders import build_three

    base = Path(tempfile.mkdtemp(prefix="zp-bench-verify-"))
    try:
        db = build_three(base / "db")
        files = [p for p in db.rglob("*.parquet")]
        mb = sum(p.stat().st_size for p in files) / 1e6
        real = verify.LocalVerifier.damaged

        def run(mode: str, helper: bool) -> float:
            cache = base / "cache"
            if mode == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            verify._seen.clear()  # a new process: only the record on disk is known
            verify.LocalVerifier.damaged = real if mode != "off" else (lambda self, info, rels: {})
            t = time.perf_counter()
            with Dataset(db, cache_dir=cache) as ds:
                if helper:
                    ds.neurons("w123", model="two")
            return (time.perf_counter() - t) * 1000

        run("cold", True)  # warm the OS page cache and imports
        print(f"dataset: {len(files)} files, {mb:.1f} MB")
        for helper in (False, True):
            row = {m: statistics.median(run(m, helper) for _ in range(args.repeat)) for m in ("off", "cold", "warm")}
            name = "open + neurons w123 --model two" if helper else "open"
            print(f"{name:34s} off {row['off']:7.1f} ms   cold {row['cold']:7.1f} ms   warm {row['warm']:7.1f} ms")
        t = time.perf_counter()
        for p in files:
            verify.file_sha256(p)
        print(f"sha256 alone: {mb / (time.perf_counter() - t):.0f} MB/s")
    finally:
        verify.LocalVerifier.damaged = real
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
