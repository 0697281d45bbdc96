"""`zeropass check`: every kind of damage gives one line naming the model and the command that
repairs it; running that command repairs it; exit 0 only when the dataset is sound."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import cli
from schemas.layout import read_manifest
from tests.tiny_models import save_tiny

REPO = Path(__file__).resolve().parent.parent


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A dataset of two tiny models and an alignment, built once; each test damages a copy."""
    base = tmp_path_factory.mktemp("check")
    a = save_tiny("gpt2", base / "src" / "a", seed=1)
    b = save_tiny("llama", base / "src" / "b", seed=2)
    db = base / "db"
    for path, name in ((a, "a"), (b, "b")):
        r = invoke("index", path, "--db", db, "--name", name, "--k", "3", "--pairs", "0", "-q")
        assert r.exit_code == 0, r.stderr
    assert invoke("align", "a", "b", "--db", db, "-q").exit_code == 0
    return db


@pytest.fixture
def db(pristine, tmp_path):
    copy = tmp_path / "db"
    shutil.copytree(pristine, copy)
    return copy


def files_of(db: Path, model: str, table: str) -> list[Path]:
    return [db / f for f in read_manifest(db)["models"][model]["files"][table]]


def edit_manifest(db: Path, edit) -> None:
    manifest = json.loads((db / "manifest.json").read_text())
    edit(manifest)
    (db / "manifest.json").write_text(json.dumps(manifest))


def check(db: Path, *extra):
    r = invoke("check", "--db", db, *extra)
    assert "Traceback" not in r.stderr
    return r


def repair_commands(r) -> list[list[str]]:
    """The distinct commands the problem lines name (without the leading `zeropass`)."""
    cmds = []
    for line in r.stdout.splitlines():
        assert ": repair with `zeropass " in line and line.endswith("`"), line
        cmd = shlex.split(line.rsplit("repair with `", 1)[1][:-1])[1:]
        if cmd not in cmds:
            cmds.append(cmd)
    return cmds


def test_a_sound_dataset_checks_clean(db):
    r = check(db)
    assert r.exit_code == 0 and r.stdout == "", r.stdout
    assert r.stderr.startswith("ok: 2 models")


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_a_byte(p: Path):
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the data pages: the footer still reads
    p.write_bytes(bytes(data))


DAMAGE = [
    pytest.param(lambda db: _truncate(files_of(db, "a", "vectors")[0]), "a", "bytes", id="truncated"),
    pytest.param(lambda db: files_of(db, "a", "heads")[1].unlink(), "a", "missing", id="missing"),
    pytest.param(lambda db: _flip_a_byte(files_of(db, "b", "vectors_by_token")[0]), "b", "sha256", id="bit-flip"),
    pytest.param(lambda db: edit_manifest(db, lambda m: m["models"]["b"]["row_counts"].update(heads=1)), "b", "rows",
                 id="row-count"),
    pytest.param(lambda db: files_of(db, "a", "parameters")[0].write_bytes(b"PAR1 not parquet PAR1"), "a", "bytes",
                 id="not-parquet"),
]


@pytest.mark.parametrize("damage,model,fragment", DAMAGE)
def test_damage_names_the_model_and_its_repair_which_works(pristine, db, damage, model, fragment):
    damage(db)
    r = check(db)
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert lines and all(line.startswith(f"model {model}: ") for line in lines), lines
    assert fragment in r.stdout
    [cmd] = repair_commands(r)
    assert cmd[:2] == ["index", str((pristine.parent / "src" / model).resolve())]
    assert cmd[-3:] == ["--db", str(db), "--replace"]
    fixed = invoke(*cmd, "-q")
    assert fixed.exit_code == 0, fixed.stderr
    assert check(db).exit_code == 0
    assert set(read_manifest(db)["models"]) == {"a", "b"}


def test_quick_skips_hashes_but_not_footers(db):
    _flip_a_byte(files_of(db, "b", "vectors_by_token")[0])
    assert check(db, "--quick").exit_code == 0
    _truncate(files_of(db, "a", "vectors")[0])
    assert check(db, "--quick").exit_code == 1


def test_a_damaged_vocabulary_names_a_model_that_repairs_it(db):
    [vocab] = read_manifest(db)["vocabularies"].values()
    (db / vocab["files"][0]).unlink()
    r = check(db)
    assert r.exit_code == 1 and r.stdout.startswith("vocabulary ") and "used by a, b" in r.stdout
    [cmd] = repair_commands(r)
    assert invoke(*cmd, "-q").exit_code == 0
    assert check(db).exit_code == 0


def test_a_damaged_alignment_names_zeropass_align(db):
    [entry] = read_manifest(db)["alignments"].values()
    _truncate(db / entry["files"][0])
    r = check(db)
    assert r.exit_code == 1 and r.stdout.startswith("alignment a / b: ")
    assert repair_commands(r) == [["align", "a", "b", "--db", str(db)]]


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.parquet", "vectors/../../x.parquet", "a//b.parquet"])
def test_a_manifest_naming_files_outside_the_dataset_is_refused(db, path):
    edit_manifest(db, lambda m: m["models"]["a"]["files"]["vectors"].append(path))
    r = check(db)
    assert r.exit_code == 1 and "malformed" in r.stdout and "--recover" in r.stdout
    r = invoke("sql", "SELECT count(*) FROM vectors", "--db", db)
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and "Traceback" not in r.stderr


def test_a_listed_file_that_links_outside_is_reported(db, tmp_path):
    target = files_of(db, "a", "heads")[0]
    outside = tmp_path / "elsewhere.parquet"
    shutil.copy(target, outside)
    target.unlink()
    target.symlink_to(outside)
    r = check(db)
    assert r.exit_code == 1 and "model a: " in r.stdout and "link out of the dataset" in r.stdout


def test_a_listed_file_that_links_inside_the_dataset_passes_as_readers_accept_it(db):
    """One link rule (schemas.format.links_out) for check and the readers: a link inside the
    dataset reads the dataset's own bytes (check used to report any link)."""
    from query import Dataset

    target = files_of(db, "a", "heads")[0]
    kept = db / "heads" / "kept.bin"
    shutil.move(target, kept)
    target.symlink_to(kept)
    r = check(db)
    assert r.exit_code == 0, r.stdout
    with Dataset(db) as ds:
        assert ds.sql("SELECT count(*) AS n FROM heads WHERE model = 'a'").column("n").to_pylist()[0] > 0


@pytest.mark.parametrize("content", ["{not json", "[]", '{"models": {"a": 3}}'])
def test_a_malformed_manifest_is_one_line_naming_recover(db, content):
    (db / "manifest.json").write_text(content)
    r = check(db)
    assert r.exit_code == 1 and len(r.stdout.splitlines()) == 1
    assert r.stdout.strip().endswith(f"repair with `zeropass check --db {db} --recover`")
    assert check(db, "--recover").exit_code == 0
    assert set(read_manifest(db)["models"]) == {"a", "b"} and set(read_manifest(db)["alignments"]) == {"a|b"}


def test_another_schema_version_says_rebuild(db):
    edit_manifest(db, lambda m: m.update(schema_version=1))
    r = check(db)
    assert r.exit_code == 1 and "schema version 1" in r.stdout and "NEWDIR" in r.stdout


def test_a_missing_catalog_is_repaired(db):
    (db / "catalog.duckdb").unlink()
    r = check(db)
    assert r.exit_code == 1 and "catalog.duckdb is missing" in r.stdout
    assert repair_commands(r) == [["check", "--db", str(db), "--repair"]]
    assert check(db, "--repair").exit_code == 0
    out = subprocess.run([sys.executable, "-c", "import duckdb; print(duckdb.connect('catalog.duckdb', read_only=True)"
                          ".execute('SELECT count(DISTINCT model) FROM vectors').fetchone()[0])"],
                         cwd=db, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"


def test_recover_refuses_when_the_manifest_is_fine(db):
    r = check(db, "--recover")
    assert r.exit_code == 1 and "nothing to recover" in r.stderr


def test_check_of_a_non_dataset_is_one_line(tmp_path):
    (tmp_path / "x").mkdir()
    r = check(tmp_path / "x")
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and len(r.stderr.splitlines()) == 1
    r = check(tmp_path / "nowhere")
    assert r.exit_code == 1 and r.stderr.startswith("Error: ")


def test_check_runs_without_torch(db):
    """The checking library and `zeropass check` need only the query extra."""
    code = ("import sys; sys.modules['torch'] = None\n"  # importing torch now raises ImportError
            "from cli import main\n"
            "try:\n    main(['check', '--db', sys.argv[1], '-q'])\n"
            "except SystemExit as e:\n    sys.exit(e.code)\n")
    r = subprocess.run([sys.executable, "-c", code, str(db)], env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_recover_refuses_a_directory_without_zeropass_files(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep")
    r = check(d, "--recover")
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and "nothing to recover" in r.stderr
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("path,shown", [
    ("db", "db"), ("my db", "'my db'"), ("-db", "./-db"), ("a,b'c", "'a,b'\"'\"'c'"), ("/abs/-x", "/abs/-x"),
])
def test_printed_commands_survive_the_shell(path, shown):
    from indexer.dataset import zeropass_command

    line = zeropass_command("check", "--db", path, "--repair")
    assert line == f"zeropass check --db {shown} --repair"
    assert shlex.split(line)[3] in (path, "./" + path)


# -- issue 20: recover never resolves a name collision by age; repair frees space first --------

def test_recover_reports_two_checkpoints_under_one_name_and_deletes_nothing(db):
    """A build of other weights planted under `a` used to become `a`, and a's genuine build was
    then listed as leftovers that --repair deletes."""
    (planted,) = files_of(db, "b", "models")
    genuine = sorted(p for p in db.rglob("*.parquet") if "model=a" in p.as_posix())
    target = db / "models" / "model=a" / planted.name
    shutil.copy(planted, target)  # b's weights, newer than a's build, under the name a
    (db / "manifest.json").unlink()
    r = check(db, "--recover")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("Error: "), r.stderr
    assert "model a has builds of two different checkpoints" in r.stderr
    assert f"models/model=a/{planted.name}" in r.stderr and "models/model=a/" in r.stderr.replace(planted.name, "", 1)
    assert not (db / "manifest.json").exists()
    assert all(p.is_file() for p in genuine)
    target.unlink()  # the user moves the stranger away: recover then restores a as it was
    assert check(db, "--recover").exit_code == 0
    assert check(db).exit_code == 0 and all(p.is_file() for p in genuine)


def test_repair_frees_space_before_it_writes(tmp_path, small_disk):
    """The leftovers of a merge that failed on a full disk: --repair used to write the catalog
    first and fail with ENOSPC, so it could never run."""
    from indexer.check import check_dataset, repair
    from tests.builders import PLANTED, SHARED_TOKENS, synthetic_model
    from tests.disks import fill

    db = small_disk / "db"
    synthetic_model(db, "alpha", "vshared", SHARED_TOKENS, 1, PLANTED["alpha"])
    leftover = db / "vectors" / "model=alpha" / "layer=0" / "merge-leftover.parquet"
    leftover.write_bytes(os.urandom(400_000))
    fill(small_disk)
    repair(db)
    assert not leftover.exists()
    (small_disk / "ballast").unlink()
    assert check_dataset(db).problems == []


def test_repair_and_check_agree_after_a_dataset_was_published_inside_another(db, tmp_path):
    """An old zeropass accepted `publish DB DB/vectors/pub`: DB's check must name what --repair
    removes, and one --repair must make it clean (not the same advice forever)."""
    from indexer.publish import publish_dataset

    publish_dataset(db, tmp_path / "pub")
    shutil.move(tmp_path / "pub", db / "vectors" / "pub")
    first = check(db)
    assert first.exit_code == 1 and ["check", "--db", str(db), "--repair"] in repair_commands(first)
    assert check(db, "--repair").exit_code == 0
    r = check(db)
    assert r.exit_code == 0, r.stdout
