"""Two builds of one model, table by table: the lists identical, the scores within 1e-12.

    .venv/bin/python -m benchmarks.compare_builds OLD_DB NEW_DB

The check behind "every table identical to the build before the change" (docs/BENCHMARKS.md §11):
each table's rows ordered by their non-float columns (model, layer, unit, side, rank, token ids,
...), which must be equal row for row; the float columns (scores, metrics) are compared with the
dense reference tests' tolerance (relative 1e-12) and the number that differ at all is printed,
so "bit for bit" shows as 0. ``created_at`` is left out. Exit status 1 on any difference.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import duckdb
import pyarrow as pa

from schemas import TABLES
from schemas.format import read_manifest
from schemas.layout import table_files


def rows(db: Path, table: str, keys: list[str], floats: list[str]) -> list[tuple]:
    files = table_files(read_manifest(db), table, None)
    if not files:
        return []
    paths = ", ".join("'" + str(db / f).replace("'", "''") + "'" for f in files)
    con = duckdb.connect()
    try:
        return con.execute(f"SELECT {', '.join(keys + floats)} FROM read_parquet([{paths}], hive_partitioning=false) "
                           f"ORDER BY {', '.join(keys) if keys else 'ALL'}").fetchall()
    finally:
        con.close()


def compare(old: Path, new: Path, rtol: float = 1e-12) -> bool:
    same = True
    for table, spec in TABLES.items():
        fields = [f for f in spec.schema if f.name != "created_at"]
        keys = [f.name for f in fields if not pa.types.is_floating(f.type)]
        floats = [f.name for f in fields if pa.types.is_floating(f.type)]
        a, b = rows(old, table, keys, floats), rows(new, table, keys, floats)
        if not a and not b:
            continue
        lists = sum(x[: len(keys)] != y[: len(keys)] for x, y in zip(a, b)) + abs(len(a) - len(b))
        differ, worst = 0, 0.0
        for x, y in zip(a, b):
            for u, v in zip(x[len(keys):], y[len(keys):]):
                if (u is None) != (v is None):
                    lists += 1
                elif u is not None and u != v and not (u != u and v != v):  # NaN == NaN here
                    differ += 1
                    worst = max(worst, abs(u - v) / max(abs(u), abs(v)))
        ok = lists == 0 and worst <= rtol
        same &= ok
        print(f"{table:18s} rows {len(a):>9} / {len(b):>9}   list differences {lists}   "
              f"floats differing {differ} (largest relative {worst:.1e})   {'same' if ok else 'DIFFERENT'}")
    print("identical lists, scores within 1e-12" if same else "the builds differ")
    return same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    args = ap.parse_args()
    sys.exit(0 if compare(args.old, args.new) else 1)


if __name__ == "__main__":
    main()
