"""Token-set enrichment: which units' stored lists are about a concept (issue 23).

``enrich(ds, ["paris", "london", ...])`` ranks every stored list (an FF neuron's ``ff_value``
list, a head dimension's ``q`` list, a head's ``ov:output`` role list, ...) by how strongly the
set's tokens crowd its top (or bottom), against the model's vocabulary as the background.

The statistic (docs/QUERY.md, "Concepts and token sets"): a list of K stored tokens is a prefix
of a ranking of the whole vocabulary (N tokens), of which M are the set's tokens. For each cutoff
n <= K the number of members in the first n is hypergeometric under "the ranking ignores the set";
the statistic is the smallest upper-tail probability over the cutoffs (the minimum-hypergeometric
or mHG statistic, restricted to the K stored cutoffs as in XL-mHG with L = K). It rewards members
near the top (a set at ranks 1-20 scores far better than at 31-50) without a free cutoff
parameter. Its exact p-value (the chance that a random ranking reaches a statistic this small at
any of the K cutoffs) is a dynamic programme over the K positions (:func:`mhg_pvalue`). P-values
are corrected by Benjamini-Hochberg over every list searched (lists without a member have p = 1).

Sets are matched per vocabulary by text with the one normaliser (``schemas.tokens.normalise``),
as ``heads``/``neurons`` match a TOKEN: ``paris`` is `` Paris``, ``Paris`` and ``paris`` in a
byte-level vocabulary, ``paris`` in a WordPiece one. The set in a model is the ids its words
match there; M counts ids, so a list holding `` Paris`` and ``Paris`` holds two members.

Vectors are read by token (``vectors_by_token``, as ``neurons``), so their cost follows the set's
rows, not the models' sizes; head role lists are read from ``head_tokens`` (small: heads x 8
lists x K per model, as ``heads`` reads them). The hypergeometric tail is computed exactly in
integers here (the query side does not depend on scipy); tests/test_enrich.py checks it against
scipy and the p-value against brute force. Dictionary features (``decoder`` / ``encoder``) are
read from ``features_by_token``; adding another table of units is one entry of :data:`LISTS`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa

from schemas.format import settings_or_empty
from schemas.kinds import ALL_KINDS, FEATURE_KINDS, FF_KINDS, HEAD_DIM_KINDS, KIND, POS
from schemas.tokens import normalise
from schemas.units import feature_unit, head_unit, vector_unit

from .errors import BadOption, BadToken, UnknownToken
from .helpers import Matches, Query, _bound, _in_ids, _list_option, _sides, _text, same_tokens
from .units import quoted

# A set (a file, a list of arguments) holds at most this many distinct words: enough for any
# concept list, and a bound on the ids bound into one query (a 100k-line file is refused whole,
# never read into a query cut short).
MAX_SET = 10_000
# A tokens file is read up to this many bytes (10,000 words of 100 bytes).
MAX_FILE_BYTES = 1_000_000

HEAD_LISTS = ("ov:source", "ov:output", "qk:query", "qk:key")


# -- which lists there are -----------------------------------------------------------------------

@dataclass(frozen=True)
class Lists:
    """One table of ranked token lists that enrichment can search.

    ``rows`` is SQL over alias ``t`` selecting (model, layer, list, head, expert, idx, side, rank,
    token_id, dictionary), ``list`` the list's name (a kind, ``ov:output``, ...); ``source`` the table read
    (a ``by_token`` one where it exists); ``unit`` names a row's unit; ``count`` is how many lists
    of ``kind`` a model has per side (the m of Benjamini-Hochberg); ``where_kind`` filters ``t``
    to the bound ``$kinds``."""

    source: str
    kinds: tuple[str, ...]
    rows: str
    where_kind: str
    unit: Callable[[dict], str]
    count: Callable[[dict, str], int]


def _layers(info: dict) -> int:
    """Layers indexed (``--layers`` may have kept fewer than the model has)."""
    layers = settings_or_empty(info).get("layers")
    return len(layers) if isinstance(layers, list) else int(info["n_layers"])


def _vector_lists(ds, info: dict) -> dict[str, int]:
    """How many lists of each vector kind a model has (per side): counted in the first indexed
    layer's file (one rank-1 row per list), times the layers indexed; positions from ``n_ctx``.

    Counting the stored lists rather than deriving them from the dimensions gets mixtures of
    experts right (experts x d_ff per FF kind, plus shared experts and one router list per
    expert), and kinds a model lacks (ff_gate, biases) count nothing."""
    layers = settings_or_empty(info).get("layers")
    first = layers[0] if isinstance(layers, list) and layers else 0
    per_layer = ds.rows(f"SELECT kind, count(*) AS n FROM {ds.source('vectors', [info['model']], [first])} "
                        f"WHERE rank = 1 AND side = 'top' AND dictionary IS NULL GROUP BY kind", {})
    out = {r["kind"]: int(r["n"]) * _layers(info) for r in per_layer if KIND[r["kind"]].group != POS}
    if info.get("n_ctx"):
        out["pos"] = int(info["n_ctx"])
    return out


def _background(info: dict) -> int:
    """N: the tokens a list was chosen from: the vocabulary, or those a --vocab-filter allowed.

    Under a filter M still counts every matched id (the allowed ones are not stored): a larger M
    only raises the tails, so p-values stay conservative."""
    vocab_filter = settings_or_empty(info).get("vocab_filter")
    allowed = vocab_filter.get("allowed") if isinstance(vocab_filter, dict) else None
    return int(allowed) if isinstance(allowed, int) and allowed > 0 else int(info["d_vocab"])


LISTS: dict[str, Lists] = {
    "vectors": Lists(  # the model's own vectors (a dictionary's rows of `vectors` are read as features)
        source="vectors_by_token", kinds=tuple(k for k in ALL_KINDS if k not in FEATURE_KINDS),
        rows="""SELECT t.model, t.layer, t.kind AS list, t.head, t.expert, t.idx, t.side, t.rank, t.token_id,
                       NULL::VARCHAR AS dictionary""",
        where_kind="list_contains($kinds, t.kind)",
        unit=lambda r: vector_unit(r["list"], r["layer"], r["head"], r["idx"], r["expert"]),
        count=lambda info, kind: info["vector_lists"].get(kind, 0)),
    "head_tokens": Lists(
        source="head_tokens", kinds=HEAD_LISTS,
        rows="""SELECT t.model, t.layer, t.circuit || ':' || t.role AS list, t.head, NULL::SMALLINT AS expert,
                       NULL::INTEGER AS idx, t.side, t.rank, t.token_id, NULL::VARCHAR AS dictionary""",
        where_kind="list_contains($kinds, t.circuit || ':' || t.role)",
        unit=lambda r: head_unit(r["layer"], r["head"]),
        # role lists are written with the pairs: none when indexed with --pairs 0
        count=lambda info, kind: _layers(info) * int(info["n_heads"]) if info.get("n_pairs") else 0),
    "features": Lists(  # dictionary features: one decoder and one encoder list each (docs/DICTIONARIES.md)
        source="features_by_token", kinds=tuple(FEATURE_KINDS),
        rows="""SELECT t.model, t.layer, t.kind AS list, NULL::SMALLINT AS head, NULL::SMALLINT AS expert,
                       t.feature AS idx, t.side, t.rank, t.token_id, t.dictionary""",
        where_kind="list_contains($kinds, t.kind)",
        unit=lambda r: feature_unit(r["dictionary"], r["idx"]),
        count=lambda info, kind: sum(d_sae for d_sae, _ in info["dictionaries"].values())),
}
# What `--kind` means when not given: FF neurons, head dimensions, heads' role lists, and the
# decoder and encoder lists of the model's dictionaries (none: no lists, no tests).
DEFAULT_KINDS = tuple(FF_KINDS) + tuple(HEAD_DIM_KINDS) + HEAD_LISTS + tuple(FEATURE_KINDS)


def _table_of(kind: str) -> str:
    return next(name for name, lists in LISTS.items() if kind in lists.kinds)


def _kinds(kind) -> list[str]:
    allowed = tuple(k for lists in LISTS.values() for k in lists.kinds)
    if kind is None:
        return list(DEFAULT_KINDS)
    return list(dict.fromkeys(_list_option(kind, allowed, "kind")))


# -- the statistics --------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def tails(N: int, M: int, K: int) -> tuple[tuple[float, ...], ...]:
    """``tails(N, M, K)[n][k]`` = P(X >= k), X ~ Hypergeometric(N tokens, M members, n drawn), n <= K.

    Exact: the tail's numerator sum_i C(M, i) C(N - M, n - i) is summed in integers (each term from
    the previous one by an exact integer ratio) and divided by C(N, n) once, which Python rounds
    correctly to a float. About K * min(K, M) big-integer steps: milliseconds for K = 100."""
    rows: list[tuple[float, ...]] = [(1.0,)]
    total = 1  # C(N, n)
    for n in range(1, K + 1):
        total = total * (N - n + 1) // n
        lo, hi = max(0, n - (N - M)), min(n, M)
        terms = [0] * (hi + 1)
        a = math.comb(M, lo) * math.comb(N - M, n - lo)
        for i in range(lo, hi + 1):
            terms[i] = a
            if i < hi:  # C(M, i+1) C(N-M, n-i-1) from C(M, i) C(N-M, n-i)
                a = a * (M - i) * (n - i) // ((i + 1) * (N - M - n + i + 1))
        tail = [0.0] * (hi + 2)
        acc = 0
        for i in range(hi, -1, -1):
            acc += terms[i]
            tail[i] = acc / total
        rows.append(tuple(tail))
    return tuple(rows)


def hypergeom_sf(k: int, N: int, M: int, n: int) -> float:
    """P(X >= k) for X ~ Hypergeometric(population N, M successes, n draws) (scipy's ``hypergeom.sf(k - 1, N, M, n)``)."""
    if k <= 0:
        return 1.0
    if k > min(n, M):
        return 0.0
    return tails(N, M, n)[n][k]


def mhg(ranks: list[int], N: int, M: int, K: int) -> tuple[float, int]:
    """The mHG statistic of a list whose members sit at ``ranks`` (1-based, within the first K):
    the smallest P(X >= members in the first n) over the cutoffs n, and the cutoff reaching it."""
    t = tails(N, M, K)
    best, cutoff = 1.0, 0
    for j, r in enumerate(sorted(ranks), start=1):  # only a member's rank can lower the minimum
        if t[r][j] < best:
            best, cutoff = t[r][j], r
    if cutoff == 0 and ranks:  # no prefix is unlikely (members only where they must be): the whole stretch
        cutoff = max(ranks)
    return best, cutoff


@lru_cache(maxsize=4096)
def mhg_pvalue(s: float, N: int, M: int, K: int) -> float:
    """P(mHG <= s) when the M members sit at random among N ranks and only the first K count.

    A dynamic programme over the positions 1..K on the number of members seen so far: the mass
    of the paths whose tail at some cutoff n falls to ``s`` or below is absorbed, and the p-value
    is the absorbed mass (summed, not 1 - survivors, so tiny p-values stay accurate)."""
    if s >= 1.0:
        return 1.0
    t = tails(N, M, K)
    limit = s * (1 + 1e-9)  # the observed statistic is one of the tails: compare without rounding noise
    f = [1.0]  # f[j]: probability of j members among the first n positions, never absorbed
    hit = 0.0
    for n in range(1, K + 1):
        row = t[n]
        # the fewest members in the first n that reach the statistic (tails fall as j grows)
        thr = next((j for j in range(1, len(row)) if row[j] <= limit), len(row))
        g = [0.0] * (len(f) + 1)
        for j, p in enumerate(f):
            member = (M - j) / (N - n + 1) if M > j else 0.0
            g[j] += p * (1 - member)
            g[j + 1] += p * member
        hit += sum(g[thr:])
        f = g[:thr]  # only paths below the threshold go on (f stays at most thr long)
    return min(1.0, hit)


def benjamini_hochberg(pvalues: list[float], m: int) -> list[float]:
    """BH-adjusted p-values (q-values) of ``pvalues`` among ``m`` tests (the others have p = 1)."""
    m = max(m, len(pvalues))
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    q = [1.0] * len(pvalues)
    running = 1.0
    for pos in range(len(order) - 1, -1, -1):
        i = order[pos]
        running = min(running, pvalues[i] * m / (pos + 1))
        q[i] = min(1.0, running)
    return q


# -- the set -----------------------------------------------------------------------------------------

def token_set(tokens: Iterable[str]) -> list[str]:
    """The distinct words of a set in order (by normalised text: duplicates count once).

    Raises BadToken for an empty set, a word that is not text and a set over :data:`MAX_SET`."""
    if isinstance(tokens, str):
        tokens = [tokens]
    seen: dict[str, str] = {}
    for word in tokens or ():
        key = normalise(_text(word, "token"))
        if key and key not in seen:
            seen[key] = word
            if len(seen) > MAX_SET:
                raise BadToken(f"the set has more than {MAX_SET:,} distinct tokens: enrich takes at most {MAX_SET:,}")
    if not seen:
        raise BadToken("the token set is empty: give TOKEN arguments, --tokens-file F or --set NAME")
    return list(seen.values())


def read_tokens_file(path) -> list[str]:
    """The words of a tokens file: one a line, blank lines and ``#`` comments skipped.

    Raises BadToken naming the file for a missing, unreadable, non-UTF-8 or oversized file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise BadToken(f"tokens file {quoted(str(p))} does not exist") from None
    except IsADirectoryError:
        raise BadToken(f"tokens file {quoted(str(p))} is a directory: give a text file, one token a line") from None
    except OSError as e:
        raise BadToken(f"tokens file {quoted(str(p))} cannot be read: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise BadToken(f"tokens file {quoted(str(p))} is over {MAX_FILE_BYTES:,} bytes: enrich takes at most "
                       f"{MAX_SET:,} tokens, one a line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadToken(f"tokens file {quoted(str(p))} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    return _words(text.splitlines())


def _words(lines: Iterable[str]) -> list[str]:
    out = []
    for line in lines:
        if line.lstrip().startswith("#"):
            continue
        if line.strip():
            out.append(line.strip("\r\n"))
    if len(out) > MAX_SET:
        raise BadToken(f"the set has {len(out):,} lines: enrich takes at most {MAX_SET:,} tokens")
    return out


def set_names() -> list[str]:
    """The named sets shipped with zeropass (``schemas/token_sets/NAME.txt``)."""
    root = resources.files("schemas") / "token_sets"
    return sorted(p.name[:-4] for p in root.iterdir() if p.name.endswith(".txt"))


def named_set(name: str) -> list[str]:
    """The words of the shipped set ``name`` (BadOption naming the sets for an unknown name)."""
    if not isinstance(name, str) or name not in set_names():
        raise BadOption(f"unknown token set {quoted(str(name))}: use one of {', '.join(set_names())} (zeropass enrich --list-sets)")
    return _words((resources.files("schemas") / "token_sets" / f"{name}.txt").read_text("utf-8").splitlines())


def set_sources() -> pa.Table:
    """name, size and source (the file's ``# source:`` line) of every shipped set."""
    rows = []
    for name in set_names():
        text = (resources.files("schemas") / "token_sets" / f"{name}.txt").read_text("utf-8")
        source = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("# source:")), "")
        rows.append({"name": name, "size": len(token_set(_words(text.splitlines()))), "source": source})
    return pa.Table.from_pylist(rows, schema=pa.schema([("name", pa.string()), ("size", pa.int64()), ("source", pa.string())]))


def gather(tokens=(), *, tokens_file=None, sets=()) -> list[str]:
    """The set from every source a caller may give: words, a tokens file, named sets (duplicates once)."""
    words = list(tokens)
    if tokens_file is not None:
        words += read_tokens_file(tokens_file)
    for name in sets:
        words += named_set(name)
    return token_set(words)


def match_summary(matches: pa.Table) -> list[str]:
    """One line per model of :func:`set_matches`: how many words matched how many ids, and the misses."""
    per: dict[str, dict[str, int]] = {}  # model -> word -> ids matched
    for m, w, i in zip(*(matches.column(c).to_pylist() for c in ("model", "word", "token_id"))):
        words = per.setdefault(m, {})
        words[w] = words.get(w, 0) + (i is not None)
    out = []
    for m, words in per.items():
        missed = [w for w, n in words.items() if n == 0]
        shown = ", ".join(quoted(w) for w in missed[:10]) + (f" and {len(missed) - 10} more" if len(missed) > 10 else "")
        out.append(f"{m}: {len(words) - len(missed)} of {len(words)} words match {sum(words.values())} token ids"
                   + (f"; no match: {shown}" if missed else ""))
    return out


# -- matching the set --------------------------------------------------------------------------------

def set_match_query(models: list[str], norms: list[str]) -> Query:
    """The vocabulary entries whose ``norm`` is one of ``norms``, in each of ``models``."""
    return Query(
        """SELECT m.model, m.vocab_id, m.d_vocab, t.norm, t.token_id, t.token
           FROM models m JOIN tokens t ON t.vocab_id = m.vocab_id
           WHERE list_contains($models, m.model) AND list_contains($norms, t.norm)
           ORDER BY m.model, t.token_id""",
        {"models": models, "norms": norms})


def set_matches(ds, tokens, *, model=None) -> pa.Table:
    """Which words of the set match which token ids in each model: model, word, token_id, token.

    A word that matches nothing in a model has one row with a null token_id."""
    words = token_set(tokens)
    models = ds.resolve_models(model)
    hits = ds.rows(*set_match_query(models, [normalise(w) for w in words]))
    by: dict[tuple[str, str], list[dict]] = {}
    for r in hits:
        by.setdefault((r["model"], r["norm"]), []).append(r)
    rows = []
    for m in models:
        for w in words:
            found = by.get((m, normalise(w)), [])
            rows += [{"model": m, "word": w, "token_id": r["token_id"], "token": r["token"]} for r in found] or \
                    [{"model": m, "word": w, "token_id": None, "token": None}]
    return pa.Table.from_pylist(rows, schema=pa.schema([("model", pa.string()), ("word", pa.string()),
                                                        ("token_id", pa.int32()), ("token", pa.string())]))


# -- the helper ---------------------------------------------------------------------------------------

def enrich_query(ds, table: str, matches: list[Matches], *, kinds: list[str], sides: list[str]) -> Query:
    """The SQL reading the set's rows of ``table``'s lists: one scan per group of models with the same ids."""
    lists = LISTS[table]
    params: dict = {"kinds": kinds, "sides": sides}
    parts = []
    for i, (models, match) in enumerate(same_tokens(matches)):
        ids = f"ids{i}"
        params[ids] = match.ids
        parts.append(f"""{lists.rows} FROM {ds.source(lists.source, models)} t
            WHERE {_in_ids("t.token_id", ids)} AND {lists.where_kind} AND list_contains($sides, t.side)""")
    # one row per list holding a member: its members' ranks and ids, best first
    return Query(f"""SELECT model, list, side, layer, head, expert, idx, dictionary,
                            list(rank ORDER BY rank, token_id) AS ranks, list(token_id ORDER BY rank, token_id) AS ids
                     FROM ({" UNION ALL ".join(parts)}) GROUP BY ALL""", params)


# What identifies one list (one test): its unit's coordinates, the list's name and side.
_KEY = ("model", "list", "side", "layer", "head", "expert", "idx", "dictionary")

_SCHEMA = pa.schema([
    ("model", pa.string()), ("unit", pa.string()), ("list", pa.string()), ("side", pa.string()),
    ("layer", pa.int16()), ("p_value", pa.float64()), ("q_value", pa.float64()), ("statistic", pa.float64()),
    ("cutoff", pa.int32()), ("hits", pa.int32()), ("fold", pa.float64()), ("set_size", pa.int32()),
    ("list_size", pa.int32()), ("background", pa.int32()), ("members", pa.list_(pa.string())),
    ("missing", pa.list_(pa.string())),
])


def enrich(ds, tokens=None, *, model=None, kind=None, side: str = "top", limit: int | None = 20) -> pa.Table:
    """Units whose stored lists are enriched in the token set, most significant first.

    One row per list (model, unit, list = its kind or head role list, side): ``statistic`` (the
    mHG minimum tail), ``cutoff`` (the rank where it is reached), ``p_value`` (exact), ``q_value``
    (Benjamini-Hochberg over every list searched), ``hits`` (members in the list), ``fold``
    ((hits in the first cutoff / cutoff) / (set_size / background)), ``set_size`` (ids of the
    model's vocabulary the set matches), ``list_size`` (K), ``background`` (the vocabulary size),
    ``members`` (``"token" #rank``, best first) and ``missing`` (the set's words no token of the
    model matches). ``limit=None``: every list with a member.

    >>> enrich(ds, ["january", "february", "march"], kind="ff_value")   # doctest: +SKIP
    """
    words = token_set(tokens)
    kinds, sides, limit = _kinds(kind), _sides(side), _bound(limit, "limit", 0)
    models = ds.resolve_models(model)
    norms = [normalise(w) for w in words]
    hits = ds.rows(*set_match_query(models, norms))
    if not hits:
        raise UnknownToken(f"no token of the set ({', '.join(words[:5])}{', ...' if len(words) > 5 else ''}) "
                           f"is in the vocabulary of {', '.join(models)}")
    ids: dict[str, dict[int, str]] = {}
    for r in hits:
        ids.setdefault(r["model"], {})[r["token_id"]] = r["token"]
    infos = {r["model"]: r for r in ds.rows("SELECT * FROM models WHERE list_contains($m, model) ORDER BY model",
                                            {"m": [m for m in models if m in ids]})}
    for info in infos.values():  # each model's dictionaries: name -> (features, tokens stored per list)
        info["dictionaries"] = {}
    if ds.manifest.get("dictionaries"):
        for r in ds.rows("SELECT model, dictionary, d_sae, k FROM dictionaries WHERE list_contains($m, model)",
                         {"m": list(infos)}):
            infos[r["model"]]["dictionaries"][r["dictionary"]] = (int(r["d_sae"]), int(r["k"]))
    matched_norms = {m: {r["norm"] for r in hits if r["model"] == m} for m in ids}
    missing = {m: [w for w, n in zip(words, norms) if n not in matched_norms[m]] for m in ids}
    matches = [Matches(m, sorted(ids[m]), [ids[m][i] for i in sorted(ids[m])]) for m in infos]

    # every list holding a member: (model, list, side, layer, head, expert, idx, dictionary) -> (ranks, ids), best first
    found: dict[tuple, tuple[list[int], list[int]]] = {}
    for table in LISTS:
        wanted = [k for k in kinds if _table_of(k) == table]
        if not wanted or table == "features" and not any(info["dictionaries"] for info in infos.values()):
            continue
        t = ds._run(*enrich_query(ds, table, matches, kinds=wanted, sides=sides))
        cols = [t.column(c).to_pylist() for c in _KEY + ("ranks", "ids")]
        for *key, ranks, member_ids in zip(*cols):
            found[tuple(key)] = (ranks, member_ids)

    # Score every list (BH needs every p-value); name units and format members for the rows kept only.
    scored = []
    for key, (member_ranks, _) in found.items():
        m, info = key[0], infos[key[0]]
        N = _background(info)
        M = min(len(ids[m]), N)
        K = min(int(info["dictionaries"][key[7]][1] if key[7] is not None else info["k"]), N)
        ranks = sorted({r for r in member_ranks if r <= K})
        if not ranks:
            continue
        stat, cutoff = mhg(ranks, N, M, K)
        order = (mhg_pvalue(stat, N, M, K), stat, -len(ranks), m, key[7] or "",
                 *(-1 if v is None else v for v in (key[3], key[4], key[5], key[6])), key[1], key[2])
        scored.append((order, key, cutoff, ranks, N, M, K))
    # Every list of the kinds asked is a test: those without a member have p = 1.
    for info in infos.values():
        info["vector_lists"] = _vector_lists(ds, info) if any(_table_of(k) == "vectors" for k in kinds) else {}
    tests = sum(LISTS[_table_of(k)].count(infos[m], k) * len(sides) for m in infos for k in kinds)
    q_values = benjamini_hochberg([s[0][0] for s in scored], tests)
    best = sorted(range(len(scored)), key=lambda i: scored[i][0])
    rows = []
    for i in best if limit is None else best[:limit]:
        (p, stat, *_), key, cutoff, ranks, N, M, K = scored[i]
        m, (member_ranks, member_ids) = key[0], found[key]
        in_cut = sum(1 for r in ranks if r <= cutoff)
        unit = LISTS[_table_of(key[1])].unit(dict(zip(_KEY, key)))
        rows.append({"model": m, "unit": unit, "list": key[1], "side": key[2],
                     "layer": key[3], "p_value": p, "q_value": q_values[i], "statistic": stat, "cutoff": cutoff,
                     "hits": len(ranks), "fold": (in_cut / cutoff) / (M / N), "set_size": M, "list_size": K,
                     "background": N, "members": [f"{json.dumps(ids[m][t], ensure_ascii=False)} #{r}"
                                                  for r, t in zip(member_ranks, member_ids) if r <= K],
                     "missing": missing[m]})
    return pa.Table.from_pylist(rows, schema=_SCHEMA)
