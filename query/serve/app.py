"""The explorer: a Starlette app serving pages and a JSON API over one read-only ``query.Dataset``.

Every read goes through the Dataset's methods (``models``, ``heads``, ``neurons``, ``show``,
``similar``, ``sql``, ``rows``), so the explorer adds no second way of querying: user values are
bound parameters, user SQL passes ``check_read_only`` and runs on the locked-down connection. Only GET
routes exist; no request names a file. Templates autoescape, so tokens are always text.
"""
from __future__ import annotations

import copy
import json
import queue
import threading
import time
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from urllib.parse import quote, urlencode

import pyarrow as pa
from jinja2 import Environment, FileSystemLoader
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from schemas import TABLES
from schemas.format import model_settings
from schemas.kinds import ALL_KINDS
from schemas.units import feature_unit

from .. import output
from ..errors import BadOption, ForbiddenSQL, QueryError, UnknownModel, UnknownToken
from ..features import resolve_feature
from ..helpers import _bound
from ..params import HELPERS, call, from_query, whole
from ..units import check_unit, parse_unit
from . import plots
from .api import ENDPOINTS, openapi

HERE = Path(__file__).parent
SQL_ROW_CAP = 1000
# Rows are not all alike: one `SELECT repeat('x', 50000000)` row is 50 MB. Past this many bytes of
# Arrow data a result is cut (X-Zeropass-Truncated), and a first row alone past it is refused.
SQL_BYTE_CAP = 8 * 2**20
SQL_TIMEOUT_S = 10.0
# Pages and SQL share the pool, but SQL may hold at most SQL_SLOTS of its Datasets at once, so
# POOL_SIZE of them are always left to pages; at most SQL_QUEUE more SQL requests wait, the rest get 503.
POOL_SIZE = 4
SQL_SLOTS = 2
SQL_QUEUE = 4
SEARCH_LIMIT = 50
UNIT_LIMIT = 20
NEIGHBOURS = 5
# Numeric columns of `heads` that make a heatmap (the rest are keys).
HEAD_KEYS = {"model", "layer", "head", "kv_head", "unit"}
DEFAULT_METRIC = "ov_copying_score"
SECURITY_HEADERS = {
    # Defence in depth: templates escape every token, and even if one slipped through no inline
    # script would run, and no page can be framed or post elsewhere.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


# -- SQL with a row cap and a time limit --------------------------------------------------------

class ServerBusy(QueryError):
    """Every SQL slot of the explorer is taken and its queue is full: try again shortly."""


class ResultTooLarge(QueryError):
    """One row of a SQL result is larger than the explorer sends."""


class UnknownDictionary(UnknownModel):
    """The model has no dictionary of that name (a 404 like an unknown model)."""


def run_sql(ds, query: str, *, max_rows: int = SQL_ROW_CAP, timeout: float = SQL_TIMEOUT_S,
            max_bytes: int = SQL_BYTE_CAP):
    """(the first rows of read-only ``query`` as Arrow, at most ``max_rows`` and ``max_bytes``; whether more exist).

    The one place the explorer runs user SQL: ``Dataset.stream`` (the statement check, the
    time limit, the one-line errors of ``zeropass sql``), read batch by batch and stopped once
    ``max_rows + 1`` rows or more than ``max_bytes`` are in, so no more than that is ever
    fetched. Raises QueryTimeout past ``timeout`` seconds, ResultTooLarge when the first row
    alone is over ``max_bytes``.
    """
    batches, n, size = [], 0, 0
    with ds.stream(query, timeout=timeout, batch_rows=max_rows + 1) as result:
        for batch in result:
            batches.append(batch)
            n += batch.num_rows
            size += batch.nbytes
            if n > max_rows or size > max_bytes:
                break
        table = pa.Table.from_batches(batches, schema=result.schema)
    more = table.num_rows > max_rows
    table = table.slice(0, max_rows)
    if table.nbytes > max_bytes:
        keep = _rows_within(table, max_bytes)
        if keep == 0:
            raise ResultTooLarge(f"the first row of the result is larger than the explorer's {max_bytes / 2**20:g} MB "
                                 f"limit: select fewer or shorter columns (e.g. left(col, 1000)), or use `zeropass sql`")
        table, more = table.slice(0, keep), True
    return table, more


def _rows_within(table: pa.Table, max_bytes: int) -> int:
    """How many first rows of ``table`` fit in ``max_bytes`` (a slice's nbytes counts only the bytes it references)."""
    lo, hi = 0, table.num_rows
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if table.slice(0, mid).nbytes <= max_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _temporal(t: pa.DataType) -> bool:
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return True
    if pa.types.is_struct(t):
        return any(_temporal(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _temporal(t.value_type)
    if pa.types.is_map(t):
        return _temporal(t.key_type) or _temporal(t.item_type)
    return False


def renderable(table: pa.Table) -> pa.Table:
    """``table`` with every date/time column Python cannot hold (``infinity``, years past 9999) as DuckDB's text of it.

    DuckDB and Arrow hold such values; Python's datetime does not, so rows of them could not be
    listed or written (a 500). Those columns only are cast, by DuckDB itself over the Arrow data
    on a connection of their own that holds nothing else, so they read as DuckDB prints them.
    """
    bad = set()
    for i, field in enumerate(table.schema):
        if _temporal(field.type):
            try:
                table.column(i).to_pylist()
            except (OverflowError, ValueError):
                bad.add(i)
    if not bad:
        return table
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        con.execute("SET enable_external_access = false")
        # by position: a result's column names may repeat or hold quotes
        rel = con.from_arrow(table.rename_columns([f"c{i}" for i in range(table.num_columns)]))
        out = rel.project(", ".join(f"CAST(c{i} AS VARCHAR) AS c{i}" if i in bad else f"c{i}"
                                    for i in range(table.num_columns))).arrow()
        out = out.read_all() if hasattr(out, "read_all") else out
        return out.rename_columns(table.column_names)
    finally:
        con.close()


# -- rendering helpers -------------------------------------------------------------------------

def tok(text) -> str:
    """A token as the CLI's table shows it: quoted when it has edge whitespace or control characters."""
    return output._table_cell(text) if text is not None else ""


def cell(v) -> str:
    return output._table_cell(v)


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(tok=tok, cell=cell, q=lambda s: quote(str(s), safe=""))
    env.globals.update(urlencode=urlencode)
    return env


def _status(e: QueryError) -> int:
    if isinstance(e, ServerBusy):
        return 503
    if isinstance(e, (UnknownModel, UnknownToken)):
        return 404
    if isinstance(e, ForbiddenSQL):
        return 403
    return 400


_WHOLE = whole()


def _layer_param(request: Request, name: str) -> int | None:
    raw = request.query_params.getlist(name)
    return _WHOLE(name, raw[-1]) if raw and raw[-1].strip() else None


def _required(request: Request, name: str, what: str) -> str:
    v = request.query_params.get(name)
    if v is None or v == "":
        raise BadOption(f"missing ?{name}=: give {what}")
    return v


@contextmanager
def _turn(ex: "Explorer", request: Request, sql: bool):
    """A SQL turn for a request that runs user SQL (``?q=`` given), none for the others; yields whether it took one."""
    if sql and request.query_params.get("q", "").strip():
        with ex.sql_turn():
            yield True
    else:
        yield False


class _Pool:
    """Up to ``size`` Datasets made by ``make`` when all are lent (the first may be given), lent one at a time."""

    def __init__(self, make, size: int, first=None):
        self._make, self._size = make, size
        self._free: queue.LifoQueue = queue.LifoQueue()
        self._made: list = []
        self._lock = threading.Lock()
        if first is not None:
            self._free.put(first)
            self._made.append(first)

    def take(self):
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            grow = len(self._made) < self._size
            if grow:
                self._made.append(None)  # the place is reserved while it opens
        if not grow:
            return self._free.get()
        try:
            ds = self._make()
        except BaseException:
            with self._lock:
                self._made.remove(None)
            raise
        with self._lock:
            self._made[self._made.index(None)] = ds
        return ds

    def give(self, ds) -> None:
        self._free.put(ds)

    def close(self, keep=None) -> None:
        for ds in self._made:
            if ds is not None and ds is not keep:
                ds.close()


class Explorer:
    """The app's state: a small pool of open Datasets, the SQL turns, the limits and the templates.

    A DuckDB connection runs one query at a time, so each request borrows a Dataset of its own
    (:meth:`session`). Pages read through the one the app was made with or, when it is busy, a
    cursor twin of it (``Dataset.cursor``: a cursor per thread over the one connection, DuckDB's
    documented way, sharing its views, lock-down and Parquet footer cache), up to ``pool_size``.

    User SQL first takes one of ``sql_slots`` turns (:meth:`sql_turn`); at most ``sql_queue``
    requests wait for one, the next is answered 503 at once. It runs on Datasets opened for it
    alone (``Dataset.reopen``, one per turn): cursors share their database's task scheduler, and
    measured here a CPU-bound query then held a cursor's page for as long as it ran (``/`` 1.8 s
    behind two slow queries, 0.2 s with SQL on its own database, docs/EXPLORER.md). A time limit
    interrupts only its own query.
    """

    def __init__(self, ds, *, sql_row_cap: int = SQL_ROW_CAP, sql_timeout: float = SQL_TIMEOUT_S, pool_size: int = POOL_SIZE,
                 sql_slots: int = SQL_SLOTS, sql_queue: int = SQL_QUEUE, sql_byte_cap: int = SQL_BYTE_CAP):
        self.ds = ds
        self._pool_lock = threading.Lock()
        self.sql_slots = max(1, sql_slots)
        self.pool_size = max(1, pool_size)
        self._pages = _Pool(ds.cursor, self.pool_size, first=ds)
        self._sql_pool = _Pool(ds.reopen, self.sql_slots)
        self.sql_queue = max(0, sql_queue)
        self._sql_turns = threading.BoundedSemaphore(self.sql_slots)
        self._sql_waiting = 0
        # The Dataset's views are fixed when it opens, so these small answers never go stale.
        self._cache: dict = {}
        self.sql_row_cap = sql_row_cap
        self.sql_byte_cap = sql_byte_cap
        self.sql_timeout = sql_timeout
        self.env = _env()

    @contextmanager
    def sql_turn(self):
        """One of the ``sql_slots`` turns for user SQL; ServerBusy when they are taken and ``sql_queue`` wait already.

        A request that waits gives up when the queries ahead of it could all have run to their time limit.
        """
        with self._pool_lock:
            got = self._sql_turns.acquire(blocking=False)
            if not got:
                if self._sql_waiting >= self.sql_queue:
                    raise ServerBusy(f"the explorer is running {self.sql_slots} SQL queries and {self._sql_waiting} more "
                                     f"wait: try again in a few seconds (pages are not affected)")
                self._sql_waiting += 1
        if not got:
            try:
                got = self._sql_turns.acquire(timeout=self.sql_timeout * (1 + self.sql_queue / self.sql_slots))
            finally:
                with self._pool_lock:
                    self._sql_waiting -= 1
            if not got:
                raise ServerBusy("no SQL turn came free in time: try again shortly (pages are not affected)")
        try:
            yield
        finally:
            self._sql_turns.release()

    @contextmanager
    def session(self, sql: bool = False):
        """This Explorer reading through a Dataset nobody else is using until the block ends.

        Pages read through cursors of the one connection; user SQL (``sql=True``, inside a
        :meth:`sql_turn`) through Datasets opened for it alone (see the class).
        """
        pool = self._sql_pool if sql else self._pages
        ds = pool.take()
        ex = copy.copy(self)
        ex.ds = ds
        try:
            yield ex
        finally:
            pool.give(ds)

    def close(self) -> None:
        """Close the cursors and Datasets the pools opened (the Dataset it was given stays its owner's)."""
        self._pages.close(keep=self.ds)
        self._sql_pool.close()

    # -- reads -----------------------------------------------------------------------------------

    def model(self, name: str) -> dict:
        """The models row of ``name``; UnknownModel for anything else (a comma list included)."""
        names = self.ds.model_names()
        if name not in names:
            raise UnknownModel(f"unknown model {name!r}: indexed models are {', '.join(names) or 'none'}")
        return self.ds.model_info(name)

    def head_metrics(self) -> list[str]:
        """The metric columns of ``heads``, as ``schemas`` declares them."""
        return [c.name for c in TABLES["heads"].columns if c.name not in HEAD_KEYS and pa.types.is_floating(c.type)]

    def head_grid(self, model: str, metric: str) -> dict:
        """{(layer, head): value} of one heads metric (``metric`` is checked against the columns)."""
        if metric not in self.head_metrics():
            raise BadOption(f"unknown head metric {metric!r}: use one of {', '.join(self.head_metrics())}")
        key = ("head_grid", model, metric)
        if key not in self._cache:
            rows = self.ds.rows(f'SELECT layer, head, "{metric}" AS v FROM {self.ds.source("heads", [model])} WHERE model = $m',
                                {"m": model})
            self._cache[key] = {(r["layer"], r["head"]): r["v"] for r in rows}
        return self._cache[key]

    def dictionaries(self, model: str | None = None) -> list[dict]:
        """The ``dictionaries`` rows (of ``model``, or all), by model and name."""
        if "dictionaries" not in self._cache:
            self._cache["dictionaries"] = self.ds.dictionaries().to_pylist()
        return [d for d in self._cache["dictionaries"] if model is None or d["model"] == model]

    def dictionary(self, model: str, name: str) -> dict:
        """The dictionaries row of ``name`` in ``model``; UnknownDictionary naming the model's dictionaries otherwise."""
        self.model(model)
        mine = self.dictionaries(model)
        row = next((d for d in mine if d["dictionary"] == name), None)
        if row is None:
            have = ", ".join(d["dictionary"] for d in mine[:20]) + (", ..." if len(mine) > 20 else "")
            raise UnknownDictionary(f"{model} has no dictionary {name!r} (its dictionaries: "
                                    f"{have or 'none; add one with `zeropass index-sae`'})")
        return row

    def alignments(self) -> list[dict]:
        if "alignments" not in self._cache:
            self._cache["alignments"] = self.ds.rows("SELECT DISTINCT model_a, model_b FROM alignments ORDER BY model_a, model_b")
        return self._cache["alignments"]

    # -- responses -----------------------------------------------------------------------------

    def html(self, template: str, status: int = 200, **ctx) -> HTMLResponse:
        ctx.setdefault("models", self.ds.model_names())
        return HTMLResponse(self.env.get_template(template).render(**ctx), status_code=status, headers=SECURITY_HEADERS)

    def error_page(self, message: str, status: int) -> HTMLResponse:
        return self.html("error.html", status=status, message=message, title=f"Error {status}")


def page(fn=None, *, sql: bool = False):
    """An HTML endpoint on a Dataset of its own; typed errors become a friendly page with a 4xx (or 503) status.

    ``sql=True``: it runs user SQL, which first takes a turn (:meth:`Explorer.sql_turn`) before a Dataset.
    """
    if fn is None:
        return lambda f: page(f, sql=sql)

    @wraps(fn)
    def endpoint(request: Request):
        explorer = request.app.state.explorer
        t = time.perf_counter()
        try:
            with _turn(explorer, request, sql) as turn, explorer.session(sql=turn) as ex:
                resp = fn(ex, request)
        except QueryError as e:
            resp = explorer.error_page(str(e), _status(e))
        resp.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - t) * 1000:.1f}"
        return resp

    return endpoint


def api(fn=None, *, sql: bool = False):
    """A JSON endpoint: the function returns an Arrow table (or a Response); errors are {"error": "..."}."""
    if fn is None:
        return lambda f: api(f, sql=sql)

    @wraps(fn)
    def endpoint(request: Request):
        explorer = request.app.state.explorer
        try:
            with _turn(explorer, request, sql) as turn, explorer.session(sql=turn) as ex:
                out = fn(ex, request)
        except QueryError as e:
            return JSONResponse({"error": str(e)}, status_code=_status(e), headers=SECURITY_HEADERS)
        if isinstance(out, Response):
            return out
        # The CLI's --format json text, byte for byte.
        return Response(output.to_json(renderable(out)), media_type="application/json", headers=SECURITY_HEADERS)

    return endpoint


# -- pages -------------------------------------------------------------------------------------

@page
def home(ex: Explorer, request: Request):
    table = ex.ds.models()
    cols = [c for c in ("model", "architecture", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_head", "d_ff",
                        "d_vocab", "tied", "variant", "k", "n_pairs", "source") if c in table.column_names]
    return ex.html("home.html", title="zeropass explorer", cols=cols, rows=table.select(cols).to_pylist(),
                   alignments=ex.alignments(), dictionaries=ex.dictionaries())


def _layer_ok(layer, lo, hi) -> bool:
    if lo is None and hi is None:
        return True
    if layer is None:
        return False
    return (lo is None or layer >= lo) and (hi is None or layer <= hi)


def _hidden(table) -> int:
    """How many entries ``readable`` left out of a helper's table (its schema metadata ``hidden_rows``)."""
    meta = table.schema.metadata or {}
    return int(meta.get(b"hidden_rows", b"0"))


@page
def search(ex: Explorer, request: Request):
    """Heads, vectors and dictionary features listing ``q``; its filters are the heads/neurons/features
    parameters, read by the API's parsers."""
    def get(key):  # the form sends empty fields for "all"
        return [v for v in request.query_params.getlist(key) if v != ""]

    spec = HELPERS["heads"]
    q = request.query_params.get("q", "")
    model = spec["model"].read(get("model"))
    circuit = spec["circuit"].read(get("circuit"))
    side, exact = spec["side"].read(get("side")), spec["exact"].read(get("exact"))
    readable = spec["readable"].read(get("readable"))
    limit = spec["limit"].read(get("limit")) if get("limit") else SEARCH_LIMIT
    kind = request.query_params.get("kind", "")
    lo, hi = _layer_param(request, "layer_min"), _layer_param(request, "layer_max")
    has_features = bool(ex.dictionaries())
    ctx = dict(title=f"search {q}" if q else "search", q=q, search_q=q, model=model[0] if model else "", kind=kind,
               circuit=circuit[0] if circuit else "", layer_min="" if lo is None else lo, layer_max="" if hi is None else hi,
               kinds=ALL_KINDS, heads=[], neurons=[], features=[], has_features=has_features, readable=readable,
               hidden=None, error=None, searched=bool(q))
    if not q:
        return ex.html("search.html", **ctx)
    for m in model or []:
        ex.model(m)
    if kind not in ("", "heads", "features") and kind not in ALL_KINDS:
        raise BadOption(f"unknown kind {kind!r}: use heads, features or one of {', '.join(ALL_KINDS)}")
    # With a layer range the helpers' own limit would cut before the filter: filter, then cut.
    cut = None if (lo is not None or hi is not None) else limit
    hidden = {}
    try:
        if kind in ("", "heads"):
            table = ex.ds.heads(q, model=model, circuit=circuit, side=side, limit=cut, exact=exact, readable=readable)
            hidden["heads"] = _hidden(table)
            ctx["heads"] = [r for r in table.to_pylist() if _layer_ok(r["layer"], lo, hi)][:limit]
        if kind not in ("heads", "features"):
            table = ex.ds.neurons(q, model=model, kind=kind or None, side=side, limit=cut, exact=exact, readable=readable)
            hidden["neurons"] = _hidden(table)
            ctx["neurons"] = [r for r in table.to_pylist() if _layer_ok(r["layer"], lo, hi)][:limit]
        if kind in ("", "features") and has_features:
            rows = ex.ds.features(q, model=model, side=side, limit=cut, exact=exact).to_pylist()
            ctx["features"] = [r for r in rows if _layer_ok(r["layer"], lo, hi)][:limit]
    except UnknownToken as e:
        ctx["error"] = str(e)
        return ex.html("search.html", status=404, **ctx)
    ctx["hidden"] = hidden if readable else None
    return ex.html("search.html", **ctx)


def _head_heatmap(model: str, grid: dict, info: dict, *, marked=None, title_fmt="{:.4g}", link=True):
    layers = list(range(info["n_layers"]))
    heads = list(range(info["n_heads"]))

    def fmt(v):
        return "no value" if v is None else title_fmt.format(v)

    return plots.heatmap(
        grid, layers, heads, row_label=lambda r: f"L{r}", col_label=lambda c: f"H{c}",
        href=(lambda r, c: f"/model/{quote(model, safe='')}/unit/L{r}.H{c}") if link else None,
        title=lambda r, c, v: f"L{r}.H{c}: {fmt(v)}", marked=marked)


@page
def model_page(ex: Explorer, request: Request):
    name = request.path_params["model"]
    info = ex.model(name)
    metrics = ex.head_metrics()
    metric = request.query_params.get("metric") or (DEFAULT_METRIC if DEFAULT_METRIC in metrics else (metrics or [""])[0])
    grid = ex.head_grid(name, metric)
    ranked = sorted(((v, k) for k, v in grid.items() if v is not None), reverse=True)[:10]
    token = request.query_params.get("token", "")
    ctx = dict(title=name, name=name, info=info, metric=metric, metrics=metrics, heat=_head_heatmap(name, grid, info),
               top_heads=[{"unit": f"L{l}.H{h}", "value": v} for v, (l, h) in ranked],
               settings=_settings(info), token=token, token_error=None, token_heads=None, token_vectors=None,
               head_rows=[], vector_rows=[],
               aligned=[a for a in ex.alignments() if name in (a["model_a"], a["model_b"])],
               dictionaries=ex.dictionaries(name))
    if token:
        try:
            hrows = ex.ds.heads(token, model=[name], limit=None).to_pylist()
            vrows = ex.ds.neurons(token, model=[name], kind=list(ALL_KINDS), limit=None).to_pylist()
        except UnknownToken as e:
            ctx["token_error"] = str(e)
            return ex.html("model.html", status=404, **ctx)
        ctx["token_heads"] = _head_heatmap(name, {(r["layer"], r["head"]): r["relevance"] for r in hrows}, info,
                                           title_fmt="relevance {:.3g}")
        ctx["token_vectors"] = _kind_heatmap(name, vrows)
        ctx["head_rows"], ctx["vector_rows"] = hrows[:15], vrows[:15]
    return ex.html("model.html", **ctx)


def _kind_heatmap(model: str, vrows: list[dict]) -> dict | None:
    """Layer x kind: how many of a layer's vectors of a kind list the token (sum of 1/rank), linking the best one."""
    if not vrows:
        return None
    kinds = [k for k in ALL_KINDS if any(r["kind"] == k for r in vrows)]
    kinds += sorted({r["kind"] for r in vrows} - set(kinds))
    layers = sorted({r["layer"] for r in vrows}, key=lambda x: (x is None, x))
    val: dict = {}
    best: dict = {}
    count: dict = {}
    for r in vrows:
        key = (r["layer"], r["kind"])
        val[key] = val.get(key, 0.0) + 1.0 / r["rank"]
        count[key] = count.get(key, 0) + 1
        if key not in best or r["rank"] < best[key]["rank"]:
            best[key] = r
    return plots.heatmap(
        val, layers, kinds, row_label=lambda r: "pos" if r is None else f"L{r}", col_label=str, cell_w=86,
        href=lambda r, c: f"/model/{quote(model, safe='')}/unit/{quote(best[(r, c)]['unit'], safe='')}",
        title=lambda r, c, v: f"{'pos' if r is None else f'L{r}'} {c}: {count[(r, c)]} vector(s), best {best[(r, c)]['unit']} "
                              f"at rank {best[(r, c)]['rank']}")


def _settings(info: dict) -> dict:
    try:
        return model_settings(info)
    except ValueError:
        return {"settings": info.get("settings")}


def _bar_items(rows: list[dict], label, score: str = "score") -> list[dict]:
    return [{"label": label(r), "score": r.get(score), "title": f"#{r.get('rank')} {label(r)}  {r.get(score)}"} for r in rows]


def _vector_lists(vectors: list[dict]) -> list[dict]:
    """A unit's ``vectors`` section (top and bottom side by side) as score bars per (kind, unit)."""
    lists = []
    for key in dict.fromkeys((r["kind"], r["unit"]) for r in vectors):
        rows = [r for r in vectors if (r["kind"], r["unit"]) == key]
        top = [dict(rank=r["rank"], token=r["top"], score=r["top_score"]) for r in rows if r["top"] is not None]
        bottom = [dict(rank=r["rank"], token=r["bottom"], score=r["bottom_score"]) for r in rows if r["bottom"] is not None]
        lists.append({"kind": key[0], "unit": key[1], "top": plots.bars(_bar_items(top, lambda r: tok(r["token"]))),
                      "bottom": plots.bars(_bar_items(bottom, lambda r: tok(r["token"])))})
    return lists


def _readable_ctx(request: Request, sections: dict, path: str) -> dict:
    """The readable toggle of a unit page: whether it is on, how many entries it hid, the link that flips it."""
    readable = HELPERS["show"]["readable"].read(request.query_params.getlist("readable"))
    hidden = sum(_hidden(t) for t in sections.values()) if readable else None
    return {"readable": readable, "hidden": hidden, "toggle": path if readable else f"{path}?readable=1"}


@page
def unit_page(ex: Explorer, request: Request):
    name, unit = request.path_params["model"], request.path_params["unit"]
    info = ex.model(name)
    u = parse_unit(unit)  # BadUnit for a malformed name; show() checks the range
    readable = HELPERS["show"]["readable"].read(request.query_params.getlist("readable"))
    sections = ex.ds.show(name, unit, limit=UNIT_LIMIT, readable=readable)
    # Neighbours cost one `similar` per model: they come from their own URL (fetched by the page's
    # script, or followed as a link), so the page itself stays fast however many models there are.
    path = f"/model/{quote(name, safe='')}/unit/{quote(u.name, safe='')}"
    neighbours = f"{path}/neighbours"
    toggle = _readable_ctx(request, sections, path)
    if u.kind == "head":
        return _head_page(ex, name, info, u, sections, neighbours, toggle)
    if u.kind == "feature":
        return _feature_page(ex, name, info, u, sections, neighbours, toggle)
    lists = _vector_lists(sections["vectors"].to_pylist())
    return ex.html("unit.html", title=f"{name} {u.name}", name=name, unit=u.name, info=info, lists=lists,
                   neighbours=neighbours, parent=f"L{u.layer}.H{u.head}" if u.head is not None else None, **toggle)


def _feature_page(ex, name, info, u, sections, neighbours, toggle):
    """A dictionary feature: decoder / encoder bars, its stats, and its stored nearest directions (linked)."""
    d = ex.dictionary(name, u.dictionary)
    stats = sections["stats"].to_pylist()
    near = sections["neighbours"].to_pylist()
    bars = plots.bars([{"label": r["neighbour"], "score": r["cosine"], "href": f"/model/{quote(name, safe='')}/unit/{quote(r['neighbour'], safe='')}",
                        "title": f"#{r['rank']} {r['neighbour']} ({r['neighbour_kind']}, layer {r['neighbour_layer']}): cosine {r['cosine']:.4g}"}
                       for r in near], label_w=200)
    return ex.html("feature.html", title=f"{name} {u.name}", name=name, unit=u.name, info=info, dictionary=d, feature=u.index,
                   lists=_vector_lists(sections["vectors"].to_pylist()), stats=stats[0] if stats else None,
                   near=near, near_bars=bars, neighbours=neighbours, **toggle)


DICTIONARY_PAGE = 100


@page
def dictionary_page(ex: Explorer, request: Request):
    """A dictionary: what it is, and its features (a page of them with their first tokens, or those listing ?token=)."""
    name, dname = request.path_params["model"], request.path_params["dictionary"]
    d = ex.dictionary(name, dname)
    spec = HELPERS["features"]

    def get(key):  # the form sends empty fields for "all"
        return [v for v in request.query_params.getlist(key) if v != ""]

    start = _WHOLE("start", get("start")[-1]) if get("start") else 0
    if start < 0 or start >= max(d["d_sae"], 1):
        raise BadOption(f"start must be a feature of {dname} (0..{d['d_sae'] - 1}), got {start}")
    token = request.query_params.get("token", "")
    kind, side = spec["kind"].read(get("kind")), spec["side"].read(get("side"))
    exact = spec["exact"].read(get("exact"))
    ctx = dict(title=f"{name} {dname}", name=name, d=d, info=ex.model(name), token=token, kind=kind[0] if kind else "",
               side=side, matches=None, token_error=None, start=start, size=DICTIONARY_PAGE, rows=[])
    if token:
        try:
            ctx["matches"] = ex.ds.features(token, model=[name], dictionary=[dname], kind=kind, side=side, exact=exact,
                                            limit=SEARCH_LIMIT).to_pylist()
        except UnknownToken as e:
            ctx["token_error"] = str(e)
            return ex.html("dictionary.html", status=404, **ctx)
        return ex.html("dictionary.html", **ctx)
    stop = min(start + DICTIONARY_PAGE, d["d_sae"])
    p = {"d": dname, "a": start, "b": stop}
    # `features` reads the dictionaries' files alone, never the model's own vectors
    firsts = ex.ds.rows(f"""SELECT feature, kind, list(token ORDER BY rank) AS tokens
                            FROM {ex.ds.source("features", [name])}
                            WHERE dictionary = $d AND side = 'top' AND rank <= 3 AND feature >= $a AND feature < $b
                            GROUP BY feature, kind""", p)
    stats = {r["feature"]: r for r in ex.ds.rows(
        f"""SELECT feature, decoder_norm, encoder_norm, b_enc, threshold FROM {ex.ds.source("feature_stats", [name])}
            WHERE dictionary = $d AND feature >= $a AND feature < $b""", p)}
    tokens = {(r["feature"], r["kind"]): r["tokens"] for r in firsts}
    ctx["rows"] = [dict(feature=f, unit=feature_unit(dname, f), decoder=tokens.get((f, "decoder"), []),
                        encoder=tokens.get((f, "encoder"), []), **{k: v for k, v in stats.get(f, {}).items() if k != "feature"})
                   for f in range(start, stop)]
    return ex.html("dictionary.html", **ctx)


@page
def neighbours_page(ex: Explorer, request: Request):
    """A unit's neighbours: the whole page, or with ?fragment=1 only its section (for the unit page's script)."""
    name, unit = request.path_params["model"], request.path_params["unit"]
    u = parse_unit(unit)
    check_unit(u, ex.model(name))  # a bad unit is one error, not one per model
    if u.kind == "feature":  # its dictionary and range are the model's to check
        resolve_feature(ex.ds, name, u)
    rows = _neighbours(ex, name, u.name)
    if "fragment" in request.query_params:
        html = ex.env.get_template("macros.html").module.neighbours(name, rows)
        return HTMLResponse(str(html), headers=SECURITY_HEADERS)
    return ex.html("neighbours.html", title=f"{name} {u.name} neighbours", name=name, unit=u.name, neighbours=rows)


def _neighbours(ex: Explorer, name: str, unit: str) -> list[dict]:
    """``similar`` in the same model and in every other one (an error there is shown, not raised)."""
    out = []
    for other in [name] + [m for m in ex.ds.model_names() if m != name]:
        try:
            rows = ex.ds.similar(name, unit, other, limit=NEIGHBOURS).to_pylist()
            out.append({"model": other, "rows": rows, "error": None})
        except QueryError as e:
            out.append({"model": other, "rows": [], "error": str(e)})
    return out


def _head_page(ex, name, info, u, sections, neighbours, toggle):
    metrics = sections["metrics"].to_pylist()
    pairs = sections["pairs"].to_pylist()
    blocks = []
    for circuit in ("ov", "qk"):
        for side in ("top", "bottom"):
            rows = [r for r in pairs if r["circuit"] == circuit and r["side"] == side]
            blocks.append({"circuit": circuit, "side": side, "rows": rows,
                           "bars": plots.bars(_bar_items(rows, lambda r: f"{tok(r['src'])} → {tok(r['dst'])}"), label_w=300, width=590)})
    metric = DEFAULT_METRIC if DEFAULT_METRIC in ex.head_metrics() else None
    place = None
    if metric:
        grid = ex.head_grid(name, metric)
        vals = sorted((v for v in grid.values() if v is not None), reverse=True)
        mine = grid.get((u.layer, u.head))
        place = {"metric": metric, "value": mine, "rank": (vals.index(mine) + 1) if mine is not None else None, "of": len(vals),
                 "heat": _head_heatmap(name, grid, info, marked={(u.layer, u.head)})}
    return ex.html("head.html", title=f"{name} {u.name}", name=name, unit=u.name, info=info, metrics=metrics,
                   blocks=blocks, roles_top=sections["head_tokens_top"].to_pylist(),
                   roles_bottom=sections["head_tokens_bottom"].to_pylist(), dims=sections["dims"].to_pylist(),
                   neighbours=neighbours, place=place, layer=u.layer, head=u.head, d_head=info.get("d_head"), **toggle)


@page
def align_page(ex: Explorer, request: Request):
    a, b = request.path_params["a"], request.path_params["b"]
    p = {"a": a, "b": b}
    options = ex.ds.rows("SELECT DISTINCT space, kind FROM alignments WHERE model_a = $a AND model_b = $b AND level = 'layer' "
                         "ORDER BY space, kind", p)
    if not options:
        raise UnknownModel(f"no alignment of {a!r} with {b!r} is stored: run `zeropass align {a} {b}` "
                           f"(stored: {', '.join(r['model_a'] + ' / ' + r['model_b'] for r in ex.alignments()) or 'none'})")
    space = request.query_params.get("space") or ("embedding" if any(o["space"] == "embedding" for o in options) else options[0]["space"])
    kind = request.query_params.get("kind") or ("layer" if any(o["kind"] == "layer" for o in options) else options[0]["kind"])
    if {"space": space, "kind": kind} not in options:
        raise BadOption(f"no {space}/{kind} layer scores for {a} / {b}: use one of "
                        f"{', '.join(o['space'] + '/' + o['kind'] for o in options)}")
    rows = ex.ds.rows("SELECT layer_a, layer_b, score, matched FROM alignments WHERE model_a = $a AND model_b = $b "
                      "AND level = 'layer' AND space = $s AND kind = $k", dict(p, s=space, k=kind))
    la = sorted({r["layer_a"] for r in rows})
    lb = sorted({r["layer_b"] for r in rows})
    matched = {(r["layer_a"], r["layer_b"]) for r in rows if r["matched"]}
    heat = plots.heatmap({(r["layer_a"], r["layer_b"]): r["score"] for r in rows}, la, lb,
                         row_label=lambda r: f"L{r}", col_label=lambda c: f"L{c}", marked=matched,
                         title=lambda r, c, v: f"{a} L{r} / {b} L{c}: {v:.4g}" + (" (matched)" if (r, c) in matched else ""))
    units = ex.ds.rows("SELECT kind, layer_a, layer_b, unit_a, unit_b, score FROM alignments WHERE model_a = $a AND model_b = $b "
                       "AND level = 'unit' AND matched AND space = $s ORDER BY layer_a, kind, score DESC LIMIT 200",
                       dict(p, s=space))
    have = set(ex.ds.model_names())
    return ex.html("align.html", title=f"align {a} / {b}", a=a, b=b, space=space, kind=kind, options=options, heat=heat,
                   matched=sorted(matched), units=units, link_a=a in have, link_b=b in have)


# -- enrichment (issue 23): a concept's units, and where they sit -------------------------------

ENRICH_ROWS = 50
NEURON_BANDS = 32  # FF neurons are drawn in at most this many bands per layer
P_FLOOR = 1e-300   # -log10(p) of a p-value that underflowed to 0 is drawn as 300


def _words(text: str) -> list[str]:
    """The words of the page's text box: split on whitespace and commas (a token with a space inside is
    given one per ``tokens=`` instead, as the API takes it)."""
    return [w for w in text.replace(",", " ").split() if w]


def _strength(p: float) -> float:
    import math

    return -math.log10(max(p, P_FLOOR))


def _enrich_heatmaps(ex: Explorer, rows: list[dict]) -> list[dict]:
    """Per model: layer x head (head role lists and head dimensions) and layer x neuron band (FF lists) of the
    strongest enrichment, -log10(p) of the best list in the cell; each cell links to that list's unit."""
    out = []
    for m in dict.fromkeys(r["model"] for r in rows):
        info = ex.model(m)
        layers = list(range(int(info["n_layers"])))
        heads, neurons = {}, {}
        d_ff = int(info.get("d_ff") or 0)
        band = max(1, -(-d_ff // NEURON_BANDS)) if d_ff else 1
        for r in rows:
            if r["model"] != m:
                continue
            try:
                u = parse_unit(r["unit"])
            except QueryError:
                continue
            if u.kind in ("head", "head_dim"):
                key, grid = (u.layer, u.head), heads
            elif u.kind == "neuron" and u.expert is None and d_ff:
                key, grid = (u.layer, u.index // band), neurons
            else:
                continue
            if key not in grid or r["p_value"] < grid[key]["p_value"]:
                grid[key] = r
        maps = {"model": m, "heads": None, "neurons": None, "band": band}
        link = lambda grid: lambda r, c: (f"/model/{quote(m, safe='')}/unit/{quote(grid[(r, c)]['unit'], safe='')}"  # noqa: E731
                                          if (r, c) in grid else None)
        tip = lambda grid, what: lambda r, c, v: (  # noqa: E731
            f"L{r} {what(c)}: best {grid[(r, c)]['unit']} {grid[(r, c)]['list']} p={grid[(r, c)]['p_value']:.3g} "
            f"q={grid[(r, c)]['q_value']:.3g}, {grid[(r, c)]['hits']} member(s)" if (r, c) in grid else f"L{r} {what(c)}: no member")
        if heads:
            cols = list(range(int(info["n_heads"])))
            values = {(l, h): _strength(heads[(l, h)]["p_value"]) if (l, h) in heads else 0.0 for l in layers for h in cols}
            maps["heads"] = plots.heatmap(values, layers, cols, row_label=lambda r: f"L{r}", col_label=lambda c: f"H{c}",
                                          href=link(heads), title=tip(heads, lambda c: f"H{c}"), signed=False, floor=0.0)
        if neurons:
            cols = list(range(-(-d_ff // band)))
            values = {(l, b): _strength(neurons[(l, b)]["p_value"]) if (l, b) in neurons else 0.0 for l in layers for b in cols}
            what = lambda c: f"N{c * band}-{min(d_ff, (c + 1) * band) - 1}"  # noqa: E731
            maps["neurons"] = plots.heatmap(values, layers, cols, row_label=lambda r: f"L{r}", col_label=lambda c: str(c * band),
                                            href=link(neurons), title=tip(neurons, what), signed=False, cell_w=30, floor=0.0)
        out.append(maps)
    return out


@page
def enrich_page(ex: Explorer, request: Request):
    """Token-set enrichment: a set (words, or a shipped set) -> the units whose lists are crowded with it,
    as a table and as heatmaps over layer x head and layer x neuron band. Bad input is one line on the page."""
    from ..enrich import match_summary, named_set, set_matches, set_sources, token_set

    def get(key):  # the form sends empty fields for "all"
        return [v for v in request.query_params.getlist(key) if v != ""]

    spec = HELPERS["enrich"]
    text = " ".join(request.query_params.getlist("words"))
    sets = get("set")  # repeatable, as `--set` is
    set_name = sets[0] if sets else ""
    if "sets" not in ex._cache:  # the shipped sets do not change while the explorer runs
        ex._cache["sets"] = set_sources().to_pylist()
    ctx = dict(title="enrich", words=text, set_name=set_name, sets=ex._cache["sets"], model="", kind="",
               side="top", limit=ENRICH_ROWS, error=None, rows=None, maps=[], summary=[], api=None, n_words=0)
    asked = any(k in request.query_params for k in ("words", "set", "tokens"))  # the form sent: an empty set is an error
    try:
        model, kind = spec["model"].read(get("model")), spec["kind"].read(get("kind"))
        side = spec["side"].read(get("side"))
        # the table shows `limit` rows; the helper runs unbounded for the heatmaps, so its bound is checked here
        limit = _bound(spec["limit"].read(get("limit")) if get("limit") else ENRICH_ROWS, "limit", 0)
        ctx.update(model=model[0] if model else "", kind=",".join(kind or []), side=side, limit=limit)
        if not asked:
            return ex.html("enrich.html", **ctx)
        for m in model or []:
            ex.model(m)
        words = token_set(_words(text) + (spec["tokens"].read(get("tokens")) or []) + [w for n in sets for w in named_set(n)])
        ctx["n_words"] = len(words)
        table = ex.ds.enrich(words, model=model, kind=kind, side=side, limit=None)
        ctx["summary"] = match_summary(set_matches(ex.ds, words, model=model))
    except QueryError as e:
        ctx["error"] = str(e)
        return ex.html("enrich.html", status=_status(e), **ctx)
    rows = table.to_pylist()
    ctx["rows"] = rows if limit is None else rows[:limit]
    ctx["total"] = len(rows)
    ctx["maps"] = _enrich_heatmaps(ex, rows)
    if len(words) <= 200:  # the twin's URL names every word
        query = [("tokens", w) for w in words] + [("model", m) for m in model or []] + [("kind", k) for k in kind or []]
        ctx["api"] = "/api/enrich?" + urlencode(query + [("side", side), ("limit", 0 if limit is None else limit)])
    return ex.html("enrich.html", **ctx)


EXAMPLE_SQL = [
    "SELECT model, layer, head, ov_copying_score FROM heads ORDER BY ov_copying_score DESC NULLS LAST LIMIT 10",
    "SELECT model, token_id, token FROM tokens t JOIN models m USING (vocab_id) WHERE norm = 'paris'",
    "SELECT kind, count(*) AS rows FROM vectors GROUP BY kind ORDER BY rows DESC",
]


@page(sql=True)
def sql_page(ex: Explorer, request: Request):
    q = request.query_params.get("q", "")
    ctx = dict(title="SQL", q=q, examples=EXAMPLE_SQL, cap=ex.sql_row_cap, timeout=ex.sql_timeout, error=None,
               cols=[], rows=[], truncated=False, ms=None)
    if not q.strip():
        return ex.html("sql.html", **ctx)
    t = time.perf_counter()
    try:
        table, truncated = run_sql(ex.ds, q, max_rows=ex.sql_row_cap, timeout=ex.sql_timeout, max_bytes=ex.sql_byte_cap)
        table = renderable(table)
    except QueryError as e:
        ctx["error"] = str(e)
        return ex.html("sql.html", status=_status(e), **ctx)
    ctx.update(cols=table.column_names, rows=[[r[c] for c in table.column_names] for r in table.to_pylist()],
               truncated=truncated, ms=(time.perf_counter() - t) * 1000, qs=urlencode({"q": q}))
    return ex.html("sql.html", **ctx)


@page
def api_docs(ex: Explorer, request: Request):
    return ex.html("api.html", title="JSON API", endpoints=ENDPOINTS)


# -- JSON API ----------------------------------------------------------------------------------

def _helper_api(name: str):
    """``/api/NAME``: helper NAME's parameters read from the query string by their one declaration
    (``query.params``), the helper called as the command line calls it, its rows as JSON."""
    spec = HELPERS[name]

    @api
    def endpoint(ex, request):
        values = from_query(spec, request.query_params.getlist)
        for p in spec.params:  # a single model is named exactly (no comma list), as on its pages
            if p.name in ("model", "in_model") and not p.multiple:
                ex.model(values[p.name])
        out = call(spec, ex.ds, values)
        if isinstance(out, dict):  # show: sections
            text = json.dumps({k: json.loads(output.to_json(renderable(t))) for k, t in out.items()}, ensure_ascii=False,
                              indent=1)
            return Response(text, media_type="application/json", headers=SECURITY_HEADERS)
        return out

    endpoint.__name__ = f"api_{name}"
    return endpoint


@api(sql=True)
def api_sql(ex, request):
    q = _required(request, "q", "read-only SQL, e.g. ?q=SELECT * FROM models")
    fmt = request.query_params.get("format", "json")
    if fmt not in ("json", "csv"):
        raise BadOption(f"unknown format {fmt!r}: use json or csv")
    table, truncated = run_sql(ex.ds, q, max_rows=ex.sql_row_cap, timeout=ex.sql_timeout, max_bytes=ex.sql_byte_cap)
    table = renderable(table)
    headers = dict(SECURITY_HEADERS, **{"X-Zeropass-Truncated": "true" if truncated else "false"})
    if fmt == "csv":
        headers["Content-Disposition"] = 'attachment; filename="zeropass.csv"'
        return Response(output.to_csv(table), media_type="text/csv; charset=utf-8", headers=headers)
    if "download" in request.query_params:
        headers["Content-Disposition"] = 'attachment; filename="zeropass.json"'
    return Response(output.to_json(table), media_type="application/json", headers=headers)


def api_openapi(request: Request):
    return JSONResponse(openapi(), headers=SECURITY_HEADERS)


# -- the app -----------------------------------------------------------------------------------

def _not_found(request: Request, exc: HTTPException):
    ex: Explorer = request.app.state.explorer
    msg = exc.detail if exc.status_code != 404 else f"no page at {request.url.path}: start from /"
    if request.url.path.startswith("/api"):
        return JSONResponse({"error": msg}, status_code=exc.status_code, headers=SECURITY_HEADERS)
    return ex.error_page(msg, exc.status_code)


def _server_error(request: Request, exc: Exception):
    # A bug, not a user error: say so in one line (uvicorn's log has the traceback).
    msg = f"internal error ({type(exc).__name__}): this is a zeropass bug, please report it with the URL"
    if request.url.path.startswith("/api"):
        return JSONResponse({"error": msg}, status_code=500, headers=SECURITY_HEADERS)
    return HTMLResponse(request.app.state.explorer.env.get_template("error.html").render(
        message=msg, title="Error 500", models=[]), status_code=500, headers=SECURITY_HEADERS)


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def create_app(ds, *, host: str = "127.0.0.1", sql_row_cap: int = SQL_ROW_CAP, sql_timeout: float = SQL_TIMEOUT_S,
               pool_size: int = POOL_SIZE, sql_slots: int = SQL_SLOTS, sql_queue: int = SQL_QUEUE,
               sql_byte_cap: int = SQL_BYTE_CAP) -> Starlette:
    """The explorer app over an open ``query.Dataset``.

    Bound to a loopback ``host``, only requests naming a loopback host are served (so a web page
    elsewhere cannot reach the dataset through DNS rebinding).
    """
    routes = [
        Route("/", home),
        Route("/search", search),
        Route("/model/{model}", model_page),
        Route("/model/{model}/unit/{unit}", unit_page),
        Route("/model/{model}/unit/{unit}/neighbours", neighbours_page),
        Route("/model/{model}/dictionary/{dictionary}", dictionary_page),
        Route("/align/{a}/{b}", align_page),
        Route("/enrich", enrich_page),
        Route("/sql", sql_page),
        Route("/api", api_docs),
        Route("/api/openapi.json", api_openapi),
        *(Route(f"/api/{name}", _helper_api(name)) for name in HELPERS),
        Route("/api/sql", api_sql),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = []
    if host in LOOPBACK:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]", "::1"]))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={404: _not_found, 405: _not_found, Exception: _server_error})
    app.state.explorer = Explorer(ds, sql_row_cap=sql_row_cap, sql_timeout=sql_timeout, pool_size=pool_size,
                                  sql_slots=sql_slots, sql_queue=sql_queue, sql_byte_cap=sql_byte_cap)
    for name in app.state.explorer.env.list_templates():  # compile now, not on a user's first visit
        app.state.explorer.env.get_template(name)
    return app
