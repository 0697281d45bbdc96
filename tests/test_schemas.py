"""The on-disk format is pinned: docs/TABLES.md is the golden rendering of schemas/."""
from pathlib import Path

import pyarrow as pa

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
