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
import sys
from pathlib import Path
from typing import Callable

import pytest

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

