"""The dataset directory on disk (DESIGN §5), shared by the writer (indexer) and readers (query).

    DIR/
      manifest.json                      the commit point: which files make up each model
      catalog.duckdb                     views for the plain `duckdb` CLI (run it from DIR)
      <table>/model=<slug>/layer=<L>/<build>.parquet   Hive-style partitions
      tokens/vocab_id=<id>/<id>.parquet  one file per vocabulary, shared by models
      alignments/model_a=<a>/model_b=<b>/<id>.parquet   results of `zeropass align`
      .builds/<slug>.json                progress of an unfinished build (for resume)

A model is visible to readers only through ``manifest.json``, which lists its files
explicitly and is replaced atomically (write, fsync, rename). Files of an unfinished or
superseded build are never listed there, so readers never see a half-written model. Paths
in the manifest are relative to DIR, so the directory can be moved, copied or zipped.

Imports only the standard library and ``schemas``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import SCHEMA_VERSION, TABLES, Table, empty_select_sql

MANIFEST = "manifest.json"
CATALOG = "catalog.duckdb"
BUILDS = ".builds"
FORMAT = "zeropass-dataset"


def empty_manifest() -> dict:
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "models": {}, "vocabularies": {}, "alignments": {}}


def read_manifest(root: Path) -> dict | None:
    """The manifest of dataset ``root``, or None when there is none yet."""
    path = Path(root) / MANIFEST
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON so that a reader sees the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def partition_dir(table: str, **keys: object) -> str:
    """Relative directory of one partition, e.g. ``vectors/model=gpt2/layer=3``."""
    parts = [table] + [f"{k}={keys[k]}" for k in TABLES[table].partition_by if k in keys]
    extra = [k for k in keys if k not in TABLES[table].partition_by]
    parts += [f"{k}={keys[k]}" for k in extra]
    return "/".join(parts)


def table_files(manifest: dict, table: str, models: list[str] | None = None) -> list[str]:
    """Relative paths of the committed files of ``table`` (restricted to ``models``)."""
    if table == "tokens":
        return sorted(f for v in manifest.get("vocabularies", {}).values() for f in v.get("files", []))
    if table == "alignments":  # keyed by the pair of models, listed apart from the models
        return sorted(f for key, v in manifest.get("alignments", {}).items()
                      if models is None or set(key.split("|")) & set(models) for f in v.get("files", []))
    files = []
    for slug, entry in sorted(manifest.get("models", {}).items()):
        if models is None or slug in models:
            files += entry.get("files", {}).get(table, [])
    return files


def view_sql(table: Table, files: list[str], root: Path | None = None, union_by_name: bool = True) -> str:
    """``SELECT`` over the given Parquet files, columns in schema order.

    ``root`` makes paths absolute (for the Python query layer); without it they stay relative
    to DIR (for catalog.duckdb, which the plain `duckdb` CLI opens from inside DIR).
    """
    if not files:
        return empty_select_sql(table)
    paths = [str(Path(root) / f) if root is not None else f for f in files]
    quoted = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
    cols = ", ".join(c.name for c in table.columns)
    # Values of model/layer live inside the files; hive_partitioning=false stops DuckDB from
    # also deriving (string-typed) columns from the key=value directory names.
    # union_by_name tolerates files written by an older writer that lacked a nullable column, but
    # reads every file's footer when the view is bound; the query layer binds lazily (False).
    return f"SELECT {cols} FROM read_parquet([{quoted}], union_by_name={'true' if union_by_name else 'false'}, hive_partitioning=false)"
