"""Opening a dataset directory read-only and running SQL over it with DuckDB.

The connection is in-memory: one view per table (``schemas.TABLES``) over the Parquet files
that ``manifest.json`` lists, with absolute paths, so the dataset can sit anywhere. After the
views exist the connection is locked down:

* ``allowed_directories`` = the dataset directory and ``enable_external_access = false``:
  no file outside the dataset can be read, no extension installed or loaded;
* ``lock_configuration = true``: SQL cannot undo the above;
* user SQL (:meth:`Dataset.sql`) is checked statement by statement with
  ``duckdb.extract_statements``: only reads (SELECT, DESCRIBE/SHOW/SUMMARIZE, EXPLAIN of a
  read, PRAGMA/CALL of table functions) run; CREATE, INSERT, COPY ... TO, ATTACH, INSTALL,
  LOAD, SET ... are refused before DuckDB sees them.
"""
from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pyarrow as pa

from schemas import SCHEMA_VERSION, TABLES
from schemas.layout import FORMAT, MANIFEST, duckdb_path, read_manifest, table_files, view_sql

from .errors import BadSQL, ForbiddenSQL, NotADataset, SchemaMismatch, UnknownModel

_ST = duckdb.StatementType
# Statement types that only read. DESCRIBE / SHOW / SUMMARIZE / WITH ... parse as SELECT.
_READ_ONLY = {_ST.SELECT, _ST.PRAGMA, _ST.CALL}
_EXPLAIN_PREFIX = re.compile(r"^\s*EXPLAIN\s+(\([^)]*\)\s*)?(ANALY[SZ]E\s+)?", re.IGNORECASE)


def check_read_only(query: str) -> list[str]:
    """The statements of ``query``; raises ForbiddenSQL unless every one only reads."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise BadSQL(_first_line(e)) from None
    if not statements:
        raise BadSQL("empty SQL: give a query, e.g. \"SELECT * FROM models\"")
    out = []
    for st in statements:
        text = st.query
        if st.type == _ST.EXPLAIN:
            # EXPLAIN ANALYZE runs its statement: check what it explains.
            inner = _EXPLAIN_PREFIX.sub("", text, count=1)
            check_read_only(inner)
        elif st.type not in _READ_ONLY:
            words = text.split()
            kind = words[0].upper() if words else st.type.name
            raise ForbiddenSQL(
                f"{kind} statements are not allowed: the dataset is read-only through zeropass "
                f"(only SELECT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN, PRAGMA and CALL run)")
        out.append(text)
    return out


def _first_line(e: BaseException) -> str:
    msg = str(e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


class Dataset:
    """A zeropass dataset directory, opened read-only.

    >>> ds = Dataset("zeropass-db")                      # doctest: +SKIP
    >>> ds.sql("SELECT model, n_layers FROM models")     # doctest: +SKIP
    pyarrow.Table ...

    The helpers (``heads``, ``neurons``, ``show``, ``tokens``, ``similar``) are methods too;
    see ``query.helpers`` for what each returns.
    """

    def __init__(self, path: str | Path):
        self.root = Path(path).expanduser().resolve()
        if not self.root.is_dir():
            raise NotADataset(
                f"no dataset directory at {self.root}: build one with `zeropass index MODEL --db {path}` "
                f"or point --db / $ZEROPASS_DB at an existing one")
        try:
            manifest = read_manifest(self.root)
        except ValueError:
            raise NotADataset(f"{self.root / MANIFEST} is not valid JSON: rebuild the dataset with `zeropass index MODEL --db {path}`") from None
        if manifest is None or manifest.get("format", FORMAT) != FORMAT:
            raise NotADataset(
                f"{self.root} is not a zeropass dataset (no {MANIFEST}): build one with `zeropass index MODEL --db {path}`")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            sources = sorted({str(m.get("source")) for m in manifest.get("models", {}).values() if m.get("source")})
            hint = f" (models: {', '.join(sources)})" if sources else ""
            raise SchemaMismatch(
                f"dataset {self.root} was written with schema version {version}, this zeropass reads version "
                f"{SCHEMA_VERSION}: rebuild it into a new directory with `zeropass index MODEL --db NEWDIR` for each model{hint}")
        self.manifest = manifest
        self.con = self._connect()

    def _connect(self) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(":memory:")
        for name, table in TABLES.items():
            con.execute(f"CREATE VIEW {name} AS {view_sql(table, table_files(self.manifest, name), self.root)}")
        # Parquet footers are cached, so repeated queries skip re-reading metadata.
        con.execute("SET parquet_metadata_cache = true")
        root = str(self.root).replace("'", "''")
        # DuckDB checks the glob-escaped name the views use (schemas.layout.duckdb_path) as given
        escaped = duckdb_path(str(self.root)).replace("'", "''")
        con.execute(f"SET allowed_directories = ['{root}/', '{escaped}/']")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        return con

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Dataset({str(self.root)!r}, models={self.model_names()})"

    # -- SQL --------------------------------------------------------------------------------

    def sql(self, query: str, params: dict | list | None = None) -> pa.Table:
        """Run read-only SQL (``$name`` or ``?`` placeholders bound from ``params``) -> Arrow.

        >>> ds.sql("SELECT * FROM tokens WHERE norm = $w", {"w": "paris"})  # doctest: +SKIP
        """
        statements = check_read_only(query)
        # Earlier statements run for their effect only (there is none that reads); the last answers.
        for st in statements[:-1]:
            self._run(st, None)
        return self._run(statements[-1], params)

    def df(self, query: str, params: dict | list | None = None):
        """Like :meth:`sql`, as a pandas DataFrame (needs pandas)."""
        return self.sql(query, params).to_pandas()

    def pl(self, query: str, params: dict | list | None = None):
        """Like :meth:`sql`, as a polars DataFrame (needs polars)."""
        import polars as pl

        return pl.from_arrow(self.sql(query, params))

    def _run(self, query: str, params: dict | list | None = None) -> pa.Table:
        """Internal SQL (trusted text, values always bound as parameters)."""
        if isinstance(params, dict):
            # DuckDB wants exactly the parameters the text names; helpers pass a superset.
            used = set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", query))
            params = {k: v for k, v in params.items() if k in used} or None
        try:
            rel = self.con.sql(query, params=params)
            if rel is None:  # PRAGMA / CALL without a result
                return pa.table({})
            return rel.to_arrow_table()
        except duckdb.PermissionException as e:
            raise ForbiddenSQL(
                f"{_first_line(e).removeprefix('Permission Error: ')}: only the dataset's own files "
                f"(under {self.root}) can be read") from None
        except duckdb.CatalogException as e:
            # With external access off, a quoted path outside the dataset is not scanned but
            # looked up as a table: say why.
            m = re.search(r"Table with name (.+?) does not exist", str(e))
            if m and ("/" in m.group(1) or "." in m.group(1)):
                raise ForbiddenSQL(f"cannot read {m.group(1)}: only the dataset's own files (under {self.root}) can be read") from None
            raise BadSQL(_first_line(e)) from None
        except duckdb.Error as e:
            raise BadSQL(_first_line(e)) from None

    def source(self, table: str, models: list[str] | None = None, layers: list[int] | None = None) -> str:
        """SQL for ``table`` restricted to the files of ``models`` (and ``layers``), as a subquery.

        The same rows as the view with those filters, but DuckDB opens only the files that can
        hold them (binding a scan over every file of a big dataset costs tens of milliseconds).
        Paths come from the manifest, never from the user.
        """
        files = table_files(self.manifest, table, models)
        if layers is not None and "layer" in TABLES[table].partition_by:
            wanted = {f"layer={int(layer)}" for layer in layers}
            files = [f for f in files if wanted & set(f.split("/"))]
        return f"({view_sql(TABLES[table], files, self.root)})"

    def rows(self, query: str, params: dict | list | None = None) -> list[dict]:
        """Internal SQL -> list of dicts."""
        return self._run(query, params).to_pylist()

    # -- models -----------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        return sorted(self.manifest.get("models", {}))

    def resolve_models(self, model: str | list[str] | tuple[str, ...] | None) -> list[str]:
        """Slugs selected by ``model`` (None: all; a slug, a comma list or a list of either)."""
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
                    raise UnknownModel(f"unknown model {slug!r}: indexed models are {have}")
                if slug not in out:
                    out.append(slug)
        return out or names

    def model_info(self, model: str) -> dict:
        (slug,) = self.resolve_models(model)
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
