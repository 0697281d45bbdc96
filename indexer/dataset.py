"""Writing a dataset directory (layout in schemas/layout.py).

Guarantees (DESIGN §5):

* every partition file is written under a temporary name and renamed into place, so a file
  that exists is complete;
* a build records its finished partitions in ``.builds/<slug>.json``; a killed build rerun
  with the same settings skips them and resumes where it stopped;
* a model becomes visible only when ``manifest.json`` is atomically replaced by one that lists
  its files; the previous build's files (re-indexing) are deleted only after that;
* one writer at a time holds ``DIR/.lock``; other models' files are never touched.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import SCHEMA_VERSION, TABLES
from schemas.layout import (
    BUILDS,
    CATALOG,
    MANIFEST,
    empty_manifest,
    partition_dir,
    read_manifest,
    table_files,
    view_sql,
    write_json_atomic,
)

from .errors import DatasetError

ZEROPASS_VERSION = "0.1.0"


def _os_error(root: Path, e: OSError) -> DatasetError:
    if e.errno == errno.ENOSPC:
        return DatasetError(f"no space left on the device holding {root}: free some space or choose another --db")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DatasetError(f"cannot write to {root} ({e.strerror}): choose a writable --db directory")
    return DatasetError(f"cannot write to {root}: {e.strerror or e}")


def check_writable(root: Path) -> None:
    """Fail early, before any work, when ``root`` cannot hold a dataset."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DatasetError(f"--db {root} is a file, not a directory: give a directory path")
    manifest = read_manifest(root) if root.is_dir() else None
    if root.exists() and any(root.iterdir()) and manifest is None and not (root / BUILDS).exists():
        raise DatasetError(f"--db {root} is a non-empty directory that is not a zeropass dataset: choose an empty or new directory")
    if manifest is not None and manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(f"--db {root} holds tables of schema version {manifest.get('schema_version')} and this zeropass "
                           f"writes version {SCHEMA_VERSION}: index into a new directory (--db NEWDIR), once per model")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise _os_error(root, e) from None


@contextmanager
def dataset_lock(root: Path):
    """Exclusive writer lock on the dataset (a second `zeropass index` waits for it)."""
    root = Path(root)
    try:
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _os_error(root, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_file_atomic(root: Path, relpath: str, write) -> None:
    """``write(tmp_path)`` writes the file; it then appears at ``root/relpath`` complete or not at all."""
    path = Path(root) / relpath
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _os_error(Path(root), e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_parquet_atomic(root: Path, relpath: str, table: pa.Table, row_group_size: int = 256 * 1024) -> None:
    """Write ``table`` to ``root/relpath`` via a temporary file and a rename."""
    write_file_atomic(root, relpath, lambda tmp: pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size))


def conform(table_name: str, data: pa.Table) -> pa.Table:
    """Order and cast ``data`` to the declared schema (dictionary-encoded strings stay encoded)."""
    declared = TABLES[table_name].schema
    cols = []
    fields = []
    for field in declared:
        if field.name not in data.column_names:
            if not field.nullable:
                raise ValueError(f"{table_name}: missing column {field.name}")
            col = pa.nulls(data.num_rows, field.type)
        else:
            col = data.column(field.name)
        if pa.types.is_dictionary(col.type) and pa.types.is_string(field.type):
            fields.append(field.with_type(col.type))  # Parquet stores it as a dictionary-encoded string
        else:
            col = col.cast(field.type)
            fields.append(field)
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=pa.schema(fields, metadata=declared.metadata))


# Row order inside a partition file. Token searches ("which neurons contain ' Paris'") filter
# vectors by token_id: sorted by it, in small row groups, DuckDB skips almost every row group by
# its min/max statistics (measured in docs/QUERY.md: `neurons` 672 ms -> 170 ms at real sizes).
# Arrow's sort is stable, so rows with the same token keep the writer's (deterministic) order.
_ROW_LAYOUT = {"vectors": (("token_id",), 16 * 1024)}

# vectors_by_token (schemas/): the model's vectors again, sorted by token across all layers. A
# token's rows then sit in one or two 16K-row groups instead of one group per layer file, which
# makes token search 3-7x faster on SmolLM2 (docs/QUERY.md). DuckDB sorts out of core within
# this memory limit, so the step stays small next to the peak of a layer.
_BY_TOKEN_ORDER = "token_id, layer NULLS FIRST, kind, head NULLS FIRST, idx, side, rank"
_BY_TOKEN_MEMORY = "512MB"


class Build:
    """One model being written. Partitions are written as they are produced; ``commit`` publishes."""

    def __init__(self, root: Path, slug: str, fingerprint: dict):
        self.root = Path(root)
        self.slug = slug
        self.fingerprint = fingerprint
        self.progress_path = self.root / BUILDS / f"{slug}.json"
        previous = self._read_progress()
        if previous and previous.get("fingerprint") == fingerprint:
            self.build_id = previous["build_id"]
            self.done: dict[str, dict] = previous["done"]
            self.resumed = True
        else:
            if previous:  # settings changed: the old unfinished build's files are garbage
                self._delete_files(f for parts in previous["done"].values() for f in [parts["file"]])
            self.build_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
            self.done = {}
            self.resumed = False
        self._sweep_tmp()
        self._save_progress()

    def key(self, table: str, **keys) -> str:
        return partition_dir(table, model=self.slug, **keys)

    def has(self, table: str, **keys) -> bool:
        return self.key(table, **keys) in self.done

    def write(self, table: str, data: pa.Table, **keys) -> None:
        """Write one partition of ``table`` (keys beyond ``model``, e.g. ``layer=3``)."""
        rel_dir = self.key(table, **keys)
        relpath = f"{rel_dir}/{self.build_id}.parquet"
        layout = _ROW_LAYOUT.get(table)
        if layout:
            data = data.sort_by([(col, "ascending") for col in layout[0]])
        write_parquet_atomic(self.root, relpath, conform(table, data), **({"row_group_size": layout[1]} if layout else {}))
        self.done[rel_dir] = {"table": table, "file": relpath, "rows": data.num_rows}
        self._save_progress()

    def write_by_token(self) -> None:
        """Write the ``vectors_by_token`` partition from this build's ``vectors`` partitions."""
        rel_dir = self.key("vectors_by_token")
        if rel_dir in self.done:
            return
        sources = sorted(p["file"] for p in self.done.values() if p["table"] == "vectors")
        relpath = f"{rel_dir}/{self.build_id}.parquet"
        if sources:
            rows = self._sort_by_token(sources, relpath)
        else:
            write_parquet_atomic(self.root, relpath, TABLES["vectors_by_token"].schema.empty_table())
            rows = 0
        self.done[rel_dir] = {"table": "vectors_by_token", "file": relpath, "rows": rows}
        self._save_progress()

    def _sort_by_token(self, sources: list[str], relpath: str) -> int:
        """DuckDB's out-of-core ``COPY ... ORDER BY`` of the ``sources`` files into ``relpath``."""
        import duckdb

        spill = self.root / BUILDS / f"{self.slug}.spill"
        q = lambda p: "'" + str(p).replace("'", "''") + "'"  # noqa: E731  (paths: ours, quoted anyway)
        files = ", ".join(q(self.root / f) for f in sources)
        cols = ", ".join(TABLES["vectors_by_token"].column_names)
        counted: list[int] = []

        def copy(tmp: Path) -> None:
            con = duckdb.connect()
            try:
                con.execute(f"SET memory_limit = '{_BY_TOKEN_MEMORY}'")
                con.execute(f"SET temp_directory = {q(spill)}")
                ((rows,),) = con.execute(
                    f"""COPY (SELECT {cols} FROM read_parquet([{files}], hive_partitioning=false) ORDER BY {_BY_TOKEN_ORDER})
                        TO {q(tmp)} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {_ROW_LAYOUT["vectors"][1]})""").fetchall()
                counted.append(int(rows))
            finally:
                con.close()

        try:
            write_file_atomic(self.root, relpath, copy)
        except duckdb.Error as e:  # DuckDB's own writes: a full disk, spilling that cannot, ...
            if "No space left" in str(e):
                raise _os_error(self.root, OSError(errno.ENOSPC, "No space left on device")) from None
            raise DatasetError(f"cannot write to {self.root}: {str(e).splitlines()[0]}") from None
        finally:
            shutil.rmtree(spill, ignore_errors=True)
        return counted[0]

    def commit(self, model_row: dict, vocab_id: str, tokens: pa.Table | None) -> dict:
        """Publish the model atomically; returns its manifest entry."""
        self.write_by_token()
        model_row = dict(model_row, model=self.slug, schema_version=SCHEMA_VERSION,
                         zeropass_version=ZEROPASS_VERSION, created_at=datetime.now(timezone.utc).replace(microsecond=0))
        self.write("models", pa.Table.from_pylist([model_row], schema=TABLES["models"].schema))
        files: dict[str, list[str]] = {}
        rows: dict[str, int] = {}
        for part in self.done.values():
            files.setdefault(part["table"], []).append(part["file"])
            rows[part["table"]] = rows.get(part["table"], 0) + part["rows"]
        manifest = read_manifest(self.root) or empty_manifest()
        if tokens is not None and vocab_id not in manifest["vocabularies"]:
            rel = f"{partition_dir('tokens', vocab_id=vocab_id)}/{vocab_id}.parquet"
            write_parquet_atomic(self.root, rel, conform("tokens", tokens))
            manifest["vocabularies"][vocab_id] = {"files": [rel], "d_vocab": tokens.num_rows}
        old = manifest["models"].get(self.slug)
        entry = {
            "build_id": self.build_id,
            "files": {t: sorted(f) for t, f in sorted(files.items())},
            "row_counts": dict(sorted(rows.items())),
            "committed_at": model_row["created_at"].isoformat(),
            "source": model_row.get("source"),
            "variant": model_row.get("variant"),
            "vocab_id": vocab_id,
        }
        manifest["models"][self.slug] = entry
        manifest["schema_version"] = SCHEMA_VERSION
        manifest["zeropass_version"] = ZEROPASS_VERSION
        try:
            write_json_atomic(self.root / MANIFEST, manifest)  # the commit point
        except OSError as e:
            raise _os_error(self.root, e) from None
        write_catalog(self.root, manifest)
        if old:
            new_files = {f for fs in entry["files"].values() for f in fs}
            self._delete_files(f for fs in old["files"].values() for f in fs if f not in new_files)
        self.progress_path.unlink(missing_ok=True)
        return entry

    # -- internals -------------------------------------------------------------------------

    def _read_progress(self) -> dict | None:
        if not self.progress_path.exists():
            return None
        try:
            return json.loads(self.progress_path.read_text())
        except ValueError:  # torn by a crash mid-write cannot happen (atomic), but be safe
            return None

    def _save_progress(self) -> None:
        try:
            self.progress_path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.progress_path, {"build_id": self.build_id, "fingerprint": self.fingerprint, "done": self.done})
        except OSError as e:
            raise _os_error(self.root, e) from None

    def _sweep_tmp(self) -> None:
        """Remove temporary files a killed build left behind in this model's partitions."""
        for table in TABLES:
            base = self.root / partition_dir(table, model=self.slug)
            if base.exists():
                for tmp in base.rglob("*.tmp"):
                    tmp.unlink(missing_ok=True)

    def _delete_files(self, relpaths) -> None:
        for rel in relpaths:
            path = self.root / rel
            path.unlink(missing_ok=True)
            parent = path.parent
            while parent != self.root and parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent


def store_alignment(root: Path, model_a: str, model_b: str, table: pa.Table) -> str:
    """Publish the alignment of two models (replacing an earlier one of the same pair)."""
    root = Path(root)
    check_writable(root)
    with dataset_lock(root):
        rel = f"{partition_dir('alignments', model_a=model_a, model_b=model_b)}/{uuid.uuid4().hex[:12]}.parquet"
        write_parquet_atomic(root, rel, conform("alignments", table))
        manifest = read_manifest(root) or empty_manifest()
        alignments = manifest.setdefault("alignments", {})
        old = alignments.get(f"{model_a}|{model_b}", {}).get("files", [])
        alignments[f"{model_a}|{model_b}"] = {"files": [rel], "rows": table.num_rows}
        try:
            write_json_atomic(root / MANIFEST, manifest)
        except OSError as e:
            raise _os_error(root, e) from None
        write_catalog(root, manifest)
        for f in old:
            (root / f).unlink(missing_ok=True)
    return rel


def remove_model(root: Path, slug: str) -> None:
    """Unpublish ``slug`` and delete its files (other models untouched)."""
    root = Path(root)
    manifest = read_manifest(root)
    if not manifest or slug not in manifest["models"]:
        return
    old = manifest["models"].pop(slug)
    write_json_atomic(root / MANIFEST, manifest)
    write_catalog(root, manifest)
    for fs in old["files"].values():
        for rel in fs:
            (root / rel).unlink(missing_ok=True)
    for table in TABLES:
        shutil.rmtree(root / partition_dir(table, model=slug), ignore_errors=True)


def write_catalog(root: Path, manifest: dict) -> None:
    """Rebuild catalog.duckdb: one view per table over the committed files (relative paths).

    DuckDB resolves relative paths against the working directory, so the catalog is used from
    inside the dataset: ``cd DIR && duckdb catalog.duckdb`` (documented in the README).
    """
    import duckdb

    root = Path(root)
    tmp = root / f"{CATALOG}.tmp{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        con = duckdb.connect(str(tmp))
        try:
            con.execute(f"SET file_search_path = '{str(root.resolve()).replace(chr(39), chr(39) * 2)}'")
            for name, table in TABLES.items():
                con.execute(f"CREATE VIEW {name} AS {view_sql(table, table_files(manifest, name))}")
        finally:
            con.close()
        os.replace(tmp, root / CATALOG)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _os_error(root, e) from None
