"""`zeropass index-many`: a SPEC of models into one dataset, here or on a local Ray instance."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from schemas import TABLES  # noqa: E402
from schemas.layout import read_manifest  # noqa: E402
from tests.dataset_helpers import assert_same_model, cli_argv, invoke_cli, run_cli, table_rows  # noqa: E402

# The CLI runs in this process (an interpreter start with torch costs about two seconds); the real
# process only where it is what a test proves: SIGKILL, and --quiet silencing what libraries print.
zp = invoke_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from tests.tiny_models import save_tiny

    tmp = tmp_path_factory.mktemp("many")
    for name, family, seed in (("a", "gpt2", 1), ("b", "llama-gqa", 2), ("c", "neox", 3)):
        save_tiny(family, tmp / name, seed=seed)
    return tmp


def spec(tmp: Path, ckpts: Path, *names: str, extra: str = "") -> Path:
    text = "[defaults]\nk = 5\npairs = 6\n\n" + "".join(
        f'[[model]]\nsource = "{ckpts / n}"\nname = "{n}"\n\n' for n in names) + extra
    p = tmp / "spec.toml"
    p.write_text(text)
    return p


def test_sequential_build_rerun_and_one_failure(ckpts, tmp_path):
    db = tmp_path / "db"
    s = spec(tmp_path, ckpts, "a", "b", extra=f'[[model]]\nsource = "{tmp_path / "nowhere"}"\nname = "gone"\n')
    r = zp("index-many", s, "--db", db)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    # one progress line per model, with an ETA; the failure in one line, the others built
    assert [ln.split("]")[0] for ln in err[:3]] == ["[1/3", "[2/3", "[3/3"]
    assert all("ETA" in ln for ln in err[:3])
    assert "gone: FAILED: no such file or directory" in err[2]
    assert err[-1].startswith("Error: 1 of 3 models failed: gone (")
    assert sorted(read_manifest(db)["models"]) == ["a", "b"]
    # a rerun does only what is missing
    before = (db / "manifest.json").read_bytes()
    r = zp("index-many", s, "--db", db)
    assert r.returncode == 1 and r.stderr.count("already in the dataset") == 2
    assert (db / "manifest.json").read_bytes() == before
    # the same as indexing each model alone
    for name in ("a", "b"):
        alone = tmp_path / f"alone-{name}"
        assert zp("index", ckpts / name, "--name", name, "--k", 5, "--pairs", 6, "--db", alone, "-q").returncode == 0
        assert_same_model(db, alone, name)
    # a changed setting rebuilds that model only
    s.write_text(s.read_text().replace('name = "b"\n', 'name = "b"\nk = 4\n', 1))
    r = zp("index-many", s, "--db", db, "--quiet")
    assert r.returncode == 1 and r.stderr.count("\n") == 1  # --quiet: only the Error line
    assert table_rows(db, "models", "a") == table_rows(tmp_path / "alone-a", "models", "a")
    assert {row[0] for row in table_rows(db, "vectors", "b")} == {"b"}
    rank = TABLES["vectors"].column_names.index("rank")
    assert max(row[rank] for row in table_rows(db, "vectors", "b")) == 4  # k = 4 now


def test_quiet_success_prints_nothing(ckpts, tmp_path):
    r = run_cli("index-many", spec(tmp_path, ckpts, "a"), "--db", tmp_path / "db", "--quiet")
    assert r.returncode == 0 and r.stderr == "" and r.stdout == ""


def test_sigkill_mid_run_then_rerun_finishes(ckpts, tmp_path):
    db = tmp_path / "db"
    s = spec(tmp_path, ckpts, "a", "b", "c")
    proc = subprocess.Popen(cli_argv("index-many", s, "--db", db), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()  # the first model is done
    assert line.startswith("[1/3]"), line
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = zp("index-many", s, "--db", db)
    assert r.returncode == 0, r.stderr
    assert "already in the dataset" in r.stderr
    assert sorted(read_manifest(db)["models"]) == ["a", "b", "c"]
    assert zp("check", "--db", db).returncode == 0


@pytest.mark.parametrize("text,needle", [
    ("[[model]\nsource = 'x'", "not valid TOML"),
    ("[[model]]\nsource = 'x'\ncolour = 'red'\n", "unknown keys ['colour']"),
    ("[[model]]\nname = 'x'\n", "has no source"),
    ("[[model]]\nsource = 'x'\nname = 'm'\n[[model]]\nsource = 'y'\nname = 'm'\n", "'m' more than once"),
    ("", "lists no models"),
    ("[[model]]\nsource = 'x'\nk = 0\n", "--k 0"),
    ("[[model]]\nsource = 'x'\nname = '../up'\n", "not a valid model name"),
    ("[[series]]\nname = 's'\nsource = 'x'\n", "needs exactly one of"),
    ("[[series]]\nname = 's'\ndirectory = 'nope'\n", "does not exist"),
    ("[[series]]\nname = 's'\nsource = 'org/m'\nrevisions = ['main']\n", "no step number"),
    ("[models]\nx = 1\n", "unknown sections"),
])
def test_bad_spec_one_line(tmp_path, text, needle):
    p = tmp_path / "spec.toml"
    p.write_text(text)
    r = zp("index-many", p, "--db", tmp_path / "db")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "db" / "manifest.json").exists()


def test_missing_spec_one_line(tmp_path):
    r = zp("index-many", tmp_path / "none.toml", "--db", tmp_path / "db")
    assert r.returncode == 1 and r.stderr.startswith("Error: SPEC") and "does not exist" in r.stderr


def test_series_directory_per_step(ckpts, tmp_path):
    import shutil

    d = tmp_path / "ckpts"
    for step, src in ((100, "a"), (200, "a")):
        shutil.copytree(ckpts / src, d / f"step{step}")
    p = tmp_path / "spec.toml"
    p.write_text(f'[defaults]\nk = 5\npairs = 0\n[[series]]\nname = "tiny"\ndirectory = "ckpts"\n')
    r = zp("index-many", p, "--db", tmp_path / "db", "-q")
    assert r.returncode == 0, r.stderr
    r = zp("sql", "SELECT model, series, step FROM models ORDER BY step", "--db", tmp_path / "db", "--format", "csv")
    assert r.stdout.splitlines() == ["model,series,step", "tiny-step100,tiny,100", "tiny-step200,tiny,200"]


# -- Ray ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    # Imported here, not at collection: the sequential tests run without the distributed extra, and
    # a test worker that never runs the Ray test does not pay for importing it.
    try:
        import ray
    except ImportError:
        pytest.skip("ray is not installed (pip install 'zeropass[distributed]')")
    # The workers find this checkout through PYTHONPATH in the environment the raylet inherits, not
    # through a runtime_env: with a runtime_env Ray leaves the two workers it prestarts at init idle
    # and starts two more for the tasks (two more interpreter starts, ~10 s of a 2-core runner).
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([saved] if saved else []))
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:  # later subprocesses of this test worker see the environment they saw before
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    yield ray
    ray.shutdown()


def _ray_workers_running(name: str) -> list[int]:
    """Pids of Ray worker processes executing task ``name`` now (Ray sets their process title)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith(f"ray::{name}"):
                pids.append(int(d.name))
    return pids


@pytest.mark.ray
def test_ray_build_equals_sequential_and_survives_a_killed_worker(local_ray, ckpts, tmp_path):
    from indexer.index_many import index_many

    s = spec(tmp_path, ckpts, "a", "b")
    seq = tmp_path / "seq"
    index_many(s, seq)
    # shard_bytes=1: every model is split into one task per layer range (here: per layer)
    db = tmp_path / "ray"
    killed: list[int] = []

    def killer():
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            # /proc is scanned only once a shard has written something: scanning it every 10 ms
            # while the workers import torch took CPU from them.
            staged = list((db / ".builds" / "staging").glob("*/vectors/model=*/layer=*/*.parquet"))
            pids = _ray_workers_running("_build_shard") if staged else []
            if staged and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.01)

    t = threading.Thread(target=killer)
    t.start()
    lines: list[str] = []
    report = index_many(s, db, use_ray=True, shard_bytes=1, progress=lines.append)
    t.join()
    assert killed, "no worker was caught mid-build"
    assert not report.failed and sorted(report.built) == ["a", "b"]
    assert any("layers 0-0" in ln and "ETA" in ln for ln in lines)
    for name in ("a", "b"):
        assert_same_model(db, seq, name)
    assert not (db / ".builds" / "staging").exists() or not any((db / ".builds" / "staging").iterdir())
    assert zp("check", "--db", db).returncode == 0
    # a rerun has nothing to do
    assert index_many(s, db, use_ray=True).skipped == ["a", "b"]


# -- SPEC values are checked before anything is built (issue 20) --------------------------------

def _series_spec(tmp_path, body: str) -> Path:
    p = tmp_path / "spec.toml"
    p.write_text("[[series]]\nname = 's'\n" + body)
    return p


def test_a_step_beyond_int64_is_refused_before_building(ckpts, tmp_path):
    """It used to build the whole model and then fail writing models.step (OverflowError), every rerun."""
    from indexer.index_many import SpecError, index_many

    spec = _series_spec(tmp_path, f"steps = {{ {2**63} = '{ckpts / 'a'}' }}\n")
    with pytest.raises(SpecError, match=f"step {2**63} .* 64-bit"):
        index_many(spec, tmp_path / "db")
    assert not (tmp_path / "db").exists()


def test_a_revision_step_beyond_int64_is_refused(tmp_path):
    from indexer.index_many import SpecError, read_spec

    with pytest.raises(SpecError, match="64-bit"):
        read_spec(_series_spec(tmp_path, f"source = 'org/m'\nrevisions = ['step{2**64}']\n"))


def test_index_model_refuses_a_step_beyond_int64_before_loading(tmp_path):
    from indexer.build import BadOption, index_model

    with pytest.raises(BadOption, match="64-bit"):
        index_model(str(tmp_path / "not-even-there"), tmp_path / "db", step=2**63)


def test_directory_entries_that_are_not_steps_are_named(ckpts, tmp_path):
    from indexer.index_many import read_spec

    d = tmp_path / "ckpts"
    (d / "step100").mkdir(parents=True)
    (d / "best").mkdir()
    (d / "notes.txt").write_text("x")
    heard = []
    jobs = read_spec(_series_spec(tmp_path, f"directory = '{d}'\n"), heard.append)
    assert [j.step for j in jobs] == [100]
    assert len(heard) == 1 and "skipped 2 entries" in heard[0] and "best" in heard[0] and "notes.txt" in heard[0]


def test_a_step_present_twice_names_both_directories(tmp_path):
    from indexer.index_many import SpecError, read_spec

    d = tmp_path / "ckpts"
    (d / "step100").mkdir(parents=True)
    (d / "checkpoint-100").mkdir()
    with pytest.raises(SpecError, match=r"step 100 more than once \(.*checkpoint-100, .*step100\)"):
        read_spec(_series_spec(tmp_path, f"directory = '{d}'\n"))
