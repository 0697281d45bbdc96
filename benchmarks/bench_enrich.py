"""Latency of ``enrich`` (issue 23) on the three-model dataset of tests/builders.py (``build_three``:
two vocabularies of 20,000 tokens, 131,072 vector rows per model), cold and warm, for sets of 20 and 200 tokens.

    python -m benchmarks.bench_enrich [--repeat 10]

Target: warm median under 200 ms for 20 tokens. Takes a few seconds (the dataset is built in a temp dir).
`benchmarks/bench_query.py` measures the same helper on the real-model dataset of `make bench`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args(argv)
    from query import Dataset
    from tests.builders import build_three

    with tempfile.TemporaryDirectory() as tmp:
        db = build_three(Path(tmp) / "db")
        print(f"{'case':<34} {'rows':>5} {'cold ms':>8} {'warm ms':>8} {'max ms':>7}")
        for label, words, kw in [("enrich(20 tokens)", [f"w{i}" for i in range(1, 21)], {}),
                                 ("enrich(20 tokens, limit=None)", [f"w{i}" for i in range(1, 21)], {"limit": None}),
                                 ("enrich(200 tokens)", [f"w{i}" for i in range(1, 201)], {})]:
            with Dataset(db) as ds:
                t = time.perf_counter()
                out = ds.enrich(words, **kw)
                cold = (time.perf_counter() - t) * 1000
                warm = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    ds.enrich(words, **kw)
                    warm.append((time.perf_counter() - t) * 1000)
            print(f"{label:<34} {out.num_rows:>5} {cold:>8.1f} {statistics.median(warm):>8.1f} {max(warm):>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
