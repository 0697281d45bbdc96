"""Latency of the query helpers on a dataset read over HTTP (a loopback server with Range
support, tests/rangeserver.py), beside the same helpers on the local directory.

    python benchmarks/bench_remote.py [--repeat 5]

Datasets: the test suite's synthetic three-model dataset (tests/builders.py ``build_synthetic``, 212 KB) and the
three-model dataset of the byte-count test (tests/builders.py ``build_three``, 15.5 MB).
For each helper:

* local: median of --repeat calls on an open local Dataset;
* remote cold: open + first call with an empty metadata cache (a first `zeropass` command);
* remote cached: open + first call in a fresh Dataset with the footers cached (a later command);
* remote warm: median of --repeat further calls on the same remote Dataset;
* KB: bytes the server sent for the cold open + call.

Loopback has no network latency: over the internet add about one round trip per request
(the request counts are printed). Figures go into docs/BENCHMARKS.md.
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


def _ms(f) -> float:
    t = time.perf_counter()
    f()
    return (time.perf_counter() - t) * 1000


def run(db: Path, srv, calls: dict, repeat: int, cache: Path) -> None:
    from query import Dataset

    url = f"{srv.url}/{db.name}"
    print(f"{'helper':40s} {'local ms':>9s} {'cold ms':>8s} {'cached ms':>9s} {'warm ms':>8s} {'KB':>7s} {'reqs':>5s}")
    with Dataset(db) as local:
        for name, call in calls.items():
            call(local)
            loc = statistics.median(_ms(lambda: call(local)) for _ in range(repeat))
            shutil.rmtree(cache, ignore_errors=True)
            srv.reset()
            holder = {}
            cold = _ms(lambda: holder.setdefault("ds", Dataset(url, cache_dir=cache)) and call(holder["ds"]))
            kb, reqs = srv.bytes_served / 1024, len(srv.requests)
            warm = statistics.median(_ms(lambda: call(holder["ds"])) for _ in range(repeat))
            holder["ds"].close()
            fresh = {}
            cached = _ms(lambda: fresh.setdefault("ds", Dataset(url, cache_dir=cache)) and call(fresh["ds"]))
            fresh["ds"].close()
            print(f"{name:40s} {loc:9.1f} {cold:8.1f} {cached:9.1f} {warm:8.1f} {kb:7.0f} {reqs:5d}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from tests.builders import build_synthetic, build_three
    from tests.rangeserver import RangeServer

    base = Path(tempfile.mkdtemp(prefix="zeropass-bench-remote-"))
    try:
        small = build_synthetic(base / "synthetic")
        three = build_three(base / "three")
        size = lambda d: sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) / 1024  # noqa: E731
        with RangeServer(base) as srv:
            print(f"synthetic dataset (tests/builders.py build_synthetic, {size(small):,.0f} KB):")
            run(small, srv, {
                "models()": lambda ds: ds.models(),
                "sql count(*) vectors": lambda ds: ds.sql("SELECT count(*) FROM vectors"),
                "heads('paris')": lambda ds: ds.heads("paris"),
                "neurons('paris')": lambda ds: ds.neurons("paris"),
                "neurons('paris', model='beta')": lambda ds: ds.neurons("paris", model="beta"),
                "show('alpha', 'L1.H0')": lambda ds: ds.show("alpha", "L1.H0"),
                "tokens('Paris is big')": lambda ds: ds.tokens("Paris is big"),
                "similar('alpha', 'L0.N1', in 'beta')": lambda ds: ds.similar("alpha", "L0.N1", "beta"),
            }, args.repeat, base / "cache")
            print(f"\nthree-model dataset (tests/builders.py build_three, {size(three):,.0f} KB):")
            run(three, srv, {
                "models()": lambda ds: ds.models(),
                "neurons('w123', model='two')": lambda ds: ds.neurons("w123", model="two"),
                "neurons('w123')": lambda ds: ds.neurons("w123"),
                "show('two', 'L2.N100')": lambda ds: ds.show("two", "L2.N100"),
                "sql count(*) vectors": lambda ds: ds.sql("SELECT count(*) FROM vectors"),
            }, args.repeat, base / "cache")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
