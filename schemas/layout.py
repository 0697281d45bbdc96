"""The dataset directory on disk (docs/DESIGN.md §5), shared by the writer (indexer) and readers (query).

    DIR/
      manifest.json                      the commit point: which files make up each model
      catalog.duckdb                     views for the plain `duckdb` CLI (run it from DIR)
      <table>/model=<slug>/layer=<L>/<build>.parquet   Hive-style partitions
      tokens/vocab_id=<id>/<id>.parquet  one file per vocabulary, shared by models
      alignments/model_a=<a>/model_b=<b>/<id>.parquet   results of `zeropass align`
      <table>/compacted/<id>.parquet     `zeropass compact`: many models' rows of a table in one file
      .builds/<slug>.json                progress of an unfinished build (for resume)
      .lock                              one writer at a time

A model is visible to readers only through ``manifest.json``, which lists its files
explicitly and is replaced atomically (write, fsync, rename). Files of an unfinished or
superseded build are never listed there, so readers never see a half-written model. Paths
in the manifest are relative to DIR, so the directory can be moved, copied or zipped.

Imports only the standard library and ``schemas``.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from . import TABLES, Table, empty_select_sql
# The manifest's rules live in schemas.format (one home); re-exported for the callers that
# think of them as part of the layout.
from .format import (  # noqa: F401
    DICTIONARIES,
    DICTIONARY_TABLES,
    FORMAT,
    MANIFEST,
    BadManifest,
    empty_manifest,
    read_manifest,
    unsafe_relpath,
    validate_manifest,
    write_json_atomic,
)

CATALOG = "catalog.duckdb"
BUILDS = ".builds"


# Manifest sections listed apart from the models: section -> (table of its files, owner kind).
SHARED = {"vocabularies": ("tokens", "vocabulary"), "alignments": ("alignments", "alignment")}


class Owner(NamedTuple):
    """Who a listed file belongs to: ``kind`` is model, vocabulary or alignment."""

    table: str
    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


def manifest_files(manifest: dict) -> dict[str, Owner]:
    """Every file the manifest lists -> its table and owner (``str(owner)``: ``model X``, ...)."""
    out: dict[str, Owner] = {}
    for slug, entry in manifest.get("models", {}).items():
        for table, files in entry.get("files", {}).items():
            out.update((f, Owner(table, "model", slug)) for f in files)
    for key, (table, kind) in SHARED.items():
        for name, entry in manifest.get(key, {}).items():
            out.update((f, Owner(table, kind, name)) for f in entry.get("files", []))
    for name, entry in manifest.get(DICTIONARIES, {}).items():
        for table, files in entry.get("files", {}).items():
            out.update((f, Owner(table, "dictionary", name)) for f in files)
    for table, entry in manifest.get("compacted", {}).items():
        out.update((f, Owner(table, "compacted", table)) for f in entry.get("files", []))
    return out


def file_info(manifest: dict) -> dict[str, dict]:
    """Every listed file's recorded ``{"bytes", "sha256", "rows"}`` (``file_info`` of each owner,
    compacted files included; may be partial)."""
    out: dict[str, dict] = {}
    for key in ("models", *SHARED, DICTIONARIES, "compacted"):
        for entry in manifest.get(key, {}).values():
            if isinstance(entry, dict) and isinstance(entry.get("file_info"), dict):
                out.update(entry["file_info"])
    return out


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


# -- compaction (indexer/compact.py writes it, docs/DATASET.md "Compaction") ---------------------
#
# `zeropass compact` folds the per-model files of a table into one file across models, sorted
# for the queries that read it (token first where the helpers search by token). The manifest
# section "compacted" maps table -> {"files": [...], "models": {slug: build_id}, "file_info"}.
# The per-model files stay listed and on disk: they remain the truth, the compacted file is a
# derived copy. A model's rows are read from the compacted file only while the model's build_id
# is the one recorded there; a model indexed or re-indexed after the compaction is read from its
# own files, so a commit never rewrites the compacted file and a re-index is seen at once.

COMPACTED_ORDER = {
    "vectors": "model, layer, kind, head NULLS FIRST, token_id",
    "vectors_by_token": "token_id, model, layer NULLS FIRST, kind, head NULLS FIRST, idx, side, rank",
    "pairs": "model, layer, head, circuit, side, rank",
    "pairs_by_token": "token_id, model, layer, head, circuit, side, rank, endpoint",
    "head_tokens": "token_id, model, layer, head, circuit, role, side, rank",
    "heads": "model, layer, head",
    "models": "model",
    "parameters": "model",
}


class Sources(NamedTuple):
    """What a view of one table reads: rows of ``compacted_models`` from the ``compacted`` files
    (filtered on ``model``), and every row of the per-model ``files``."""

    compacted: list[str]
    compacted_models: list[str]
    files: list[str]


def compacted_models(manifest: dict, table: str) -> list[str]:
    """The models whose current build the compacted files of ``table`` hold."""
    entry = manifest.get("compacted", {}).get(table) or {}
    models = manifest.get("models", {})
    return sorted(s for s, b in entry.get("models", {}).items()
                  if isinstance(models.get(s), dict) and models[s].get("build_id") == b)


def table_sources(manifest: dict, table: str, models: list[str] | None = None, use_compacted: bool = True,
                  dictionaries: bool = True) -> Sources:
    """The files a view of ``table`` (restricted to ``models``) reads (see ``Sources``).

    ``dictionaries=False``: without the dictionaries' files (compaction folds only the models' own).
    """
    stored = TABLES[table].derived_from or table  # a derived table reads its source's per-model files
    if table in DICTIONARY_ONLY:
        return Sources([], [], dictionary_files(manifest, stored, models))
    extra = dictionary_files(manifest, stored, models) if dictionaries else []
    src = _model_sources(manifest, table, stored, models, use_compacted)
    return src._replace(files=src.files + extra) if extra else src


def _model_sources(manifest: dict, table: str, stored: str, models: list[str] | None, use_compacted: bool) -> Sources:
    if table not in COMPACTED_ORDER:
        return Sources([], [], table_files(manifest, stored, models))
    covered = set(compacted_models(manifest, table)) if use_compacted else set()
    entry = manifest.get("compacted", {}).get(table) or {}
    take = sorted(s for s in covered if models is None or s in models)
    compacted = list(entry.get("files", [])) if take else []
    rest = [s for s in (manifest.get("models", {}) if models is None else models) if s not in covered]
    return Sources(compacted, take, table_files(manifest, stored, rest))


def sources_sql(table: Table, src: Sources, root: Path | None = None, union_by_name: bool = True,
                layers: list[int] | None = None) -> str:
    """``SELECT`` over ``src`` (``view_sql`` of the per-model files, UNION ALL the compacted
    rows of the models taken from them; ``layers`` filters the compacted rows too)."""
    if not src.compacted:
        return view_sql(table, src.files, root, union_by_name)
    where = "model IN (" + ", ".join("'" + m.replace("'", "''") + "'" for m in src.compacted_models) + ")"
    if layers is not None:
        where += " AND layer IN (" + ", ".join(str(int(x)) for x in layers) + ")"
    part = f"{_stored_sql(table, src.compacted, root, union_by_name)} WHERE {where}"  # compacted files hold the table itself
    return part if not src.files else f"{part} UNION ALL {view_sql(table, src.files, root, union_by_name)}"


def duckdb_path(path: str) -> str:
    """``path`` as a DuckDB file-reader argument that names exactly that file.

    DuckDB's readers treat ``*``, ``?`` and ``[`` as glob syntax even inside a list: a dataset in
    ``db[1]`` read the files of ``db1``, one in ``a*b`` those of ``a,b`` too. A one-character
    class (``[*]``) matches the character itself, which is DuckDB's only escape. (Commas, quotes,
    braces and spaces are literal inside a quoted string.)
    """
    return "".join(f"[{c}]" if c in "*?[" else c for c in str(path))


def view_sql(table: Table, files: list[str], root: Path | None = None, union_by_name: bool = True) -> str:
    """``SELECT`` over the given per-model Parquet files of ``table``, columns in schema order.

    ``root`` makes paths absolute (for the Python query layer); without it they stay relative
    to DIR (for catalog.duckdb, which the plain `duckdb` CLI opens from inside DIR).

    A derived table (``Table.derived_from``) is computed from its source table's files.
    """
    if table.derived_from is not None and files:
        return _derived_sql(table, view_sql(TABLES[table.derived_from], files, root, union_by_name))
    return _stored_sql(table, files, root, union_by_name)


def _derived_sql(table: Table, source: str) -> str:
    """``table``'s rows from a ``SELECT`` of its source table: ``pairs_by_token`` has each pair
    under its src token, then under its dst token, in one scan (two zipped unnests); the feature
    views rename the dictionaries' vectors rows (docs/DICTIONARIES.md)."""
    if table.name in DICTIONARY_ONLY:
        made = {"feature": "idx AS feature", "unit": "dictionary || '.F' || idx AS unit"}
        return f"SELECT {', '.join(made.get(c, c) for c in table.column_names)} FROM ({source}) WHERE dictionary IS NOT NULL"
    assert table.name == "pairs_by_token", table.name
    made = {"token_id": "unnest([src_id, dst_id]) AS token_id", "endpoint": "unnest(['src', 'dst']) AS endpoint"}
    return f"SELECT {', '.join(made.get(c, c) for c in table.column_names)} FROM ({source})"


def _stored_sql(table: Table, files: list[str], root: Path | None = None, union_by_name: bool = True) -> str:
    """``SELECT`` over Parquet files that hold ``table``'s own columns."""
    if not files:
        return empty_select_sql(table)
    paths = [duckdb_path(str(Path(root) / f) if root is not None else f) for f in files]
    quoted = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
    cols = ", ".join(c.name for c in table.columns)
    # Values of model/layer live inside the files; hive_partitioning=false stops DuckDB from
    # also deriving (string-typed) columns from the key=value directory names.
    # union_by_name tolerates files written by an older writer that lacked a nullable column, but
    # reads every file's footer when the view is bound; the query layer binds lazily (False).
    return f"SELECT {cols} FROM read_parquet([{quoted}], union_by_name={'true' if union_by_name else 'false'}, hive_partitioning=false)"


# -- dictionaries (SAEs, transcoders; indexer/dictionaries/, docs/DICTIONARIES.md) ---------------
#
# The manifest section "dictionaries" maps a dictionary's name -> {"model", "files": {table: [...]},
# "file_info", "row_counts", "build_id", "source", "origin"}, like a model's entry. Its `vectors` and
# `vectors_by_token` files join the model's own in those views (never compacted: a dictionary added
# or re-indexed after a compaction is seen at once); `features` / `features_by_token` read them alone.

# Views that read only the dictionaries' files (their own tables, and the feature views of vectors).
DICTIONARY_ONLY = ("dictionaries", "feature_stats", "feature_neighbours", "features", "features_by_token")


def dictionary_files(manifest: dict, table: str, models: list[str] | None = None) -> list[str]:
    """Relative paths of the dictionaries' committed files of ``table`` (restricted to their ``models``)."""
    return sorted(f for entry in manifest.get(DICTIONARIES, {}).values()
                  if models is None or entry.get("model") in models for f in entry.get("files", {}).get(table, []))
