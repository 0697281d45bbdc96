"""`zeropass history`: a unit's top tokens across a training-checkpoint series, and the units
that start promoting a token (docs/QUERY.md "history").

A series is the models sharing ``models.series``, ordered by ``models.step`` (written by
`zeropass index-many` from a SPEC's ``[[series]]``). Both helpers return one row per token (or
unit) with one rank column per step, ``step N`` (null: not in the top ``max_rank`` at that step),
and a ``change`` column saying when it entered and left the lists.
"""
from __future__ import annotations

import pyarrow as pa

from .errors import BadOption, BadUnit, UnknownModel
from .helpers import Query, _bound, _sides, match_tokens
from schemas.units import head_unit_sql

from .units import check_unit, parse_unit, quoted

# What a unit promotes, per unit kind: the write side (FF values, head outputs) by default.
_DEFAULT_KIND = {"neuron": "ff_value", "head_dim": "o", "pos": "pos"}
_UNIT_KINDS = {"neuron": ("ff_key", "ff_gate", "ff_value"), "head_dim": ("q", "k", "v", "o")}
# `--token`: the write-side vectors, and heads through their OV circuit's output tokens.
TOKEN_KINDS = ("ff_value", "o", "ov_output")


def series_query(series: str) -> Query:
    return Query("SELECT model, step FROM models WHERE series = $series ORDER BY step, model", {"series": series})


def series_steps(ds, series: str) -> list[tuple[str, int]]:
    """(model, step) of ``series`` by step; raises UnknownModel naming the series there are."""
    rows = ds._run(*series_query(series)).to_pylist()
    if not rows:
        names = [r["series"] for r in ds._run("SELECT DISTINCT series FROM models WHERE series IS NOT NULL ORDER BY 1", {}).to_pylist()]
        hint = f"series in the dataset: {', '.join(names)}" if names else \
            "the dataset has no series: index one with `zeropass index-many SPEC` ([[series]] entries)"
        raise UnknownModel(f"no series {quoted(series)}; {hint}")
    if any(r["step"] is None for r in rows):
        raise UnknownModel(f"series {quoted(series)} has models without a step")
    return [(r["model"], r["step"]) for r in rows]


def _pivot(long: list[dict], key: tuple[str, ...], steps: list[int]) -> pa.Table:
    """Rows (key..., step, rank) -> one row per key with ``step N`` rank columns and ``change``."""
    by_key: dict[tuple, dict[int, int]] = {}
    for r in long:
        ranks = by_key.setdefault(tuple(r[k] for k in key), {})
        ranks[r["step"]] = min(ranks.get(r["step"], r["rank"]), r["rank"])
    out = []
    for k, ranks in by_key.items():
        present = [s in ranks for s in steps]
        events = []
        for i, s in enumerate(steps):
            if present[i] and (i == 0 or not present[i - 1]) and i > 0:
                events.append(f"enters at {s}")
            if not present[i] and i > 0 and present[i - 1]:
                events.append(f"leaves at {s}")
        change = "; ".join(events) or ("always" if all(present) else "")
        first = next(s for s, p in zip(steps, present) if p)
        out.append((first, min(ranks.values()), k, ranks, change))
    out.sort(key=lambda x: (x[0], x[1], x[2]))
    cols: dict[str, list] = {name: [row[2][i] for row in out] for i, name in enumerate(key)}
    for s in steps:
        cols[f"step {s}"] = [row[3].get(s) for row in out]
    cols["change"] = [row[4] for row in out]
    types = {f"step {s}": pa.int32() for s in steps}
    return pa.table({c: pa.array(v, types.get(c)) for c, v in cols.items()})


def history(ds, series: str, unit: str | None = None, *, token: str | None = None, exact: bool = False,
            token_id: int | None = None, kind=None, side: str = "top", max_rank: int | None = 10,
            limit: int | None = 50) -> pa.Table:
    """``zeropass history``: :func:`unit_history` of UNIT, or :func:`token_history` of a token (``token`` or ``token_id``).

    >>> history(ds, "pythia-70m", "L3.N117")            # doctest: +SKIP
    >>> history(ds, "pythia-70m", token="Paris")        # doctest: +SKIP
    """
    if (unit is None) == (token is None and token_id is None):
        raise BadOption("give either UNIT or --token TOKEN (or --id N)")
    if unit is not None:
        kinds = [kind] if isinstance(kind, str) else list(kind or [])
        if len(kinds) > 1:
            raise BadOption("UNIT takes one --kind")
        return unit_history(ds, series, unit, kind=kinds[0] if kinds else None, side=side, max_rank=max_rank)
    return token_history(ds, series, token, exact=exact, token_id=token_id, kind=kind, side=side, max_rank=max_rank,
                         limit=limit)


def unit_history(ds, series: str, unit: str, *, kind: str | None = None, side: str = "top", max_rank: int | None = 10) -> pa.Table:
    """How ``unit``'s top (or bottom) tokens change across ``series``: one row per token that is in
    the first ``max_rank`` at some step. A head (``L1.H2``) is read through its OV circuit's output
    tokens; a neuron through ``kind`` (default ff_value), a head dimension likewise (default o)."""
    steps = series_steps(ds, series)
    u = parse_unit(unit)
    max_rank = _bound(max_rank, "--max-rank", 1) or 2**31 - 1  # None: no bound
    for model, _ in steps:
        check_unit(u, ds.model_info(model))
    models = [m for m, _ in steps]
    params = {"models": models, "unit": u.name, "sides": _sides(side), "max_rank": max_rank}
    if u.kind == "head":
        if kind not in (None, "ov_output"):
            raise BadOption(f"--kind {kind} does not apply to a head: a head's tokens are its OV output tokens")
        sql = """SELECT m.step, h.token_id, h.token, h.side, h.rank FROM head_tokens h JOIN models m USING (model)
                  WHERE list_contains($models, h.model) AND h.layer = $layer AND h.head = $head AND h.circuit = 'ov'
                  AND h.role = 'output' AND list_contains($sides, h.side) AND h.rank <= $max_rank"""
        params.pop("unit")
        params.update(layer=u.layer, head=u.head)
    else:
        default = _DEFAULT_KIND.get(u.kind, u.bias_kind)
        kind = kind or default
        if kind != default and kind not in _UNIT_KINDS.get(u.kind, ()):
            raise BadOption(f"--kind {kind} does not apply to {u.name}: use one of "
                            f"{', '.join(_UNIT_KINDS.get(u.kind, (default,)))}")
        sql = """SELECT m.step, v.token_id, v.token, v.side, v.rank FROM vectors v JOIN models m USING (model)
                  WHERE list_contains($models, v.model) AND v.unit = $unit AND v.kind = $kind
                  AND list_contains($sides, v.side) AND v.rank <= $max_rank"""
        params["kind"] = kind
    long = ds._run(sql, params).to_pylist()
    key = ("token_id", "token") if side != "both" else ("side", "token_id", "token")
    return _pivot(long, key, [s for _, s in steps])


def token_history(ds, series: str, token: str | None = None, *, exact: bool = False, token_id: int | None = None,
                  kind=None, side: str = "top", max_rank: int = 10, limit: int | None = 50) -> pa.Table:
    """The units that have TOKEN in their first ``max_rank`` tokens at some step of ``series``, with
    its rank per step; the units that start promoting it late come last. ``kind`` (default
    ff_value, o and ov_output, the write side): vector kinds and/or ``ov_output`` (heads)."""
    steps = series_steps(ds, series)
    models = [m for m, _ in steps]
    kinds = _kinds(kind)
    max_rank = _bound(max_rank, "--max-rank", 1) or 2**31 - 1  # None: no bound
    hits = match_tokens(ds, token, model=models, exact=exact, token_id=token_id).to_pylist()
    ids = sorted({h["token_id"] for h in hits})
    params = {"models": models, "ids": ids, "sides": _sides(side), "max_rank": max_rank, "kinds": kinds}
    sql = f"""SELECT m.step, v.unit, v.kind, v.token, v.rank FROM vectors v JOIN models m USING (model)
              WHERE list_contains($models, v.model) AND list_contains($ids, v.token_id)
              AND list_contains($kinds, v.kind) AND list_contains($sides, v.side) AND v.rank <= $max_rank
              UNION ALL
              SELECT m.step, {head_unit_sql('h')}, 'ov_output', h.token, h.rank
              FROM head_tokens h JOIN models m USING (model)
              WHERE list_contains($kinds, 'ov_output') AND list_contains($models, h.model)
              AND list_contains($ids, h.token_id) AND h.circuit = 'ov' AND h.role = 'output'
              AND list_contains($sides, h.side) AND h.rank <= $max_rank"""
    table = _pivot(ds._run(sql, params).to_pylist(), ("unit", "kind", "token"), [s for _, s in steps])
    limit = _bound(limit, "--limit", 0)
    return table.slice(0, limit) if limit is not None else table


def _kinds(kind) -> list[str]:
    from schemas.kinds import ALL_KINDS

    if not kind:
        return list(TOKEN_KINDS)
    values = [k.strip() for part in ([kind] if isinstance(kind, str) else kind) for k in str(part).split(",") if k.strip()]
    bad = [k for k in values if k not in tuple(ALL_KINDS) + ("ov_output",)]
    if bad:
        raise BadOption(f"--kind {', '.join(bad)} is unknown: use {', '.join(tuple(ALL_KINDS) + ('ov_output',))}")
    return values


__all__ = ["history", "unit_history", "token_history", "series_steps", "BadUnit"]
