"""Shared session fixtures: datasets built once and shared by the query and CLI tests
(datasette's make_app_client pattern). What they hold is built by tests/builders.py (public,
shared with benchmarks/).

* ``synthetic_db``: ``builders.build_synthetic``, three models with hand-planted rows (no torch);
  ``builders.PLANTED`` says where the known answers are.
* ``tiny_db``: ``builders.build_tiny``, real tiny random models indexed with
  ``indexer.build.index_model`` (a GPT-2 whose head L1.H2 copies ``Paris``, and a BERT sharing
  its vocabulary). Skipped when the indexer cannot run here.
* ``prebuilt``: ``prebuilt(builder, dst)`` copies what ``builder`` wrote once per test run, shared by
  pytest-xdist's workers; both datasets above come from it (docs/TESTING.md).
"""
from __future__ import annotations

import fcntl
import gc
import hashlib
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable

import pytest

# Several tests send Ctrl-C (SIGINT) to a child process and check its one-line answer. A suite
# started where SIGINT is ignored (a background job of a shell without job control: `make test &`
# in a script) hands that ignored SIGINT to every child, which then never answers: those tests
# hung until their timeouts (seen in this repository's own CI runs started that way). The
# suite's processes take the default Ctrl-C again, so the children do too.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Fewer cyclic garbage collections: collecting the suite imports torch, transformers and the test
# modules (millions of long-lived objects); at the default threshold of 700 allocations a worker ran
# ~1,700 collections (2 s of CPU) before its first test, and spent ~2% of its test time in them after.
# At 10,000: ~90 collections, the same peak RSS (measured on the heaviest files, including the
# in-process memory bounds of test_read_hostile and test_serve_limits). No test depends on when
# cyclic garbage is collected (a Dataset's temporary directory has a weakref.finalize; tests close
# their datasets). Set before the first heavy import.
gc.set_threshold(10_000, 10, 10)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.builders import build_synthetic, build_tiny  # noqa: E402  (pure Python, no torch)

# Under pytest-xdist two workers share the machine's cores: torch's intra-op threads (one per core
# by default, in each worker and each CLI subprocess) would only contend on these tiny matrices.
# Set before any test module imports torch; subprocesses inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# -- the order files are handed to pytest-xdist's workers ----------------------------------------

# Seconds each of the slowest files took in a full run on the 2-core machine (`make test`,
# --durations=0, summed per file; 2026-12-03). `make test` hands whole files to two workers
# (--dist loadfile) in collection order (--no-loadscope-reorder), and a worker takes the next file
# when it is nearly done: longest first leaves the shortest files for the end, where they fill the
# gap between the two workers (a schedule of the measured times: 196 s of the longer worker's time
# in xdist's own order, by number of tests, against 182 s longest first; the ideal split is 182 s).
# A stale figure only costs time; a file not listed runs after these, in its usual order.
_SLOW_FILES = {
    "test_index_many.py": 41.7, "test_dataset_hostile.py": 35.8, "test_index.py": 35.7,
    "test_sql_hostile.py": 33.8, "test_serve.py": 31.5, "test_circuit_processes.py": 30.1,
    "test_remote.py": 23.9, "test_compact.py": 20.8, "test_build_hostile.py": 10.5,
    "test_read_hostile.py": 10.2, "test_query.py": 8.7, "test_merge.py": 8.7, "test_adapters.py": 8.5,
    "test_dictionaries.py": 8.0, "test_serve_limits.py": 7.8, "test_profile.py": 7.0,
}


def pytest_collection_modifyitems(items) -> None:
    """Slowest files first (``_SLOW_FILES``); within a file, tests keep their order."""
    items.sort(key=lambda item: -_SLOW_FILES.get(item.path.name, 0.0))  # stable: file order otherwise kept


# -- built once per run, copied per user -------------------------------------------------------

def _run_base(tmp_path_factory) -> Path:
    """A directory shared by every process of this test run: under pytest-xdist each worker has its
    own base temp (``.../pytest-N/popen-gw0``) inside the run's; without xdist the base is the run's."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def prebuilt(tmp_path_factory) -> Callable[..., Path]:
    """``prebuilt(builder, dst, *args)``: a copy at ``dst`` of what ``builder(path, *args)`` writes.

    The builder runs once per test run, whichever xdist worker asks first (the others wait on a file
    lock), into a directory keyed by the builder and its arguments; every caller gets its own copy,
    free to damage. A copy has the build's ids and timestamps: a test that needs a fresh build (new
    build ids, a rebuild over an old one) calls the builder itself.
    """
    root = _run_base(tmp_path_factory) / "prebuilt"
    root.mkdir(exist_ok=True)

    def copy(builder: Callable[..., object], dst: Path, *args) -> Path:
        key = hashlib.sha256(repr((builder.__module__, builder.__qualname__, args)).encode()).hexdigest()[:16]
        src = root / key
        with open(root / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (src / ".done").exists():
                shutil.rmtree(src, ignore_errors=True)  # a worker that died mid-build
                src.mkdir()
                builder(src / "out", *args)
                (src / ".done").touch()
        shutil.copytree(src / "out", dst, symlinks=True)
        return dst

    return copy


@pytest.fixture(scope="session")
def synthetic_db(tmp_path_factory, prebuilt) -> Path:
    return prebuilt(build_synthetic, tmp_path_factory.mktemp("synthetic") / "db")


@pytest.fixture(scope="session")
def ds(synthetic_db):
    from query import Dataset

    d = Dataset(synthetic_db)
    yield d
    d.close()



@pytest.fixture
def synthetic_cli(synthetic_db):
    """``synthetic_cli(*args)``: the CLI in this process over ``synthetic_db`` (wide terminal, exceptions raised)."""
    from click.testing import CliRunner

    from cli import cli

    def run(*args):
        return CliRunner().invoke(cli, list(args) + ["--db", str(synthetic_db)], env={"COLUMNS": "200"},
                                  catch_exceptions=False)
    return run


# -- real tiny models --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_db(tmp_path_factory, prebuilt) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return prebuilt(build_tiny, tmp_path_factory.mktemp("tiny") / "tiny") / "db"


# -- a real small filesystem -------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MB filesystem (tmpfs), so a write runs out of space for real (needs root)."""
    import subprocess

    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the full-disk test needs root")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)

