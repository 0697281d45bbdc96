"""Dictionary features (SAEs, transcoders; docs/DICTIONARIES.md): the `features TOKEN` and
`dictionaries` helpers and the feature page of `show`.

A feature's rows are `vectors` rows (kinds decoder / encoder, `dictionary` set), so `show` and
`similar` read them as they read a neuron's; this module only adds what a feature has and a
neuron has not: its dictionary, its stats and its stored neighbours.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pyarrow as pa

from schemas.kinds import FEATURE_KINDS

from .errors import BadUnit
from .helpers import (Query, _bound, _in_ids, _limit_clause, _list_option, _rank_clause, _sides, match_tokens,
                      matches_by_model, same_tokens, show_vectors_query)


def resolve_feature(ds, model: str, u):
    """``u`` (a parsed ``res-L8.F17``) with its dictionary's layer; BadUnit when ``model`` has no such
    dictionary or the dictionary no such feature."""
    rows = ds.rows(f"SELECT layer, d_sae FROM {ds.source('dictionaries', [model])} WHERE dictionary = $d", {"d": u.dictionary})
    if not rows:
        names = [r["dictionary"] for r in ds.rows(
            f"SELECT dictionary FROM {ds.source('dictionaries', [model])} ORDER BY dictionary", {})]
        have = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") if names else "none; add one with `zeropass index-sae`"
        raise BadUnit(f"{u.name}: {model} has no dictionary {u.dictionary!r} (its dictionaries: {have})")
    if u.index >= rows[0]["d_sae"]:
        raise BadUnit(f"{u.name}: feature {u.index} is out of range for {u.dictionary} (features 0..{rows[0]['d_sae'] - 1})")
    return dataclasses.replace(u, layer=rows[0]["layer"])


def show_feature(ds, model: str, u, limit: int | None, readable: bool = False) -> "OrderedDict[str, pa.Table]":
    """`show MODEL res-L8.F17`: ``vectors`` (decoder / encoder lists side by side, as for a neuron),
    ``stats`` (norms, b_enc, threshold) and ``neighbours`` (stored nearest write-side directions).
    ``readable``: the lists without entries whose text is not letters, as for a neuron."""
    u = resolve_feature(ds, model, u)
    params = {"d": u.dictionary, "f": u.index}
    where = "dictionary = $d AND feature = $f"
    out: OrderedDict[str, pa.Table] = OrderedDict()
    out["vectors"] = ds._run(*show_vectors_query(ds, model, u, None, limit, readable))
    out["stats"] = ds._run(f"""SELECT decoder_norm, encoder_norm, b_enc, threshold
                               FROM {ds.source('feature_stats', [model])} WHERE {where}""", params)
    out["neighbours"] = ds._run(f"""SELECT rank, neighbour, neighbour_kind, neighbour_layer, cosine
                                    FROM {ds.source('feature_neighbours', [model])} WHERE {where} ORDER BY rank""", params)
    return out


def features_query(ds, matches, *, kinds: list[str], sides: list[str], dictionaries: list[str] | None,
                   max_rank: int | None, limit: int | None) -> Query:
    """The SQL of :func:`features` for the tokens matched per model (read from the dictionaries'
    token-sorted files alone, ``features_by_token``)."""
    params: dict = {"kinds": kinds, "sides": sides}
    rank_clause = _rank_clause("f.rank", max_rank, params)
    dict_clause = ""
    if dictionaries is not None:
        params["dicts"] = dictionaries
        dict_clause = "AND list_contains($dicts, f.dictionary)"
    parts = []
    for i, (models, match) in enumerate(same_tokens(matches)):
        ids, texts = f"ids{i}", f"texts{i}"
        params.update({ids: match.ids, texts: match.texts})
        parts.append(f"""
            SELECT f.model, f.dictionary, f.layer, f.feature, f.unit, f.kind, f.side, f.rank, f.score,
                   list_extract(${texts}::VARCHAR[], list_position(${ids}::INTEGER[], f.token_id)) AS token
            FROM {ds.source("features_by_token", models)} f
            WHERE {_in_ids("f.token_id", ids)} AND list_contains($kinds, f.kind) AND list_contains($sides, f.side)
                  {dict_clause} {rank_clause}""")
    order = "rank, CASE WHEN side = 'top' THEN -score ELSE score END, model, dictionary, feature, kind, side"
    return Query(
        f"""WITH v AS MATERIALIZED ({" UNION ALL ".join(parts)})
        SELECT * FROM (
            SELECT model, dictionary, feature, unit, layer, kind, side, min(rank) AS rank, arg_min(score, rank) AS score,
                   count(*) AS hits,
                   list(to_json(token) || ' #' || rank || ' (' || printf('%.4g', score) || ')' ORDER BY rank) AS evidence
            FROM v GROUP BY model, dictionary, feature, unit, layer, kind, side)
        ORDER BY {order} {_limit_clause(limit, params)}""", params)


_EMPTY = pa.schema([("model", pa.string()), ("dictionary", pa.string()), ("feature", pa.int32()), ("unit", pa.string()),
                    ("layer", pa.int16()), ("kind", pa.string()), ("side", pa.string()), ("rank", pa.int32()),
                    ("score", pa.float32()), ("hits", pa.int64()), ("evidence", pa.list_(pa.string()))])


def features(ds, token: str | None = None, *, model=None, dictionary=None, kind=None, side: str = "top",
             max_rank: int | None = None, limit: int | None = 20, exact: bool = False,
             token_id: int | None = None) -> pa.Table:
    """Dictionary features whose decoder (what they write) or encoder (what they read) lists hold TOKEN.

    One row per (model, dictionary, feature, kind, side), ranked like `neurons`: rank, then score,
    then model, dictionary, feature. ``kind``: decoder and/or encoder (default both).

    >>> features(ds, "paris", kind=["decoder"], max_rank=5)   # doctest: +SKIP
    """
    kinds = _list_option(kind or list(FEATURE_KINDS), FEATURE_KINDS, "kind")
    dictionaries = _list_option(dictionary, tuple(_dictionary_names(ds)), "dictionary") if dictionary else None
    sides, limit, max_rank = _sides(side), _bound(limit, "limit", 0), _bound(max_rank, "max rank", 1)
    hits = match_tokens(ds, token, model=model, exact=exact, token_id=token_id)
    matches = matches_by_model(hits)
    if not matches:
        return _EMPTY.empty_table()
    return ds._run(*features_query(ds, matches, kinds=kinds, sides=sides, dictionaries=dictionaries,
                                   max_rank=max_rank, limit=limit))


_DICTIONARY_COLUMNS = ("model", "dictionary", "layer", "site", "hook", "d_in", "d_sae", "architecture", "format", "source",
                       "revision", "k", "n_neighbours")


def dictionaries(ds, *, model=None) -> pa.Table:
    """The indexed dictionaries (SAEs, transcoders), by model and name: layer, site, hook, width
    (d_in -> d_sae features), architecture, format, source, revision, k, stored neighbours.

    ``model=None``: every model's (an empty table when there are none).

    >>> dictionaries(ds, model="gpt2")   # doctest: +SKIP
    """
    where, params = "", {}
    if model is not None:
        params["m"] = ds.resolve_models(model)
        where = "WHERE list_contains($m, model)"
    return ds._run(f"SELECT {', '.join(_DICTIONARY_COLUMNS)} FROM dictionaries {where} ORDER BY model, dictionary", params)


def _dictionary_names(ds) -> list[str]:
    return [r["dictionary"] for r in ds.rows("SELECT DISTINCT dictionary FROM dictionaries ORDER BY dictionary", {})]
