"""`zeropass compact`: fold the per-model files of each table into one file across models.

Why: a helper over N models otherwise opens N x (files per model) small Parquet files, and
DuckDB pays per file and per scan (docs/QUERY.md "Many models"). After compaction a table is
one file, sorted for the queries that read it (``schemas.layout.COMPACTED_ORDER``: token first
where the helpers search by token), plus the files of models committed since.

Guarantees (docs/DATASET.md "Compaction"):

* the compacted files are written under new names while the dataset lock is held, then one
  :func:`indexer.dataset.commit` lists them in the manifest's ``compacted`` section (the
  commit point) and deletes the compacted files they replace. A kill at any point before the
  manifest's rename leaves the dataset as it was; the unlisted files it wrote are leftovers that
  the next commit (or `zeropass check --repair`) deletes. Rerunning the command starts over.
* the compacted files are built from the per-model files, which stay listed and on disk: they
  are the truth. A damaged compacted file is repaired by running `zeropass compact` again; a
  re-indexed model is read from its new files at once (the compacted copy of its old build is
  skipped by build id), and commits never rewrite a compacted file, so a commit's cost does not
  grow with the dataset.

No torch here.
"""
from __future__ import annotations

import uuid
from pathlib import Path

from schemas import TABLES
from schemas.layout import COMPACTED_ORDER, Sources, sources_sql, table_sources

from .dataset import _duckdb_error, commit, dataset_lock, open_dataset, sorted_copy
from .errors import DatasetError


def compact(root: str | Path, progress=None) -> dict:
    """Compact the dataset at ``root``; returns the manifest's new ``compacted`` section.

    A dataset with fewer than two models is left as it is (nothing to fold).
    """
    import duckdb

    root = Path(root)
    say = progress or (lambda _m: None)
    with dataset_lock(root):  # re-entrant: commit below takes it again; no commit can slip in between
        manifest = open_dataset(root)
        if manifest is None:
            raise DatasetError(f"{root} holds no dataset yet: index a model first with `zeropass index MODEL --db {root}`")
        models = {s: e.get("build_id") for s, e in manifest["models"].items()}
        section: dict = {}
        if len(models) >= 2:
            run = uuid.uuid4().hex[:12]
            for table in COMPACTED_ORDER:
                src = table_sources(manifest, table, use_compacted=False, dictionaries=False)  # dictionaries stay apart
                if not src.files:
                    continue
                rel = f"{table}/compacted/{run}.parquet"
                rows, digest = _write(root, table, src, rel)
                section[table] = {"files": [rel], "models": dict(sorted(models.items())),
                                  "file_info": {rel: dict(digest, rows=rows)}}
                say(f"compacted {table}: {len(src.files)} files -> 1 ({rows} rows)")

        def change(m: dict) -> list[str]:
            old = m.get("compacted", {})
            m["compacted"] = section
            return [f for entry in old.values() for f in entry.get("files", [])]

        try:
            commit(root, change)
        except duckdb.Error as e:
            raise _duckdb_error(root, e) from None
    return section


def _write(root: Path, table: str, src: Sources, rel: str) -> tuple[int, dict]:
    """DuckDB's out-of-core ``COPY ... ORDER BY`` of ``src`` into ``root/rel`` (atomic)."""
    return sorted_copy(root, rel, sources_sql(TABLES[table], src, root, union_by_name=True), COMPACTED_ORDER[table],
                       root / (rel + ".tmp.spill"))


