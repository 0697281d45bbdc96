"""The indexer-backed commands end to end: `zeropass index`, `coverage`, `align`, `diff`."""
from __future__ import annotations

import json

from click.testing import CliRunner

from cli import cli
from schemas.layout import read_manifest
from tests.tiny_models import save_tiny


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_index_reports_progress_on_stderr_and_is_queryable(tmp_path):
    path = save_tiny("llama-gqa", tmp_path / "m")
    db = tmp_path / "db"
    r = invoke("index", str(path), "--db", str(db), "--name", "tiny", "--k", "4", "--pairs", "8", "--variant", "folded")
    assert r.exit_code == 0, r.stderr
    assert "layer 1 done (2/2)" in r.stderr and "ETA" in r.stderr
    assert "Traceback" not in r.stderr
    r = invoke("models", "--db", str(db), "--format", "json")
    [row] = json.loads(r.stdout)
    assert (row["model"], row["variant"], row["n_kv_heads"], row["k"]) == ("tiny", "folded", 2, 4)
    r = invoke("index", str(path), "--db", str(db), "--name", "quiet", "--k", "4", "--pairs", "8", "--quiet")
    assert r.exit_code == 0 and r.stderr == ""


def test_index_bad_input_is_one_line(tmp_path):
    for args, fragment in [
        (["index", str(tmp_path / "missing")], "missing"),
        (["index", str(save_tiny("gpt2", tmp_path / "g")), "--layers", "7"], "--layers"),
        (["index", str(tmp_path / "g"), "--name", "bad name!"], "--name"),
    ]:
        r = invoke(*args, "--db", str(tmp_path / "db"))
        assert r.exit_code == 1, r.stderr
        lines = r.stderr.strip().splitlines()  # progress lines may precede the one error line
        errors = [line for line in lines if line.startswith("Error:")]
        assert errors == lines[-1:] and fragment in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert read_manifest(tmp_path / "db") is None


def test_coverage_json_accounts_for_every_tensor(tmp_path):
    path = save_tiny("neox", tmp_path / "n")
    r = invoke("coverage", str(path), "--format", "json")
    rows = json.loads(r.stdout)
    assert rows and all(row["covered_by"] or row["reason"] for row in rows)


def test_align_stores_the_alignments_table(tmp_path):
    a = save_tiny("gpt2", tmp_path / "a", seed=1)
    b = save_tiny("gpt2", tmp_path / "b", seed=2)
    db = tmp_path / "db"
    r = invoke("align", str(a), str(b), "--db", str(db))
    assert r.exit_code == 0, r.stderr
    assert "stored" in r.stderr
    r = invoke("sql", "SELECT count(*) AS n, count(DISTINCT layer_a) AS layers FROM alignments WHERE level = 'layer'",
               "--db", str(db), "--format", "json")
    [row] = json.loads(r.stdout)
    assert row["n"] > 0 and row["layers"] == 2


def test_diff_indexes_the_delta_as_its_own_model(tmp_path):
    base = save_tiny("gpt2", tmp_path / "base", seed=1)
    tuned = save_tiny("gpt2", tmp_path / "tuned", seed=2)
    db = tmp_path / "db"
    r = invoke("diff", str(base), str(tuned), "--db", str(db), "--name", "delta", "--k", "4", "--pairs", "8")
    assert r.exit_code == 0, r.stderr
    r = invoke("models", "--db", str(db), "--format", "json")
    [row] = json.loads(r.stdout)
    assert (row["model"], row["variant"]) == ("delta", "diff")
    other = save_tiny("bert", tmp_path / "bert")
    r = invoke("diff", str(base), str(other), "--db", str(db))
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr
