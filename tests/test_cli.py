"""The `zeropass` CLI: commands call the library, print table/csv/json, errors are one line."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import cli

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["index", "models", "sql", "heads", "neurons", "show", "tokens", "similar", "coverage", "align", "diff"]


@pytest.fixture
def run(synthetic_db):
    def _run(*args, env=None, db=True):
        argv = list(args) + (["--db", str(synthetic_db)] if db else [])
        return CliRunner().invoke(cli, argv, env=dict({"COLUMNS": "100"}, **(env or {})), catch_exceptions=False)
    return _run


def _one_error_line(result, *fragments):
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_an_example(command):
    r = CliRunner().invoke(cli, [command, "--help"])
    assert r.exit_code == 0
    assert "zeropass " + command in r.stdout


def test_group_help_lists_commands():
    r = CliRunner().invoke(cli, ["--help"])
    for c in COMMANDS:
        assert c in r.stdout


def test_models(run):
    r = run("models")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["model", "architecture", "n_layers"]
    assert [line.split()[0] for line in lines[2:]] == ["alpha", "beta", "gamma"]


def test_heads_json_equals_library(run, ds):
    r = run("heads", "paris", "--format", "json", "--limit", "0")
    assert r.exit_code == 0
    assert json.loads(r.stdout) == json.loads(json.dumps(ds.heads("paris", limit=None).to_pylist()))
    assert r.stderr == ""


def test_heads_table_first_row(run):
    r = run("heads", "paris", "--circuit", "ov")
    first = r.stdout.splitlines()[2].split()
    assert first[:2] == ["alpha", "L1.H0"]


def test_csv_is_exact_and_complete(run, ds):
    r = run("neurons", "the", "--format", "csv", "--limit", "0")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    lib = ds.neurons("the", limit=None).to_pylist()
    assert len(rows) == len(lib)
    assert [float(x["score"]) for x in rows] == [x["score"] for x in lib]
    assert [json.loads(x["evidence"]) for x in rows] == [x["evidence"] for x in lib]


def test_table_is_cut_to_terminal_width(run):
    for cmd in (["models"], ["heads", "the"], ["show", "alpha", "L1.H0"], ["tokens", "Paris is big"]):
        r = run(*cmd, env={"COLUMNS": "60"})
        assert r.exit_code == 0
        assert max(len(line) for line in r.stdout.splitlines()) <= 60, cmd


def test_model_option_repeatable_and_comma(run):
    a = run("heads", "paris", "--model", "alpha", "--model", "gamma", "--format", "json").stdout
    b = run("heads", "paris", "-m", "alpha,gamma", "--format", "json").stdout
    assert a == b and {r["model"] for r in json.loads(a)} == {"alpha", "gamma"}


def test_exact_and_id(run):
    r = run("neurons", " Paris", "--exact", "--model", "alpha", "--format", "json")
    assert [x["unit"] for x in json.loads(r.stdout)] == ["L0.N1"]
    r = run("neurons", "--id", "1", "--model", "alpha", "--format", "json")
    assert [x["unit"] for x in json.loads(r.stdout)] == ["L0.N1"]


def test_show_formats(run):
    r = run("show", "alpha", "L1.H0")
    assert r.exit_code == 0 and "# pairs" in r.stdout and '" Paris"' in r.stdout
    j = json.loads(run("show", "alpha", "L1.H0", "--format", "json").stdout)
    assert list(j) == ["metrics", "pairs", "head_tokens_top", "head_tokens_bottom", "dims"]
    assert j["pairs"][0]["src"] == " Paris"
    c = run("show", "alpha", "L0.N1", "--format", "csv").stdout
    assert c.startswith("# vectors\nkind,unit,rank,top,top_score,bottom,bottom_score\n")


def test_tokens_and_similar(run):
    r = run("tokens", "Paris", "--format", "json")
    assert {x["model"]: x["token_ids"] for x in json.loads(r.stdout)} == {"alpha": [2], "beta": [2], "gamma": [2]}
    r = run("similar", "alpha", "L0.N1", "--in", "gamma", "--format", "json")
    assert json.loads(r.stdout)[0]["unit"] == "L0.N0"


def test_sql_and_params(run):
    r = run("sql", "SELECT token FROM tokens WHERE vocab_id = $v AND norm = $q ORDER BY token_id", "-p", "v", "vshared",
            "-p", "q", "paris", "--format", "json")
    assert [x["token"] for x in json.loads(r.stdout)] == [" Paris", "Paris", "paris"]


def test_db_from_environment(run, synthetic_db):
    r = run("models", "--format", "csv", env={"ZEROPASS_DB": str(synthetic_db)}, db=False)
    assert r.exit_code == 0 and r.stdout.startswith("model,")


def test_empty_result_says_so_and_exits_zero(run):
    r = run("neurons", "paris", "--kind", "pos")
    assert r.exit_code == 0 and r.stdout == ""
    assert "No vector lists 'paris'" in r.stderr
    r = run("neurons", "paris", "--kind", "pos", "--format", "json")
    assert r.exit_code == 0 and json.loads(r.stdout) == []
    assert run("neurons", "paris", "--kind", "pos", "--quiet").stderr == ""
    r = run("sql", "SELECT * FROM models WHERE false")
    assert r.exit_code == 0 and "No rows." in r.stderr


@pytest.mark.parametrize("args,fragments", [
    (["sql", "CREATE TABLE x AS SELECT 1"], ["CREATE statements are not allowed"]),
    (["sql", "INSERT INTO models SELECT * FROM models"], ["INSERT statements are not allowed"]),
    (["sql", "COPY models TO 'x.csv'"], ["COPY statements are not allowed"]),
    (["sql", "ATTACH 'x.duckdb'"], ["ATTACH statements are not allowed"]),
    (["sql", "INSTALL httpfs"], ["INSTALL statements are not allowed"]),
    (["sql", "LOAD httpfs"], ["LOAD statements are not allowed"]),
    (["sql", "SELECT * FROM read_csv('/etc/passwd')"], ["/etc/passwd", "only the dataset's own files"]),
    (["sql", "SELEC 1"], ["Parser Error"]),
    (["sql", "SELECT nope FROM models"], ["nope"]),
    (["heads", "paris", "--model", "delta"], ["unknown model 'delta'", "alpha, beta, gamma"]),
    (["show", "delta", "L0.H0"], ["unknown model 'delta'"]),
    (["show", "alpha", "L0.Q1"], ["malformed unit 'L0.Q1'", "L5.H3"]),
    (["show", "alpha", "L7.H0"], ["layer 7 is out of range"]),
    (["similar", "alpha", "L0.N9", "--in", "gamma"], ["neuron 9 is out of range"]),
    (["heads", "parisx"], ["'parisx' is in no vocabulary", "nearest: ' Paris'"]),
    (["neurons", "   "], ["only whitespace", "--exact"]),
    (["heads"], ["give a TOKEN"]),
    (["neurons", "paris", "--kind", "ff_nope"], ["unknown kind 'ff_nope'"]),
])
def test_errors_are_one_line(run, args, fragments):
    _one_error_line(run(*args), *fragments)


def test_missing_and_old_datasets(tmp_path, synthetic_db):
    r = CliRunner().invoke(cli, ["models", "--db", str(tmp_path / "nope")])
    _one_error_line(r, "no dataset directory", "zeropass index MODEL --db")
    import shutil

    old = tmp_path / "old"
    shutil.copytree(synthetic_db, old)
    m = json.loads((old / "manifest.json").read_text())
    m["schema_version"] = 0
    (old / "manifest.json").write_text(json.dumps(m))
    _one_error_line(CliRunner().invoke(cli, ["heads", "paris", "--db", str(old)]), "schema version 0", "rebuild")


def _no_torch(argv: list[str]) -> subprocess.CompletedProcess:
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            f"from cli import main; main({argv!r})")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_index_without_torch_says_what_to_install(tmp_path):
    r = _no_torch(["index", str(tmp_path / "model"), "--db", str(tmp_path / "db")])
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "pip install 'zeropass[index]'" in r.stderr, r.stderr


def test_sql_runs_without_torch(synthetic_db):
    r = _no_torch(["heads", "paris", "--db", str(synthetic_db), "--format", "json"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["unit"] == "L1.H0"


def test_indexer_errors_are_one_line(tmp_path):
    pytest.importorskip("torch")
    r = CliRunner().invoke(cli, ["index", str(tmp_path / "no-such-model"), "--db", str(tmp_path / "db"), "--quiet"])
    _one_error_line(r)
    r = CliRunner().invoke(cli, ["coverage", str(tmp_path / "no-such-model")])
    _one_error_line(r)


def test_index_then_query_real_tiny_model(tiny_db):
    r = CliRunner().invoke(cli, ["heads", "paris", "--model", "tgpt2", "--circuit", "ov", "--db", str(tiny_db), "--format", "json"])
    assert r.exit_code == 0, r.stderr
    from tests.builders import COPY_HEAD, COPY_LAYER

    assert json.loads(r.stdout)[0]["unit"] == f"L{COPY_LAYER}.H{COPY_HEAD}"


def test_demo_refuses_a_dataset_of_another_schema_version(tmp_path):
    from cli.demo import main as demo

    old = tmp_path / "old-db"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": "zeropass-dataset", "schema_version": 1, "models": {"minilm": {}}}))
    r = CliRunner().invoke(demo, ["--db", str(old)])
    _one_error_line(r, "schema version 1", "rm -rf", "ZEROPASS_DB")
