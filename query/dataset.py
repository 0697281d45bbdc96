"""Opening a dataset directory read-only and running SQL over it with DuckDB.

The connection is in-memory: one view per table (``schemas.TABLES``) over the Parquet files
that ``manifest.json`` lists, with absolute paths, so the dataset can sit anywhere. The
manifest is untrusted input: its shape is checked and every listed path must stay inside the
dataset (no absolute paths, no ``..``, no symlink out). Opening reads no Parquet footer beyond
the first file of each view, so one damaged file does not stop the rest of the dataset.

After the views exist the connection is locked down (docs/QUERY.md, "SQL safety"):

* ``allowed_directories`` = the dataset directory and ``enable_external_access = false``,
  DuckDB's temp directory a private ``mkdtemp`` (0700, removed on close): DuckDB allows its
  temp directory on top of ``allowed_directories``, and the default ``./.tmp`` is whatever the
  working directory holds;
* no extension autoloading, no Python replacement scans (a Python variable is not a table);
* ``lock_configuration = true``: SQL cannot undo the above;
* user SQL (:meth:`Dataset.sql`) is checked statement by statement before DuckDB runs any:
  SELECT (with DESCRIBE/SHOW/SUMMARIZE/FROM-first), EXPLAIN of such a statement, and PRAGMA /
  CALL / table functions on an allow-list of those that only read. Everything else is refused.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

from schemas import SCHEMA_VERSION, TABLES
from schemas import layout
from schemas.layout import FORMAT, MANIFEST, Owner, duckdb_path, table_files, view_sql

from .errors import (BadManifest, BadSQL, DamagedFile, ForbiddenSQL, Interrupted, NotADataset, QueryError,
                     QueryTimeout, SchemaMismatch, UnknownModel)
from . import remote
from .units import quoted

_ST = duckdb.StatementType

# -- what user SQL may run -------------------------------------------------------------------------

# Table functions (FROM f(...), CALL f(...)) that only read: the dataset's files (the reads are
# confined by allowed_directories), generated rows, or the connection's own catalog. Anything
# not listed is refused, so a function added by a later DuckDB is refused until reviewed.
# Left out on purpose: query / query_table (run a string as SQL, past this check),
# json_execute_serialized_sql, checkpoint / force_checkpoint, enable_/disable_ logging and
# profiling, truncate_duckdb_logs, *_external_resource*, *_grammar_extension, arrow_scan /
# pandas_scan / python_map_function (take raw pointers), read_duckdb, seq_scan.
READ_TABLE_FUNCTIONS = frozenset("""
    range generate_series unnest repeat repeat_row
    read_parquet parquet_scan read_csv read_csv_auto read_json read_json_auto read_ndjson read_ndjson_auto
    read_json_objects read_json_objects_auto read_ndjson_objects read_text read_blob glob sniff_csv
    parquet_metadata parquet_schema parquet_file_metadata parquet_kv_metadata parquet_full_metadata
    json_each json_tree summary histogram histogram_values test_all_types pg_timezone_names icu_calendar_names
    duckdb_columns duckdb_constraints duckdb_databases duckdb_dependencies duckdb_functions duckdb_indexes
    duckdb_keywords duckdb_optimizers duckdb_schemas duckdb_sequences duckdb_settings duckdb_tables duckdb_types
    duckdb_views duckdb_variables duckdb_memory duckdb_temporary_files
    pragma_table_info pragma_show pragma_version pragma_platform pragma_collations pragma_database_size
    pragma_storage_info pragma_metadata_info pragma_user_agent
""".split())

# PRAGMAs that only report. A PRAGMA with `=` is a SET; import_database runs SQL files;
# enable_profiling / profiling_output write a file; the rest reconfigure or checkpoint.
READ_PRAGMAS = frozenset("""
    version platform user_agent show_tables show_tables_expanded show_databases database_list table_info show
    database_size storage_info metadata_info collations functions
""".split())

# Scalar functions with an effect (no sequence can exist here, but refuse them by name anyway).
WRITING_SCALARS = frozenset({"write_log", "setval", "nextval"})

_COMMENTS = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*", re.S)
# Fail closed: anything these do not match exactly (a comment inside, a quoted name, a
# computed argument) is refused rather than guessed at.
_PRAGMA = re.compile(r"PRAGMA\s+([A-Za-z_]\w*)\s*(?:\(\s*(?:'(?:[^']|'')*'|\d+)\s*\))?\s*;?\s*\Z", re.I)
_CALL = re.compile(r"CALL\s+([A-Za-z_]\w*)\s*(\(.*\))\s*;?\s*\Z", re.I | re.S)
_EXPLAIN = re.compile(r"EXPLAIN\s+(?:\([^()']*\)\s*)?(?:ANALY[SZ]E\s+)?", re.I)

_READS = "only SELECT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN and read-only PRAGMA/CALL run"
_checker_lock = threading.Lock()
_checker: duckdb.DuckDBPyConnection | None = None


def check_read_only(query: str) -> list[str]:
    """The statements of ``query``; raises ForbiddenSQL unless every one only reads.

    Every statement is checked before any runs, so ``SELECT 1; DROP VIEW x`` runs nothing.
    """
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise BadSQL(_first_line(e)) from None
    if not statements:
        raise BadSQL("empty SQL: give a query, e.g. \"SELECT * FROM models\"")
    for st in statements:
        _check_statement(st.query, st.type)
    return [st.query for st in statements]


def _forbidden(what: str) -> ForbiddenSQL:
    return ForbiddenSQL(f"{what} not allowed: the dataset is read-only through zeropass ({_READS})")


def _check_statement(text: str, kind: "duckdb.StatementType") -> None:
    body = _COMMENTS.sub("", text, count=1)
    if kind == _ST.SELECT:
        _check_select(text)
    elif kind == _ST.EXPLAIN:
        m = _EXPLAIN.match(body)
        try:
            inner = duckdb.extract_statements(body[m.end():]) if m else []
        except duckdb.Error:
            inner = []
        # EXPLAIN ANALYZE runs what it explains: that must be one statement that passes itself.
        if len(inner) != 1 or inner[0].type == _ST.EXPLAIN:
            raise _forbidden("this EXPLAIN is")
        _check_statement(inner[0].query, inner[0].type)
    elif kind == _ST.PRAGMA:
        m = _PRAGMA.match(body)
        if not m or m.group(1).lower() not in READ_PRAGMAS:
            name = m.group(1) if m else body.split("(")[0][:40]
            raise _forbidden(f"{name} is")
    elif kind == _ST.CALL:
        m = _CALL.match(body)
        if not m:
            raise _forbidden(f"{body.split('(')[0][:40].strip()} is")
        # CALL f(args) is SELECT * FROM f(args): check it as one (the arguments may hold subqueries).
        _check_select(f"SELECT * FROM {m.group(1)}{m.group(2)}")
    else:
        words = body.split()
        raise _forbidden(f"{words[0].upper() if words else kind.name} statements are")


def _check_select(text: str) -> None:
    """Refuse a SELECT that calls a table function off the allow-list, anywhere in its tree."""
    global _checker
    with _checker_lock:
        if _checker is None:
            _checker = duckdb.connect(":memory:")
        (tree,) = _checker.execute("SELECT json_serialize_sql($q::VARCHAR)", {"q": text}).fetchall()[0]
    tree = json.loads(tree)
    if tree.get("error"):
        raise BadSQL(f"cannot check this statement: {tree.get('error_message', 'unknown error')}")
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if node.get("type") == "TABLE_FUNCTION":
                name = str((node.get("function") or {}).get("function_name", "")).lower()
                if name not in READ_TABLE_FUNCTIONS:
                    raise _forbidden(f"{name}() is")
            elif node.get("class") == "FUNCTION" and str(node.get("function_name", "")).lower() in WRITING_SCALARS:
                raise _forbidden(f"{node['function_name']}() is")
            stack.extend(node.values())


def _first_line(e: BaseException) -> str:
    msg = str(e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


class _Wrapped(Exception):
    """A DuckDB error that reached us through Arrow's reader as another exception type."""


def _one_line(s: str) -> str:
    return " ".join(s.split())


def _quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _failing_view_sql(table, rel: str) -> str:
    """A view with the table's columns whose every scan fails naming ``rel`` (a file it cannot open)."""
    from schemas import duckdb_type

    # error() in every column and in WHERE: no filter or projection the optimizer pushes in can
    # skip it (a constant NULL column would let `WHERE model = 'x'` fold the scan away).
    fail = f"error({_quote('zeropass-unreadable:' + rel)})"
    cols = ", ".join(f"CAST({fail} AS {duckdb_type(c.type)}) AS {c.name}" for c in table.columns)
    return f"SELECT {cols} FROM range(1) WHERE {fail} IS NULL"


# Types that DuckDB's Arrow export gets wrong (UHUGEINT above 2^127 comes out negative) or only
# as opaque bytes: the results carry them as DuckDB's own text instead.
_AS_TEXT = re.compile(r"UHUGEINT|BIGNUM|VARINT|\bBIT\b|TIME WITH TIME ZONE|TIMETZ")


def _exact(rel):
    types = [str(t) for t in rel.types]
    if not any(_AS_TEXT.search(t) for t in types):
        return rel
    cols = [(f"CAST(#{i + 1} AS VARCHAR)" if _AS_TEXT.search(t) else f"#{i + 1}") + ' AS "' + c.replace('"', '""') + '"'
            for i, (c, t) in enumerate(zip(rel.columns, types))]
    return rel.project(", ".join(cols))


# -- the manifest (untrusted input) ----------------------------------------------------------------

def _manifest_error(root: Path | str, why: str) -> BadManifest:
    return BadManifest(
        f"{root}/{MANIFEST} is malformed ({why}): it is not what zeropass writes; run `zeropass check --db {root}`, "
        f"or re-index the models into a new directory with `zeropass index MODEL --db NEWDIR`")


def validate_manifest(manifest: object, root: Path | str) -> dict[str, Owner]:
    """Check ``manifest`` (shape: ``schemas.layout.validate_manifest``, the writer's own check),
    its format and schema version, and that no listed file is a link out of ``root`` (a directory;
    a URL ``root`` has no links to follow).

    Returns {relative path: Owner(table, kind, name)} for every listed file. Raises BadManifest
    (or NotADataset, SchemaMismatch) with one line.
    """
    if isinstance(manifest, dict):
        if manifest.get("format", FORMAT) != FORMAT:
            raise NotADataset(f"{root} is not a zeropass dataset ({MANIFEST} has format {manifest.get('format')!r})")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            models = manifest.get("models")
            sources = sorted({str(m.get("source")) for m in models.values() if isinstance(m, dict) and m.get("source")}) \
                if isinstance(models, dict) else []
            hint = f" (models: {', '.join(sources)})" if sources else ""
            raise SchemaMismatch(
                f"dataset {root} was written with schema version {version}, this zeropass reads version "
                f"{SCHEMA_VERSION}: rebuild it into a new directory with `zeropass index MODEL --db NEWDIR` for each model{hint}")
    try:
        layout.validate_manifest(manifest, f"{root}/{MANIFEST}")
    except layout.BadManifest as e:
        raise _manifest_error(root, e.why) from None
    owners = layout.manifest_files(manifest)
    if not isinstance(root, Path):
        return owners
    real_root = os.path.realpath(root)
    for rel, real in _real_paths(real_root, owners):
        if os.path.commonpath([real, real_root]) != real_root:
            raise _manifest_error(root, f"{rel} is a link to {real}, outside the dataset")
    return owners


def _real_paths(real_root: str, rels):
    """(rel, os.path.realpath(real_root/rel)) for each relative path, resolving each shared
    directory once: a link anywhere on the way is followed as realpath follows it. At 200 models
    (2,411 files) this is 25 ms instead of realpath's 115 ms (one lstat per component per file)."""
    known: dict[str, str] = {}
    for rel in rels:
        real, prefix = real_root, ""
        for part in rel.split("/"):  # no '..', '.' or '' (layout.unsafe_relpath refused them)
            prefix = f"{prefix}/{part}" if prefix else part
            hit = known.get(prefix)
            if hit is None:
                step = os.path.join(real, part)
                hit = known[prefix] = os.path.realpath(step) if os.path.islink(step) else step
            real = hit
        yield rel, real


class _Batches:
    """The record batches of one result, in order; ``schema`` is known before the first."""

    def __init__(self, schema: pa.Schema, batches):
        self.schema = schema
        self._batches = batches

    def __iter__(self):
        return self._batches


class Dataset:
    """A zeropass dataset directory, opened read-only.

    >>> ds = Dataset("zeropass-db")                      # doctest: +SKIP
    >>> ds.sql("SELECT model, n_layers FROM models")     # doctest: +SKIP
    pyarrow.Table ...

    The helpers (``heads``, ``neurons``, ``show``, ``tokens``, ``similar``) are methods too;
    see ``query.helpers`` for what each returns. One Dataset may be shared by threads: its
    queries take turns on its one connection.
    """

    def __init__(self, path: str | Path, cache_dir: str | Path | None = None):
        # A URL is read where it is published (query.remote); its root is the URL, for messages.
        self._remote = remote.Remote(str(path), cache_dir) if remote.is_url(path) else None
        if self._remote is not None:
            self.root = self._remote.url
        else:
            self.root = Path(remote.local_path(path)).expanduser().resolve()
        if self._remote is None and not self.root.is_dir():
            raise NotADataset(
                f"no dataset directory at {self.root}: build one with `zeropass index MODEL --db {path}` "
                f"or point --db / $ZEROPASS_DB at an existing one")
        self._given = path
        self._cache_dir = cache_dir
        self._lock = threading.RLock()
        self._sources: dict[tuple, str] = {}   # (table, models, layers) -> view name
        self._unreadable: dict[str, str] = {}  # listed file -> why DuckDB could not bind it
        self._no_compacted: set[str] = set()   # tables whose compacted file could not be bound
        self._why_stopped: str | None = None   # "timeout" / "interrupt" while a query is stopped
        self._timeout: float | None = None     # the running query's timeout, for its message
        self._read_manifest()
        # DuckDB spills to, and allows reading from, its temp directory: give it one nobody else controls.
        self._tmp = tempfile.mkdtemp(prefix="zeropass-duckdb-")  # mode 0700
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)
        try:
            self.con = self._connect()
        except BaseException:
            self._cleanup()
            raise

    def _read_manifest(self) -> None:
        if self._remote is not None:
            text = self._remote.manifest_text()
            manifest = self._parse_manifest(text, f"{self.root}/{MANIFEST}")
            self._owners = validate_manifest(manifest, self.root)
            self._remote.use(manifest, self._owners)
            self.manifest = manifest
            self._signature = self._remote.revision
            return
        path = self.root / MANIFEST
        try:
            st = os.stat(path)
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise NotADataset(
                f"{self.root} is not a zeropass dataset (no {MANIFEST}): build one with `zeropass index MODEL --db {self._given}`") from None
        except (OSError, UnicodeDecodeError) as e:
            raise BadManifest(f"cannot read {path} ({getattr(e, 'strerror', None) or e}): check the file, or run `zeropass check --db {self.root}`") from None
        manifest = self._parse_manifest(text, path)
        self._owners = validate_manifest(manifest, self.root)
        self.manifest = manifest
        self._signature = (st.st_ino, st.st_mtime_ns, st.st_size)

    def _parse_manifest(self, text: str, path) -> object:
        try:
            return json.loads(text)
        except ValueError:
            if self._remote is not None:
                raise NotADataset(f"{self.root} is not a zeropass dataset ({path} is not JSON): check the URL") from None
            raise BadManifest(f"{path} is not valid JSON (the manifest): run `zeropass check --db {self.root}`, "
                              f"or rebuild the dataset with `zeropass index MODEL --db {self._given}`") from None

    def _path(self, rel: str) -> str:
        """The path DuckDB opens for the listed file ``rel`` (a local path, or ``zeropass://rel``)."""
        return self._remote.path(rel) if self._remote is not None else str(self.root / rel)

    def _exists(self, rel: str) -> bool:
        # Remote: a listed file is taken to exist (one request per file would cost more than opening);
        # a missing one fails when read, naming it.
        return True if self._remote is not None else os.path.exists(self.root / rel)

    def _connect(self) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(":memory:")
        self.con = con
        con.execute(f"SET temp_directory = {_quote(self._tmp)}")
        con.execute("SET python_enable_replacements = false")  # a Python variable is not a table
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute("SET enable_progress_bar = false")  # DuckDB draws it on stdout, into the data
        # Parquet footers are cached, so repeated queries skip re-reading metadata.
        con.execute("SET parquet_metadata_cache = true")
        if self._remote is not None:
            # The one filesystem that serves the manifest's files (query.remote): user SQL can
            # reach nothing else through it, and no other path is allowed.
            con.register_filesystem(self._remote.fs.filesystem())
            con.execute(f"SET allowed_directories = [{_quote(remote.PROTOCOL + '://')}]")
        else:
            # DuckDB checks the glob-escaped name the views use (schemas.layout.duckdb_path) as given
            con.execute(f"SET allowed_directories = [{_quote(str(self.root) + '/')}, {_quote(duckdb_path(str(self.root)) + '/')}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        con.execute("CREATE SCHEMA _zeropass")  # the helpers' per-model views, out of SHOW TABLES
        self._build_views()
        return con

    # -- views ------------------------------------------------------------------------------------

    def _files(self, table: str, models, layers, compacted: bool = True) -> layout.Sources:
        """What a view of ``table`` restricted to ``models`` and ``layers`` reads (manifest-driven)."""
        src = layout.table_sources(self.manifest, table, models,
                                   use_compacted=compacted and table not in self._no_compacted)
        if layers is not None and "layer" in TABLES[table].partition_by:
            wanted = {f"layer={int(layer)}" for layer in layers}
            src = src._replace(files=[f for f in src.files if wanted & set(f.split("/"))])
        return src

    def _build_views(self) -> None:
        self._unreadable.clear()
        self._no_compacted.clear()
        for name in TABLES:
            self._create_view(name, name, None, None)
        for (table, models, layers, compacted), name in self._sources.items():
            self._create_view(name, table, models and list(models), layers, compacted)

    def _create_view(self, name: str, table: str, models, layers, compacted: bool = True) -> None:
        """A view of ``table`` (``models``, ``layers``) that opens no file but those it binds columns from.

        Compacted rows come first. A compacted file that is missing or cannot be bound is not
        used: every view of the table then reads the per-model files it was built from (they
        stay listed), and `zeropass check` names it. Per-model files: a missing file makes the
        view an error naming it (DuckDB checks every path at bind); an unreadable file is
        skipped as the binding file, and stays listed, so a query that reaches it fails naming
        it while the view itself still exists.
        """
        src = self._files(table, models, layers, compacted)
        head = None
        if src.compacted:
            head = layout.sources_sql(TABLES[table], src._replace(files=[], compacted=[self._path(f) for f in src.compacted]),
                                      None, union_by_name=False,
                                      layers=layers if "layer" in TABLES[table].partition_by else None)
            try:
                if not all(self._exists(f) for f in src.compacted):
                    raise duckdb.IOException(f"compacted file missing: {src.compacted}")
                self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {head}")
            except duckdb.Error as e:
                for f in src.compacted:
                    self._unreadable.setdefault(f, _first_line(e))
                self._no_compacted.add(table)
                return self._create_view(name, table, models, layers, compacted)
        files = src.files
        missing = [f for f in files if not self._exists(f)]
        order = [f for f in files if f not in missing]
        sql = None
        while order and not missing:
            candidate = view_sql(TABLES[table], [self._path(f) for f in order], None, union_by_name=False)
            try:
                self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {candidate}")
                sql = candidate
                break
            except duckdb.Error as e:
                bad = self._listed_file_in(str(e), order)
                if bad is None or bad in self._unreadable:
                    raise self._translate(e, None) from None
                self._unreadable[bad] = _first_line(e)
                if all(f in self._unreadable for f in order):
                    missing = [bad]
                order = [f for f in order if f != bad] + [bad]
        if missing:
            sql = _failing_view_sql(TABLES[table], missing[0])
        elif sql is not None and head is None:
            return  # the view bound above is the view
        elif sql is None and head is None:
            sql = view_sql(TABLES[table], [], self.root)
        if head is not None:
            sql = head if sql is None else f"{head} UNION ALL {sql}"
        try:
            self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
        except duckdb.Error as e:  # a file deleted since it bound above (a re-index publishing now)
            raise self._translate(e, self._listed_file_in(str(e))) from None

    def source(self, table: str, models: list[str] | None = None, layers: list[int] | None = None,
               compacted: bool = True) -> str:
        """Name of a view of ``table`` restricted to the files of ``models`` (and ``layers``).

        The same rows as the view with those filters, but DuckDB opens only the files that can
        hold them (binding a scan over every file of a big dataset costs tens of milliseconds),
        and a damaged file of another model is never touched. Paths come from the manifest,
        never from the user; the view follows the manifest when a model is re-indexed.

        ``compacted=False``: the models' own files even where a compacted copy holds them (the
        same rows). For scans of one model by many tokens: its own ``vectors_by_token`` file is
        sorted by token within the model, the compacted one by token across all models, where
        150 tokens touch most row groups of the file.
        """
        layer_key = tuple(sorted({int(x) for x in layers})) if layers is not None and "layer" in TABLES[table].partition_by else None
        key = (table, tuple(models) if models is not None else None, layer_key, bool(compacted))
        with self._lock:
            name = self._sources.get(key)
            if name is None:
                name = f"_zeropass.src{len(self._sources)}_{table}"
                self._create_view(name, table, list(models) if models is not None else None, layer_key, bool(compacted))
                self._sources[key] = name
        return name

    def _refresh(self, force: bool = False) -> None:
        """Re-read the manifest and rebuild the views if it changed (a stat, before each query).

        A remote manifest is fetched again only when forced (after a read failed): a request
        before every query would cost more than most queries.
        """
        if self._remote is not None:
            self._remote.last_error = None  # each attempt starts clean: an old failed read must not name this one's error
            if force:
                # after a failed read: a new revision, or the same one after a network error; views
                # that failed to bind are bound again (footers come from the caches)
                self._read_manifest()
                self._remote.file_errors.clear()
                self._build_views()
            return
        try:
            st = os.stat(self.root / MANIFEST)
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            sig = None
        if sig == self._signature and not force:
            return
        self._read_manifest()
        self._build_views()

    # -- running SQL ------------------------------------------------------------------------------

    def reopen(self) -> "Dataset":
        """Another Dataset over the same place (its own connection, e.g. one per server thread)."""
        return Dataset(self._given, cache_dir=self._cache_dir)

    def close(self) -> None:
        with self._lock:
            self.con.close()
        self._cleanup()

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Dataset({str(self.root)!r}, models={self.model_names()})"

    def interrupt(self) -> None:
        """Stop the query running now (from another thread or a signal handler)."""
        self._why_stopped = "interrupt"
        self.con.interrupt()

    def sql(self, query: str, params: dict | list | None = None, timeout: float | None = None) -> pa.Table:
        """Run read-only SQL (``$name`` or ``?`` placeholders bound from ``params``) -> Arrow.

        ``params`` must name exactly the placeholders of the last statement; ``timeout`` (seconds)
        stops the query with QueryTimeout.

        >>> ds.sql("SELECT * FROM tokens WHERE norm = $w", {"w": "paris"})  # doctest: +SKIP
        """
        with self.stream(query, params, timeout=timeout) as batches:
            return pa.Table.from_batches(list(batches), schema=batches.schema)

    def df(self, query: str, params: dict | list | None = None, timeout: float | None = None):
        """Like :meth:`sql`, as a pandas DataFrame (needs pandas)."""
        return self.sql(query, params, timeout).to_pandas()

    def pl(self, query: str, params: dict | list | None = None, timeout: float | None = None):
        """Like :meth:`sql`, as a polars DataFrame (needs polars)."""
        import polars as pl

        return pl.from_arrow(self.sql(query, params, timeout))

    @contextmanager
    def stream(self, query: str, params: dict | list | None = None, timeout: float | None = None,
               batch_rows: int = 65536):
        """Like :meth:`sql`, as record batches read while DuckDB computes them (constant memory).

        >>> with ds.stream("SELECT * FROM vectors") as batches:   # doctest: +SKIP
        ...     for b in batches: ...
        """
        if params is not None and not isinstance(params, (dict, list, tuple)):
            raise BadSQL(f"params must be a dict (for $name) or a list (for ?), not {type(params).__name__}")
        statements = check_read_only(query)
        with self._lock, self._deadline(timeout):
            for st in statements[:-1]:  # earlier statements only report; they run for completeness
                self._attempts(lambda st=st: self._arrow(self._relation(st, None)))
            reader = self._attempts(lambda: self._reader(statements[-1], list(params) if isinstance(params, tuple) else params, batch_rows))
            yield _Batches(reader.schema, self._translated(reader, timeout))

    def _translated(self, reader, timeout):
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except QueryError:
                raise
            except Exception as e:  # noqa: BLE001 (DuckDB errors surface through Arrow's reader)
                raise self._translate(e, self._listed_file_in(str(e)), timeout) from None
            yield batch

    def _reader(self, query: str, params, batch_rows: int) -> pa.RecordBatchReader:
        rel = self._relation(query, params)
        if rel is None:  # a statement without a result
            return pa.RecordBatchReader.from_batches(pa.schema([]), [])
        reader = _exact(rel).to_arrow_reader(batch_rows)
        # Read the first batch here, inside the retry: most damage and vanished files show up now.
        first = []
        try:
            first.append(reader.read_next_batch())
        except StopIteration:
            pass
        except Exception as e:  # noqa: BLE001
            if isinstance(e, duckdb.Error):
                raise
            raise _Wrapped(str(e)) from None

        def batches():
            yield from first
            while True:
                try:
                    yield reader.read_next_batch()
                except StopIteration:
                    return
        return pa.RecordBatchReader.from_batches(reader.schema, batches())

    def _relation(self, query: str, params):
        return self.con.sql(query, params=params)

    @staticmethod
    def _arrow(rel) -> pa.Table:
        return pa.table({}) if rel is None else _exact(rel).to_arrow_table()

    def _attempts(self, body):
        """Run ``body`` on fresh views; when it fails on a listed file, re-read the manifest and retry once.

        A re-index publishes its manifest, then deletes the files it superseded: a reader that
        read the old manifest finds them gone, and the new manifest names their replacements.
        """
        for attempt in (0, 1):
            self._why_stopped = None
            self._refresh()
            try:
                return body()
            except QueryError:
                raise
            except Exception as e:  # noqa: BLE001
                if self._why_stopped:  # DuckDB may report an interrupt as RuntimeError("Query interrupted")
                    raise self._translate(e, None, self._timeout) from None
                if not isinstance(e, (duckdb.Error, _Wrapped)):
                    raise
                bad = self._listed_file_in(str(e))
                if bad is not None and attempt == 0 and self._why_stopped is None:
                    self._refresh(force=True)
                    continue
                raise self._translate(e, bad, self._timeout) from None

    @contextmanager
    def _deadline(self, timeout: float | None):
        self._timeout = timeout
        if timeout is None:
            yield
            return
        if not isinstance(timeout, (int, float)) or not timeout > 0 or timeout != timeout:
            raise BadSQL(f"timeout must be a positive number of seconds, not {timeout!r}")

        def fire():
            self._why_stopped = "timeout"
            self.con.interrupt()

        timer = threading.Timer(timeout, fire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            timer.join()  # a timer firing now must not hit the next query
            self._timeout = None

    def _run(self, query: str, params: dict | list | None = None) -> pa.Table:
        """Internal SQL (trusted text, values always bound as parameters)."""
        with self._lock:
            return self._attempts(lambda: self._arrow(self._relation(query, params)))

    def rows(self, query: str, params: dict | list | None = None) -> list[dict]:
        """Internal SQL -> list of dicts."""
        return self._run(query, params).to_pylist()

    # -- errors -----------------------------------------------------------------------------------

    def _listed_file_in(self, message: str, files=None) -> str | None:
        """The listed file an error message names (DuckDB quotes the absolute path), if any."""
        m = re.search(r"zeropass-unreadable:([^'\"]+)", message)
        if m:
            return m.group(1)
        for rel in (files if files is not None else self._owners):
            if rel in message:
                return rel
        return None

    def _translate(self, e: BaseException, bad: str | None, timeout: float | None = None) -> QueryError:
        msg = str(e)
        if self._remote is not None and not self._why_stopped:
            # the typed error behind a failed remote read (unreachable, refused, changed), also when
            # it happened while a view was bound (DuckDB's own message is then a Python traceback)
            err = self._remote.file_errors.get(bad) if bad is not None else None
            err, self._remote.last_error = err or self._remote.last_error, None
            if err is not None:
                return err
        if isinstance(e, duckdb.InterruptException) or "INTERRUPT Error" in msg or self._why_stopped:
            if self._why_stopped == "timeout":
                return QueryTimeout(f"the query ran longer than {timeout:g} s and was stopped (--timeout / timeout=): "
                                    f"narrow it, or allow more time")
            return Interrupted("interrupted")
        if bad is not None:
            return self._damaged(bad, self._unreadable.get(bad) or _first_line(e))
        if isinstance(e, duckdb.PermissionException):
            return ForbiddenSQL(
                f"{_first_line(e).removeprefix('Permission Error: ')}: only the dataset's own files "
                f"(under {self.root}) can be read")
        if isinstance(e, duckdb.CatalogException):
            # With external access off, a quoted path outside the dataset is not scanned but
            # looked up as a table: say why.
            m = re.search(r"Table with name (.+?) does not exist", msg)
            if m and ("/" in m.group(1) or "." in m.group(1)):
                return ForbiddenSQL(f"cannot read {m.group(1)}: only the dataset's own files (under {self.root}) can be read")
        return BadSQL(_first_line(e))

    def _damaged(self, rel: str, detail: str) -> DamagedFile:
        table, kind, name = self._owners.get(rel, ("?", "model", "?"))
        state = "damaged" if (self._remote.exists(rel) if self._remote is not None else self._exists(rel)) else "missing"
        detail = detail.removeprefix("Invalid Input Error: ").removeprefix("IO Error: ")
        if self._remote is not None:  # nothing to repair here: the publisher's copy is at fault
            return DamagedFile(f"{table} file {rel} of {kind} {name!r} is {state} at {self.root} ({_one_line(detail)}): "
                               f"the published copy is damaged; its publisher can repair it with `zeropass check` on "
                               f"the source and `zeropass publish DB {self.root}`")
        check = f"run `zeropass check --db {self.root}` to see all damage"
        if kind == "model":
            source = (self.manifest.get("models", {}).get(name) or {}).get("source") or "SOURCE"
            fix = f"re-index it with `zeropass index {source} --name {name} --replace --db {self.root}`"
            owner = f"model {name!r}"
        elif kind == "vocabulary":
            users = sorted(s for s, m in self.manifest.get("models", {}).items() if m.get("vocab_id") == name)
            first = users[0] if users else "M"
            source = (self.manifest.get("models", {}).get(first) or {}).get("source") or "SOURCE"
            fix = f"re-index one of its models ({', '.join(users) or 'none'}) with `zeropass index {source} --name {first} --replace --db {self.root}`"
            owner = f"vocabulary {name!r}"
        elif kind == "compacted":  # derived from the per-model files, which stay: rebuild it from them
            fix = f"rebuild it from the models' own files with `zeropass compact --db {self.root}`"
            owner = "the compacted copy of many models"
        else:
            a, _, b = name.partition("|")
            fix = f"re-run `zeropass align {a} {b} --db {self.root}`"
            owner = f"alignment {name!r}"
        return DamagedFile(f"{table} file {rel} of {owner} is {state} ({_one_line(detail)}): {check}, then {fix}")

    # -- models -----------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        return sorted(self.manifest.get("models", {}))

    def resolve_models(self, model: str | list[str] | tuple[str, ...] | None) -> list[str]:
        """Slugs selected by ``model`` (None or empty list: all; a slug, a comma list or a list of either).

        Names given but naming nothing (``""``, ``",,"``) are refused rather than read as "all".
        """
        names = self.model_names()
        if model is None or model == () or model == []:
            if not names:
                raise UnknownModel(f"dataset {self.root} holds no models yet: add one with `zeropass index MODEL --db {self.root}`")
            return names
        wanted = [model] if isinstance(model, str) else list(model)
        out: list[str] = []
        for item in wanted:
            for slug in (s.strip() for s in str(item).split(",")):
                if not slug:
                    continue
                if slug not in names:
                    have = ", ".join(names) if names else "none"
                    raise UnknownModel(f"unknown model {quoted(slug)}: indexed models are {have}")
                if slug not in out:
                    out.append(slug)
        if not out:
            have = ", ".join(names) if names else "none"
            raise UnknownModel(f"no model named in {quoted(model if isinstance(model, str) else ','.join(map(str, model)))}: "
                               f"give one of {have}")
        return out

    def resolve_model(self, model: str, what: str = "MODEL") -> str:
        """The one slug ``model`` names (for helpers about one model: ``show``, ``similar``)."""
        if not isinstance(model, str):
            raise UnknownModel(f"{what} must be one model name, got {model!r}")
        slugs = self.resolve_models(model)
        if len(slugs) != 1:
            raise UnknownModel(f"{what} {quoted(model)} names {len(slugs)} models ({', '.join(slugs)}): give one")
        return slugs[0]

    def model_info(self, model: str) -> dict:
        """The ``models`` row of one model, as a dict."""
        slug = self.resolve_model(model)
        rows = self.rows("SELECT * FROM models WHERE model = $m", {"m": slug})
        if not rows:
            raise UnknownModel(f"model {slug!r} is in the manifest but has no models row: re-index it")
        return rows[0]

    # -- helpers (implemented in query.helpers) -----------------------------------------------

    def models(self) -> pa.Table:
        from . import helpers

        return helpers.models(self)

    def heads(self, token=None, **kw) -> pa.Table:
        from . import helpers

        return helpers.heads(self, token, **kw)

    def neurons(self, token=None, **kw) -> pa.Table:
        from . import helpers

        return helpers.neurons(self, token, **kw)

    def show(self, model: str, unit: str, **kw) -> dict[str, pa.Table]:
        from . import helpers

        return helpers.show(self, model, unit, **kw)

    def tokens(self, text: str, **kw) -> pa.Table:
        from . import helpers

        return helpers.tokens(self, text, **kw)

    def similar(self, model: str, unit: str, in_model: str, **kw) -> pa.Table:
        from . import helpers

        return helpers.similar(self, model, unit, in_model, **kw)


def open_dataset(path: str | Path) -> Dataset:
    """Open the dataset directory ``path`` read-only."""
    return Dataset(path)


def _enrich(self, tokens, **kw) -> pa.Table:
    """Units whose stored lists are enriched in a token set (``query.enrich.enrich``)."""
    from . import enrich

    return enrich.enrich(self, tokens, **kw)


Dataset.enrich = _enrich
