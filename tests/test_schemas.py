"""The on-disk format is pinned: docs/TABLES.md is the golden rendering of schemas/."""
from pathlib import Path

import pyarrow as pa
import pytest

import schemas
from schemas import TABLES, duckdb_type, empty_select_sql
from schemas.__main__ import HEADER

DOC = Path(__file__).resolve().parent.parent / "docs" / "TABLES.md"


def test_golden_tables_doc_matches_declarations():
    expected = HEADER + schemas.render()
    assert DOC.read_text(encoding="utf-8") == expected, (
        "schemas/ changed: review the change, bump SCHEMA_VERSION if old datasets cannot be read, "
        "then run `python -m schemas > docs/TABLES.md`"
    )


def test_design_tables_are_declared():
    for name in ("models", "tokens", "vectors", "pairs", "head_tokens", "heads", "parameters"):
        assert name in TABLES
    for t in TABLES.values():
        assert t.column_names[0] in ("model", "vocab_id", "model_a")
        assert len(set(t.column_names)) == len(t.column_names)
        for c in t.columns:
            assert c.doc.strip(), f"{t.name}.{c.name} has no description"


def test_empty_views_have_the_declared_types():
    import duckdb

    con = duckdb.connect()
    for t in TABLES.values():
        rel = con.sql(empty_select_sql(t))
        assert rel.columns == t.column_names
        assert [str(x) for x in rel.types] == [duckdb_type(c.type) for c in t.columns]
        assert rel.fetchall() == []
        assert isinstance(t.schema, pa.Schema)


# -- one declaration per idea: kinds, unit names, token normalisation (issue 11) ---------------

def test_kinds_are_declared_once_with_side_and_group():
    from schemas import kinds

    assert len({k.name for k in kinds.KINDS}) == len(kinds.KINDS)
    for k in kinds.KINDS:
        assert k.side in (kinds.READ, kinds.WRITE) and k.group in (kinds.FF, kinds.HEAD_DIM, kinds.BIAS, kinds.POS, kinds.ROUTER, kinds.FEATURE)
        assert (k.unit_suffix is not None) == (k.group == kinds.BIAS)
        assert not k.kv or k.group == kinds.HEAD_DIM
    # docs/DESIGN.md §3: read-side vectors are FF keys/gates, Q/K/V columns, router rows and dictionary encoders; the rest write.
    assert kinds.READ_KINDS == ("ff_key", "ff_gate", "q", "k", "v", "router", "encoder")
    assert set(kinds.ALL_KINDS) == set(kinds.READ_KINDS) | set(kinds.WRITE_KINDS)
    assert kinds.ALL_KINDS == kinds.FF_KINDS + kinds.HEAD_DIM_KINDS + kinds.BIAS_KINDS + kinds.POS_KINDS + kinds.ROUTER_KINDS + kinds.FEATURE_KINDS
    doc = next(c.doc for c in TABLES["vectors"].columns if c.name == "kind")
    assert all(f"`{k}`" in doc for k in kinds.ALL_KINDS)


def _unit_cases():
    from schemas.kinds import KINDS

    for k in KINDS:
        for layer, head, idx in ((0, None if k.group != "head_dim" else 0, 0), (31, 7 if k.group == "head_dim" else None, 123)):
            if k.group == "pos":
                layer = None
            if k.group == "bias":
                idx = 0
            yield k.name, layer, head, idx, None, ("res-L8" if k.group == "feature" else None)
            if k.group in ("ff", "router"):  # mixture of experts: a routed expert's unit
                yield k.name, layer, head, idx, 3, None


def test_unit_names_and_their_sql_twin_agree():
    import duckdb

    from schemas.units import head_unit, head_unit_sql, vector_unit, vector_unit_sql

    cases = list(_unit_cases())
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT {vector_unit_sql('v')} FROM (SELECT unnest($kind) AS kind, unnest($layer::SMALLINT[]) AS layer, "
        f"unnest($head::SMALLINT[]) AS head, unnest($idx::INTEGER[]) AS idx, unnest($expert::SMALLINT[]) AS expert, "
        f"unnest($dictionary::VARCHAR[]) AS dictionary) v",
        {"kind": [c[0] for c in cases], "layer": [c[1] for c in cases], "head": [c[2] for c in cases],
         "idx": [c[3] for c in cases], "expert": [c[4] for c in cases], "dictionary": [c[5] for c in cases]}).fetchall()
    assert [r[0] for r in rows] == [vector_unit(*c) for c in cases]
    assert {vector_unit("ff_value", 5, None, 123), vector_unit("q", 5, 3, 7), vector_unit("pos", None, None, 12),
            vector_unit("bias_attn_out", 5, None, 0), vector_unit("bias_ff_out", 5, None, 0),
            vector_unit("ff_key", 5, None, 123, 3), vector_unit("router", 5, None, 3, 3), vector_unit("router", 5, None, 0)} == \
        {"L5.N123", "L5.H3.d7", "P12", "L5.attn_bias", "L5.ff_bias", "L5.E3.N123", "L5.E3.router", "L5.shared_router"}
    assert vector_unit("decoder", 8, None, 17, dictionary="res-L8") == "res-L8.F17"
    assert con.execute(f"SELECT {head_unit_sql('h')} FROM (SELECT 5::SMALLINT AS layer, 3::SMALLINT AS head) h").fetchall() \
        == [(head_unit(5, 3),)] == [("L5.H3",)]


def test_token_normalisation_is_one_function():
    import indexer.align
    import indexer.tokens
    import query
    from schemas.tokens import normalise

    assert query.norm is normalise and indexer.tokens.normalise is normalise and indexer.align.normalise is normalise
    assert [normalise(s) for s in (" Paris", "ＰＡＲＩＳ", "\tParis\n", "ﬁ", "  ")] == ["paris", "paris", "paris", "fi", ""]


def test_schemas_modules_import_without_duckdb_torch_or_numpy():
    import subprocess
    import sys

    code = ("import sys\nfor m in ('duckdb', 'torch', 'transformers', 'numpy', 'click'): sys.modules[m] = None\n"
            "import schemas.kinds, schemas.units, schemas.tokens\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(DOC.parent.parent), timeout=60)
    assert r.returncode == 0, r.stderr


# -- schemas.format: the rules writer and readers share ------------------------------------------

def test_revision_is_one_contract_between_publish_and_the_remote_reader(tmp_path, synthetic_db):
    """publish names what it writes and query.remote names what it read by the same function."""
    import hashlib

    from indexer.publish import plan
    from schemas.format import revision

    data = (synthetic_db / "manifest.json").read_bytes()
    assert revision(data) == hashlib.sha256(data).hexdigest()[:16]
    assert plan(synthetic_db, str(tmp_path / "dest"))[0].revision == revision(data)


@pytest.mark.parametrize("rel,why", [
    ("vectors/model=a/*.parquet", "glob"), ("vectors/model=a/x?.parquet", "glob"), ("vectors/model=[a]/x.parquet", "glob"),
    ("/abs/x.parquet", "absolute"), ("vectors/../x.parquet", "leaves"), ("vectors\\x.parquet", "backslash"),
])
def test_unsafe_manifest_paths_are_refused_with_their_reason(rel, why):
    from schemas.format import BadManifest, validate_manifest

    with pytest.raises(BadManifest, match=why):
        validate_manifest({"models": {"a": {"files": {"vectors": [rel]}}}})


@pytest.mark.parametrize("manifest,error,match", [
    ({"format": "other", "models": {}}, "OtherFormat", "not a zeropass dataset"),
    ({"format": "zeropass-dataset", "schema_version": -1, "models": {"m": {"source": "org/m"}}}, "OtherVersion",
     r"schema version -1 and .*`zeropass index MODEL --db NEWDIR.*models: org/m"),
])
def test_one_version_gate_and_one_message(manifest, error, match):
    import schemas.format as fmt

    with pytest.raises(getattr(fmt, error), match=match):
        fmt.check_version(manifest, "DB")


def test_the_link_rule_accepts_links_inside_and_refuses_links_out(tmp_path):
    from schemas.format import inside, links_out

    root = tmp_path / "db"
    (root / "vectors").mkdir(parents=True)
    (root / "vectors" / "real.parquet").write_bytes(b"x")
    (root / "vectors" / "in.parquet").symlink_to(root / "vectors" / "real.parquet")
    (tmp_path / "elsewhere.parquet").write_bytes(b"x")
    (root / "vectors" / "out.parquet").symlink_to(tmp_path / "elsewhere.parquet")
    rels = ["vectors/real.parquet", "vectors/in.parquet", "vectors/out.parquet"]
    assert [rel for rel, _ in links_out(root, rels)] == ["vectors/out.parquet"]
    assert inside(root / "vectors" / "new", root) and inside(root, root) and not inside(tmp_path, root)


def test_model_settings_reads_the_settings_column():
    from schemas.format import model_settings

    assert model_settings({"settings": '{"k": 3}'}) == {"k": 3}
    assert model_settings({"settings": None}) == {} == model_settings(None)
    with pytest.raises(ValueError):
        model_settings({"settings": "[1]"})
