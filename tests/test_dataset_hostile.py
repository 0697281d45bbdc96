"""The dataset writer under hostile conditions: nothing lost, nothing silently replaced, damage
contained (issue 11). Real files, real DuckDB, a real tmpfs for a full disk, real SIGKILLs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from indexer.build import index_model
from indexer.errors import DatasetError
from cli import cli
from schemas.layout import read_manifest
from tests.disks import fill
from tests.tiny_models import D_VOCAB, save_tiny

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--k", "3", "--pairs", "0", "-q"]  # no circuit pairs: the writer is under test, not the kernels


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def snapshot(db: Path) -> dict[str, bytes]:
    """Every file of the dataset (except the lock) -> its bytes."""
    return {p.relative_to(db).as_posix(): p.read_bytes() for p in sorted(db.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def published(db: Path) -> dict[str, bytes]:
    """Manifest, catalog and every file the manifest lists -> bytes: the dataset readers see."""
    from schemas.layout import manifest_files

    names = ["manifest.json", "catalog.duckdb"] + sorted(manifest_files(read_manifest(db)))
    return {n: (db / n).read_bytes() for n in names}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two different tiny GPT-2 checkpoints whose default names collide (a/model, b/model)."""
    base = tmp_path_factory.mktemp("ckpt")
    return {"a": save_tiny("gpt2", base / "a" / "model", seed=1), "b": save_tiny("gpt2", base / "b" / "model", seed=2)}


def index_into(db: Path, *builds: tuple[str, str | None]) -> None:
    """Each (checkpoint, name) indexed into ``db`` in turn (None: the default name), with ``SMALL``'s settings."""
    for path, name in builds:
        index_model(path, db, name=name, k=3, n_pairs=0, progress=None)


@pytest.fixture(scope="module")
def indexed(prebuilt, models):
    """``indexed(dst, ("a", "a"), ("b", "b"))``: a copy at ``dst`` of a dataset into which those
    checkpoints were indexed under those names, in that order (`index_into`), built once per test
    run (`prebuilt`): the tests' starting points, not what they test; the copy is the test's to damage."""
    def copy(dst: Path, *builds: tuple[str, str | None]) -> Path:
        return prebuilt(index_into, dst, *((str(models[m]), name) for m, name in builds))

    return copy


# -- 1. default names that collide -------------------------------------------------------------

def test_a_name_taken_by_another_checkpoint_is_refused_unless_replace(tmp_path, models):
    db = tmp_path / "db"
    assert invoke("index", models["a"], "--db", db, *SMALL).exit_code == 0
    before = published(db)
    line = one_error_line(invoke("index", models["b"], "--db", db, *SMALL))
    assert "'model'" in line and "--name" in line and "--replace" in line and str(models["b"]) in line
    assert published(db) == before, "the refused index changed the dataset"
    # the same checkpoint again (other settings) is a re-index, as before
    assert invoke("index", models["a"], "--db", db, "--k", "2", "--pairs", "0", "-q").exit_code == 0
    assert read_manifest(db)["models"]["model"]["origin"] == str(models["a"].resolve())
    # another name keeps both; --replace means it
    assert invoke("index", models["b"], "--db", db, "--name", "model-b", *SMALL).exit_code == 0
    assert invoke("index", models["b"], "--db", db, "--replace", *SMALL).exit_code == 0
    manifest = read_manifest(db)
    assert set(manifest["models"]) == {"model", "model-b"}
    assert manifest["models"]["model"]["origin"] == str(models["b"].resolve())


def test_a_model_recorded_without_origin_is_replaced_as_before(tmp_path, models, indexed):
    """Manifests written before origins were recorded (and recovered ones) cannot tell."""
    db = indexed(tmp_path / "db", ("a", None))
    manifest = json.loads((db / "manifest.json").read_text())
    manifest["models"]["model"]["origin"] = None
    (db / "manifest.json").write_text(json.dumps(manifest))
    assert invoke("index", models["b"], "--db", db, *SMALL).exit_code == 0
    assert read_manifest(db)["models"]["model"]["origin"] == str(models["b"].resolve())


def test_hub_ids_of_two_organisations_with_one_name(tmp_path):
    """org1/x and org2/x through the real hub code path (offline, from a populated hub cache)."""
    cache = tmp_path / "hub"
    rev = "0" * 40
    for seed, org in enumerate(("org1", "org2")):
        repo = cache / f"models--{org}--x"
        save_tiny("gpt2", repo / "snapshots" / rev, seed=seed)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(rev)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    db = tmp_path / "db"
    # A process of its own for the environment (huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE
    # when imported); both commands run in it, one after the other (one interpreter start, not two).
    out = subprocess.run([sys.executable, "-c", _INDEX_EACH, str(db), *SMALL, "--", "org1/x", "org2/x"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first, second = json.loads(out.stdout)
    assert first["exit_code"] == 0, first
    assert second["exit_code"] == 1, second
    err = second["stderr"]
    assert err.startswith("Error: ") and "org1/x" in err and "--replace" in err, err
    assert read_manifest(db)["models"]["x"]["source"] == "org1/x"


# `zeropass index REF --db DB OPTIONS` for each REF in turn, in this one process (click's runner:
# the console script's parsing, Error: lines and exit codes); a traceback fails the test.
_INDEX_EACH = """
import json, sys
from click.testing import CliRunner
from cli import cli
db, rest = sys.argv[1], sys.argv[2:]
options, refs = rest[:rest.index("--")], rest[rest.index("--") + 1:]
runs = [CliRunner().invoke(cli, ["index", ref, "--db", db, *options], catch_exceptions=False) for ref in refs]
print(json.dumps([{"exit_code": r.exit_code, "stderr": r.stderr} for r in runs]))
"""


# -- 2. damage: the shared vocabulary ----------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_shared_tokens_file_is_rewritten_by_the_next_commit(tmp_path, models, indexed, damage):
    db = indexed(tmp_path / "db", ("a", None))
    [vocab] = read_manifest(db)["vocabularies"].values()
    tokens = db / vocab["files"][0]
    good = tokens.read_bytes()
    if damage == "truncate":
        tokens.write_bytes(good[: len(good) // 2])
    else:
        tokens.unlink()
    index_model(str(models["b"]), db, name="other", k=3, n_pairs=0, progress=None)  # shares the vocabulary
    assert pq.ParquetFile(tokens).metadata.num_rows == D_VOCAB
    assert invoke("check", "--db", db).exit_code == 0


# -- 3. a lost manifest ------------------------------------------------------------------------

def test_a_lost_manifest_is_refused_and_recovered_from_the_files(tmp_path, models, indexed):
    db = indexed(tmp_path / "db", ("a", "a"), ("b", "b"))
    rows = invoke("sql", "SELECT model, count(*) AS n FROM vectors GROUP BY 1 ORDER BY 1", "--db", db, "--format", "json").stdout
    (db / "manifest.json").unlink()
    before = snapshot(db)
    line = one_error_line(invoke("index", models["a"], "--db", db, "--name", "c", *SMALL))
    assert f"zeropass check --db {db} --recover" in line
    assert snapshot(db) == before, "the refused index wrote something"
    r = invoke("check", "--db", db, "--recover")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert set(read_manifest(db)["models"]) == {"a", "b"}
    assert invoke("sql", "SELECT model, count(*) AS n FROM vectors GROUP BY 1 ORDER BY 1", "--db", db, "--format", "json").stdout == rows
    assert invoke("index", models["a"], "--db", db, "--name", "c", *SMALL).exit_code == 0
    assert set(read_manifest(db)["models"]) == {"a", "b", "c"}


def test_a_malformed_manifest_is_refused_and_kept_when_recovering(tmp_path, models, indexed):
    db = indexed(tmp_path / "db", ("a", "a"))
    (db / "manifest.json").write_text('{"models": ')
    line = one_error_line(invoke("index", models["b"], "--db", db, "--name", "b", *SMALL))
    assert "not valid JSON" in line and "--recover" in line
    assert invoke("check", "--db", db, "--recover").exit_code == 0
    assert (db / "manifest.json.damaged").read_text() == '{"models": '
    assert set(read_manifest(db)["models"]) == {"a"}


def test_a_directory_with_builds_but_no_dataset_is_refused_untouched(tmp_path, models):
    """check_writable used to let any directory with a .builds folder pass."""
    db = tmp_path / "notmine"
    (db / ".builds").mkdir(parents=True)
    (db / "precious.txt").write_text("keep me")
    before = snapshot(db)
    line = one_error_line(invoke("index", models["a"], "--db", db, *SMALL))
    assert "--recover" in line or "not a zeropass dataset" in line
    assert snapshot(db) == before


# -- 4. odd --db paths -------------------------------------------------------------------------

ODD = [
    pytest.param("db,1", None, id="comma"), pytest.param("db'1", None, id="quote"),
    pytest.param('db"1', None, id="double-quote"), pytest.param("db[1]", "db1", id="brackets"),
    pytest.param("db{1,2}", "db1", id="braces"), pytest.param("d*b", "dxb", id="star"),
    pytest.param("d?b", "dxb", id="question-mark"), pytest.param("my db", None, id="space"),
    pytest.param("dbé", None, id="non-ascii"), pytest.param("-db", None, id="leading-dash"),
]


@pytest.mark.parametrize("name,decoy", ODD)
def test_odd_db_paths_work_end_to_end(tmp_path, models, indexed, name, decoy, monkeypatch):
    """index, models, sql, check through the CLI; a decoy dataset that DuckDB's globbing would
    also match (db[1] -> db1, d*b -> dxb) must not leak into the results."""
    import duckdb

    monkeypatch.chdir(tmp_path)
    if decoy:
        indexed(tmp_path / decoy, ("b", "decoy"))
    db = tmp_path / name
    r = invoke("index", models["a"], f"--db={name}", "--name", "m", *SMALL)  # relative, as typed
    assert r.exit_code == 0, r.stderr
    r = invoke("models", f"--db={name}", "--format", "json")
    assert [m["model"] for m in json.loads(r.stdout)] == ["m"], r.stderr
    r = invoke("sql", "SELECT DISTINCT model FROM vectors_by_token", f"--db={db}", "--format", "json")
    assert json.loads(r.stdout) == [{"model": "m"}], r.stderr
    r = invoke("check", f"--db={name}")
    assert r.exit_code == 0, r.stdout + r.stderr
    # plain DuckDB, from inside the dataset (the catalog's paths are relative to it); in this process
    # rather than a `python -c` of its own for each of the ten paths
    monkeypatch.chdir(db)
    con = duckdb.connect("catalog.duckdb", read_only=True)
    try:
        assert con.execute("SELECT DISTINCT model FROM vectors").fetchall() == [("m",)]
    finally:
        con.close()


def test_every_odd_character_at_once_through_the_real_command(tmp_path, models):
    db = tmp_path / "-a,b 'q\" [1] {x,y} *?é"
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def zp(*args, cwd=None):
        return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], env=env, cwd=cwd,
                              capture_output=True, text=True, timeout=300)

    r = zp("index", models["a"], "--db", db, "--name", "m", *SMALL)
    assert r.returncode == 0, r.stderr
    r = zp("sql", "SELECT count(DISTINCT layer) AS n FROM heads", "--db", db, "--format", "csv")
    assert r.returncode == 0 and r.stdout.split() == ["n", "2"], r.stderr
    assert zp("check", "--db", db).returncode == 0
    r = zp("models", "--db", ".", "--format", "csv", cwd=db)  # relative, from inside DIR
    assert r.returncode == 0 and "\nm," in r.stdout, r.stderr


# -- 5. a full disk at every write -------------------------------------------------------------

def _fill_before(monkeypatch, disk: Path, module, name: str, when=lambda *a, **k: True):
    """Let ``module.name`` run for real, but on a full disk when ``when(args)`` holds."""
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        if when(*args, **kwargs):
            fill(disk)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("step", ["catalog", "manifest", "tokens", "progress"])
def test_a_full_disk_at_any_write_fails_and_leaves_the_dataset_as_it_was(tmp_path, small_disk, monkeypatch, models, indexed,
                                                                         step):
    import indexer.dataset as dataset

    db = indexed(small_disk / "db", ("a", "ok"))
    if step == "tokens":  # a damaged shared vocabulary makes the next commit rewrite it
        [vocab] = read_manifest(db)["vocabularies"].values()
        (db / vocab["files"][0]).write_bytes(b"PAR1")
    before = published(db)
    if step == "catalog":
        _fill_before(monkeypatch, small_disk, dataset, "_write_catalog_tmp")
    elif step == "manifest":
        _fill_before(monkeypatch, small_disk, dataset, "write_json_atomic", lambda path, obj: Path(path).name == "manifest.json")
    elif step == "tokens":
        _fill_before(monkeypatch, small_disk, dataset, "write_parquet_atomic", lambda root, rel, *a, **k: rel.startswith("tokens/"))
    else:
        _fill_before(monkeypatch, small_disk, dataset, "write_json_atomic", lambda path, obj: "layer=1" in json.dumps(obj))
    with pytest.raises(DatasetError, match="^no space left on the device holding"):
        index_model(str(models["b"]), db, name="new", k=3, n_pairs=0, progress=None)
    assert published(db) == before, f"a full disk during the {step} write changed the published dataset"
    assert not [p for p in db.rglob("*") if ".tmp" in p.name], "temporary files left behind"
    (small_disk / "ballast").unlink()
    monkeypatch.undo()
    index_model(str(models["b"]), db, name="new", k=3, n_pairs=0, progress=None)  # space again: it completes
    assert set(read_manifest(db)["models"]) == {"ok", "new"}


def test_a_full_disk_through_the_cli_is_one_line_and_exit_1(tmp_path, small_disk, models):
    db = small_disk / "db"
    assert invoke("index", models["a"], "--db", db, "--name", "ok", *SMALL).exit_code == 0
    before = published(db)
    fill(small_disk)
    line = one_error_line(invoke("index", models["b"], "--db", db, "--name", "new", *SMALL))
    assert "no space left" in line
    assert published(db) == before


# -- 6. leftovers of killed writers ------------------------------------------------------------

# Builds that stall once their layer 0 is on disk, one after the other in one process (one import
# of torch instead of one per build), which the test then SIGKILLs: each build is left as a kill
# mid-build leaves it, the earlier ones parked in their progress callback on a thread of their own.
_STALLED_BUILDS = textwrap.dedent("""
    import os, sys, threading, time
    sys.path.insert(0, {repo!r})
    from indexer.build import index_model
    def build(path, db, name, stalled):
        def slow(msg):
            if "done (" in msg:
                print(name, msg, flush=True)
                stalled.set()
                time.sleep(120)  # the test kills us here
        try:
            index_model(path, db, name=name, k=3, n_pairs=0, progress=slow)
        finally:
            os._exit(3)  # finished or failed without stalling: not the state the tests want
    for path, db, name in {builds!r}:
        stalled = threading.Event()
        threading.Thread(target=build, args=(path, db, name, stalled), daemon=True).start()
        if not stalled.wait(300):
            os._exit(4)
    time.sleep(300)
""")


def _kill_after_first_layer(*builds: tuple[Path, Path, str]) -> None:
    """Index each (checkpoint, dataset, name) up to its layer 0 in one process, then SIGKILL it."""
    script = _STALLED_BUILDS.format(repo=str(REPO), builds=[(str(p), str(db), name) for p, db, name in builds])
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    waiting = [name for _, _, name in builds]
    for line in proc.stdout:
        if "done (" in line:  # that build's layer 0 is on disk
            waiting.remove(line.split()[0])
            if not waiting:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not waiting, (proc.returncode, waiting)


@pytest.fixture(scope="module")
def killed(tmp_path_factory, models, indexed):
    """Two datasets with a build SIGKILLed after its layer 0, made by one killed process; tests copy them:
    ``after_a``: a committed, then r (checkpoint b) killed; ``fresh``: m (checkpoint a), the first
    write into a new directory, killed."""
    base = tmp_path_factory.mktemp("killed")
    after_a = indexed(base / "after-a", ("a", "a"))
    fresh = base / "fresh"
    _kill_after_first_layer((models["b"], after_a, "r"), (models["a"], fresh, "m"))
    return {"after_a": after_a, "fresh": fresh}


def test_the_next_write_cleans_leftovers_and_keeps_resumable_builds(tmp_path, models, killed):
    db = Path(shutil.copytree(killed["after_a"], tmp_path / "db", symlinks=True))  # r: a resumable build, its files must stay
    resumable = set(json.loads((db / ".builds" / "r.json").read_text())["done"])
    committed = read_manifest(db)["models"]["a"]
    some = db / committed["files"]["vectors"][0]
    # what killed writers leave, named as the writer names its temporary files
    junk = [
        db / "catalog.duckdb.tmp4242-0badc0de", db / "catalog.duckdb.tmp4242-0badc0de.wal",
        db / "manifest.json.tmp4242-0badc0de", db / ".builds" / "a.json.tmp4242-0badc0de",
        some.with_name(some.name + ".tmp"), db / ".builds" / "gone.spill" / "duckdb_temp_block-1.block",
        some.with_name("20000101T000000-0badc0de.parquet"),  # a superseded build a kill did not delete
        db / "pairs" / "model=gone" / "layer=0" / "20000101T000000-0badc0de.parquet",  # an abandoned model
    ]
    for p in junk:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"junk")
    r = invoke("check", "--db", db)
    assert r.exit_code == 1 and "leftover" in r.stdout and "--repair" in r.stdout
    assert "unfinished build of r" in r.stderr
    index_model(str(models["a"]), db, name="a2", k=3, n_pairs=0, progress=None)  # any successful write
    assert not [p for p in junk if p.exists()], [p for p in junk if p.exists()]
    assert not (db / "pairs" / "model=gone").exists()
    progress = json.loads((db / ".builds" / "r.json").read_text())
    assert set(progress["done"]) == resumable and all((db / p["file"]).is_file() for p in progress["done"].values())
    assert invoke("check", "--db", db).exit_code == 0
    # the resumable build still resumes, and then nothing is left over
    msgs = []
    index_model(str(models["b"]), db, name="r", k=3, n_pairs=0, progress=msgs.append)
    assert any("resuming" in m for m in msgs)
    assert invoke("check", "--db", db).exit_code == 0 and not (db / ".builds").exists()


def test_check_repair_removes_leftovers_and_rewrites_a_stale_catalog(tmp_path, models, indexed):
    db = indexed(tmp_path / "db", ("a", "a"))
    old_catalog = (db / "catalog.duckdb").read_bytes()
    index_model(str(models["b"]), db, name="b", k=3, n_pairs=0, progress=None)
    (db / "catalog.duckdb").write_bytes(old_catalog)  # as if killed between manifest and catalog rename
    (db / "manifest.json.tmp1-0badc0de").write_text("{}")
    r = invoke("check", "--db", db)
    assert r.exit_code == 1 and "stale" in r.stdout and "leftover" in r.stdout
    assert all(line.endswith(f"repair with `zeropass check --db {db} --repair`") for line in r.stdout.splitlines())
    assert invoke("check", "--db", db, "--repair").exit_code == 0
    assert invoke("check", "--db", db).exit_code == 0


# -- 7. one commit path: remove_model and store_alignment take the lock -----------------------

def test_remove_model_waits_for_the_writer_lock(tmp_path, models, indexed):
    from indexer.dataset import remove_model

    db = indexed(tmp_path / "db", ("a", "a"), ("b", "b"))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(db / '.lock')!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(1.5)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    t = time.perf_counter()
    remove_model(db, "b")
    assert time.perf_counter() - t > 1.0, "remove_model did not wait for the writer holding the lock"
    holder.wait()
    assert set(read_manifest(db)["models"]) == {"a"}
    assert not list(db.glob("*/model=b"))
    assert invoke("check", "--db", db).exit_code == 0  # catalog rewritten, nothing left over


def test_two_concurrent_first_index_runs_on_a_new_directory_both_land(tmp_path, models):
    db = tmp_path / "db"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-m", "cli", "index", str(models[m]), "--db", str(db),
                               "--name", m, *SMALL], env=env, stderr=subprocess.PIPE, text=True) for m in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert set(read_manifest(db)["models"]) == {"a", "b"}
    assert invoke("check", "--db", db).exit_code == 0


# -- 8. the per-layer completion record --------------------------------------------------------

def test_a_layer_is_complete_only_by_its_record(tmp_path, models, indexed, killed):
    """Resume trusts the explicit per-layer record; a recorded partition whose file was lost
    (or truncated) since is recomputed, not published damaged."""
    db = Path(shutil.copytree(killed["fresh"], tmp_path / "db", symlinks=True))
    progress = json.loads((db / ".builds" / "m.json").read_text())
    assert list(progress["layers_done"]) == ["0"]
    assert sorted(progress["layers_done"]["0"]) == sorted(f"{t}/model=m/layer=0" for t in ("vectors", "pairs", "head_tokens", "heads"))
    lost = db / progress["done"]["heads/model=m/layer=0"]["file"]
    lost.write_bytes(lost.read_bytes()[:50])
    index_model(str(models["a"]), db, name="m", k=3, n_pairs=0, progress=None)
    clean = indexed(tmp_path / "clean", ("a", "m"))  # a build of m that was never interrupted
    assert invoke("check", "--db", db).exit_code == 0
    q = "SELECT * EXCLUDE (model) FROM heads ORDER BY ALL"
    assert invoke("sql", q, "--db", db, "--format", "csv").stdout == invoke("sql", q, "--db", clean, "--format", "csv").stdout
