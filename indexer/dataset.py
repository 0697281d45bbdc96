"""Writing a dataset directory (layout in schemas/layout.py). No torch here: ``zeropass check``
uses this module with the query extra only.

Guarantees (docs/DESIGN.md §5, docs/DATASET.md "Failure handling"):

* every partition file is written under a temporary name, fsynced and renamed into place, so a
  file that exists is complete; its size and sha256 are recorded (progress file, then manifest);
* a build records its finished partitions, and each finished layer, in ``.builds/<slug>.json``;
  a killed build rerun with the same settings skips them and resumes where it stopped;
* every change of the manifest goes through one path, :func:`commit`: under the dataset
  lock, write the new catalog to a temporary file, write the new manifest (the commit point),
  rename the catalog into place, then delete superseded files and leftovers. A failure before
  the manifest rename leaves manifest and catalog byte-identical. Readers therefore see, in
  this order: new files appear, the manifest switches, old files disappear;
* one writer at a time holds ``DIR/.lock`` (re-entrant within a thread); other models' files
  are never touched;
* a directory is only written when it is empty, new or a dataset with a readable manifest.
"""
from __future__ import annotations

import copy
import errno
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import SCHEMA_VERSION, TABLES
from schemas.layout import (
    BUILDS,
    CATALOG,
    MANIFEST,
    BadManifest,
    empty_manifest,
    manifest_files,
    partition_dir,
    read_manifest,
    sources_sql,
    table_sources,
)
from schemas.format import (
    OtherVersion,
    check_version,
    file_digest,
    first_line,
    temporary_name,
    validate_manifest,
    write_atomic,
    write_json_atomic,
)

from .errors import DatasetError, NameTaken, NotADatasetDir
from .profile import phase

ZEROPASS_VERSION = "0.1.0"
LOCK = ".lock"

# Names a zeropass writer puts in DIR (besides the table directories): a directory holding any
# of them but no manifest is a dataset whose manifest was lost, not a stranger's directory.
_OURS = {MANIFEST, CATALOG, BUILDS}
# Entries that do not make a directory "non-empty": the lock, a concurrent writer's probe, and
# the temporary manifest/catalog of a first writer that is creating the dataset right now.
_TRANSIENT = re.compile(r"^(\.lock|\.probe\d+|(manifest\.json|catalog\.duckdb)\.tmp.*)$")
# Temporary names of our writers, where they write them: "<table>/.../x.parquet.tmp",
# "manifest.json.tmp123-abcd1234", "catalog.duckdb.tmp123-abcd1234", ".builds/m.json.tmp123-ab".
_TMP = re.compile(r"\.tmp(\d+(-[0-9a-f]+)?)?$")
_ROOT_TMP = re.compile(r"^(manifest\.json|catalog\.duckdb)\.tmp\d+-[0-9a-f]+(\.wal)?$")


def zeropass_command(*args: object) -> str:
    """A shell command line a user can paste: ``zeropass index ./a,b --db 'my db'``.

    A value starting with ``-`` (a relative path) gets ``./`` so that it cannot read as an option;
    only ``--long-option`` words are passed as options.
    """
    words = ["zeropass"]
    for a in args:
        a = str(a)
        if a.startswith("-") and not re.fullmatch(r"--[a-z][a-z-]*", a):  # our options are all long
            a = "./" + a
        words.append(shlex.quote(a))
    return " ".join(words)


def _os_error(root: Path, e: OSError) -> DatasetError:
    if e.errno == errno.ENOSPC:
        return DatasetError(f"no space left on the device holding {root}: free some space or choose another --db")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DatasetError(f"cannot write to {root} ({e.strerror}): choose a writable --db directory")
    return DatasetError(f"cannot write to {root}: {e.strerror or e}")


def _duckdb_error(root: Path, e: Exception) -> DatasetError:
    """DuckDB's own writes (catalog, sorted copy) fail with its exception types, not OSError."""
    if "No space left" in str(e):
        return _os_error(root, OSError(errno.ENOSPC, "No space left on device"))
    return DatasetError(f"cannot write to {root}: {first_line(e)}")


# -- is this directory a dataset we may write? -----------------------------------------------

def open_dataset(root: Path) -> dict | None:
    """The manifest of ``root`` for writing: None when ``root`` is new or empty.

    Raises NotADatasetDir (nothing written) for a directory with files but no manifest, one
    with a malformed manifest, or one of another schema version.
    """
    root = Path(root)
    db = zeropass_command("check", "--db", root, "--recover")
    try:
        manifest = read_manifest(root)
    except BadManifest as e:
        raise NotADatasetDir(f"{e}: rebuild it from the dataset's files with `{db}`") from None
    if manifest is None:
        state = directory_state(root)
        if state == "ours":
            raise NotADatasetDir(f"--db {root} holds zeropass data but no {MANIFEST} (lost or never committed): "
                                 f"rebuild the manifest from the files with `{db}`, then rerun")
        if state == "foreign":
            raise NotADatasetDir(f"--db {root} is a non-empty directory that is not a zeropass dataset: "
                                 f"choose an empty or new directory")
        return None
    try:
        check_version(manifest, f"--db {root}")
    except OtherVersion as e:
        raise NotADatasetDir(str(e)) from None
    return manifest


def directory_state(root: Path) -> str:
    """Without looking at the manifest: ``empty`` (or missing), ``ours`` (zeropass entries:
    table directories, ``.builds``, a catalog) or ``foreign`` (only other things)."""
    root = Path(root)
    entries = [p.name for p in root.iterdir() if not _TRANSIENT.match(p.name)] if root.is_dir() else []
    if any(name in _OURS or name in TABLES or name.startswith(MANIFEST) for name in entries):
        return "ours"
    return "foreign" if entries else "empty"


def check_writable(root: Path) -> None:
    """Fail early, before any work, when ``root`` cannot hold a dataset."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DatasetError(f"--db {root} is a file, not a directory: give a directory path")
    outer = enclosing_dataset(root)
    if outer is not None:
        raise DatasetError(f"--db {root} is inside the dataset {outer}: a dataset cannot hold another (its "
                           f"`check --repair` would delete the inner one's files); choose a directory outside it")
    if root.is_dir():
        open_dataset(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink(missing_ok=True)  # a writer's clean-up may have taken it already
    except OSError as e:
        raise _os_error(root, e) from None


def enclosing_dataset(path: Path) -> Path | None:
    """The dataset directory that ``path`` lies strictly inside (a parent holding a manifest), or None.

    ``DIR/.builds/`` is the exception: `index-many --ray` stages its shard datasets there, and
    leftovers never reach inside it (the writer's own progress records and spill live there)."""
    real = Path(os.path.realpath(path))
    for parent in real.parents:
        if (parent / BUILDS) in (real, *real.parents):
            return None
        if (parent / MANIFEST).is_file() and any((parent / t).is_dir() for t in (*TABLES, BUILDS)) \
                or (parent / MANIFEST).is_file() and (parent / CATALOG).is_file():
            return parent
    return None


_held = threading.local()


@contextmanager
def dataset_lock(root: Path):
    """Exclusive writer lock on the dataset (a second writer waits for it).

    Re-entrant within a thread: ``Build.commit`` publishes inside ``index_canonical``'s lock.
    (flock conflicts between two descriptors even in one process, so a nested plain acquire
    would deadlock.)
    """
    root = Path(root)
    key = os.path.realpath(root)
    held = getattr(_held, "roots", None)
    if held is None:
        held = _held.roots = {}
    if key in held:
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _os_error(root, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held[key] = 1
        try:
            yield
        finally:
            del held[key]
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def writer_active(root: Path) -> bool:
    """Whether another process holds the dataset lock now (checking without waiting, writing nothing)."""
    try:
        fd = os.open(Path(root) / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


# -- files ---------------------------------------------------------------------------------

def write_file_atomic(root: Path, relpath: str, write) -> dict:
    """``write(tmp_path)`` writes the file; it then appears at ``root/relpath`` complete or not at all.

    Returns its ``file_digest`` (hashed from the page cache right after the write). The
    temporary name is ``<file>.tmp`` (the writer holds the lock; a resumed build sweeps them).
    """
    path = Path(root) / relpath

    def write_and_hash(tmp: Path) -> dict:
        write(tmp)
        return file_digest(tmp)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, write_and_hash, tmp=path.with_name(path.name + ".tmp"))
    except OSError as e:
        raise _os_error(Path(root), e) from None


def write_parquet_atomic(root: Path, relpath: str, table: pa.Table, row_group_size: int = 256 * 1024) -> dict:
    """Write ``table`` to ``root/relpath`` via a temporary file and a rename; returns its digest."""
    return write_file_atomic(root, relpath, lambda tmp: pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size))


def parquet_rows(path: Path) -> int:
    """Rows of a Parquet file from its footer; raises OSError/ArrowException when it is damaged."""
    return pq.ParquetFile(path).metadata.num_rows


# Dictionary-encoded string columns with at most this many distinct texts are written as they are.
# Parquet's writer copies an Arrow dictionary whole into every row group: the vocabulary's texts
# (49152 for SmolLM2) in each 16K-row group of `vectors` were 60 % of the file. Larger dictionaries
# are decoded, and the writer builds each row group's own dictionary of the texts it holds:
# SmolLM2's layer file 16.6 -> 6.8 MB, written in 0.17 s instead of 0.41 s, and `token = 'the'`
# over it 7.7x faster (docs/BENCHMARKS.md §11, third round).
_DIRECT_DICTIONARY = 256


def conform(table_name: str, data: pa.Table) -> pa.Table:
    """Order and cast ``data`` to the declared schema (dictionary-encoded strings with a small
    dictionary stay encoded, `_DIRECT_DICTIONARY`)."""
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
        if (pa.types.is_dictionary(col.type) and pa.types.is_string(field.type)
                and max((len(chunk.dictionary) for chunk in col.chunks), default=0) <= _DIRECT_DICTIONARY):
            fields.append(field.with_type(col.type))  # Parquet stores it as a dictionary-encoded string
        else:
            col = col.cast(field.type)
            fields.append(field)
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=pa.schema(fields, metadata=declared.metadata))


# -- the one commit path -------------------------------------------------------------------

Change = Callable[[dict], Iterable[str]]


def commit(root: Path, change: Change) -> dict:
    """Apply ``change`` to the manifest and commit it; returns the new manifest.

    ``change(manifest)`` edits the manifest in place (it may write new files first) and returns
    the relative paths it superseded. Under the dataset lock: the catalog is written to a
    temporary file, then the manifest is replaced (the commit point), then the catalog is
    renamed into place, then superseded files and leftovers (:func:`leftovers`) are deleted. A
    failure before the manifest's rename raises DatasetError and leaves the published dataset
    (manifest, catalog, files) exactly as it was.
    """
    root = Path(root)
    with dataset_lock(root):
        before = open_dataset(root)
        manifest = copy.deepcopy(before) if before else empty_manifest()
        superseded = list(change(manifest) or [])
        try:  # the writer's own output passes the readers' validator, or nothing is committed
            validate_manifest(manifest, root / MANIFEST)
        except BadManifest as e:
            raise DatasetError(f"refusing to commit to {root}: {e.why}") from None
        manifest["schema_version"] = SCHEMA_VERSION
        manifest["zeropass_version"] = ZEROPASS_VERSION
        catalog_tmp = _write_catalog_tmp(root, manifest)  # one-line errors; removes itself on failure
        try:
            write_json_atomic(root / MANIFEST, manifest)  # the commit point
        except BaseException as e:
            _unlink_catalog_tmp(catalog_tmp)
            if isinstance(e, OSError) and not isinstance(e, DatasetError):
                raise _os_error(root, e) from None
            raise
        try:
            os.replace(catalog_tmp, root / CATALOG)
        except OSError as e:
            _unlink_catalog_tmp(catalog_tmp)
            raise DatasetError(f"the manifest of {root} was updated but its catalog could not be replaced "
                               f"({e.strerror}): repair it with `{zeropass_command('check', '--db', root, '--repair')}`") from None
        listed = manifest_files(manifest)
        delete_files(root, (f for f in superseded if f not in listed))
        delete_files(root, leftovers(root, manifest))
        return manifest


def _unlink_catalog_tmp(tmp: Path | None) -> None:
    if tmp is not None:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)


def write_catalog(root: Path, manifest: dict) -> None:
    """Rewrite catalog.duckdb for ``manifest`` (used by `zeropass check --repair`; the writer uses commit)."""
    root = Path(root)
    tmp = _write_catalog_tmp(root, manifest)
    try:
        os.replace(tmp, root / CATALOG)
    except OSError as e:
        _unlink_catalog_tmp(tmp)
        raise _os_error(root, e) from None


def catalog_digest(manifest: dict) -> str:
    """What the catalog's views read, in 16 hex digits; stored as each view's comment, so that
    `zeropass check` can tell a stale catalog from a current one without reading the data."""
    # Without compaction the digest is that of the plain file lists (catalogs written before stay current).
    srcs = {name: table_sources(manifest, name) for name in TABLES}
    files = {name: (s.files if not s.compacted else s) for name, s in srcs.items()}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def catalog_comment(manifest: dict) -> str:
    return f"zeropass view over the files of manifest.json (digest {catalog_digest(manifest)})"


def _write_catalog_tmp(root: Path, manifest: dict) -> Path:
    """Write the views of ``manifest`` to a temporary catalog file beside catalog.duckdb; on
    failure nothing is left and the error is one line (DatasetError).

    DuckDB binds a view when it is created, which checks every listed path and reads the files'
    footers. The views are bound through a private temporary directory, so that the dataset's own
    path, which may hold commas, quotes, brackets or ``*`` (``file_search_path`` is a
    comma-separated list), never reaches DuckDB: first through one link to the dataset itself
    (cost: a stat and a footer per file, no directory tree per commit, so a commit stays cheap in a
    dataset of hundreds of models); a table whose files cannot be bound that way (a damaged or
    missing file) is bound instead against a stand-in tree, where each listed path is a link to an
    empty file of the table's declared schema. So a damaged file of one model cannot stop the
    catalog from being written (damage stays with its model, and `zeropass check` reports it).
    The stored views keep the manifest's relative paths; the plain `duckdb` CLI resolves them
    from inside DIR.
    """
    import duckdb

    tmp = Path(temporary_name(str(root / CATALOG)))
    stand_in = Path(tempfile.mkdtemp(prefix="zeropass-catalog-"))
    try:
        if re.search(r"[,*?\[\]'#%]", str(stand_in)):
            raise DatasetError(f"the temporary directory {stand_in} has a character DuckDB cannot take in a path: "
                               f"set TMPDIR to a plain path")
        (stand_in / "real").symlink_to(Path(root).resolve(), target_is_directory=True)
        # Built in the stand-in directory too: duckdb.connect reads "?" in a path as the start
        # of URL options. Then copied beside catalog.duckdb, so that the rename is atomic.
        built = stand_in / CATALOG
        con = duckdb.connect(str(built))
        try:
            comment = catalog_comment(manifest).replace("'", "''")
            for name, table in TABLES.items():
                src = table_sources(manifest, name)
                sql = f"CREATE VIEW {name} AS {sources_sql(table, src)}"
                con.execute(f"SET file_search_path = '{stand_in / 'real'}'")
                try:
                    con.execute(sql)
                except duckdb.Error:
                    con.execute(f"SET file_search_path = '{_stand_in_tree(stand_in, name, src.compacted + src.files)}'")
                    con.execute(sql)
                con.execute(f"COMMENT ON VIEW {name} IS '{comment}'")
            # An explicit checkpoint fails loudly on a full disk; a plain close() does not,
            # and leaves the views only in a .wal file that a copy would leave behind.
            con.execute("CHECKPOINT")
        finally:
            con.close()
        if built.with_name(built.name + ".wal").exists():
            raise DatasetError(f"cannot write the catalog of {root}: DuckDB left its write-ahead log unmerged")
        with open(built, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        return tmp
    except BaseException as e:
        _unlink_catalog_tmp(tmp)
        if isinstance(e, OSError) and not isinstance(e, DatasetError):
            raise _os_error(root, e) from None
        if isinstance(e, duckdb.Error):
            raise _duckdb_error(root, e) from None
        raise
    finally:
        shutil.rmtree(stand_in, ignore_errors=True)


def _stand_in_tree(stand_in: Path, table: str, files: list[str]) -> Path:
    """A directory where each of ``files`` is a link to an empty file of ``table``'s schema."""
    tree = stand_in / f"tree-{table}"
    empty = stand_in / f"{table}.empty.parquet"
    pq.write_table(TABLES[table].schema.empty_table(), empty)
    for rel in files:
        link = tree / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(empty)
    tree.mkdir(exist_ok=True)
    return tree


# -- leftovers -----------------------------------------------------------------------------

def _progress_records(root: Path) -> dict[Path, dict | None]:
    """``.builds/*.json`` -> its content (None when unreadable)."""
    out: dict[Path, dict | None] = {}
    builds = Path(root) / BUILDS
    if builds.is_dir():
        for p in sorted(builds.glob("*.json")):
            try:
                rec = json.loads(p.read_text())
                out[p] = rec if isinstance(rec, dict) and isinstance(rec.get("done"), dict) else None
            except (OSError, ValueError):
                out[p] = None
    return out


def unfinished_builds(root: Path, manifest: dict) -> dict[str, dict]:
    """Resumable builds: slug -> progress record (a build already committed is not one)."""
    out = {}
    for path, rec in _progress_records(root).items():
        slug = path.stem
        committed = manifest.get("models", {}).get(slug, {}).get("build_id")
        if rec is not None and rec.get("build_id") != committed:
            out[slug] = rec
    return out


def leftovers(root: Path, manifest: dict) -> list[Path]:
    """Files and directories no published model and no resumable build needs.

    Temporary files of killed writers (``*.tmp*``, catalog ``.wal``), DuckDB spill directories,
    Parquet files in the table directories that neither the manifest nor a resumable build
    (``.builds/<slug>.json``) lists (a superseded build that a kill stopped from deleting), and
    progress files that are unreadable or whose build is already committed. Only called with
    the dataset lock held, or to report: while the lock is held no writer is mid-file.
    """
    root = Path(root)
    out: list[Path] = []
    keep = set(manifest_files(manifest))
    unfinished = unfinished_builds(root, manifest)
    for rec in unfinished.values():
        keep.update(part.get("file") for part in rec["done"].values() if isinstance(part, dict))
    for path, rec in _progress_records(root).items():
        if path.stem not in unfinished:
            out.append(path)
    builds = root / BUILDS
    if builds.is_dir():
        out += [p for p in sorted(builds.iterdir())
                if p.name.endswith(".spill") or (".json.tmp" in p.name and _TMP.search(p.name))]
    out += [p for p in sorted(root.iterdir()) if _ROOT_TMP.match(p.name)]
    for name in TABLES:
        base = root / name
        if not base.is_dir():
            continue
        for p in sorted(base.rglob("*")):
            if p.is_file() and (p.name.endswith(".parquet.tmp") or (p.suffix == ".parquet" and p.relative_to(root).as_posix() not in keep)):
                out.append(p)
    return out


def delete_files(root: Path, paths: Iterable) -> None:
    """Delete files (relative to ``root`` or absolute inside it) and the directories they empty."""
    root = Path(root)
    for p in paths:
        path = p if isinstance(p, Path) and p.is_absolute() else root / p
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        parent = path.parent
        while parent != root and root in parent.parents and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


# -- sources -------------------------------------------------------------------------------

_HUB_CACHE = re.compile(r"/models--([^/]+?)--([^/]+)/snapshots/[^/]+")


def origin_of(provenance) -> str | None:
    """Where a checkpoint comes from, independent of how it was typed: a hub id (``org/x``,
    also when read from the local hub cache) or an absolute path. Two models with the same
    origin are the same checkpoint for the name-collision rule; a diff is ``TUNED - BASE``.

    ``provenance`` is an ``indexer.load.Provenance`` (read by attribute, so this module needs no
    torch); ``with_base=False`` gives the checkpoint's own origin, without a diff's base."""
    return _origin(provenance, with_base=True)


def _origin(prov, *, with_base: bool) -> str | None:
    path = getattr(prov, "path", None)
    if not path:
        mine = str(prov.source) if getattr(prov, "source", None) else None
    else:
        m = _HUB_CACHE.search(str(path))
        mine = f"{m.group(1)}/{m.group(2)}" if m else str(path)
    base = getattr(prov, "base", None)
    if with_base and base is not None:
        return f"{mine} - {_origin(base, with_base=False)}"
    return mine


def checkpoint_origin(provenance) -> str | None:
    """The origin of the checkpoint itself (a diff's tuned model, without its base)."""
    return _origin(provenance, with_base=False)


# -- a model being written -----------------------------------------------------------------

# Row order inside a partition file. Token searches ("which neurons contain ' Paris'") filter
# vectors by token_id: sorted by it, in small row groups, DuckDB skips almost every row group by
# its min/max statistics (measured in docs/QUERY.md: `neurons` 672 ms -> 170 ms at real sizes).
# Arrow's sort is stable, so rows with the same token keep the writer's (deterministic) order.
_ROW_LAYOUT = {"vectors": (("token_id",), 16 * 1024)}

# vectors_by_token (schemas/): the model's vectors again, sorted by token across all layers. A
# token's rows then sit in one or two 16K-row groups instead of one group per layer file, which
# makes token search 3-7x faster on SmolLM2 (docs/QUERY.md). DuckDB sorts out of core within
# this memory limit, so the step stays small next to the peak of a layer.
_BY_TOKEN_ORDER = "token_id, layer NULLS FIRST, kind, head NULLS FIRST, expert NULLS FIRST, idx, side, rank"  # expert: MoE (issue 12)
_BY_TOKEN_MEMORY = "512MB"


class Build:
    """One model being written. Partitions are written as they are produced; ``commit`` publishes.

    Create it with the dataset lock held (``index_canonical`` holds it for the whole build).
    ``origin`` (see :func:`origin_of`) identifies the checkpoint: a published model of the same
    name from another origin is not replaced unless ``replace``.
    """

    def __init__(self, root: Path, slug: str, fingerprint: dict, *, origin: str | None = None, replace: bool = False):
        self.root = Path(root)
        self.slug = slug
        self.fingerprint = fingerprint
        self.origin = origin
        self.removed_dictionaries: list[str] = []  # set by commit: the model's dictionaries a new checkpoint made stale
        manifest = open_dataset(self.root)
        if manifest is None:  # a new dataset: its (empty) manifest comes first, see open_dataset
            manifest = commit(self.root, lambda m: [])
        old = manifest["models"].get(slug)
        if old and origin is not None and old.get("origin") not in (None, origin) and not replace:
            was = old["origin"]
            raise NameTaken(f"a model named {slug!r} indexed from {was} is already in {self.root}, and {origin} is "
                            f"another checkpoint: choose another name with --name NAME, or replace it with --replace")
        self.progress_path = self.root / BUILDS / f"{slug}.json"
        previous = self._read_progress()
        if previous and previous.get("fingerprint") == fingerprint:
            self.build_id = previous["build_id"]
            self.done: dict[str, dict] = self._intact(previous["done"])
            layers = previous.get("layers_done", {})
            # a layer stays complete only while every partition it recorded is still intact
            self.layers_done: dict[str, list[str]] = {
                l: parts for l, parts in layers.items() if all(p in self.done for p in parts)}
            self.resumed = True
        else:
            if previous:  # settings changed: the old unfinished build's files are garbage
                delete_files(self.root, (p["file"] for p in previous["done"].values()))
            self.build_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
            self.done = {}
            self.layers_done = {}
            self.resumed = False
        self._sweep_tmp()
        self._save_progress()

    def key(self, table: str, **keys) -> str:
        return partition_dir(table, model=self.slug, **keys)

    def has(self, table: str, **keys) -> bool:
        return self.key(table, **keys) in self.done

    def layer_done(self, layer: int) -> bool:
        """Whether every partition of ``layer`` was written (recorded by ``mark_layer_done``)."""
        return str(layer) in self.layers_done

    def mark_layer_done(self, layer: int, tables: Iterable[str]) -> None:
        """Record that ``layer``'s partitions of ``tables`` are all written: the explicit
        completion record a resumed build trusts (not the presence of one of the files)."""
        parts = [self.key(t, layer=layer) for t in tables]
        missing = [p for p in parts if p not in self.done]
        if missing:
            raise RuntimeError(f"layer {layer} marked complete without {missing}")  # a writer bug, not user input
        self.layers_done[str(layer)] = parts
        self._save_progress()

    def write(self, table: str, data: pa.Table, **keys) -> None:
        """Write one partition of ``table`` (keys beyond ``model``, e.g. ``layer=3``)."""
        with phase("parquet writes"):
            self._write(table, data, **keys)

    def _write(self, table: str, data: pa.Table, **keys) -> None:
        rel_dir = self.key(table, **keys)
        relpath = f"{rel_dir}/{self.build_id}.parquet"
        layout = _ROW_LAYOUT.get(table)
        if layout:
            data = data.sort_by([(col, "ascending") for col in layout[0]])
        digest = write_parquet_atomic(self.root, relpath, conform(table, data), **({"row_group_size": layout[1]} if layout else {}))
        self.done[rel_dir] = {"table": table, "file": relpath, "rows": data.num_rows, **digest}
        self._save_progress()

    def write_by_token(self) -> None:
        """Write the ``vectors_by_token`` partition from this build's ``vectors`` partitions."""
        with phase("by-token sort"):
            self._write_by_token()

    def _write_by_token(self) -> None:
        rel_dir = self.key("vectors_by_token")
        if rel_dir in self.done:
            return
        sources = sorted(p["file"] for p in self.done.values() if p["table"] == "vectors")
        relpath = f"{rel_dir}/{self.build_id}.parquet"
        if sources:
            rows, digest = self._sort_by_token(sources, relpath)
        else:
            digest = write_parquet_atomic(self.root, relpath, TABLES["vectors_by_token"].schema.empty_table())
            rows = 0
        self.done[rel_dir] = {"table": "vectors_by_token", "file": relpath, "rows": rows, **digest}
        self._save_progress()

    def _sort_by_token(self, sources: list[str], relpath: str) -> tuple[int, dict]:
        return sort_by_token(self.root, self.slug, sources, relpath)

    def commit(self, model_row: dict, vocab_id: str, tokens: pa.Table | None, rebuild_args: list[str] | None = None) -> dict:
        """Publish the model atomically; returns its manifest entry.

        ``rebuild_args`` is the `zeropass` command line (without ``--db``) that rebuilds this
        model; `zeropass check` prints it as the repair of a damaged model.
        """
        with phase("commit"):
            return self._commit(model_row, vocab_id, tokens, rebuild_args)

    def _commit(self, model_row: dict, vocab_id: str, tokens: pa.Table | None, rebuild_args: list[str] | None) -> dict:
        self.write_by_token()
        model_row = dict(model_row, model=self.slug, schema_version=SCHEMA_VERSION,
                         zeropass_version=ZEROPASS_VERSION, created_at=datetime.now(timezone.utc).replace(microsecond=0))
        self.write("models", pa.Table.from_pylist([model_row], schema=TABLES["models"].schema))
        files: dict[str, list[str]] = {}
        rows: dict[str, int] = {}
        info: dict[str, dict] = {}
        for part in self.done.values():
            files.setdefault(part["table"], []).append(part["file"])
            rows[part["table"]] = rows.get(part["table"], 0) + part["rows"]
            digest = {k: part[k] for k in ("bytes", "sha256") if k in part} or file_digest(self.root / part["file"])
            info[part["file"]] = dict(digest, rows=part["rows"])
        entry = {
            "build_id": self.build_id,
            "files": {t: sorted(f) for t, f in sorted(files.items())},
            "file_info": dict(sorted(info.items())),
            "row_counts": dict(sorted(rows.items())),
            "committed_at": model_row["created_at"].isoformat(),
            "source": model_row.get("source"),
            "origin": self.origin,
            "rebuild": rebuild_args,
            "variant": model_row.get("variant"),
            "vocab_id": vocab_id,
        }

        def change(manifest: dict) -> list[str]:
            vocab = manifest["vocabularies"].get(vocab_id)
            if tokens is not None and (vocab is None or vocabulary_damage(self.root, vocab)):
                # new, or damaged since it was written (a later model sharing it repairs it)
                rel = f"{partition_dir('tokens', vocab_id=vocab_id)}/{vocab_id}.parquet"
                digest = write_parquet_atomic(self.root, rel, conform("tokens", tokens))
                manifest["vocabularies"][vocab_id] = {"files": [rel], "d_vocab": tokens.num_rows,
                                                      "file_info": {rel: dict(digest, rows=tokens.num_rows)}}
            old = manifest["models"].get(self.slug)
            manifest["models"][self.slug] = entry
            superseded = [f for fs in (old or {}).get("files", {}).values() for f in fs]
            # Dictionaries were projected through the old weights (W_U, W_E, W_O/W_V, the FF values of
            # their neighbours): another checkpoint makes them wrong, so they go in this same commit.
            self.removed_dictionaries = [] if old is None or _same_projection(self.root, old, entry, model_row) else \
                sorted(n for n, d in manifest.get("dictionaries", {}).items() if d.get("model") == self.slug)
            for name in self.removed_dictionaries:
                gone = manifest["dictionaries"].pop(name)
                superseded += [f for fs in gone.get("files", {}).values() for f in fs]
            return superseded

        commit(self.root, change)
        self.progress_path.unlink(missing_ok=True)
        return entry

    # -- internals -------------------------------------------------------------------------

    def _intact(self, done: dict) -> dict:
        """The recorded partitions whose file is still there with its recorded size."""
        out = {}
        for rel_dir, part in done.items():
            path = self.root / part["file"]
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if part.get("bytes", size) == size:
                out[rel_dir] = part
        return out

    def _read_progress(self) -> dict | None:
        if not self.progress_path.exists():
            return None
        try:
            rec = json.loads(self.progress_path.read_text())
        except (OSError, ValueError):  # torn by a crash mid-write cannot happen (atomic), but be safe
            return None
        return rec if isinstance(rec, dict) and isinstance(rec.get("done"), dict) and rec.get("build_id") else None

    def _save_progress(self) -> None:
        try:
            self.progress_path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.progress_path, {"build_id": self.build_id, "fingerprint": self.fingerprint,
                                                   "done": self.done, "layers_done": self.layers_done})
        except OSError as e:
            raise _os_error(self.root, e) from None

    def _sweep_tmp(self) -> None:
        """Remove temporary files a killed build left behind in this model's partitions."""
        for table in TABLES:
            base = self.root / partition_dir(table, model=self.slug)
            if base.exists():
                for tmp in base.rglob("*.tmp"):
                    tmp.unlink(missing_ok=True)


def _same_projection(root: Path, old: dict, entry: dict, model_row: dict) -> bool:
    """Whether a model re-indexed as ``entry`` projects its dictionaries as the ``old`` entry did: the
    same weights (``models.weights_sha256``), variant (``folded`` changes W_U) and vocabulary.
    A published models file that cannot be read counts as different (nothing stale is kept)."""
    if old.get("vocab_id") != entry.get("vocab_id") or old.get("variant") != entry.get("variant"):
        return False
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table(root / old["files"]["models"][0], columns=["weights_sha256"]).to_pylist()
        before = json.loads(rows[0]["weights_sha256"] or "null")
    except Exception:  # noqa: BLE001 (missing, damaged, or an older file without the column)
        return False
    return before is not None and before == json.loads(model_row.get("weights_sha256") or "null")


def sorted_copy(root: Path, relpath: str, select_sql: str, order_by: str, spill: Path) -> tuple[int, dict]:
    """DuckDB's out-of-core ``COPY (select_sql ORDER BY order_by)`` into the Parquet file
    ``root/relpath`` (atomic, 16K-row groups, within a 512 MB memory limit, spilling to
    ``spill``, which is removed afterwards); returns (rows, digest). A full disk or a failed
    spill is one DatasetError line. Shared by ``vectors_by_token`` and `zeropass compact`."""
    import duckdb

    q = lambda p: "'" + str(p).replace("'", "''") + "'"  # noqa: E731  (COPY TO takes no globs)
    counted: list[int] = []

    def copy(tmp: Path) -> None:
        con = duckdb.connect()
        try:
            con.execute(f"SET memory_limit = '{_BY_TOKEN_MEMORY}'")
            con.execute(f"SET temp_directory = {q(spill)}")
            con.execute("SET enable_progress_bar = false")  # DuckDB draws it on a terminal's stdout
            ((rows,),) = con.execute(
                f"""COPY ({select_sql} ORDER BY {order_by})
                    TO {q(tmp)} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {_ROW_LAYOUT["vectors"][1]})""").fetchall()
            counted.append(int(rows))
        finally:
            con.close()

    try:
        digest = write_file_atomic(root, relpath, copy)
    except duckdb.Error as e:  # DuckDB's own writes: a full disk, spilling that cannot, ...
        raise _duckdb_error(root, e) from None
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    return counted[0], digest


def sort_by_token(root: Path, slug: str, sources: list[str], relpath: str) -> tuple[int, dict]:
    """The ``vectors`` files ``sources`` sorted by token into the ``vectors_by_token`` file
    ``relpath`` (both relative to ``root``); returns (rows, digest). Shared by a build and by
    `zeropass merge`, which rebuilds it for a model merged from shards."""
    from schemas.layout import duckdb_path

    root = Path(root)
    q = lambda p: "'" + str(p).replace("'", "''") + "'"  # noqa: E731
    # read_parquet globs its arguments: escape the dataset path (it may hold * ? [)
    files = ", ".join(q(duckdb_path(root / f)) for f in sources)
    cols = ", ".join(TABLES["vectors_by_token"].column_names)
    return sorted_copy(root, relpath, f"SELECT {cols} FROM read_parquet([{files}], hive_partitioning=false)",
                       _BY_TOKEN_ORDER, root / BUILDS / f"{slug}.spill")


def vocabulary_damage(root: Path, vocab: dict) -> str | None:
    """Why a published vocabulary's file is unusable (missing, wrong size, unreadable footer,
    wrong row count), or None. Cheap: no hashing; run at every commit that shares it."""
    for rel in vocab.get("files", []):
        path = Path(root) / rel
        info = vocab.get("file_info", {}).get(rel, {})
        if not path.is_file():
            return f"{rel} is missing"
        if "bytes" in info and path.stat().st_size != info["bytes"]:
            return f"{rel} has {path.stat().st_size} bytes, not {info['bytes']}"
        try:
            rows = parquet_rows(path)
        except (OSError, pa.ArrowException) as e:
            return f"{rel} is not a readable Parquet file ({first_line(e)})"
        if vocab.get("d_vocab") is not None and len(vocab.get("files", [])) == 1 and rows != vocab["d_vocab"]:
            return f"{rel} has {rows} rows, not {vocab['d_vocab']}"
    return None


def store_alignment(root: Path, model_a: str, model_b: str, table: pa.Table) -> str:
    """Publish the alignment of two models (replacing an earlier one of the same pair)."""
    root = Path(root)
    check_writable(root)
    rel = f"{partition_dir('alignments', model_a=model_a, model_b=model_b)}/{uuid.uuid4().hex[:12]}.parquet"

    def change(manifest: dict) -> list[str]:
        digest = write_parquet_atomic(root, rel, conform("alignments", table))
        alignments = manifest.setdefault("alignments", {})
        old = alignments.get(f"{model_a}|{model_b}", {}).get("files", [])
        alignments[f"{model_a}|{model_b}"] = {"files": [rel], "rows": table.num_rows,
                                              "file_info": {rel: dict(digest, rows=table.num_rows)}}
        return old

    commit(root, change)
    return rel


def remove_model(root: Path, slug: str) -> None:
    """Unpublish ``slug`` and delete its files, and any unfinished build of it (other models untouched)."""
    root = Path(root)
    if not (root / MANIFEST).exists():
        return

    def change(manifest: dict) -> list[str]:
        (root / BUILDS / f"{slug}.json").unlink(missing_ok=True)  # its files become leftovers
        old = manifest["models"].pop(slug, None)
        # its dictionaries (docs/DICTIONARIES.md) go with it: they cannot be read without its vocabulary
        mine = [n for n, d in manifest.get("dictionaries", {}).items() if d.get("model") == slug]
        gone = [manifest["dictionaries"].pop(n) for n in mine]
        return [f for e in [old or {}, *gone] for fs in e.get("files", {}).values() for f in fs]

    commit(root, change)
