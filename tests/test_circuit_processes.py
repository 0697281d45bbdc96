"""Circuits in worker processes (indexer/kernels/pairs.py ``CircuitProcesses``, docs/PAIRS.md
"Circuits in worker processes"): the tables the circuit threads build, and the hostile ends of a
build that has them (SIGKILL, Ctrl-C, a worker killed under it, a bad setting), each of which
leaves no process behind and says one line. Real spawned processes and real signals; the model
is tiny (``ZEROPASS_CIRCUIT_WORKERS=processes`` chooses them where ``auto`` would not)."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.dataset_helpers import ROOT, invoke_cli
from tests.test_index import _contents
from tests.tiny_models import save_tiny

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny("llama-gqa", tmp_path_factory.mktemp("gqa") / "m")


def _gone(pid: int) -> bool:
    """The process has ended (a zombie nobody reaped has ended too)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if not _gone(p)]


def test_processes_build_the_tables_the_threads_build(tmp_path, model, monkeypatch, capsys):
    from indexer.build import index_model

    monkeypatch.setenv("ZEROPASS_CIRCUIT_WORKERS", "threads")
    index_model(str(model), tmp_path / "threads", name="m", k=5, n_pairs=12, progress=None)
    monkeypatch.setenv("ZEROPASS_CIRCUIT_WORKERS", "processes")
    index_model(str(model), tmp_path / "processes", name="m", k=5, n_pairs=12, progress=None, profile=True)
    assert _contents(tmp_path / "threads") == _contents(tmp_path / "processes")
    # The workers' own phases come back to the build's profile, beside the main thread's.
    report = capsys.readouterr().err
    for name in ("circuit basis and layout", "screening", "exact rescoring"):
        assert f"{name} (background)" in report


# A build that parks in its progress callback once layer 0 is on disk (its circuit workers are
# alive then: they end with the layer loop), after printing the pids of its children (the two
# workers, then multiprocessing's resource tracker); the tests signal it there.
_PARKED = textwrap.dedent("""
    import os, sys, time
    with open({starts!r}, "a") as f:  # a plain script, no __main__ guard: spawn must not run it again
        print(os.getpid(), file=f)
    sys.path.insert(0, {repo!r})
    os.environ["ZEROPASS_CIRCUIT_WORKERS"] = "processes"
    from indexer.build import index_model
    def park(msg):
        if "layer 0 done" in msg:
            kids = [int(p) for t in os.listdir("/proc/self/task")
                    for p in open(f"/proc/self/task/{{t}}/children").read().split()]
            # the circuit workers first, then multiprocessing's resource tracker
            kids.sort(key=lambda k: "spawn_main" not in open(f"/proc/{{k}}/cmdline").read())
            print("workers", *kids, flush=True)
            {then}
    index_model({model!r}, {db!r}, name="m", k=5, n_pairs=12, progress=park)
    print("finished", flush=True)
""")


def _start_parked(model: Path, db: Path, then: str, **popen) -> tuple[subprocess.Popen, list[int]]:
    """Run the parked build as a script file (``python build.py``, as a user would); once it is
    parked, its top level has run once: in the build's process, not again in each worker."""
    script, starts = db.parent / "build.py", db.parent / "starts.txt"
    script.write_text(_PARKED.format(repo=str(ROOT), model=str(model), db=str(db), then=then, starts=str(starts)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)
    if not select.select([proc.stdout], [], [], 120)[0]:
        proc.kill()
        pytest.fail("the build did not park within 120 s")
    line = proc.stdout.readline()
    assert line.startswith("workers"), (line, proc.stderr.read() if proc.poll() is not None else "")
    workers = [int(p) for p in line.split()[1:]]
    assert len(workers) == 3  # two workers and the resource tracker
    assert starts.read_text().split() == [str(proc.pid)]
    return proc, workers


def test_a_sigkilled_build_leaves_no_circuit_worker(tmp_path, model):
    proc, workers = _start_parked(model, tmp_path / "db", "time.sleep(120)")
    assert not any(_gone(p) for p in workers)
    proc.kill()
    proc.wait()
    # PR_SET_PDEATHSIG: the kernel kills them with their parent; nothing else would (they wait on a pipe).
    assert _wait_gone(workers) == []


def test_a_killed_worker_fails_the_build_in_one_line_and_keeps_what_was_written(tmp_path, model, monkeypatch):
    proc, workers = _start_parked(model, tmp_path / "db", "os.kill(kids[0], 9); time.sleep(1)")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "finished" not in out
    last = err.strip().splitlines()[-1]
    assert "circuit worker process ended before its circuit did" in last, err
    assert _wait_gone(workers) == []
    # Layer 0 was recorded complete before the kill: the same build resumes and finishes (on the
    # circuit threads: what is resumed does not depend on where circuits run, and no second spawn).
    from indexer.build import index_model

    monkeypatch.setenv("ZEROPASS_CIRCUIT_WORKERS", "threads")
    said = []
    index_model(str(model), tmp_path / "db", name="m", k=5, n_pairs=12, progress=said.append)
    assert any("resuming the unfinished build" in m for m in said)


def test_ctrl_c_stops_the_build_and_its_workers(tmp_path, model):
    # The real command would do the same; a script parks it where the workers are alive, in a
    # process group of its own, as a terminal's foreground job is.
    proc, workers = _start_parked(model, tmp_path / "db", "time.sleep(120)", start_new_session=True)
    assert not any(_gone(p) for p in workers)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group, workers included
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "finished" not in out
    # A bare script's own traceback (the CLI turns it into one line), and nothing else went wrong.
    assert err.strip().splitlines()[-1] == "KeyboardInterrupt", err
    assert _wait_gone(workers) == []


def test_a_bad_workers_setting_is_one_error_line(tmp_path, model):
    r = invoke_cli("index", model, "--db", tmp_path / "db", "--name", "m", "--k", "5", "--pairs", "12",
                   env={"ZEROPASS_CIRCUIT_WORKERS": "fork"})
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "ZEROPASS_CIRCUIT_WORKERS must be auto, threads or processes" in lines[0]
