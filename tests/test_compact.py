"""`zeropass compact` (indexer/compact.py): answers equal before and after, table by table and
helper by helper; a SIGKILL mid-compaction leaves the dataset as it was; a model re-indexed after
compaction is read from its new files; a damaged compacted file is skipped and named by `check`."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from schemas import TABLES

ROOT = Path(__file__).resolve().parents[1]


def _copy(synthetic_db: Path, tmp_path: Path, name: str = "db") -> Path:
    db = tmp_path / name
    shutil.copytree(synthetic_db, db)
    return db


def _tables(db: Path) -> dict:
    from query import Dataset

    with Dataset(db) as ds:
        # created_at differs between two commits of the same rows (the re-index test compares two)
        return {t: ds.sql(f"SELECT * {'EXCLUDE (created_at)' if t == 'models' else ''} FROM {t} ORDER BY ALL") for t in TABLES}


def _sources(db: Path) -> dict:
    """Every per-model (and per-layer) source view the helpers use, by table."""
    from query import Dataset

    out = {}
    with Dataset(db) as ds:
        for t in TABLES:
            for models in (["alpha"], ["beta"], ["alpha", "beta"], ["gamma"]):
                cols = "* EXCLUDE (created_at)" if t == "models" else "*"
                out[t, tuple(models)] = ds.sql(f"SELECT {cols} FROM {ds.source(t, models)} ORDER BY ALL")
                if "layer" in TABLES[t].partition_by:
                    out[t, tuple(models), 1] = ds.sql(f"SELECT {cols} FROM {ds.source(t, models, [1])} ORDER BY ALL")
    return out


HELPERS = [
    ("heads paris", lambda d: d.heads("paris", limit=None)),
    ("heads the ov", lambda d: d.heads("the", circuit="ov", side="both", limit=None)),
    ("heads beta", lambda d: d.heads("paris", model="beta", limit=None)),
    ("neurons paris", lambda d: d.neurons("paris", limit=None)),
    ("neurons all kinds", lambda d: d.neurons("paris", kind=["q", "k", "v", "o", "ff_key", "ff_value", "ff_gate"], side="both", limit=None)),
    ("neurons gamma", lambda d: d.neurons("paris", model="gamma", limit=None)),
    ("show head", lambda d: d.show("alpha", "L1.H0")),
    ("show neuron", lambda d: d.show("alpha", "L0.N1")),
    ("show gamma", lambda d: d.show("gamma", "L1.H1")),
    ("tokens", lambda d: d.tokens("Paris is the city")),
    ("similar", lambda d: d.similar("alpha", "L0.N1", "beta")),
    ("similar head", lambda d: d.similar("alpha", "L1.H0", "gamma")),
    ("models", lambda d: d.models().drop_columns(["created_at"])),
]


def _helpers(db: Path) -> dict:
    from query import Dataset

    out = {}
    with Dataset(db) as ds:
        for name, fn in HELPERS:
            r = fn(ds)
            out[name] = {k: v.to_pylist() for k, v in r.items()} if isinstance(r, dict) else r.to_pylist()
    return out


@pytest.fixture(scope="module")
def pristine_helpers(synthetic_db) -> dict:
    """What every helper answers on the synthetic dataset before anything is done to it: each test's
    copy holds the same bytes, so it answers the same (computed once instead of once a test)."""
    return _helpers(synthetic_db)


def _assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert before[key] == after[key], key


def _compact(db: Path) -> dict:
    from indexer.compact import compact

    return compact(db)


def test_answers_equal_after_compaction(synthetic_db, tmp_path, pristine_helpers):
    db = _copy(synthetic_db, tmp_path)
    tables, sources, helpers = _tables(db), _sources(db), pristine_helpers
    n_files = sum(1 for _ in db.rglob("*.parquet"))
    section = _compact(db)
    assert set(section) == {"vectors", "vectors_by_token", "pairs", "pairs_by_token", "head_tokens", "heads", "models", "parameters"}
    from query import Dataset

    with Dataset(db) as ds:  # the views read the compacted files now, not the per-model ones
        view = ds.sql("SELECT sql FROM duckdb_views() WHERE view_name = 'pairs'").column(0)[0].as_py()
        assert "/compacted/" in view and "model=alpha" not in view
    _assert_same(tables, _tables(db))
    _assert_same(sources, _sources(db))
    _assert_same(helpers, _helpers(db))
    assert sum(1 for _ in db.rglob("*.parquet")) == n_files + len(section)  # the per-model files stay


def test_plain_duckdb_catalog_after_compaction(synthetic_db, tmp_path):
    import duckdb

    db = _copy(synthetic_db, tmp_path)
    want = {t: r.num_rows for t, r in _tables(db).items()}
    _compact(db)
    out = subprocess.run([sys.executable, "-c", (
        "import duckdb, json; con = duckdb.connect('catalog.duckdb', read_only=True); "
        f"print(json.dumps({{t: con.execute(f'SELECT count(*) FROM {{t}}').fetchall()[0][0] for t in {list(TABLES)!r}}}))")],
        cwd=db, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import json

    assert json.loads(out.stdout) == want
    con = duckdb.connect(str(db / "catalog.duckdb"), read_only=True)
    assert "compacted" in con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'vectors'").fetchall()[0][0]
    con.close()
    from indexer.check import check_dataset

    assert check_dataset(db).ok


def _beta_again(db: Path, seed: int) -> None:
    """Re-commit model beta with other rows (a re-index through the real writer path)."""
    from tests.builders import PLANTED, SHARED_TOKENS, synthetic_model

    synthetic_model(db, "beta", "vshared", SHARED_TOKENS, seed, PLANTED["beta"])


def test_reindex_after_compaction_reads_the_new_model(synthetic_db, tmp_path):
    plain = _copy(synthetic_db, tmp_path, "plain")
    _beta_again(plain, 99)
    db = _copy(synthetic_db, tmp_path)
    _compact(db)
    from query import Dataset

    want = _tables(plain)  # plain is not touched again
    with Dataset(db) as ds:  # a reader open across the re-index sees the new rows too
        ds.heads("paris")
        _beta_again(db, 99)
        assert ds.sql("SELECT * FROM pairs ORDER BY ALL") == want["pairs"]
    _assert_same(want, _tables(db))
    _assert_same(_sources(plain), _sources(db))
    _assert_same(_helpers(plain), _helpers(db))
    # and a second compaction folds the new build in
    _compact(db)
    _assert_same(want, _tables(db))


def test_damaged_compacted_file_is_skipped_and_named(synthetic_db, tmp_path, pristine_helpers):
    from indexer.check import check_dataset
    from schemas.layout import read_manifest

    db = _copy(synthetic_db, tmp_path)
    helpers = pristine_helpers
    _compact(db)
    rel = read_manifest(db)["compacted"]["pairs"]["files"][0]
    (db / rel).write_bytes(b"not parquet at all")
    _assert_same(helpers, _helpers(db))  # readers fall back to the per-model files
    problems = check_dataset(db).problems
    assert [p.repair for p in problems] == [f"zeropass compact --db {db}"], problems
    assert "compacted pairs" in problems[0].what
    (db / rel).unlink()
    _assert_same(helpers, _helpers(db))
    _compact(db)  # the repair
    assert check_dataset(db).ok
    _assert_same(helpers, _helpers(db))


_KILLED = """
import sys, time
sys.path.insert(0, {root!r})
import indexer.compact as c
import indexer.dataset as d  # the compacted files are written by d.sorted_copy through d.write_file_atomic
real = d.write_file_atomic
written = 0
def slow(root, rel, write):
    def w(tmp):
        global written
        write(tmp)
        written += 1
        print("wrote", rel, flush=True)
        if written == {after}:
            time.sleep(60)  # the test kills us here, before this file's rename
    return real(root, rel, w)
d.write_file_atomic = slow
c.compact({db!r})
print("done", flush=True)
"""


@pytest.mark.parametrize("after", [1, 3, 7])
def test_sigkill_during_compaction_leaves_the_dataset_as_it_was(synthetic_db, tmp_path, pristine_helpers, after):
    """SIGKILL after the n-th compacted file is written (before its rename, and later ones)."""
    db = _copy(synthetic_db, tmp_path)
    manifest, catalog = (db / "manifest.json").read_bytes(), (db / "catalog.duckdb").read_bytes()
    helpers = pristine_helpers
    proc = subprocess.Popen([sys.executable, "-c", _KILLED.format(root=str(ROOT), db=str(db), after=after)],
                            stdout=subprocess.PIPE, text=True)
    for _ in range(after):
        assert proc.stdout.readline().startswith("wrote")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (db / "manifest.json").read_bytes() == manifest
    assert (db / "catalog.duckdb").read_bytes() == catalog
    _assert_same(helpers, _helpers(db))
    from indexer.check import check_dataset

    assert any("compacted" in p.what or "leftover" in p.what.lower() or ".tmp" in p.what for p in check_dataset(db).problems)
    _compact(db)  # a rerun finishes, and its publish deletes what the killed one left
    assert not list(db.rglob("*.tmp")) and not list(db.rglob("*.spill"))
    assert check_dataset(db).ok
    _assert_same(helpers, _helpers(db))


def test_compact_one_model_and_cli(synthetic_db, tmp_path):
    db = _copy(synthetic_db, tmp_path)
    from tests.dataset_helpers import invoke_cli

    r = invoke_cli("compact", "--db", db)
    assert r.returncode == 0 and "compacted 8 tables" in r.stderr, r.stderr
    r = invoke_cli("compact", "--db", tmp_path / "nothing")
    assert r.returncode == 1 and r.stderr.startswith("Error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    one = tmp_path / "one"
    from tests.builders import PLANTED, SHARED_TOKENS, synthetic_model

    synthetic_model(one, "alpha", "vshared", SHARED_TOKENS, 1, PLANTED["alpha"])
    assert _compact(one) == {}
    assert "compacted" not in str(sorted(p.as_posix() for p in one.rglob("*")))


def test_compaction_is_dropped_when_every_model_is_reindexed(synthetic_db, tmp_path):
    """A compacted file no current build is in is not read (its models were all re-indexed)."""
    from schemas.layout import compacted_models, read_manifest, table_sources

    db = _copy(synthetic_db, tmp_path)
    _compact(db)
    m = read_manifest(db)
    assert compacted_models(m, "pairs") == ["alpha", "beta", "gamma"]
    _beta_again(db, 5)
    m = read_manifest(db)
    assert compacted_models(m, "pairs") == ["alpha", "gamma"]
    src = table_sources(m, "pairs", ["beta"])
    assert src.compacted == [] and all("model=beta" in f for f in src.files)
    from indexer.check import check_dataset

    report = check_dataset(db)
    assert report.ok and any("1 model committed since the last compaction" in n for n in report.notes), report.notes


def test_hostile_slug_in_a_compacted_manifest(synthetic_db, tmp_path):
    """Slugs are pasted into the views' `model IN (...)` as quoted literals: a quote in a slug of a
    hand-edited manifest is text, never SQL."""
    import json

    from query import Dataset

    db = _copy(synthetic_db, tmp_path)
    _compact(db)
    m = json.loads((db / "manifest.json").read_text())
    evil = "b') OR true OR ('x"
    m["models"][evil] = m["models"].pop("beta")
    for entry in m["compacted"].values():
        entry["models"][evil] = entry["models"].pop("beta")
    (db / "manifest.json").write_text(json.dumps(m))
    with Dataset(db) as ds:
        assert ds.sql("SELECT DISTINCT model FROM pairs ORDER BY 1").column(0).to_pylist() == ["alpha", "gamma"]
        assert ds.sql(f"SELECT count(*) FROM {ds.source('pairs', [evil])}").column(0)[0].as_py() == 0


def test_pairs_by_token_holds_each_pair_under_both_tokens(synthetic_db, tmp_path):
    """`pairs_by_token` is computed from the per-model pairs files, and stored by `zeropass compact`:
    both give each pair twice, once under src_id and once under dst_id."""
    from query import Dataset

    db = _copy(synthetic_db, tmp_path)
    key = "model, layer, head, circuit, side, rank, src_id, dst_id, score"
    expected = f"""SELECT {key}, src_id AS token_id, 'src' AS endpoint FROM pairs
                   UNION ALL SELECT {key}, dst_id, 'dst' FROM pairs ORDER BY ALL"""
    for compacted in (False, True):
        if compacted:
            _compact(db)
        with Dataset(db) as ds:
            want = ds.sql(expected)
            got = ds.sql(f"SELECT {key}, token_id, endpoint FROM pairs_by_token ORDER BY ALL")
            assert want.num_rows == 2 * ds.sql("SELECT count(*) FROM pairs").column(0)[0].as_py() > 0
            assert got.to_pylist() == want.to_pylist(), compacted
