"""Helper queries over a dataset: every one is plain SQL over the tables of DESIGN §4.

All take a :class:`query.dataset.Dataset` and return pyarrow Tables (``show`` returns an ordered
dict of them). User values are always bound as parameters, never pasted into SQL text.

Token matching (DESIGN §6), the same in every helper:

* default: ``tokens.norm = norm(TOKEN)`` where ``norm(s) = NFKC(s).strip().lower()`` — the
  indexer's definition — so ``paris`` finds `` Paris``, ``Paris`` and ``paris``;
* ``exact=True``: ``tokens.token = TOKEN`` (the decoded text as given, spaces included);
* ``token_id=N``: that id in each selected model's vocabulary.

Tokens are matched per vocabulary by text, so models with different tokenizers are searched for
the same word at once.
"""
from __future__ import annotations

import unicodedata
from collections import OrderedDict

import pyarrow as pa

from .errors import BadOption, BadToken, UnknownToken
from .units import BIAS_KIND, Unit, check_unit, parse_unit, unit_sql

FF_KINDS = ("ff_key", "ff_gate", "ff_value")
HEAD_DIM_KINDS = ("q", "k", "v", "o")
ALL_KINDS = FF_KINDS + HEAD_DIM_KINDS + ("bias_attn_out", "bias_ff_out", "pos")
SIDES = {"top": ["top"], "bottom": ["bottom"], "both": ["top", "bottom"]}


def norm(text: str) -> str:
    """The search form of a token (the ``tokens.norm`` column): NFKC, stripped, lower-cased."""
    return unicodedata.normalize("NFKC", text).strip().lower()


def _sides(side: str) -> list[str]:
    if side not in SIDES:
        raise BadOption(f"unknown side {side!r}: use top, bottom or both")
    return SIDES[side]


def _list_option(value, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    out = [s.strip() for item in items for s in str(item).split(",") if s.strip()]
    for s in out:
        if s not in allowed:
            raise BadOption(f"unknown {what} {s!r}: use one of {', '.join(allowed)}")
    return out


# -- token matching ----------------------------------------------------------------------------

def match_tokens(ds, token: str | None = None, *, model=None, exact: bool = False, token_id: int | None = None) -> pa.Table:
    """The vocabulary entries TOKEN matches in each selected model: model, vocab_id, token_id, token, piece.

    Raises UnknownToken (with the nearest tokens as suggestions) when it matches in none.
    """
    models = ds.resolve_models(model)
    if token_id is not None:
        where, params = "t.token_id = $q", {"q": int(token_id)}
        shown = f"token id {token_id}"
    else:
        if token is None:
            raise BadToken("give a TOKEN, or a token id with --id")
        if exact:
            where, params = "t.token = $q", {"q": token}
        else:
            q = norm(token)
            if not q:
                raise BadToken(f"token {token!r} is empty or only whitespace: use --exact to match it as given (e.g. --exact ' ')")
            where, params = "t.norm = $q", {"q": q}
        shown = repr(token)
    hits = ds._run(
        f"""SELECT m.model, m.vocab_id, t.token_id, t.token, t.piece
            FROM models m JOIN tokens t ON t.vocab_id = m.vocab_id
            WHERE list_contains($models, m.model) AND {where}
            ORDER BY m.model, t.token_id""",
        dict(params, models=models))
    if hits.num_rows == 0:
        scope = "the vocabulary of " + ", ".join(models)
        if token_id is not None:
            raise UnknownToken(f"{shown} is not in {scope}")
        hint = suggest(ds, token, models)
        tail = f"; nearest: {', '.join(repr(s) for s in hint)}" if hint else ""
        raise UnknownToken(f"token {shown} is in no vocabulary of {', '.join(models)}{tail}")
    return hits


def suggest(ds, token: str, models: list[str], n: int = 5) -> list[str]:
    """The ``n`` vocabulary entries nearest to ``token`` (Jaro-Winkler, then edit distance)."""
    q = norm(token) or token
    rows = ds.rows(
        """SELECT norm, min(token) AS example
           FROM tokens WHERE vocab_id IN (SELECT vocab_id FROM models WHERE list_contains($models, model))
             AND norm <> '' AND NOT special
           GROUP BY norm
           ORDER BY jaro_winkler_similarity(norm, $q) DESC, levenshtein(norm, $q), norm
           LIMIT $n""",
        {"models": models, "q": q, "n": n})
    return [r["example"] for r in rows]


def _ids_by_model(hits: pa.Table) -> dict[str, list[int]]:
    return {m: ids for m, ids, _ in _matches_by_model(hits)}


def _matches_by_model(hits: pa.Table) -> list[tuple[str, list[int], list[str]]]:
    """(model, token ids, token texts) for each model with matches, from `match_tokens`."""
    out: dict[str, tuple[list[int], list[str]]] = {}
    for m, i, t in zip(*(hits.column(c).to_pylist() for c in ("model", "token_id", "token"))):
        ids, texts = out.setdefault(m, ([], []))
        ids.append(i)
        texts.append(t)
    return [(m, ids, texts) for m, (ids, texts) in out.items()]


def _in_list(name: str, values: list, params: dict) -> str:
    """``($name_0, $name_1, ...)`` with the values bound in ``params`` (never pasted)."""
    keys = [f"{name}_{j}" for j in range(len(values))]
    params.update(zip(keys, values))
    return "(" + ", ".join("$" + k for k in keys) + ")"


def _limit(limit: int | None, params: dict) -> str:
    if limit is None:
        return ""
    params["limit"] = int(limit)
    return "LIMIT $limit"


# -- helpers -----------------------------------------------------------------------------------

def models(ds) -> pa.Table:
    """The ``models`` table, most useful columns first."""
    return ds._run(
        """SELECT model, architecture, n_layers, n_heads, n_kv_heads, d_model, d_head, d_ff, d_vocab,
                  tied, variant, k, n_pairs, source, COLUMNS(lambda c: c NOT IN (
                    'model', 'architecture', 'n_layers', 'n_heads', 'n_kv_heads', 'd_model', 'd_head',
                    'd_ff', 'd_vocab', 'tied', 'variant', 'k', 'n_pairs', 'source'))
           FROM models ORDER BY model""")


def heads(ds, token: str | None = None, *, model=None, circuit=None, side: str = "top", limit: int | None = 20,
          exact: bool = False, token_id: int | None = None) -> pa.Table:
    """Heads whose stored circuit entries contain TOKEN, best first.

    Evidence is every ``pairs`` row of the head with TOKEN as its source/query (``src``) or
    promoted/key (``dst``) token, and every ``head_tokens`` row (role lists) with TOKEN.
    Ranking: ``relevance = sum(1 / rank)`` over the evidence rows (a rank-1 entry counts 1, a
    rank-10 entry 0.1), ties by best rank, then model, layer, head. One row per head:
    model, unit, layer, head, relevance, best_rank, hits, evidence (list, best first; each item
    says circuit, list, side, rank, the token(s) and the score).

    >>> heads(ds, "paris", circuit="ov")   # doctest: +SKIP
    """
    circuits = _list_option(circuit or ["ov", "qk"], ("ov", "qk"), "circuit")
    hits = match_tokens(ds, token, model=model, exact=exact, token_id=token_id)
    params = {"circuits": circuits, "sides": _sides(side)}
    parts = []
    # One scan per model over its own files, with the matched ids as a bound IN list: the
    # filter reaches the Parquet reader (row-group pruning) instead of a join.
    for i, (m, ids) in enumerate(_ids_by_model(hits).items()):
        params[f"m{i}"] = m
        ids_sql = _in_list(f"t{i}", ids, params)
        parts.append(f"""
            SELECT p.model, p.layer, p.head, p.rank, p.score,
                   p.circuit || ' ' || p.side || ' pair #' || p.rank || ' ' || to_json(p.src) || ' -> '
                     || to_json(p.dst) || ' (' || printf('%.4g', p.score) || ')' AS evidence
            FROM {ds.source("pairs", [m])} p
            WHERE p.model = $m{i} AND (p.src_id IN {ids_sql} OR p.dst_id IN {ids_sql})
              AND list_contains($circuits, p.circuit) AND list_contains($sides, p.side)
            UNION ALL
            SELECT h.model, h.layer, h.head, h.rank, h.score,
                   h.circuit || ' ' || h.role || ' ' || h.side || ' #' || h.rank || ' ' || to_json(h.token)
                     || ' (' || printf('%.4g', h.score) || ')' AS evidence
            FROM {ds.source("head_tokens", [m])} h
            WHERE h.model = $m{i} AND h.token_id IN {ids_sql}
              AND list_contains($circuits, h.circuit) AND list_contains($sides, h.side)""")
    lim = _limit(limit, params)
    return ds._run(
        f"""WITH ev AS ({" UNION ALL ".join(parts)})
        SELECT model, 'L' || layer || '.H' || head AS unit, layer, head,
               sum(1.0 / rank) AS relevance, min(rank) AS best_rank, count(*) AS hits,
               list(evidence ORDER BY rank, abs(score) DESC, evidence) AS evidence
        FROM ev GROUP BY model, layer, head
        ORDER BY relevance DESC, best_rank, model, layer, head
        {lim}""", params)


def neurons(ds, token: str | None = None, *, model=None, kind=None, max_rank: int | None = None, side: str = "top",
            limit: int | None = 20, exact: bool = False, token_id: int | None = None) -> pa.Table:
    """Vectors (FF neurons by default; any ``vectors.kind`` via ``kind``) whose top-k list holds TOKEN.

    One row per (model, unit, kind, side): rank (best rank of a matching token), score (at that
    rank), hits (how many of the list's tokens match, e.g. `` Paris`` and ``Paris``), evidence
    (the matching entries: token, rank, score). Ranked by rank, then by score (largest first for
    ``top``, most negative first for ``bottom``), then model, layer, unit.

    >>> neurons(ds, "paris", kind=["ff_value"], max_rank=5)   # doctest: +SKIP
    """
    kinds = _list_option(kind or list(FF_KINDS), ALL_KINDS, "kind")
    hits = match_tokens(ds, token, model=model, exact=exact, token_id=token_id)
    params = {"kinds": kinds, "sides": _sides(side), "max_rank": int(max_rank) if max_rank is not None else 2**31 - 1}
    parts = []
    # vectors_by_token holds each token's rows together (one or two row groups per model); the
    # join with the matched ids lets DuckDB push them into the Parquet scan as a filter.
    for i, (m, ids, texts) in enumerate(_matches_by_model(hits)):
        params.update({f"m{i}": m, f"ids{i}": ids, f"texts{i}": texts})
        parts.append(f"""
            SELECT v.model, {unit_sql("v")} AS unit, v.layer, v.kind, v.side, v.head, v.idx, v.rank, t.token, v.score
            FROM {ds.source("vectors_by_token", [m])} v
            JOIN (SELECT unnest($ids{i}::INTEGER[]) AS token_id, unnest($texts{i}::VARCHAR[]) AS token) t USING (token_id)
            WHERE v.model = $m{i} AND list_contains($kinds, v.kind) AND list_contains($sides, v.side) AND v.rank <= $max_rank""")
    lim = _limit(limit, params)
    return ds._run(
        f"""WITH v AS ({" UNION ALL ".join(parts)}),
        hits AS (
            SELECT v.model, v.unit, v.layer, v.kind, v.side, min(v.rank) AS rank, arg_min(v.score, v.rank) AS score,
                   count(*) AS hits, any_value(v.head) AS head, any_value(v.idx) AS idx,
                   list(to_json(v.token) || ' #' || v.rank || ' (' || printf('%.4g', v.score) || ')' ORDER BY v.rank) AS evidence
            FROM v GROUP BY v.model, v.unit, v.layer, v.kind, v.side)
        SELECT model, unit, layer, kind, side, rank, score, hits, evidence FROM hits
        ORDER BY rank, CASE WHEN side = 'top' THEN -score ELSE score END, model, layer, kind, head, idx
        {lim}""", params)


def _kv_head(ds, info: dict, layer: int, head: int) -> int:
    rows = ds.rows(f"SELECT kv_head FROM {ds.source('heads', [info['model']], [layer])} WHERE model = $m AND layer = $l AND head = $h",
                   {"m": info["model"], "l": layer, "h": head})
    if rows and rows[0]["kv_head"] is not None:
        return int(rows[0]["kv_head"])
    group = max(1, info["n_heads"] // max(1, info.get("n_kv_heads") or info["n_heads"]))
    return head // group


def _vector_pivot(ds, model: str, layers: list[int] | None, where: str, params: dict, limit: int | None) -> pa.Table:
    """Top and bottom lists side by side, one row per (kind, head, idx, rank)."""
    params = dict(params, m=model, lim=int(limit) if limit is not None else 2**31 - 1)
    return ds._run(
        f"""SELECT kind, unit, rank,
                   max(token) FILTER (WHERE side = 'top') AS top,
                   max(score) FILTER (WHERE side = 'top') AS top_score,
                   max(token) FILTER (WHERE side = 'bottom') AS bottom,
                   max(score) FILTER (WHERE side = 'bottom') AS bottom_score
            FROM {ds.source("vectors", [model], layers)} WHERE model = $m AND ({where}) AND rank <= $lim
            GROUP BY kind, unit, head, idx, rank
            ORDER BY array_position(['ff_key', 'ff_gate', 'ff_value', 'q', 'k', 'v', 'o'], kind) NULLS LAST, kind, head, idx, rank""",
        params)


def show(ds, model: str, unit: str, *, limit: int | None = 10) -> "OrderedDict[str, pa.Table]":
    """Everything stored about one unit, as named sections (an ordered dict of Arrow tables).

    * ``L5.H3``: ``metrics`` (the heads row, one metric per row), ``pairs`` (top and bottom
      ``limit`` entries of both circuits), ``head_tokens_top`` / ``head_tokens_bottom`` (the role
      lists side by side), ``dims`` (for each of Q/K/V/O: the tokens most often in the top-``limit``
      lists of the head's dimensions: how many dimensions, best rank, mean score);
    * ``L5.N123``: ``vectors`` (ff_key / ff_gate / ff_value: top and bottom tokens side by side);
    * ``L5.H3.d7``: ``vectors`` for q/o of head 3 and k/v of its key/value head, dimension 7;
    * ``P12``, ``L5.attn_bias``, ``L5.ff_bias``: ``vectors`` for that vector.
    """
    (slug,) = ds.resolve_models([model.split(",")[0]] if model else model)
    info = ds.model_info(slug)
    u = parse_unit(unit)
    check_unit(u, info)
    out: OrderedDict[str, pa.Table] = OrderedDict()
    if u.kind == "head":
        p = {"m": slug, "l": u.layer, "h": u.head}
        src = {t: ds.source(t, [slug], [u.layer]) for t in ("heads", "pairs", "head_tokens", "vectors")}
        row = ds.rows(f"SELECT * EXCLUDE (model, layer, head, unit) FROM {src['heads']} WHERE model = $m AND layer = $l AND head = $h", p)
        metrics = list(row[0].items()) if row else []
        out["metrics"] = pa.table({"metric": [k for k, _ in metrics],
                                   "value": pa.array([None if v is None else float(v) for _, v in metrics], pa.float64())})
        p["lim"] = int(limit) if limit is not None else 2**31 - 1
        out["pairs"] = ds._run(
            f"""SELECT circuit, side, rank, src, dst, score FROM {src['pairs']}
               WHERE model = $m AND layer = $l AND head = $h AND rank <= $lim
               ORDER BY circuit, side DESC, rank""", p)
        for side in ("top", "bottom"):
            out[f"head_tokens_{side}"] = ds._run(
                f"""SELECT rank,
                          max(token) FILTER (WHERE circuit = 'ov' AND role = 'source') AS ov_source,
                          max(token) FILTER (WHERE circuit = 'ov' AND role = 'output') AS ov_output,
                          max(token) FILTER (WHERE circuit = 'qk' AND role = 'query') AS qk_query,
                          max(token) FILTER (WHERE circuit = 'qk' AND role = 'key') AS qk_key
                   FROM {src['head_tokens']} WHERE model = $m AND layer = $l AND head = $h AND side = $side AND rank <= $lim
                   GROUP BY rank ORDER BY rank""", dict(p, side=side))
        kv = _kv_head(ds, info, u.layer, u.head)
        out["dims"] = ds._run(
            f"""WITH d AS (
                 SELECT kind, token_id, any_value(token) AS token, count(DISTINCT idx) AS dims, min(rank) AS best_rank,
                        avg(score) AS mean_score
                 FROM {src['vectors']}
                 WHERE model = $m AND layer = $l AND side = 'top' AND rank <= $lim
                   AND ((kind IN ('q', 'o') AND head = $h) OR (kind IN ('k', 'v') AND head = $kv))
                 GROUP BY kind, token_id)
               SELECT kind, token, dims, best_rank, mean_score FROM d
               QUALIFY row_number() OVER (PARTITION BY kind ORDER BY dims DESC, best_rank, mean_score DESC) <= $lim
               ORDER BY array_position(['q', 'k', 'v', 'o'], kind), dims DESC, best_rank, mean_score DESC""",
            dict(p, kv=kv))
        return out
    if u.kind == "neuron":
        where, params = "layer = $l AND idx = $i AND kind IN ('ff_key', 'ff_gate', 'ff_value')", {"l": u.layer, "i": u.index}
    elif u.kind == "head_dim":
        kv = _kv_head(ds, info, u.layer, u.head)
        where = "layer = $l AND idx = $i AND ((kind IN ('q', 'o') AND head = $h) OR (kind IN ('k', 'v') AND head = $kv))"
        params = {"l": u.layer, "i": u.index, "h": u.head, "kv": kv}
    elif u.kind == "pos":
        where, params = "kind = 'pos' AND idx = $i", {"i": u.index}
    else:
        where, params = "layer = $l AND kind = $k", {"l": u.layer, "k": BIAS_KIND[u.bias]}
    out["vectors"] = _vector_pivot(ds, slug, [u.layer] if u.layer is not None else None, where, params, limit)
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
    """
    if not text:
        raise BadToken("give a non-empty TEXT")
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


def _segment(ds, vocab_id: str, text: str) -> dict:
    steps = ds.rows(
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
    matches = ds.rows(
        "SELECT token FROM tokens WHERE vocab_id = $v AND norm = $q ORDER BY token_id",
        {"v": vocab_id, "q": norm(text)}) if norm(text) else []
    return {"n_tokens": len(steps), "tokens": [r["surface"] for r in steps], "token_ids": [r["token_id"] for r in steps],
            "pieces": [r["piece"] for r in steps], "matches": [r["token"] for r in matches]}


def _signature_kinds(u: Unit) -> list[str]:
    if u.kind == "neuron":
        return list(FF_KINDS)
    if u.kind == "head_dim":
        return list(HEAD_DIM_KINDS)
    if u.kind == "pos":
        return ["pos"]
    return [BIAS_KIND[u.bias]]


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
    (a,) = ds.resolve_models([model])
    (b,) = ds.resolve_models([in_model])
    ia, ib = ds.model_info(a), ds.model_info(b)
    u = parse_unit(unit)
    check_unit(u, ia)
    params: dict = {"a": a, "b": b, "va": ia["vocab_id"], "vb": ib["vocab_id"], "unit": u.name}
    layer_a = [u.layer] if u.layer is not None else None
    if u.kind == "head":
        ks = {r["model"]: r for r in ds.rows(
            f"""SELECT model, max(rank) AS k, count(DISTINCT circuit || role) AS channels
                FROM {ds.source("head_tokens", [a, b])} WHERE side = 'top' GROUP BY model""", params)}
        params.update(ka=float(ks.get(a, {}).get("k") or 1), kb=float(ks.get(b, {}).get("k") or 1),
                      layer=u.layer, head=u.head)
        channels_b = int(ks.get(b, {}).get("channels") or 0)
        rows_a = f"""SELECT h.circuit || ':' || h.role AS channel, h.token_id, h.rank FROM {ds.source("head_tokens", [a], layer_a)} h
                     WHERE h.model = $a AND h.layer = $layer AND h.head = $head AND h.side = 'top'"""
        rows_b = f"""SELECT 'L' || h.layer || '.H' || h.head AS unit, h.layer, h.circuit || ':' || h.role AS channel,
                            h.token_id, h.rank FROM {ds.source("head_tokens", [b])} h WHERE h.model = $b AND h.side = 'top'"""
    else:
        kinds = _signature_kinds(u)
        params.update(ka=float(ia["k"] or 1), kb=float(ib["k"] or 1), kinds=kinds, layer=u.layer)
        if len(kinds) == 1 or u.kind == "head_dim":
            channels_b = len(kinds)
        else:  # which FF kinds model b has (gated or not): one layer file tells
            channels_b = ds.rows(
                f"""SELECT count(DISTINCT kind) AS n FROM {ds.source("vectors", [b], [0])}
                    WHERE model = $b AND list_contains($kinds, kind)""", params)[0]["n"]
        layer = "v.layer = $layer" if u.layer is not None else "v.layer IS NULL"
        rows_a = f"""SELECT v.kind AS channel, v.token_id, v.rank FROM {ds.source("vectors", [a], layer_a)} v
                     WHERE v.model = $a AND {layer} AND v.unit = $unit AND v.side = 'top' AND list_contains($kinds, v.kind)"""
        rows_b = f"""SELECT {unit_sql("v")} AS unit, v.layer, v.kind AS channel, v.token_id, v.rank
                     FROM {ds.source("vectors_by_token", [b])} v
                     WHERE v.model = $b AND v.side = 'top' AND list_contains($kinds, v.kind)"""
    sig = ds.rows(
        f"""SELECT r.channel, t.norm, sum(($ka + 1 - r.rank) / $ka) AS w
            FROM ({rows_a}) r JOIN (SELECT token_id, norm FROM tokens WHERE vocab_id = $va) t USING (token_id)
            GROUP BY r.channel, t.norm""", params)
    if not sig:
        return pa.table({"unit": pa.array([], pa.string()), "layer": pa.array([], pa.int16()),
                         "similarity": pa.array([], pa.float64()), "shared": pa.array([], pa.int64()),
                         "tokens": pa.array([], pa.list_(pa.string()))})
    ids_b = [r["token_id"] for r in ds.rows(
        "SELECT token_id FROM tokens WHERE vocab_id = $vb AND list_contains($norms, norm) ORDER BY token_id",
        dict(params, norms=sorted({r["norm"] for r in sig})))]
    params.update(total=sum(r["w"] for r in sig) + channels_b * (params["kb"] + 1) / 2,
                  sa_channel=[r["channel"] for r in sig], sa_norm=[r["norm"] for r in sig], sa_w=[r["w"] for r in sig])
    params["ids_b"] = ids_b
    same = "WHERE unit <> $unit" if a == b else ""
    lim = _limit(limit, params)
    return ds._run(
        f"""WITH
        sa AS (SELECT unnest($sa_channel::VARCHAR[]) AS channel, unnest($sa_norm::VARCHAR[]) AS norm,
                      unnest($sa_w::DOUBLE[]) AS w),
        rb AS (SELECT r.unit, r.layer, r.channel, t.norm, sum(($kb + 1 - r.rank) / $kb) AS w
               FROM ({rows_b} AND token_id IN (SELECT unnest($ids_b::INTEGER[]))) r
               JOIN (SELECT token_id, norm FROM tokens WHERE vocab_id = $vb) t USING (token_id)
               GROUP BY r.unit, r.layer, r.channel, t.norm),
        inter_n AS (SELECT rb.unit, any_value(rb.layer) AS layer, sa.norm, sum(least(sa.w, rb.w)) AS w
                    FROM rb JOIN sa USING (channel, norm) GROUP BY rb.unit, sa.norm),
        inter AS (SELECT unit, any_value(layer) AS layer, sum(w) AS w, count(*) AS shared,
                         list(norm ORDER BY w DESC, norm)[1:10] AS tokens
                  FROM inter_n GROUP BY unit)
        SELECT unit, layer, w / ($total - w) AS similarity, shared, tokens FROM inter {same}
        ORDER BY similarity DESC, shared DESC, layer, unit
        {lim}""", params)
