"""Helper queries over a dataset: every one is plain SQL over the tables of docs/DESIGN.md §4.

All take a :class:`query.dataset.Dataset` and return pyarrow Tables (``show`` returns an ordered
dict of them). Each helper is two steps: a ``*_query`` function builds the SQL and exactly the
parameters it names (a :class:`Query`; nothing runs, so tests can read both), then the helper runs
it. User values are always bound as parameters; SQL text is assembled only from trusted fragments:
table sources built from the manifest (``Dataset.source``), column expressions and kind names from
``schemas``, and fixed clauses.

Token matching (docs/DESIGN.md §6), the same in every helper:

* default: ``tokens.norm = normalise(TOKEN)`` (``schemas.tokens``: NFKC, stripped, lower-cased,
  the indexer's definition), so ``paris`` finds `` Paris``, ``Paris`` and ``paris``;
* ``exact=True``: ``tokens.token = TOKEN`` (the decoded text as given, spaces included);
* ``token_id=N``: that id in each selected model's vocabulary.

Tokens are matched per vocabulary by text, so models with different tokenizers are searched for
the same word at once. The matched ids of each model are bound as one ``INTEGER[]`` parameter and
every scan filters on them the same way, ``token_id IN (SELECT unnest($ids))`` (see
:func:`_in_ids`).
"""
from __future__ import annotations

import operator
from collections import OrderedDict
from typing import NamedTuple

import pyarrow as pa

from schemas.kinds import (ALL_KINDS, BIAS, FEATURE, FEATURE_KINDS, FF, FF_KINDS, HEAD_DIM, HEAD_DIM_KINDS, KV_KINDS, POS, POS_KINDS,
                           ROUTER, ROUTER_KINDS, QUERY_HEAD_KINDS, order_sql)
from schemas.tokens import normalise
from schemas.units import head_unit_sql, vector_unit_sql

from .errors import BadOption, BadToken, UnknownToken
from .units import Unit, check_unit, column_max, parse_unit, quoted

norm = normalise  # the name query has always exported (query.norm)

SIDES = {"top": ["top"], "bottom": ["bottom"], "both": ["top", "bottom"]}
_MAX_RANK = column_max("vectors", "rank")        # ranks and row counts beyond this bound nothing
_MAX_TOKEN_ID = column_max("tokens", "token_id")
# Suggestions compare TOKEN with every vocabulary entry (Jaro-Winkler, Levenshtein: quadratic in
# the lengths); vocabulary entries are short, so a longer TOKEN gets none rather than a slow query.
SUGGEST_MAX_CHARS = 200
# `tokens` segments TEXT with a recursive query, one step per token; a bound keeps it interactive.
TOKENS_MAX_CHARS = 1000


class Query(NamedTuple):
    """SQL text and the parameters it names (``$name``), exactly."""

    sql: str
    params: dict


# -- checking arguments ------------------------------------------------------------------------

def _sides(side: str) -> list[str]:
    if side not in SIDES:
        raise BadOption(f"unknown side {side!r}: use top, bottom or both")
    return SIDES[side]


def _list_option(value, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    out = [s.strip() for item in items for s in str(item).split(",") if s.strip()]
    if not out:
        raise BadOption(f"no {what} given in {value!r}: use one or more of {', '.join(allowed)}")
    for s in out:
        if s not in allowed:
            raise BadOption(f"unknown {what} {quoted(s)}: use one of {', '.join(allowed)}")
    return out


def _bound(value, what: str, minimum: int) -> int | None:
    """A limit or rank bound: None (no bound) or a whole number >= ``minimum``.

    Ranks and token ids are int32 columns, so a bound beyond int32 bounds nothing: it is the same
    as None (and the SQL leaves the predicate out rather than binding a value DuckDB cannot hold).
    """
    if value is None:
        return None
    try:
        n = operator.index(value)
    except TypeError:
        raise BadOption(f"{what} {value!r} is not a whole number") from None
    if isinstance(value, bool):
        raise BadOption(f"{what} {value!r} is not a whole number")
    if n < minimum:
        raise BadOption(f"{what} {n} is out of range: give {minimum} or more")
    return None if n > _MAX_RANK else n


def _text(value, what: str) -> str:
    """A str that DuckDB can bind: lone surrogates (from undecodable bytes) are refused."""
    if not isinstance(value, str):
        raise BadToken(f"{what} {value!r} is not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadToken(f"{what} {quoted(value)} is not valid Unicode text: lone surrogate U+{ord(value[e.start]):04X} "
                       f"at position {e.start} (was it read from bytes that are not UTF-8?)") from None
    return value


def _in_ids(column: str, key: str) -> str:
    """The one token filter: ``column`` is one of the ids bound as the INTEGER[] parameter ``$key``.

    A semi-join on the unnested list: DuckDB pushes its min/max into the Parquet scan, as fast as
    a join for a few ids and twice as fast as a list of scalar parameters for 150 (docs/QUERY.md),
    and it also serves an OR of two columns (``heads``), which a join would double-count.
    """
    return f"{column} IN (SELECT unnest(${key}::INTEGER[]))"


def _limit_clause(limit: int | None, params: dict) -> str:
    """``LIMIT $limit`` with its parameter, or nothing when there is no limit."""
    if limit is None:
        return ""
    params["limit"] = limit
    return "LIMIT $limit"


def _rank_clause(column: str, max_rank: int | None, params: dict, key: str = "max_rank") -> str:
    """``AND column <= $key`` with its parameter, or nothing when there is no bound."""
    if max_rank is None:
        return ""
    params[key] = max_rank
    return f"AND {column} <= ${key}"


# -- token matching ----------------------------------------------------------------------------

def match_query(models: list[str], token: str | None = None, *, exact: bool = False, token_id: int | None = None) -> Query:
    """The SQL of :func:`match_tokens` (raises BadToken for a TOKEN that cannot match anything)."""
    if token_id is not None:
        condition, value = "t.token_id = $q", token_id
    elif token is None:
        raise BadToken("give a TOKEN, or a token id with --id")
    elif exact:
        condition, value = "t.token = $q", _text(token, "token")
    else:
        value = normalise(_text(token, "token"))
        if not value:
            raise BadToken(f"token {quoted(token)} is empty or only whitespace: use --exact to match it as given (e.g. --exact ' ')")
        condition = "t.norm = $q"
    return Query(
        f"""SELECT m.model, m.vocab_id, t.token_id, t.token, t.piece
            FROM models m JOIN tokens t ON t.vocab_id = m.vocab_id
            WHERE list_contains($models, m.model) AND {condition}
            ORDER BY m.model, t.token_id""",
        {"models": models, "q": value})


def match_tokens(ds, token: str | None = None, *, model=None, exact: bool = False, token_id: int | None = None) -> pa.Table:
    """The vocabulary entries TOKEN matches in each selected model: model, vocab_id, token_id, token, piece.

    Raises UnknownToken (with the nearest tokens as suggestions) when it matches in none.
    """
    models = ds.resolve_models(model)
    scope = ", ".join(models)
    if token_id is not None:
        try:
            token_id = operator.index(token_id)
        except TypeError:
            raise BadOption(f"token id {token_id!r} is not a whole number") from None
        if not 0 <= token_id <= _MAX_TOKEN_ID:  # no vocabulary has it (and DuckDB could not bind it)
            raise UnknownToken(f"token id {token_id} is not in the vocabulary of {scope}")
    hits = ds._run(*match_query(models, token, exact=exact, token_id=token_id))
    if hits.num_rows == 0:
        if token_id is not None:
            raise UnknownToken(f"token id {token_id} is not in the vocabulary of {scope}")
        hint = suggest(ds, token, models)
        tail = f"; nearest: {', '.join(repr(s) for s in hint)}" if hint else ""
        raise UnknownToken(f"token {quoted(token)} is in no vocabulary of {scope}{tail}")
    return hits


def suggest_query(token: str, models: list[str], n: int = 5) -> Query:
    """The SQL of :func:`suggest`."""
    return Query(
        """SELECT norm, min(token) AS example
           FROM tokens WHERE vocab_id IN (SELECT vocab_id FROM models WHERE list_contains($models, model))
             AND norm <> '' AND NOT special
           GROUP BY norm
           ORDER BY jaro_winkler_similarity(norm, $q) DESC, levenshtein(norm, $q), norm
           LIMIT $n""",
        {"models": models, "q": normalise(token) or token, "n": n})


def suggest(ds, token: str, models: list[str], n: int = 5) -> list[str]:
    """The ``n`` vocabulary entries nearest to ``token`` (Jaro-Winkler, then edit distance); none for a long token."""
    if len(token) > SUGGEST_MAX_CHARS:
        return []
    return [r["example"] for r in ds.rows(*suggest_query(token, models, n))]


class Matches(NamedTuple):
    """The tokens matched in one model (from :func:`match_tokens`)."""

    model: str
    ids: list[int]
    texts: list[str]


def matches_by_model(hits: pa.Table) -> list[Matches]:
    """One :class:`Matches` per model with matches, in the order of ``hits``."""
    out: dict[str, Matches] = {}
    for m, i, t in zip(*(hits.column(c).to_pylist() for c in ("model", "token_id", "token"))):
        entry = out.setdefault(m, Matches(m, [], []))
        entry.ids.append(i)
        entry.texts.append(t)
    return list(out.values())


def same_tokens(matches: list[Matches]) -> list[tuple[list[str], Matches]]:
    """``matches`` grouped by identical matched ids and texts (models sharing a vocabulary):
    (the models, their common matches). Each group is one scan over one source of all its
    models, so a query over 200 checkpoints of one family costs one scan, not 200 (docs/QUERY.md)."""
    groups: dict[tuple, tuple[list[str], Matches]] = {}
    for m in matches:
        groups.setdefault((tuple(m.ids), tuple(m.texts)), ([], m))[0].append(m.model)
    return list(groups.values())


# -- helpers -----------------------------------------------------------------------------------

_MODEL_COLUMNS = ("model", "architecture", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_head", "d_ff", "d_vocab",
                  "tied", "variant", "k", "n_pairs", "source")


def models_query() -> Query:
    first = ", ".join(_MODEL_COLUMNS)
    rest = ", ".join(f"'{c}'" for c in _MODEL_COLUMNS)
    return Query(f"SELECT {first}, COLUMNS(lambda c: c NOT IN ({rest})) FROM models ORDER BY model", {})


def models(ds) -> pa.Table:
    """The ``models`` table, most useful columns first."""
    return ds._run(*models_query())


def heads_query(ds, matches: list[Matches], *, circuits: list[str], sides: list[str], limit: int | None,
                readable: bool = False) -> Query:
    """The SQL of :func:`heads` for the tokens matched per model.

    The heads are ranked on numbers alone and cut to ``limit`` first; evidence strings are
    built for the heads kept only (at 200 models a token has ~17,000 evidence rows, and
    formatting and grouping their strings cost more than finding them, docs/QUERY.md).
    ``readable``: pairs whose other token is not readable (``READABLE_SQL``) are no evidence."""
    params: dict = {"circuits": circuits, "sides": sides}
    partner = f"AND {READABLE_SQL.format(col=_PAIR_PARTNER)}" if readable else ""
    parts = []
    # One scan per group of models with the same matches, over their files only.
    for i, (models, match) in enumerate(same_tokens(matches)):
        ids = f"ids{i}"
        params[ids] = match.ids
        parts.append(f"""
            SELECT p.model, p.layer, p.head, p.rank, p.score, p.circuit, p.side, NULL::VARCHAR AS role,
                   p.src AS a, p.dst AS b
            FROM {ds.source("pairs_by_token", models)} p
            WHERE {_in_ids("p.token_id", ids)}
              AND (p.endpoint = 'src' OR NOT {_in_ids("p.src_id", ids)})  -- a pair matching at both ends counts once
              AND list_contains($circuits, p.circuit) AND list_contains($sides, p.side) {partner}
            UNION ALL
            SELECT h.model, h.layer, h.head, h.rank, h.score, h.circuit, h.side, h.role, h.token AS a, NULL AS b
            FROM {ds.source("head_tokens", models)} h
            WHERE {_in_ids("h.token_id", ids)}
              AND list_contains($circuits, h.circuit) AND list_contains($sides, h.side)""")
    evidence = " UNION ALL ".join(parts)
    limit_clause = _limit_clause(limit, params)
    order = "relevance DESC, best_rank, model, layer, head"
    return Query(
        f"""WITH ev AS MATERIALIZED ({evidence}),
        best AS (
            SELECT model, layer, head, sum(1.0 / rank ORDER BY rank) AS relevance, min(rank) AS best_rank,
                   count(*) AS hits
            FROM ev GROUP BY model, layer, head
            ORDER BY {order} {limit_clause}),
        told AS (
            SELECT b.*, ev.rank, ev.score,
                   CASE WHEN ev.role IS NULL
                        THEN ev.circuit || ' ' || ev.side || ' pair #' || ev.rank || ' ' || to_json(ev.a) || ' -> '
                             || to_json(ev.b) || ' (' || printf('%.4g', ev.score) || ')'
                        ELSE ev.circuit || ' ' || ev.role || ' ' || ev.side || ' #' || ev.rank || ' ' || to_json(ev.a)
                             || ' (' || printf('%.4g', ev.score) || ')' END AS evidence
            FROM best b JOIN ev ON ev.model = b.model AND ev.layer = b.layer AND ev.head = b.head)
        SELECT model, {head_unit_sql("told")} AS unit, layer, head, relevance, best_rank, hits,
               list(evidence ORDER BY rank, abs(score) DESC, evidence) AS evidence
        FROM told GROUP BY model, layer, head, relevance, best_rank, hits
        ORDER BY {order}""", params)


_PAIR_PARTNER = "CASE WHEN p.endpoint = 'src' THEN p.dst ELSE p.src END"  # the other token of a pair row


def hidden_pairs_query(ds, matches: list[Matches], *, circuits: list[str], sides: list[str]) -> Query:
    """How many pair rows :func:`heads_query` with ``readable`` leaves out (their other token is not readable)."""
    params: dict = {"circuits": circuits, "sides": sides}
    parts = []
    for i, (models, match) in enumerate(same_tokens(matches)):
        params[f"ids{i}"] = match.ids
        parts.append(f"""SELECT count(*) AS n FROM {ds.source("pairs_by_token", models)} p
            WHERE {_in_ids("p.token_id", f"ids{i}")} AND (p.endpoint = 'src' OR NOT {_in_ids("p.src_id", f"ids{i}")})
              AND list_contains($circuits, p.circuit) AND list_contains($sides, p.side)
              AND NOT {READABLE_SQL.format(col=_PAIR_PARTNER)}""")
    return Query(f"SELECT sum(n)::BIGINT AS n FROM ({' UNION ALL '.join(parts)})", params)


def heads(ds, token: str | None = None, *, model=None, circuit=None, side: str = "top", limit: int | None = 20,
          exact: bool = False, token_id: int | None = None, readable: bool = False) -> pa.Table:
    """Heads whose stored circuit entries contain TOKEN, best first.

    Evidence is every ``pairs`` row of the head with TOKEN as its source/query (``src``) or
    promoted/key (``dst``) token, and every ``head_tokens`` row (role lists) with TOKEN.
    Ranking: ``relevance = sum(1 / rank)`` over the evidence rows (a rank-1 entry counts 1, a
    rank-10 entry 0.1), ties by best rank, then model, layer, head. One row per head:
    model, unit, layer, head, relevance, best_rank, hits, evidence (list, best first; each item
    says circuit, list, side, rank, the token(s) and the score). ``limit=None``: all heads.
    ``readable``: pairs whose other token is not letters are left out; the table's schema
    metadata ``hidden_rows`` says how many pair rows that was.

    >>> heads(ds, "paris", circuit="ov")   # doctest: +SKIP
    """
    circuits = _list_option(circuit or ["ov", "qk"], ("ov", "qk"), "circuit")
    sides, limit = _sides(side), _bound(limit, "limit", 0)
    hits = match_tokens(ds, token, model=model, exact=exact, token_id=token_id)
    matches = matches_by_model(hits)
    out = ds._run(*heads_query(ds, matches, circuits=circuits, sides=sides, limit=limit, readable=readable))
    if readable:
        hidden = ds.rows(*hidden_pairs_query(ds, matches, circuits=circuits, sides=sides))[0]["n"] or 0
        out = out.replace_schema_metadata({"hidden_rows": str(hidden)})
    return out


def neurons_query(ds, matches: list[Matches], *, kinds: list[str], sides: list[str], max_rank: int | None,
                  limit: int | None) -> Query:
    """The SQL of :func:`neurons` for the tokens matched per model.

    As in :func:`heads_query`, the vectors are ranked on numbers and cut to ``limit`` before
    their unit names and evidence strings are built."""
    params: dict = {"kinds": kinds, "sides": sides}
    rank_clause = _rank_clause("v.rank", max_rank, params)
    parts = []
    # vectors_by_token holds each token's rows together (one or two row groups per model).
    for i, (models, match) in enumerate(same_tokens(matches)):
        ids, texts = f"ids{i}", f"texts{i}"
        params.update({ids: match.ids, texts: match.texts})
        parts.append(f"""
            SELECT v.model, v.layer, v.kind, v.side, v.head, v.expert, v.dictionary, v.idx, v.rank, v.score,
                   list_extract(${texts}::VARCHAR[], list_position(${ids}::INTEGER[], v.token_id)) AS token
            FROM {ds.source("vectors_by_token", models)} v
            WHERE {_in_ids("v.token_id", ids)}
              AND list_contains($kinds, v.kind) AND list_contains($sides, v.side) {rank_clause}""")
    matched_rows = " UNION ALL ".join(parts)
    limit_clause = _limit_clause(limit, params)
    # One vector is (model, layer, kind, side, head, expert, idx); layer, head and expert may be null.
    key = ("model", "layer", "kind", "side", "head", "expert", "dictionary", "idx")
    same = " AND ".join(f"v.{c} IS NOT DISTINCT FROM b.{c}" for c in key)
    order = ("rank, CASE WHEN side = 'top' THEN -score ELSE score END, model, layer, kind, head, idx, "
             "expert NULLS FIRST, side")
    return Query(
        f"""WITH v AS MATERIALIZED ({matched_rows}),
        best AS (
            SELECT * FROM (SELECT {", ".join(key)}, min(rank) AS rank, arg_min(score, rank) AS score, count(*) AS hits
                           FROM v GROUP BY {", ".join(key)})
            ORDER BY {order} {limit_clause}),
        told AS (
            SELECT b.*, list(to_json(v.token) || ' #' || v.rank || ' (' || printf('%.4g', v.score) || ')'
                             ORDER BY v.rank) AS evidence
            FROM best b JOIN v ON {same}
            GROUP BY ALL)
        SELECT model, {vector_unit_sql("told")} AS unit, layer, kind, side, rank, score, hits, evidence FROM told
        ORDER BY {order}""", params)


_KEY_TYPES = {"model": "VARCHAR", "layer": "SMALLINT", "kind": "VARCHAR", "side": "VARCHAR", "head": "SMALLINT",
              "expert": "SMALLINT", "idx": "INTEGER", "rank": "INTEGER"}


def _vector_key(row: dict) -> tuple:
    """(head, expert, idx) of a ``neurons`` row, from its unit name (the columns are not in the result)."""
    u = parse_unit(row["unit"])
    if u.kind == "router":
        return None, u.expert, 0 if u.expert is None else u.expert
    return u.head, u.expert, 0 if u.kind == "bias" else u.index


def unreadable_above_query(ds, rows: list[dict]) -> Query:
    """For each vector of ``rows`` (model, layer, kind, side, head, expert, idx, rank): how many of its
    list's entries ranked above ``rank`` are not readable (``READABLE_SQL``), as ``above``."""
    models = sorted({r["model"] for r in rows})
    layers = None if any(r["layer"] is None for r in rows) else sorted({r["layer"] for r in rows})
    params = {f"r_{c}": [r[c] for r in rows] for c in _KEY_TYPES}
    cols = ", ".join(f"unnest($r_{c}::{t}[]) AS {c}" for c, t in _KEY_TYPES.items())
    same = " AND ".join(f"v.{c} IS NOT DISTINCT FROM r.{c}" for c in _KEY_TYPES if c != "rank")
    return Query(
        f"""WITH r AS (SELECT {cols})
            SELECT r.*, count(v.rank) AS above
            FROM r LEFT JOIN {ds.source("vectors", models, layers)} v
              ON {same} AND v.rank < r.rank AND NOT {READABLE_SQL.format(col="v.token")}
            GROUP BY ALL""", params)


def neurons(ds, token: str | None = None, *, model=None, kind=None, max_rank: int | None = None, side: str = "top",
            limit: int | None = 20, exact: bool = False, token_id: int | None = None, readable: bool = False) -> pa.Table:
    """Vectors (FF neurons by default; any ``vectors.kind`` via ``kind``) whose top-k list holds TOKEN.

    One row per (model, unit, kind, side): rank (best rank of a matching token), score (at that
    rank), hits (how many of the list's tokens match, e.g. `` Paris`` and ``Paris``), evidence
    (the matching entries: token, rank, score). Ranked by rank, then by score (largest first for
    ``top``, most negative first for ``bottom``), then model, layer, unit. ``max_rank=None`` and
    ``limit=None``: no bound.

    ``readable``: adds ``readable_rank``, the rank once the list's entries that are not letters
    are left out (what ``index --vocab-filter alpha`` would store, within the stored k); the
    table's schema metadata ``hidden_rows`` counts the entries left out above the rows' ranks.

    >>> neurons(ds, "paris", kind=["ff_value"], max_rank=5)   # doctest: +SKIP
    """
    kinds = _list_option(kind or list(FF_KINDS), ALL_KINDS, "kind")
    sides, limit, max_rank = _sides(side), _bound(limit, "limit", 0), _bound(max_rank, "max rank", 1)
    hits = match_tokens(ds, token, model=model, exact=exact, token_id=token_id)
    out = ds._run(*neurons_query(ds, matches_by_model(hits), kinds=kinds, sides=sides, max_rank=max_rank, limit=limit))
    if not readable:
        return out
    rows = out.to_pylist()
    keys = [dict(r, **dict(zip(("head", "expert", "idx"), _vector_key(r)))) for r in rows]
    above = {tuple(a[c] for c in _KEY_TYPES): a["above"] for a in ds.rows(*unreadable_above_query(ds, keys))} if rows else {}
    gaps = [above[tuple(k[c] for c in _KEY_TYPES)] for k in keys]
    out = out.append_column("readable_rank", pa.array([r["rank"] - g for r, g in zip(rows, gaps)], pa.int32()))
    return out.replace_schema_metadata({"hidden_rows": str(sum(gaps))})


def kv_head_query(ds, model: str, layer: int, head: int) -> Query:
    return Query(f"SELECT kv_head FROM {ds.source('heads', [model], [layer])} WHERE layer = $l AND head = $h",
                 {"l": layer, "h": head})


def _kv_head(ds, info: dict, layer: int, head: int) -> int:
    rows = ds.rows(*kv_head_query(ds, info["model"], layer, head))
    if rows and rows[0]["kv_head"] is not None:
        return int(rows[0]["kv_head"])
    group = max(1, info["n_heads"] // max(1, info.get("n_kv_heads") or info["n_heads"]))
    return head // group


def _head_dims_where(prefix: str = "") -> str:
    """The head-dimension vectors of query head $h: q/o under $h, k/v under its key/value head $kv."""
    return (f"((list_contains($query_head_kinds, {prefix}kind) AND {prefix}head = $h)"
            f" OR (list_contains($kv_kinds, {prefix}kind) AND {prefix}head = $kv))")


_HEAD_DIM_PARAMS = {"query_head_kinds": list(QUERY_HEAD_KINDS), "kv_kinds": list(KV_KINDS)}


def show_head_queries(ds, model: str, layer: int, head: int, kv: int, limit: int | None,
                      readable: bool = False) -> "OrderedDict[str, Query]":
    """The SQL of :func:`show` for a head ``L{layer}.H{head}`` (key/value head ``kv``), by section."""
    src = {t: _readable(ds.source(t, [model], [layer]), t, readable) for t in ("heads", "pairs", "head_tokens", "vectors")}
    where = "layer = $l AND head = $h"
    base = {"l": layer, "h": head}
    out: OrderedDict[str, Query] = OrderedDict()
    out["metrics"] = Query(f"SELECT * EXCLUDE (model, layer, head, unit) FROM {src['heads']} WHERE {where}", dict(base))
    p = dict(base)
    rank = _rank_clause("rank", limit, p, "lim")
    out["pairs"] = Query(
        f"""SELECT circuit, side, rank, src, dst, score FROM {src['pairs']}
           WHERE {where} {rank}
           ORDER BY circuit, side DESC, rank""", p)
    for side in ("top", "bottom"):
        p = dict(base, side=side)
        rank = _rank_clause("rank", limit, p, "lim")
        out[f"head_tokens_{side}"] = Query(
            f"""SELECT rank,
                      max(token) FILTER (WHERE circuit = 'ov' AND role = 'source') AS ov_source,
                      max(token) FILTER (WHERE circuit = 'ov' AND role = 'output') AS ov_output,
                      max(token) FILTER (WHERE circuit = 'qk' AND role = 'query') AS qk_query,
                      max(token) FILTER (WHERE circuit = 'qk' AND role = 'key') AS qk_key
               FROM {src['head_tokens']} WHERE {where} AND side = $side {rank}
               GROUP BY rank ORDER BY rank""", p)
    p = dict(_HEAD_DIM_PARAMS, l=layer, h=head, kv=kv)
    rank = _rank_clause("rank", limit, p, "lim")
    top_n = "QUALIFY row_number() OVER (PARTITION BY kind ORDER BY dims DESC, best_rank, mean_score DESC) <= $lim" if limit is not None else ""
    out["dims"] = Query(
        f"""WITH d AS (
             SELECT kind, token_id, any_value(token) AS token, count(DISTINCT idx) AS dims, min(rank) AS best_rank,
                    avg(score) AS mean_score
             FROM {src['vectors']}
             WHERE layer = $l AND side = 'top' {rank} AND {_head_dims_where()}
             GROUP BY kind, token_id)
           SELECT kind, token, dims, best_rank, mean_score FROM d
           {top_n}
           ORDER BY {order_sql("kind")}, dims DESC, best_rank, mean_score DESC""", p)
    return out


# --readable (issue 23): a list entry is readable when its text is letters, surrounding whitespace
# aside (the word-boundary marker decodes to a space): the query-time twin of `index --vocab-filter
# alpha` (indexer/vocab_filter.py, str.isalpha; RE2's \p{L} is the same letter categories).
READABLE_SQL = "regexp_full_match({col}, '\\s*\\p{{L}}+\\s*')"
_TOKEN_COLUMNS = {"pairs": ("src", "dst"), "head_tokens": ("token",), "vectors": ("token",)}
# the columns of show's sections that hold list entries (counted to say how many were hidden)
SHOWN_TOKEN_COLUMNS = ("top", "bottom", "src", "token", "ov_source", "ov_output", "qk_query", "qk_key")


def _readable(source: str, table: str, readable: bool) -> str:
    """``source``, or (``readable``) a subquery of its rows whose tokens are all readable."""
    cols = _TOKEN_COLUMNS.get(table)
    if not readable or not cols:
        return source
    return f"(SELECT * FROM {source} WHERE {' AND '.join(READABLE_SQL.format(col=c) for c in cols)})"


def show_vectors_query(ds, model: str, u: Unit, kv: int | None, limit: int | None, readable: bool = False) -> Query:
    """The SQL of :func:`show` for a unit made of vectors (neuron, head dimension, position, bias)."""
    # MoE (issue 12): an expert's neuron / router row is picked by the expert column (null: dense or shared).
    if u.kind == "neuron":
        where = "layer = $l AND idx = $i AND list_contains($kinds, kind) AND expert IS NOT DISTINCT FROM $e"
        params = {"l": u.layer, "i": u.index, "kinds": list(FF_KINDS), "e": u.expert}
    elif u.kind == "router":
        where, params = "layer = $l AND kind = 'router' AND expert IS NOT DISTINCT FROM $e", {"l": u.layer, "e": u.expert}
    elif u.kind == "head_dim":
        where = f"layer = $l AND idx = $i AND {_head_dims_where()}"
        params = dict(_HEAD_DIM_PARAMS, l=u.layer, i=u.index, h=u.head, kv=kv)
    elif u.kind == "pos":
        where, params = "idx = $i AND list_contains($kinds, kind)", {"i": u.index, "kinds": list(POS_KINDS)}
    elif u.kind == "feature":
        where = "layer = $l AND dictionary = $d AND idx = $i AND list_contains($kinds, kind)"
        params = {"l": u.layer, "d": u.dictionary, "i": u.index, "kinds": list(FEATURE_KINDS)}
    else:
        where, params = "layer = $l AND kind = $kind", {"l": u.layer, "kind": u.bias_kind}
    rank = _rank_clause("rank", limit, params, "lim")
    layers = [u.layer] if u.layer is not None else None
    # Top and bottom lists side by side, one row per (kind, head, idx, rank).
    return Query(
        f"""SELECT kind, unit, rank,
                   max(token) FILTER (WHERE side = 'top') AS top,
                   max(score) FILTER (WHERE side = 'top') AS top_score,
                   max(token) FILTER (WHERE side = 'bottom') AS bottom,
                   max(score) FILTER (WHERE side = 'bottom') AS bottom_score
            FROM {_readable(ds.source("vectors", [model], layers), "vectors", readable)} WHERE {where} {rank}
            GROUP BY kind, unit, head, idx, rank
            ORDER BY {order_sql("kind")}, head, idx, rank""", params)


def show(ds, model: str, unit: str, *, limit: int | None = 10, readable: bool = False) -> "OrderedDict[str, pa.Table]":
    """Everything stored about one unit, as named sections (an ordered dict of Arrow tables).

    * ``L5.H3``: ``metrics`` (the heads row, one metric per row), ``pairs`` (top and bottom
      ``limit`` entries of both circuits), ``head_tokens_top`` / ``head_tokens_bottom`` (the role
      lists side by side), ``dims`` (for each of Q/K/V/O: the tokens most often in the top-``limit``
      lists of the head's dimensions: how many dimensions, best rank, mean score);
    * ``L5.N123``: ``vectors`` (ff_key / ff_gate / ff_value: top and bottom tokens side by side);
    * ``L5.H3.d7``: ``vectors`` for q/o of head 3 and k/v of its key/value head, dimension 7;
    * ``P12``, ``L5.attn_bias``, ``L5.ff_bias``: ``vectors`` for that vector.

    ``limit=None``: every rank. ``readable``: list entries whose text is not letters (fragments,
    punctuation, digits) are left out (ranks keep their stored numbers); each table's schema
    metadata ``hidden_rows`` says how many entries within the ranks shown were left out.
    """
    if readable:
        full = _show(ds, model, unit, limit, False)
        kept = _show(ds, model, unit, limit, True)
        count = lambda t: sum(t.num_rows - t.column(c).null_count for c in SHOWN_TOKEN_COLUMNS if c in t.column_names)  # noqa: E731
        return OrderedDict((name, t.replace_schema_metadata({"hidden_rows": str(count(full[name]) - count(t))}))
                           for name, t in kept.items())
    return _show(ds, model, unit, limit, False)


def _show(ds, model: str, unit: str, limit, readable: bool) -> "OrderedDict[str, pa.Table]":
    slug = ds.resolve_model(model)
    info = ds.model_info(slug)
    u = parse_unit(unit)
    check_unit(u, info)
    limit = _bound(limit, "limit", 0)
    if u.kind == "feature":  # res-L8.F17: a dictionary's feature (query/features.py)
        from .features import show_feature

        return show_feature(ds, slug, u, limit, readable)
    kv = _kv_head(ds, info, u.layer, u.head) if u.head is not None else None
    if u.kind != "head":
        return OrderedDict(vectors=ds._run(*show_vectors_query(ds, slug, u, kv, limit, readable)))
    out: OrderedDict[str, pa.Table] = OrderedDict()
    for name, query in show_head_queries(ds, slug, u.layer, u.head, kv, limit, readable).items():
        if name == "metrics":  # one metric per row
            row = ds.rows(*query)
            metrics = list(row[0].items()) if row else []
            out[name] = pa.table({"metric": [k for k, _ in metrics],
                                  "value": pa.array([None if v is None else float(v) for _, v in metrics], pa.float64())})
        else:
            out[name] = ds._run(*query)
    return out


def tokens(ds, text: str, *, model=None) -> pa.Table:
    """How TEXT maps to tokens of each selected model's vocabulary, without a tokenizer.

    A greedy longest match over the ``tokens`` table, in SQL (a recursive query): at each
    position take the longest vocabulary entry whose text is a prefix of the rest
    (case-insensitive, an exact-case match preferred, then the lower id); WordPiece
    vocabularies (``##`` continuation pieces) use ``##`` pieces inside a word and other pieces
    at a word start; whitespace no entry starts with is skipped (as pre-tokenizers do); a
    character no entry covers shows as a null id. This approximates, but is not, the model's
    tokenizer (BPE merges are not replayed).

    One row per model: model, n_tokens, tokens (decoded texts), token_ids, pieces, and
    ``matches``: the entries whose ``norm`` equals norm(TEXT) — what ``heads``/``neurons`` match.
    TEXT longer than ``TOKENS_MAX_CHARS`` is refused (one recursive step per token).
    """
    text = _text(text, "TEXT")
    if not text:
        raise BadToken("give a non-empty TEXT")
    if len(text) > TOKENS_MAX_CHARS:
        raise BadToken(f"TEXT has {len(text):,} characters; tokens maps at most {TOKENS_MAX_CHARS:,} at a time: split it")
    models = ds.resolve_models(model)
    vocab = {r["model"]: r["vocab_id"] for r in ds.rows(
        "SELECT model, vocab_id FROM models WHERE list_contains($models, model)", {"models": models})}
    cache: dict[str, dict] = {}
    rows = []
    for m in models:
        v = vocab.get(m)
        if v not in cache:
            cache[v] = _segment(ds, v, text)
        rows.append(dict(model=m, **cache[v]))
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("model", pa.string()), ("n_tokens", pa.int64()), ("tokens", pa.list_(pa.string())),
        ("token_ids", pa.list_(pa.int32())), ("pieces", pa.list_(pa.string())), ("matches", pa.list_(pa.string()))]))


def segment_query(vocab_id: str, text: str) -> Query:
    """The SQL of :func:`tokens` for one vocabulary: one row per step of the greedy match."""
    return Query(
        """WITH RECURSIVE
        voc AS MATERIALIZED (
            SELECT token_id, piece, surface, lower(surface) AS lsurface, length(surface) AS n, cont
            FROM (SELECT token_id, piece,
                         CASE WHEN wp AND starts_with(piece, '##') AND length(piece) > 2 THEN substr(piece, 3) ELSE token END AS surface,
                         wp AND starts_with(piece, '##') AND length(piece) > 2 AS cont
                  FROM tokens, (SELECT count(*) FILTER (WHERE starts_with(piece, '##') AND length(piece) > 2) > 100 AS wp
                                FROM tokens WHERE vocab_id = $v) w
                  WHERE vocab_id = $v AND NOT special)
            -- only entries that occur somewhere in the text can take part: a few hundred rows
            WHERE surface <> '' AND contains(lower($text), lower(surface))),
        steps(i, rest, at_start, token_id, piece, surface, skipped) AS (
            SELECT 0, $text::VARCHAR, true, NULL::INTEGER, NULL::VARCHAR, NULL::VARCHAR, false
            UNION ALL
            SELECT s.i + 1,
                   CASE WHEN c.token_id IS NULL THEN substr(s.rest, 2) ELSE substr(s.rest, c.n + 1) END,
                   c.token_id IS NULL AND trim(substr(s.rest, 1, 1)) = '',
                   c.token_id, c.piece, coalesce(c.surface, substr(s.rest, 1, 1)),
                   c.token_id IS NULL AND trim(substr(s.rest, 1, 1)) = ''
            FROM steps s LEFT JOIN LATERAL (
                SELECT token_id, piece, surface, n FROM voc
                WHERE starts_with(lower(s.rest), lsurface)
                ORDER BY (cont = NOT s.at_start) DESC, n DESC, starts_with(s.rest, surface) DESC, token_id
                LIMIT 1) c ON true
            WHERE length(s.rest) > 0)
        SELECT token_id, piece, surface FROM steps WHERE i > 0 AND NOT skipped ORDER BY i""",
        {"v": vocab_id, "text": text})


def _segment(ds, vocab_id: str, text: str) -> dict:
    steps = ds.rows(*segment_query(vocab_id, text))
    q = normalise(text)
    matches = ds.rows("SELECT token FROM tokens WHERE vocab_id = $v AND norm = $q ORDER BY token_id",
                      {"v": vocab_id, "q": q}) if q else []
    return {"n_tokens": len(steps), "tokens": [r["surface"] for r in steps], "token_ids": [r["token_id"] for r in steps],
            "pieces": [r["piece"] for r in steps], "matches": [r["token"] for r in matches]}


# Unit.kind -> the schemas.kinds group whose kinds are the channels of its signature
_GROUP_OF_UNIT = {"neuron": FF, "head_dim": HEAD_DIM, "pos": POS, "bias": BIAS, "router": ROUTER, "feature": FEATURE}


def _signature_kinds(u: Unit) -> list[str]:
    if u.kind == "bias":
        return [u.bias_kind]
    return {FF: list(FF_KINDS), HEAD_DIM: list(HEAD_DIM_KINDS), POS: list(POS_KINDS),
            ROUTER: list(ROUTER_KINDS), FEATURE: list(FEATURE_KINDS)}[_GROUP_OF_UNIT[u.kind]]


def _rank_weight(k_param: str) -> str:
    """Weight (K + 1 - rank) / K of an entry of a list of K (rank 1 -> 1, rank K -> 1/K)."""
    return f"sum((${k_param} + 1 - r.rank) / ${k_param})"


def signature_query(ds, model: str, vocab_id: str, u: Unit, k: float) -> Query:
    """The signature of ``u``: (channel, norm, w) rows, w the summed rank weights of one list's entries."""
    layers = [u.layer] if u.layer is not None else None
    if u.kind == "head":
        rows = f"""SELECT h.circuit || ':' || h.role AS channel, h.token_id, h.rank FROM {ds.source("head_tokens", [model], layers)} h
                   WHERE h.layer = $layer AND h.head = $head AND h.side = 'top'"""
        params = {"layer": u.layer, "head": u.head}
    else:
        layer = "v.layer = $layer" if u.layer is not None else "v.layer IS NULL"
        rows = f"""SELECT v.kind AS channel, v.token_id, v.rank FROM {ds.source("vectors", [model], layers)} v
                   WHERE {layer} AND v.unit = $unit AND v.side = 'top' AND list_contains($kinds, v.kind)"""
        params = {"unit": u.name, "kinds": _signature_kinds(u)}
        if u.layer is not None:
            params["layer"] = u.layer
    return Query(
        f"""SELECT r.channel, t.norm, {_rank_weight("k")} AS w
            FROM ({rows}) r JOIN (SELECT token_id, norm FROM tokens WHERE vocab_id = $vocab) t USING (token_id)
            GROUP BY r.channel, t.norm""", dict(params, k=k, vocab=vocab_id))


def similar_query(ds, model: str, vocab_id: str, u: Unit, k: float, signature: list[dict], ids: list[int],
                  total: float, exclude: str | None, limit: int | None) -> Query:
    """Units of ``model`` scored against ``signature`` (rows of :func:`signature_query`).

    One model, many tokens: read from the model's own files, also when it is compacted (see
    ``Dataset.source``'s ``compacted``).

    ``ids``: the token ids of ``model``'s vocabulary with a norm of the signature (only their rows can
    overlap); ``total``: both units' total weight (see :func:`similar`); ``exclude``: a unit to leave out.
    """
    params: dict = {"k": k, "vocab": vocab_id, "total": total, "ids": ids,
                    "sig_channel": [r["channel"] for r in signature], "sig_norm": [r["norm"] for r in signature],
                    "sig_w": [r["w"] for r in signature]}
    if u.kind == "head":
        rows = f"""SELECT {head_unit_sql("h")} AS unit, h.layer, h.circuit || ':' || h.role AS channel, h.token_id, h.rank
                   FROM {ds.source("head_tokens", [model], compacted=False)} h
                   WHERE h.side = 'top' AND {_in_ids("h.token_id", "ids")}"""
    else:
        rows = f"""SELECT {vector_unit_sql("v")} AS unit, v.layer, v.kind AS channel, v.token_id, v.rank
                   FROM {ds.source("vectors_by_token", [model], compacted=False)} v
                   WHERE v.side = 'top' AND list_contains($kinds, v.kind) AND {_in_ids("v.token_id", "ids")}"""
        params["kinds"] = _signature_kinds(u)
    exclude_clause = ""
    if exclude is not None:
        params["exclude"] = exclude
        exclude_clause = "WHERE unit <> $exclude"
    limit_clause = _limit_clause(limit, params)
    return Query(
        f"""WITH
        sa AS (SELECT unnest($sig_channel::VARCHAR[]) AS channel, unnest($sig_norm::VARCHAR[]) AS norm,
                      unnest($sig_w::DOUBLE[]) AS w),
        rb AS (SELECT r.unit, r.layer, r.channel, t.norm, {_rank_weight("k")} AS w
               FROM ({rows}) r
               JOIN (SELECT token_id, norm FROM tokens WHERE vocab_id = $vocab) t USING (token_id)
               GROUP BY r.unit, r.layer, r.channel, t.norm),
        inter_n AS (SELECT rb.unit, any_value(rb.layer) AS layer, sa.norm, sum(least(sa.w, rb.w)) AS w
                    FROM rb JOIN sa USING (channel, norm) GROUP BY rb.unit, sa.norm),
        inter AS (SELECT unit, any_value(layer) AS layer, sum(w) AS w, count(*) AS shared,
                         list(norm ORDER BY w DESC, norm)[1:10] AS tokens
                  FROM inter_n GROUP BY unit)
        SELECT unit, layer, w / ($total - w) AS similarity, shared, tokens FROM inter {exclude_clause}
        ORDER BY similarity DESC, shared DESC, layer, unit
        {limit_clause}""", params)


_SIMILAR_SCHEMA = pa.schema([("unit", pa.string()), ("layer", pa.int16()), ("similarity", pa.float64()),
                             ("shared", pa.int64()), ("tokens", pa.list_(pa.string()))])


def similar(ds, model: str, unit: str, in_model: str, *, limit: int | None = 10) -> pa.Table:
    """Units of ``in_model`` whose top token lists overlap most with ``unit`` of ``model``.

    A unit's signature maps (channel, normalised token text) to a weight: channels are the
    vector kinds (ff_key, ff_gate, ff_value for a neuron; q/k/v/o for a head dimension) or,
    for a head, the ``head_tokens`` role lists (``ov:source``, ``ov:output``, ``qk:query``,
    ``qk:key``); only ``top`` lists count. A token at rank r of a list of K gets weight
    (K + 1 - r) / K (rank 1 -> 1, rank K -> 1/K); tokens of one list with the same normalised
    text add up. Similarity is the weighted Jaccard index sum(min(wa, wb)) / sum(max(wa, wb))
    over the union of keys, so 1 means identical lists. A unit's total weight is
    channels x (K + 1) / 2 (every list holds K entries), so only the entries of the other
    model that share a token text with the unit are read. Candidates are units of the same
    sort (neurons with neurons, heads with heads, ...); under grouped-query attention K/V head
    dimensions are named by their key/value head.

    Result: unit, layer, similarity, shared (number of shared token texts), tokens (the shared
    token texts, heaviest first, at most 10).
    """
    a, b = ds.resolve_model(model), ds.resolve_model(in_model, what="--in")
    ia, ib = ds.model_info(a), ds.model_info(b)
    u = parse_unit(unit)
    if u.kind == "feature":  # its layer is its dictionary's
        from .features import resolve_feature

        u = resolve_feature(ds, a, u)
    check_unit(u, ia)
    limit = _bound(limit, "limit", 0)
    if u.kind == "head":
        stats = {r["model"]: r for r in ds.rows(
            f"""SELECT model, max(rank) AS k, count(DISTINCT circuit || role) AS channels
                FROM {ds.source("head_tokens", [a, b])} WHERE side = 'top' GROUP BY model""", {})}
        k_a, k_b = (float(stats.get(m, {}).get("k") or 1) for m in (a, b))
        channels_b = int(stats.get(b, {}).get("channels") or 0)
    else:
        kinds = _signature_kinds(u)
        k_a, k_b = float(ia["k"] or 1), float(ib["k"] or 1)
        if len(kinds) == 1 or u.kind in ("head_dim", "feature"):  # a feature has both lists
            channels_b = len(kinds)
        else:  # which FF kinds model b has (gated or not): one layer file tells
            channels_b = ds.rows(
                f"SELECT count(DISTINCT kind) AS n FROM {ds.source('vectors', [b], [0])} WHERE list_contains($kinds, kind)",
                {"kinds": kinds})[0]["n"]
    signature = ds.rows(*signature_query(ds, a, ia["vocab_id"], u, k_a))
    if not signature:
        return _SIMILAR_SCHEMA.empty_table()
    ids_b = [r["token_id"] for r in ds.rows(
        "SELECT token_id FROM tokens WHERE vocab_id = $vocab AND list_contains($norms, norm) ORDER BY token_id",
        {"vocab": ib["vocab_id"], "norms": sorted({r["norm"] for r in signature})})]
    total = sum(r["w"] for r in signature) + channels_b * (k_b + 1) / 2
    return ds._run(*similar_query(ds, b, ib["vocab_id"], u, k_b, signature, ids_b, total,
                                  exclude=u.name if a == b else None, limit=limit))
