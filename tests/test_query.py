"""The query layer: opening, read-only SQL, helpers equal to plain SQL, token matching, errors.

Most tests run on the session's synthetic dataset (tests/conftest.py, ``PLANTED`` says where
the known answers are); ``test_real_*`` run on real tiny models indexed with index_model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from query import (BadOption, BadSQL, BadToken, BadUnit, Dataset, ForbiddenSQL, NotADataset, SchemaMismatch,
                   UnknownModel, UnknownToken, norm)

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> dict:
    """Every file under the dataset with its content hash (to prove nothing changed)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


# -- opening -----------------------------------------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(NotADataset, match="zeropass index MODEL --db"):
        Dataset(tmp_path / "nope")


def test_directory_without_manifest(tmp_path):
    with pytest.raises(NotADataset, match="not a zeropass dataset"):
        Dataset(tmp_path)


def test_other_schema_version(tmp_path, synthetic_db):
    copy = tmp_path / "old"
    shutil.copytree(synthetic_db, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 999
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SchemaMismatch, match=r"schema version 999.*rebuild.*zeropass index"):
        Dataset(copy)


def test_relocatable_and_independent_of_cwd(tmp_path, synthetic_db, monkeypatch, ds):
    copy = tmp_path / "moved"
    shutil.copytree(synthetic_db, copy)
    monkeypatch.chdir(tmp_path)
    with Dataset("moved") as moved:
        assert moved.sql("SELECT count(*) AS n FROM vectors").to_pylist() == ds.sql("SELECT count(*) AS n FROM vectors").to_pylist()
        assert moved.model_names() == ["alpha", "beta", "gamma"]


# -- SQL ---------------------------------------------------------------------------------------

def test_sql_returns_arrow_and_binds_parameters(ds):
    t = ds.sql("SELECT token_id FROM tokens WHERE vocab_id = $v AND norm = $q ORDER BY token_id", {"v": "vshared", "q": "paris"})
    assert t.column("token_id").to_pylist() == [1, 2, 3]
    assert ds.sql("SELECT ? + 1 AS x", [41]).to_pylist() == [{"x": 42}]
    assert list(ds.df("SELECT model FROM models ORDER BY model")["model"]) == ["alpha", "beta", "gamma"]


def test_every_table_has_a_view(ds):
    from schemas import TABLES

    for name, table in TABLES.items():
        cols = ds.sql(f"SELECT * FROM {name} LIMIT 0").column_names
        assert cols == table.column_names, name


def test_read_only_statements_run(ds):
    assert ds.sql("DESCRIBE heads").num_rows > 0
    assert ds.sql("SHOW TABLES").num_rows >= 7
    assert ds.sql("SUMMARIZE models").num_rows > 0
    assert ds.sql("EXPLAIN SELECT * FROM vectors").num_rows > 0
    assert ds.sql("WITH x AS (SELECT 1 AS a) SELECT * FROM x").to_pylist() == [{"a": 1}]


@pytest.mark.parametrize("query", [
    pytest.param("CREATE TABLE x AS SELECT 1", id="create"),
    pytest.param("CREATE VIEW v AS SELECT 1", id="create-view"),
    pytest.param("CREATE OR REPLACE VIEW models AS SELECT 1 AS model", id="replace-view"),
    pytest.param("INSERT INTO models SELECT * FROM models", id="insert"),
    pytest.param("UPDATE models SET k = 1", id="update"),
    pytest.param("DELETE FROM models", id="delete"),
    pytest.param("DROP VIEW models", id="drop"),
    pytest.param("COPY (SELECT 1) TO '{root}/x.csv'", id="copy-to"),
    pytest.param("COPY models TO '{root}/models/evil.parquet' (FORMAT parquet)", id="copy-over-dataset"),
    pytest.param("EXPORT DATABASE '{root}/export'", id="export"),
    pytest.param("ATTACH '{root}/catalog.duckdb' AS c", id="attach"),
    pytest.param("INSTALL httpfs", id="install"),
    pytest.param("LOAD httpfs", id="load"),
    pytest.param("SET enable_external_access = true", id="set"),
    pytest.param("EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1", id="explain-analyze-create"),
    pytest.param("SELECT 1; DROP VIEW models", id="second-statement"),
])
def test_sql_cannot_change_the_dataset(ds, synthetic_db, query):
    before = _snapshot(synthetic_db)
    with pytest.raises(ForbiddenSQL, match="not allowed: the dataset is read-only") as e:
        ds.sql(query.format(root=synthetic_db))
    assert "\n" not in str(e.value)
    assert _snapshot(synthetic_db) == before
    assert ds.sql("SELECT count(*) AS n FROM models").to_pylist() == [{"n": 3}]


@pytest.mark.parametrize("query", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM '/etc/hostname'",
    "SELECT * FROM read_parquet('{outside}')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM read_text('{root}/../outside.parquet')",
])
def test_sql_cannot_read_outside_the_dataset(ds, synthetic_db, tmp_path, query):
    import pyarrow as pa
    import pyarrow.parquet as pq

    outside = tmp_path / "outside.parquet"
    pq.write_table(pa.table({"a": [1]}), outside)
    with pytest.raises(ForbiddenSQL, match="only the dataset's own files"):
        ds.sql(query.format(outside=outside, root=synthetic_db))


def test_sql_can_read_the_dataset_files_directly(ds, synthetic_db):
    f = sorted((synthetic_db / "models").rglob("*.parquet"))[0]
    assert ds.sql(f"SELECT count(*) AS n FROM read_parquet('{f}')").to_pylist() == [{"n": 1}]


@pytest.mark.parametrize("query,match", [
    ("SELEC 1", "Parser Error"),
    ("SELECT nope FROM models", "nope"),
    ("SELECT * FROM no_such_table", "no_such_table"),
    ("", "empty SQL"),
])
def test_bad_sql_is_one_line(ds, query, match):
    with pytest.raises(BadSQL, match=match) as e:
        ds.sql(query)
    assert "\n" not in str(e.value)


# -- token matching ----------------------------------------------------------------------------

def test_norm_is_the_indexers():
    from indexer.tokens import normalise

    for s in [" Paris", "ＰＡＲＩＳ", "\tParis\n", "ﬁ", "🙂", "  "]:
        assert norm(s) == normalise(s)


def test_default_match_is_case_and_space_insensitive(ds):
    from query import match_tokens

    hits = match_tokens(ds, "paris", model="alpha")
    assert sorted(hits.column("token").to_pylist()) == [" Paris", "Paris", "paris"]
    assert match_tokens(ds, "  PARIS ", model="alpha").num_rows == 3
    assert match_tokens(ds, " Paris", model="alpha", exact=True).column("token_id").to_pylist() == [1]
    assert match_tokens(ds, None, model="alpha", token_id=2).column("token").to_pylist() == ["Paris"]
    # Matched per vocabulary by text: gamma's 'paris' has its own id.
    g = match_tokens(ds, "Paris", model="gamma")
    assert g.column("token").to_pylist() == ["paris"]


AWKWARD = [
    pytest.param("O'Brien", "L1.N0", id="quote"),
    pytest.param("a\\b", "L1.N0", id="backslash"),
    pytest.param("100%", "L1.N0", id="percent"),
    pytest.param("snake_case", "L1.N0", id="underscore"),
    pytest.param("line\nbreak", "L1.N0", id="newline"),
    pytest.param("🙂", "L1.N1", id="emoji"),
]


@pytest.mark.parametrize("token,unit", AWKWARD)
@pytest.mark.parametrize("exact", [False, True], ids=["norm", "exact"])
def test_awkward_tokens_are_bound_not_pasted(ds, token, unit, exact):
    t = ds.neurons(token, model="alpha", exact=exact, kind="ff_key,ff_value", limit=None)
    rows = t.to_pylist()
    assert [r["unit"] for r in rows] == [unit]
    assert rows[0]["evidence"] == [f"{json.dumps(token, ensure_ascii=False)} #{rows[0]['rank']} ({rows[0]['evidence'][0].rsplit('(', 1)[1]}"]


def test_like_wildcards_do_not_match(ds):
    # '%' and '_' are not wildcards: 1000 and snakeXcase exist but must not be found.
    for token in ("100%", "snake_case"):
        ev = " ".join(e for r in ds.neurons(token, limit=None, kind=["ff_key", "ff_value"]).to_pylist() for e in r["evidence"])
        assert "1000" not in ev and "snakeXcase" not in ev


def test_whitespace_only_token(ds):
    with pytest.raises(BadToken, match="only whitespace.*--exact"):
        ds.neurons("   ")
    with pytest.raises(BadToken):
        ds.heads("")
    rows = ds.neurons(" ", exact=True, model="alpha", kind="ff_value").to_pylist()
    assert [(r["unit"], r["rank"]) for r in rows] == [("L1.N1", 3)]


def test_unknown_token_suggests_nearest(ds):
    with pytest.raises(UnknownToken, match=r"'parisx' is in no vocabulary of alpha, beta, gamma; nearest: ' Paris'"):
        ds.heads("parisx")
    with pytest.raises(UnknownToken, match="token id 99999"):
        ds.heads(token_id=99999, model="alpha")


def test_unknown_model_lists_indexed(ds):
    with pytest.raises(UnknownModel, match="unknown model 'delta': indexed models are alpha, beta, gamma"):
        ds.heads("paris", model="alpha,delta")


def test_model_filter_forms(ds):
    a = ds.heads("paris", model=["alpha", "gamma"], limit=None)
    b = ds.heads("paris", model="alpha,gamma", limit=None)
    assert a.equals(b)
    assert set(a.column("model").to_pylist()) == {"alpha", "gamma"}


def test_bad_options(ds):
    with pytest.raises(BadOption, match="unknown kind 'ff_nope'"):
        ds.neurons("paris", kind="ff_nope")
    with pytest.raises(BadOption, match="unknown circuit"):
        ds.heads("paris", circuit="xy")


# -- heads and neurons equal plain SQL ---------------------------------------------------------

def test_heads_finds_the_copying_head_first(ds):
    rows = ds.heads("paris").to_pylist()
    top = rows[0]
    assert (top["model"], top["unit"], top["best_rank"]) == ("alpha", "L1.H0", 1)
    assert top["evidence"][0] == 'ov top pair #1 " Paris" -> " Paris" (99)'
    assert {"ov source top #1 \" Paris\" (49)", "ov output top #1 \" Paris\" (49)"} <= set(top["evidence"])
    # Across all models: beta and gamma heads that list (case/space variants of) paris are there too.
    assert {(r["model"], r["unit"]) for r in rows} == {("alpha", "L1.H0"), ("alpha", "L0.H1"), ("beta", "L0.H0"), ("gamma", "L1.H1")}
    assert [r["relevance"] for r in rows] == sorted((r["relevance"] for r in rows), reverse=True)


def _sql_head_evidence(ds, q: str) -> dict:
    rows = ds.sql("""
        WITH hit AS (SELECT m.model, t.token_id FROM models m JOIN tokens t USING (vocab_id) WHERE t.norm = $q)
        SELECT p.model, p.layer, p.head, p.rank FROM pairs p
        WHERE p.side = 'top' AND ((p.model, p.src_id) IN (SELECT (model, token_id) FROM hit)
                               OR (p.model, p.dst_id) IN (SELECT (model, token_id) FROM hit))
        UNION ALL
        SELECT h.model, h.layer, h.head, h.rank FROM head_tokens h JOIN hit USING (model, token_id) WHERE h.side = 'top'
    """, {"q": q}).to_pylist()
    out: dict = {}
    for r in rows:
        out.setdefault((r["model"], r["layer"], r["head"]), []).append(r["rank"])
    return out


@pytest.mark.parametrize("q", ["paris", "the", "w33", "city"])
def test_heads_equals_plain_sql(ds, q):
    expected = _sql_head_evidence(ds, q)
    got = ds.heads(q, limit=None).to_pylist()
    assert {(r["model"], r["layer"], r["head"]) for r in got} == set(expected)
    for r in got:
        ranks = expected[(r["model"], r["layer"], r["head"])]
        assert r["hits"] == len(ranks) and r["best_rank"] == min(ranks)
        assert r["relevance"] == pytest.approx(sum(1 / x for x in ranks))


@pytest.mark.parametrize("q,kinds", [("paris", ["ff_key", "ff_gate", "ff_value"]), ("the", ["ff_value"]),
                                     ("city", ["q", "k", "v", "o", "pos"])])
def test_neurons_equals_plain_sql(ds, q, kinds):
    expected = ds.sql("""
        SELECT v.model, v.unit, v.kind, min(v.rank) AS rank, count(*) AS hits
        FROM vectors v JOIN models m USING (model) JOIN tokens t ON t.vocab_id = m.vocab_id AND t.token_id = v.token_id
        WHERE t.norm = $q AND v.side = 'top' AND list_contains($kinds, v.kind)
        GROUP BY ALL""", {"q": q, "kinds": kinds}).to_pylist()
    got = ds.neurons(q, kind=kinds, limit=None).to_pylist()
    key = lambda r: (r["model"], r["unit"], r["kind"], r["rank"], r["hits"])  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, expected))
    order = [(r["rank"], -r["score"]) for r in got]
    assert order == sorted(order)


def test_neurons_max_rank_side_and_limit(ds):
    assert all(r["rank"] <= 2 for r in ds.neurons("the", max_rank=2, limit=None).to_pylist())
    bottom = ds.neurons("paris", side="bottom", model="alpha").to_pylist()
    assert [(r["unit"], r["kind"], r["rank"]) for r in bottom] == [("L1.N2", "ff_key", 2)]
    assert ds.neurons("the", limit=2).num_rows == 2
    beta = ds.neurons("paris", model="beta").to_pylist()
    assert beta[0]["unit"] == "L1.N2" and beta[0]["hits"] == 2  # 'Paris' #2 and ' Paris' #4, one row


def test_empty_result_is_empty(ds):
    assert ds.neurons("paris", kind="pos").num_rows == 0


# -- show --------------------------------------------------------------------------------------

def test_show_head(ds):
    s = ds.show("alpha", "L1.H0")
    assert list(s) == ["metrics", "pairs", "head_tokens_top", "head_tokens_bottom", "dims"]
    metrics = dict(zip(s["metrics"]["metric"].to_pylist(), s["metrics"]["value"].to_pylist()))
    row = ds.sql("SELECT * FROM heads WHERE model = 'alpha' AND layer = 1 AND head = 0").to_pylist()[0]
    assert metrics["ov_copying_score"] == row["ov_copying_score"]
    pairs = s["pairs"].to_pylist()
    assert {(p["circuit"], p["side"]) for p in pairs} == {("ov", "top"), ("ov", "bottom"), ("qk", "top"), ("qk", "bottom")}
    assert pairs[0] == {"circuit": "ov", "side": "top", "rank": 1, "src": " Paris", "dst": " Paris", "score": 99.0}
    assert s["head_tokens_top"].to_pylist()[0]["ov_source"] == " Paris"
    assert set(s["dims"].column("kind").to_pylist()) == {"q", "k", "v", "o"}


def test_show_neuron_dim_position_bias(ds):
    v = ds.show("alpha", "l0.n1")["vectors"].to_pylist()  # case-insensitive unit names
    assert [r["kind"] for r in v] == ["ff_key"] * 5 + ["ff_value"] * 5
    assert [r["top"] for r in v if r["kind"] == "ff_value"] == [" Paris", " France", " London", " city", " the"]
    assert all(r["bottom_score"] < 0 for r in v)
    d = ds.show("alpha", "L0.H1.d1")["vectors"]
    assert set(d.column("kind").to_pylist()) == {"q", "k", "v", "o"}
    assert set(ds.show("alpha", "P2")["vectors"].column("unit").to_pylist()) == {"P2"}
    assert ds.show("alpha", "L1.attn_bias")["vectors"].num_rows == 5
    assert ds.show("gamma", "L0.N0", limit=2)["vectors"].num_rows == 6  # ff_key, ff_gate, ff_value x 2 ranks


@pytest.mark.parametrize("model,unit,match", [
    ("alpha", "L1.X3", "malformed unit 'L1.X3': use one of L5.H3"),
    ("alpha", "H3", "malformed unit"),
    ("alpha", "L9.H0", "layer 9 is out of range for alpha"),
    ("alpha", "L0.H7", "head 7 is out of range"),
    ("alpha", "L0.N99", "neuron 99 is out of range"),
    ("alpha", "L0.H0.d9", "dimension 9 is out of range"),
    ("gamma", "P1", "no learned positions"),
])
def test_show_bad_units(ds, model, unit, match):
    with pytest.raises(BadUnit, match=match):
        ds.show(model, unit)


def test_show_unknown_model(ds):
    with pytest.raises(UnknownModel, match="indexed models are alpha, beta, gamma"):
        ds.show("nope", "L0.H0")


# -- tokens ------------------------------------------------------------------------------------

def test_tokens_maps_text_per_vocabulary(ds):
    rows = {r["model"]: r for r in ds.tokens("Paris").to_pylist()}
    assert rows["alpha"]["tokens"] == ["Paris"] and rows["alpha"]["token_ids"] == [2]
    assert rows["alpha"]["matches"] == [" Paris", "Paris", "paris"]
    assert rows["gamma"]["tokens"] == ["paris"] and rows["gamma"]["token_ids"] == [2]
    assert ds.tokens("Paris is big", model="alpha").to_pylist()[0]["tokens"] == ["Paris", " ", "is", " big"]
    # WordPiece: '##' pieces inside a word, whitespace skipped.
    g = ds.tokens("par big", model="gamma").to_pylist()[0]
    assert g["pieces"] == ["par", "big"]
    g = ds.tokens("parisx12", model="gamma").to_pylist()[0]
    assert g["pieces"][0] == "paris" and g["tokens"][0] == "paris"
    # A character no entry covers: null id.
    a = ds.tokens("Paris§", model="alpha").to_pylist()[0]
    assert a["token_ids"] == [2, None] and a["tokens"] == ["Paris", "§"]


def test_tokens_awkward_text(ds):
    a = ds.tokens("O'Brien 100%", model="alpha").to_pylist()[0]
    assert a["tokens"] == ["O'Brien", " ", "100%"]


# -- similar -----------------------------------------------------------------------------------

def _signature(ds, model, unit, kinds):
    rows = ds.sql("""SELECT v.kind, v.rank, t.norm, m.k FROM vectors v JOIN models m USING (model)
                     JOIN tokens t ON t.vocab_id = m.vocab_id AND t.token_id = v.token_id
                     WHERE v.model = $m AND v.unit = $u AND v.side = 'top' AND list_contains($kinds, v.kind)""",
                  {"m": model, "u": unit, "kinds": kinds}).to_pylist()
    sig: dict = {}
    for r in rows:
        key = (r["kind"], r["norm"])
        sig[key] = sig.get(key, 0.0) + (r["k"] + 1 - r["rank"]) / r["k"]
    return sig


def _jaccard(a, b):
    keys = set(a) | set(b)
    return sum(min(a.get(x, 0), b.get(x, 0)) for x in keys) / sum(max(a.get(x, 0), b.get(x, 0)) for x in keys)


def test_similar_across_vocabularies(ds):
    rows = ds.similar("alpha", "L0.N1", "gamma").to_pylist()
    assert rows[0]["unit"] == "L0.N0"
    assert rows[0]["tokens"][:4] == ["paris", "france", "london", "city"]
    kinds = ["ff_key", "ff_gate", "ff_value"]
    a = _signature(ds, "alpha", "L0.N1", kinds)
    # gamma has ff_gate too, alpha does not: that channel counts in gamma's total weight.
    for r in rows:
        assert r["similarity"] == pytest.approx(_jaccard(a, _signature(ds, "gamma", r["unit"], kinds)))
    assert [r["similarity"] for r in rows] == sorted((r["similarity"] for r in rows), reverse=True)


def test_similar_same_model_and_heads(ds):
    rows = ds.similar("alpha", "L0.N1", "alpha", limit=None).to_pylist()
    assert "L0.N1" not in {r["unit"] for r in rows}
    h = ds.similar("alpha", "L1.H0", "beta", limit=3).to_pylist()
    assert 0 < len(h) <= 3 and all(0 < r["similarity"] <= 1 for r in h)
    same = ds.similar("alpha", "L1.H0", "alpha", limit=None).to_pylist()
    assert "L1.H0" not in {r["unit"] for r in same}


# -- import hygiene ----------------------------------------------------------------------------

def test_query_imports_without_torch_or_transformers(synthetic_db):
    code = f"""
import sys
sys.modules['torch'] = None
sys.modules['transformers'] = None
import query, cli
from cli import main
try:
    main(['sql', 'SELECT count(*) AS n FROM models', '--db', {str(synthetic_db)!r}, '--format', 'json'])
except SystemExit as e:
    assert e.code in (0, None), e.code
assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"n": 3}]


# -- real tiny models --------------------------------------------------------------------------

def test_real_copying_head_is_found_first(tiny_db):
    from tests.builders import COPY_HEAD, COPY_LAYER

    with Dataset(tiny_db) as d:
        rows = d.heads("paris", model="tgpt2", circuit="ov").to_pylist()
        assert (rows[0]["layer"], rows[0]["head"]) == (COPY_LAYER, COPY_HEAD)
        assert rows[0]["best_rank"] == 1
        assert any('"Paris" -> "Paris"' in e for e in rows[0]["evidence"])


def test_real_models_share_words(tiny_db):
    with Dataset(tiny_db) as d:
        assert d.model_names() == ["tbert", "tgpt2"]
        got = d.neurons("paris", limit=None)
        expected = d.sql("""SELECT count(*) AS n FROM vectors v JOIN models m USING (model)
                            JOIN tokens t ON t.vocab_id = m.vocab_id AND t.token_id = v.token_id
                            WHERE t.norm = 'paris' AND v.side = 'top' AND v.kind LIKE 'ff_%'""").to_pylist()[0]["n"]
        assert sum(got.column("hits").to_pylist()) == expected
        assert set(got.column("model").to_pylist()) <= {"tbert", "tgpt2"}
        sim = d.similar("tgpt2", "L0.N0", "tbert", limit=5)
        assert sim.num_rows > 0
        s = d.show("tgpt2", "L1.H2")
        assert s["pairs"].num_rows > 0 and s["metrics"].num_rows > 0


# -- each helper's SQL names exactly its parameters (issue 11) ---------------------------------

def _named(sql: str) -> set[str]:
    import re

    return set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", sql))


def _all_queries(ds):
    """Every Query the helpers build, for the synthetic dataset, with and without bounds."""
    from query import helpers as h
    from query.units import parse_unit

    hits = h.match_tokens(ds, "paris")
    matches = h.matches_by_model(hits)
    out = {
        "models": h.models_query(),
        "match-norm": h.match_query(["alpha"], "paris"),
        "match-exact": h.match_query(["alpha"], " Paris", exact=True),
        "match-id": h.match_query(["alpha"], token_id=2),
        "suggest": h.suggest_query("parisx", ["alpha"]),
        "segment": h.segment_query("vshared", "Paris is big"),
        "kv_head": h.kv_head_query(ds, "alpha", 0, 1),
    }
    for limit in (None, 5):
        out[f"heads-{limit}"] = h.heads_query(ds, matches, circuits=["ov"], sides=["top"], limit=limit)
        for max_rank in (None, 3):
            out[f"neurons-{limit}-{max_rank}"] = h.neurons_query(ds, matches, kinds=["ff_key"], sides=["top"],
                                                               max_rank=max_rank, limit=limit)
        for name, q in h.show_head_queries(ds, "alpha", 1, 0, 0, limit).items():
            out[f"show-{name}-{limit}"] = q
        for unit in ("L0.N1", "L0.H1.d1", "P2", "L1.attn_bias"):
            out[f"show-{unit}-{limit}"] = h.show_vectors_query(ds, "alpha", parse_unit(unit), 1, limit)
        for unit in ("L0.N1", "L1.H0", "P2"):
            u = parse_unit(unit)
            sig = h.signature_query(ds, "alpha", "vshared", u, 5.0)
            out[f"signature-{unit}"] = sig
            rows = ds.rows(*sig)
            for exclude in (None, unit):
                out[f"similar-{unit}-{limit}-{exclude}"] = h.similar_query(ds, "beta", "vshared", u, 5.0, rows, [1, 2], 9.0,
                                                                         exclude=exclude, limit=limit)
    return out


def test_helper_queries_name_exactly_their_params(ds):
    for name, q in _all_queries(ds).items():
        assert _named(q.sql) == set(q.params), name
        ds._run(*q)  # and DuckDB runs it with exactly those


def test_no_sentinel_bounds_in_helper_sql(ds):
    for name, q in _all_queries(ds).items():
        assert "2147483647" not in q.sql and str(2**31 - 1) not in map(str, q.params.values()), name
        if "None" in name.split("-"):
            assert "LIMIT $limit" not in q.sql or "limit" in q.params, name


def test_unbounded_limit_leaves_the_predicate_out(ds):
    from query import helpers as h

    matches = h.matches_by_model(h.match_tokens(ds, "paris"))
    q = h.neurons_query(ds, matches, kinds=["ff_key"], sides=["top"], max_rank=None, limit=None)
    assert "LIMIT" not in q.sql and "max_rank" not in q.sql
    assert "<= $lim" not in "".join(x.sql for x in h.show_head_queries(ds, "alpha", 1, 0, 0, None).values())


# -- hostile arguments: one typed error or a correct result (issue 11) -------------------------

@pytest.mark.parametrize("call", [
    pytest.param(lambda d: d.show("", "L0.H0"), id="show-empty"),
    pytest.param(lambda d: d.show(",,", "L0.H0"), id="show-commas"),
    pytest.param(lambda d: d.show(" , ", "L0.H0"), id="show-blank-commas"),
    pytest.param(lambda d: d.similar("alpha", "L0.N1", ","), id="similar-in-comma"),
    pytest.param(lambda d: d.similar("", "L0.N1", "alpha"), id="similar-empty"),
    pytest.param(lambda d: d.heads("paris", model=""), id="heads-empty-model"),
    pytest.param(lambda d: d.neurons("paris", model=[",", ""]), id="neurons-empty-models"),
    pytest.param(lambda d: d.tokens("paris", model=","), id="tokens-comma-model"),
])
def test_empty_model_names_are_refused(ds, call):
    with pytest.raises(UnknownModel, match="no model named in") as e:
        call(ds)
    assert "\n" not in str(e.value) and "alpha, beta, gamma" in str(e.value)


def test_show_and_similar_take_one_model(ds):
    with pytest.raises(UnknownModel, match="'alpha,beta' names 2 models"):
        ds.show("alpha,beta", "L0.H0")
    with pytest.raises(UnknownModel, match="--in 'alpha,gamma' names 2 models"):
        ds.similar("alpha", "L0.N1", "alpha,gamma")
    assert ds.show(" alpha ,", "L0.N1")["vectors"].num_rows > 0  # one name, with spaces and a trailing comma


@pytest.mark.parametrize("unit,match", [
    ("L99999999999999999999.N1", "layer 99999999999999999999 is larger than any model has"),
    ("L32768.H0", "layer 32768 is larger"),
    ("L0.H32768", "head 32768 is larger"),
    ("L0.N2147483648", "neuron 2147483648 is larger"),
    ("L0.H0.d99999999999", "dimension 99999999999 is larger"),
    ("P" + "9" * 100_000, r"position 9{40}…\(100,000 digits\)"),
    ("L٣.N1", "malformed unit"),  # non-ASCII digits are not unit numbers
    ("x" * 100_000, r"malformed unit 'x{60}'…\(100,000 characters\)"),
])
def test_unit_numbers_beyond_their_columns(unit, match):
    from query.units import parse_unit

    with pytest.raises(BadUnit, match=match) as e:
        parse_unit(unit)
    assert len(str(e.value)) < 400


def test_unit_numbers_at_their_column_limits_parse(ds):
    from query.units import parse_unit

    assert parse_unit("L32767.N2147483647").name == "L32767.N2147483647"
    with pytest.raises(BadUnit, match="layer 32767 is out of range for alpha"):
        ds.similar("alpha", "L32767.N2147483647", "beta")


@pytest.mark.parametrize("call,match", [
    pytest.param(lambda d: d.heads("paris", limit=-1), "limit -1 is out of range: give 0 or more", id="heads-limit"),
    pytest.param(lambda d: d.neurons("paris", limit=-5), "limit -5", id="neurons-limit"),
    pytest.param(lambda d: d.show("alpha", "L0.H0", limit=-1), "limit -1", id="show-limit"),
    pytest.param(lambda d: d.similar("alpha", "L0.N1", "beta", limit=-1), "limit -1", id="similar-limit"),
    pytest.param(lambda d: d.neurons("paris", max_rank=-1), "max rank -1 is out of range: give 1 or more", id="max-rank-neg"),
    pytest.param(lambda d: d.neurons("paris", max_rank=0), "max rank 0", id="max-rank-0"),
    pytest.param(lambda d: d.neurons("paris", limit="ten"), "limit 'ten' is not a whole number", id="limit-text"),
    pytest.param(lambda d: d.neurons("paris", limit=2.5), "not a whole number", id="limit-float"),
    pytest.param(lambda d: d.neurons("paris", kind=","), "no kind given", id="kind-commas"),
])
def test_bad_bounds_are_one_line(ds, call, match):
    with pytest.raises(BadOption, match=match) as e:
        call(ds)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("huge", [2**31, 10**30, 10**100])
def test_bounds_beyond_int32_mean_no_bound(ds, huge):
    assert ds.heads("paris", limit=huge).equals(ds.heads("paris", limit=None))
    assert ds.neurons("the", limit=huge, max_rank=huge).equals(ds.neurons("the", limit=None))
    s, t = ds.show("alpha", "L1.H0", limit=huge), ds.show("alpha", "L1.H0", limit=None)
    assert all(s[k].equals(t[k]) for k in s)
    assert ds.similar("alpha", "L0.N1", "gamma", limit=huge).equals(ds.similar("alpha", "L0.N1", "gamma", limit=None))


@pytest.mark.parametrize("token_id", [-1, 2**31, 10**30, 10**100])
def test_token_ids_beyond_int32_are_in_no_vocabulary(ds, token_id):
    with pytest.raises(UnknownToken, match=f"token id {token_id} is not in the vocabulary of alpha, beta, gamma"):
        ds.neurons(token_id=token_id)
    with pytest.raises(UnknownToken):
        ds.heads(token_id=token_id)


@pytest.mark.parametrize("token", ["par\ud800is", "\udcff"])
@pytest.mark.parametrize("exact", [False, True], ids=["norm", "exact"])
def test_lone_surrogates_are_refused(ds, token, exact):
    with pytest.raises(BadToken, match=r"not valid Unicode text: lone surrogate U\+D"):
        ds.neurons(token, exact=exact)
    with pytest.raises(BadToken, match="TEXT .* not valid Unicode"):
        ds.tokens(token)


def test_nul_bytes_are_text(ds):
    with pytest.raises(UnknownToken, match=r"token 'par\\x00is' is in no vocabulary"):
        ds.heads("par\x00is")
    rows = ds.tokens("Paris\x00", model="alpha").to_pylist()[0]
    assert rows["tokens"] == ["Paris", "\x00"] and rows["token_ids"] == [2, None]


@pytest.mark.parametrize("exact", [False, True], ids=["norm", "exact"])
def test_a_100k_character_token_is_one_short_line(ds, exact):
    import time

    t = time.perf_counter()
    with pytest.raises(UnknownToken, match=r"token 'x{60}'…\(100,000 characters\) is in no vocabulary of alpha, beta, gamma$") as e:
        ds.neurons("x" * 100_000, exact=exact)
    assert len(str(e.value)) < 200
    assert time.perf_counter() - t < 5  # no suggestion search over the vocabulary


def test_tokens_refuses_text_beyond_its_bound(ds):
    from query.helpers import TOKENS_MAX_CHARS

    assert ds.tokens("Paris " * (TOKENS_MAX_CHARS // 6), model="alpha").num_rows == 1
    with pytest.raises(BadToken, match=f"TEXT has 100,000 characters; tokens maps at most {TOKENS_MAX_CHARS:,} at a time"):
        ds.tokens("x" * 100_000)


@pytest.mark.parametrize("args,fragments", [
    pytest.param(["show", "", "L0.H0"], ["no model named in ''"], id="show-empty"),
    pytest.param(["show", ",,", "L0.H0"], ["no model named in ',,'"], id="show-commas"),
    pytest.param(["similar", "alpha", "L0.N1", "--in", ","], ["no model named in ','"], id="similar-in-comma"),
    pytest.param(["heads", "paris", "--model", ""], ["no model named"], id="heads-model-empty"),
    pytest.param(["show", "alpha", "L99999999999999999999.N1"], ["layer 99999999999999999999 is larger"], id="huge-layer"),
    pytest.param(["heads", "paris", "--limit", "-1"], ["limit -1 is out of range"], id="limit-neg"),
    pytest.param(["neurons", "paris", "--max-rank", "-1"], ["max rank -1"], id="max-rank-neg"),
    pytest.param(["neurons", "--id", str(10**30)], [f"token id {10**30} is not in"], id="id-huge"),
    pytest.param(["tokens", "x" * 5000], ["TEXT has 5,000 characters"], id="tokens-huge"),
])
def test_hostile_cli_arguments_are_one_line(synthetic_db, args, fragments):
    from click.testing import CliRunner

    from cli import cli

    r = CliRunner().invoke(cli, args + ["--db", str(synthetic_db)], catch_exceptions=False)
    assert r.exit_code == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("args", [
    ["heads", "paris", "--limit", str(10**30)],
    ["neurons", "the", "--limit", str(10**30), "--max-rank", str(10**30)],
    ["show", "alpha", "L1.H0", "--limit", str(10**30)],
])
def test_huge_cli_bounds_mean_all(synthetic_db, args):
    from click.testing import CliRunner

    from cli import cli

    r = CliRunner().invoke(cli, args + ["--db", str(synthetic_db), "--format", "json"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)


def test_cli_help_derives_tables_and_kinds_from_their_declarations():
    from click.testing import CliRunner

    from cli import cli
    from schemas import TABLES
    from schemas.kinds import ALL_KINDS

    r = CliRunner().invoke(cli, ["sql", "--help"], env={"COLUMNS": "200"})
    listed = [line.split()[0] for line in r.stdout.splitlines() if line.startswith("    ") and "," in line and "zeropass" not in line]
    assert listed == list(TABLES)
    r = CliRunner().invoke(cli, ["neurons", "--help"], env={"COLUMNS": "400"})
    assert f"Vector kinds (repeat or comma list): {', '.join(ALL_KINDS)}." in " ".join(r.stdout.split())


def test_every_helper_call_passes_exactly_the_named_parameters(synthetic_db):
    """Dataset._run is to refuse unknown parameters: no helper may rely on them being dropped."""
    with Dataset(synthetic_db) as d:
        run = d._run
        seen = []

        def strict(query, params=None):
            if isinstance(params, dict):
                assert _named(query) == set(params), (query, sorted(params))
            seen.append(query)
            return run(query, params)

        d._run = strict
        d.models()
        d.heads("paris", limit=None)
        d.heads("paris", circuit="qk", side="both", limit=3)
        d.neurons("paris", max_rank=3, limit=2)
        d.neurons(token_id=2, kind="q,k,v,o,pos,bias_attn_out", side="both")
        for unit in ("L1.H0", "L0.N1", "L0.H1.d1", "P2", "L1.attn_bias"):
            d.show("alpha", unit)
            d.show("alpha", unit, limit=None)
            d.similar("alpha", unit, "beta")
            d.similar("alpha", unit, "alpha", limit=None)
        d.tokens("Paris is big")
        with pytest.raises(UnknownToken):
            d.heads("parisx")
        assert len(seen) > 30


@pytest.mark.parametrize("q", ["paris", "the", "city"])
@pytest.mark.parametrize("limit", [1, 2, 5])
def test_limited_heads_and_neurons_are_the_first_rows_of_all(ds, q, limit):
    """Both helpers rank and cut before they build evidence: a limit must give the head of the
    full answer, evidence included."""
    for helper in (ds.heads, ds.neurons):
        everything = helper(q, side="both", limit=None).to_pylist()
        assert helper(q, side="both", limit=limit).to_pylist() == everything[:limit]


# -- the Dataset's helper methods are the helpers, with their signatures (issue 21) ------------

def test_helper_methods_have_the_helpers_own_signatures():
    import inspect

    import importlib

    import query
    from query import helpers

    history = importlib.import_module("query.history")  # `query.history` is the function
    for name, fn in [("models", helpers.models), ("heads", helpers.heads), ("neurons", helpers.neurons),
                     ("show", helpers.show), ("tokens", helpers.tokens), ("similar", helpers.similar),
                     ("history", history.history), ("token_history", history.token_history)]:
        method = inspect.signature(getattr(query.Dataset, name))
        want = list(inspect.signature(fn).parameters.values())[1:]   # without ds
        got = list(method.parameters.values())[1:]                   # without self
        assert [(p.name, p.kind, p.default) for p in got] == [(p.name, p.kind, p.default) for p in want], name
        assert not any(p.kind == p.VAR_KEYWORD for p in got), name
        assert getattr(query, name) is fn and name in query.__all__, name


def test_helper_methods_answer_as_the_helpers(ds):
    from query import helpers

    assert ds.heads("paris", circuit="qk", limit=3).equals(helpers.heads(ds, "paris", circuit="qk", limit=3))
    assert ds.neurons("Paris", exact=True, side="both").equals(helpers.neurons(ds, "Paris", exact=True, side="both"))
    with pytest.raises(TypeError):
        ds.heads("paris", circuits="qk")  # a misspelt option is an error, not ignored


def test_history_is_a_method_like_the_other_helpers(ds):
    from query import history

    with pytest.raises(Exception) as by_method:
        ds.history("no-such-series", "L0.N0")
    with pytest.raises(Exception) as by_function:
        history(ds, "no-such-series", "L0.N0")
    assert type(by_method.value) is type(by_function.value) and str(by_method.value) == str(by_function.value)
    assert isinstance(by_method.value, __import__("query").QueryError)
