"""The connection of a :class:`query.Dataset`: what user SQL may run, running it (streams,
timeouts, Ctrl-C, the retry after a re-index) and turning DuckDB's failures into typed errors.

After the views exist the connection is locked down (docs/QUERY.md, "SQL safety"):

* ``allowed_directories`` = the dataset directory and ``enable_external_access = false``,
  DuckDB's temp directory a private ``mkdtemp`` (0700, removed on close): DuckDB allows its
  temp directory on top of ``allowed_directories``, and the default ``./.tmp`` is whatever the
  working directory holds;
* no extension autoloading, no Python replacement scans (a Python variable is not a table);
* ``lock_configuration = true``: SQL cannot undo the above;
* user SQL (:meth:`Connection.sql`) is checked statement by statement before DuckDB runs any:
  SELECT (with DESCRIBE/SHOW/SUMMARIZE/FROM-first), EXPLAIN of such a statement, and PRAGMA /
  CALL / table functions on an allow-list of those that only read. Everything else is refused.
"""
from __future__ import annotations

import json
import re
import threading
from contextlib import contextmanager

import duckdb
import pyarrow as pa

from schemas.format import first_line
from schemas.layout import duckdb_path

from .errors import (BadSQL, DamagedFile, ForbiddenSQL, Interrupted, QueryError, QueryTimeout)

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
        raise BadSQL(first_line(e)) from None
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

class _Wrapped(Exception):
    """A DuckDB error that reached us through Arrow's reader as another exception type."""


def _one_line(s: str) -> str:
    return " ".join(s.split())


def _quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"

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



class _Batches:
    """The record batches of one result, in order; ``schema`` is known before the first."""

    def __init__(self, schema: pa.Schema, batches):
        self.schema = schema
        self._batches = batches

    def __iter__(self):
        return self._batches

class Connection:
    """The SQL half of a Dataset (a mixin: ``query.catalog.Catalog`` provides the views and the
    manifest it reads, ``query.dataset.Dataset`` puts the two together)."""

    def _connect(self) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(":memory:")
        self.con = con
        con.execute(f"SET temp_directory = {_quote(self._tmp)}")
        # GLOBAL: cursor() twins start from these too (a cursor does not inherit a plain SET, and
        # cannot change a setting once lock_configuration is on)
        con.execute("SET GLOBAL python_enable_replacements = false")  # a Python variable is not a table
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute("SET enable_progress_bar = false")  # DuckDB draws it on stdout, into the data (off by default in a cursor)
        # Parquet footers are cached, so repeated queries skip re-reading metadata.
        con.execute("SET parquet_metadata_cache = true")
        if self._remote is not None:
            self._remote.attach(con)
        else:
            # DuckDB checks the glob-escaped name the views use (schemas.layout.duckdb_path) as given
            con.execute(f"SET allowed_directories = [{_quote(str(self.root) + '/')}, {_quote(duckdb_path(str(self.root)) + '/')}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        con.execute("CREATE SCHEMA _zeropass")  # the helpers' per-model views, out of SHOW TABLES
        self._build_views()
        return con

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
        if self._remote is not None:
            # DuckDB cannot interrupt a read it is waiting on: the reads end by the deadline themselves
            with self._remote.within(timeout), self._deadline_timer(timeout):
                yield
            return
        with self._deadline_timer(timeout):
            yield

    @contextmanager
    def _deadline_timer(self, timeout: float):
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
            err = self._remote.error_for(bad)
            if isinstance(err, DamagedFile):  # its bytes are not the listed ones: name its model and the repair
                return self._damaged(err.rel, err.why)
            if err is not None:
                return err
        if isinstance(e, duckdb.InterruptException) or "INTERRUPT Error" in msg or self._why_stopped:
            if self._why_stopped == "timeout":
                return QueryTimeout(f"the query ran longer than {timeout:g} s and was stopped (--timeout / timeout=): "
                                    f"narrow it, or allow more time")
            return Interrupted("interrupted")
        if isinstance(e, duckdb.PermissionException) or msg.startswith("Permission Error"):
            # before damage: a refused path may start with a listed file's name (FILE/../../x)
            return ForbiddenSQL(
                f"{first_line(e).removeprefix('Permission Error: ')}: only the dataset's own files "
                f"(under {self.root}) can be read")
        if bad is not None:
            return self._damaged(bad, self._corrupt.get(bad) or self._unreadable.get(bad) or first_line(e))
        if isinstance(e, duckdb.PermissionException):
            return ForbiddenSQL(
                f"{first_line(e).removeprefix('Permission Error: ')}: only the dataset's own files "
                f"(under {self.root}) can be read")
        if isinstance(e, duckdb.CatalogException):
            # With external access off, a quoted path outside the dataset is not scanned but
            # looked up as a table: say why.
            m = re.search(r"Table with name (.+?) does not exist", msg)
            if m and ("/" in m.group(1) or "." in m.group(1)):
                return ForbiddenSQL(f"cannot read {m.group(1)}: only the dataset's own files (under {self.root}) can be read")
        if "Traceback (most recent call last)" in msg:  # a Python callback failed: its last line is the error
            lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
            return BadSQL(f"reading the dataset failed: {lines[-1] if lines else type(e).__name__}")
        return BadSQL(first_line(e))

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
