"""`zeropass index --profile`: every phase named, and its seconds add up to the wall time."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from indexer import profile
from tests.dataset_helpers import invoke_cli

pytest.importorskip("transformers")

# The phases a tiny decoder's build goes through (no fold: raw variant; "other" is what no hook claims).
BUILD_PHASES = ["load/dequantise", "canonicalise and fold", "vector GEMMs", "top-k selection", "vector tables",
                "circuit factors", "circuit basis and layout", "screening", "exact rescoring", "head metrics",
                "head tables", "parquet writes", "by-token sort", "commit"]


def _table(stderr: str) -> dict[str, float]:
    rows = {}
    for line in stderr.splitlines():
        m = re.match(r"^(\S.*?)\s+(\d+\.\d\d)\s+\d+\.\d%", line)
        if m:
            rows[m.group(1)] = float(m.group(2))
    return rows


def _background(stderr: str) -> dict[str, str]:
    """Phases run on other threads (the circuit workers): name -> the rest of the line."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^(\S.*?) \(background\)\s+(.*)$", stderr, flags=re.M)}


def test_profile_names_every_phase_and_adds_up_to_the_wall_time(tmp_path):
    from tests.tiny_models import save_tiny

    path = save_tiny("llama-gqa", tmp_path / "m")
    t = time.perf_counter()
    r = invoke_cli("index", path, "--db", tmp_path / "db", "--name", "m", "--k", "5", "--pairs", "10",
                   "--profile", "--quiet")
    outside = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    rows, background = _table(r.stderr), _background(r.stderr)
    # The circuits run on the workers while the main thread builds factors: there, or here.
    assert set(BUILD_PHASES) <= set(rows) | set(background), r.stderr
    assert {"screening", "exact rescoring"} <= set(background), r.stderr
    wall = float(re.search(r"profile: ([0-9.]+) s wall", r.stderr).group(1))
    # The phases are exclusive and "other" takes the rest: they sum to the wall time, which is
    # the build's share of the command (the rates are measured after it).
    assert rows["sum"] == pytest.approx(wall, abs=0.02)
    assert sum(v for k, v in rows.items() if k != "sum") == pytest.approx(wall, abs=0.05)
    assert wall <= outside
    # Every GEMM phase has its floor and ratio; layers 0 and 1 have a line of their own.
    for name in ("vector GEMMs", "circuit factors"):
        line = next(x for x in r.stderr.splitlines() if x.startswith(name))
        assert len(line.split()) - len(name.split()) == 6, line
    for name in ("screening", "exact rescoring"):  # thread seconds, GFLOP, floor, ratio
        assert len(background[name].split()) == 4, background[name]
    assert re.search(r"^\s+0 .*\n\s+1 ", r.stderr, flags=re.M), r.stderr


def test_phase_is_a_shared_no_op_without_a_profile():
    assert profile.phase("screening", flops=1e9) is profile.phase("vector GEMMs")
    with profile.phase("screening"):
        pass
    profile.add_flops("screening", 1.0, "bf16")
    profile.set_layer(3)  # nothing runs: nothing recorded, nothing raised


def test_nested_phases_are_exclusive():
    with profile.profiling(True, report=None) as prof:
        with profile.phase("commit"):
            time.sleep(0.05)
            with profile.phase("by-token sort"):
                time.sleep(0.1)
    totals = prof.by_phase()
    assert totals["by-token sort"] == pytest.approx(0.1, abs=0.05)
    assert totals["commit"] == pytest.approx(0.05, abs=0.04)
    assert sum(totals.values()) == pytest.approx(prof.wall, abs=1e-6)


def test_two_circuits_at_once_build_the_tables_of_one_at_a_time(tmp_path, monkeypatch):
    # The build runs a head's QK circuit on a second thread while its OV runs: every table, in
    # file order, must be what one circuit at a time gives (GQA: heads share a kv head's factors).
    from concurrent.futures import Future

    import indexer.kernels.pairs as pairs
    from indexer.build import index_model
    from tests.test_index import _contents
    from tests.tiny_models import save_tiny

    path = save_tiny("llama-gqa", tmp_path / "m")
    index_model(str(path), tmp_path / "at_once", name="m", k=5, n_pairs=12, progress=None)

    def one_at_a_time(*args, **kw):
        done = Future()
        done.set_result(pairs.top_pairs(*args, **kw))
        return done

    monkeypatch.setattr(pairs, "submit_top_pairs", one_at_a_time)
    index_model(str(path), tmp_path / "in_turn", name="m", k=5, n_pairs=12, progress=None)
    assert _contents(tmp_path / "at_once") == _contents(tmp_path / "in_turn")


def test_one_head_in_flight_builds_the_tables_of_two(tmp_path, monkeypatch):
    # Where a head's factors are large (7B shapes) one head is in flight instead of two, and each
    # factor is built in a pass of its own (_FACTOR_BYTES): the same tables.
    from indexer.build import _ModelWriter, index_model
    from tests.test_index import _contents
    from tests.tiny_models import save_tiny

    path = save_tiny("llama-gqa", tmp_path / "m")
    index_model(str(path), tmp_path / "two", name="m", k=5, n_pairs=12, progress=None)
    monkeypatch.setattr(_ModelWriter, "_PIPELINE_BYTES", 0)
    monkeypatch.setattr(_ModelWriter, "_FACTOR_BYTES", 0)
    index_model(str(path), tmp_path / "one", name="m", k=5, n_pairs=12, progress=None)
    assert _contents(tmp_path / "two") == _contents(tmp_path / "one")


@pytest.mark.parametrize("family", ["llama-gqa", "phi3"])  # phi3: gate and up fused in one tensor
def test_the_mlp_is_freed_before_the_heads_circuits_run(tmp_path, monkeypatch, family):
    # A layer's peak is reached in its circuits (Llama-2-7B shapes, docs/BENCHMARKS.md §11): the
    # MLP's weights, which the heads never read, must be gone by then, not merely unused.
    import gc
    import weakref

    from indexer.build import _ModelWriter, index_model
    from tests.tiny_models import save_tiny

    mlp_refs, seen = [], []
    vectors, heads = _ModelWriter.vectors, _ModelWriter._heads

    def vectors_noting_the_mlp(self, l, lw):
        mlp_refs.extend(weakref.ref(t) for t in (lw.W_in, lw.W_out, lw.W_gate) if t is not None)
        return vectors(self, l, lw)

    def heads_checking(self, l, lw, **options):
        gc.collect()
        seen.append((lw.W_in, lw.W_out, lw.W_gate, [r() is None for r in mlp_refs]))
        return heads(self, l, lw, **options)

    monkeypatch.setattr(_ModelWriter, "vectors", vectors_noting_the_mlp)
    monkeypatch.setattr(_ModelWriter, "_heads", heads_checking)
    index_model(str(save_tiny(family, tmp_path / "m")), tmp_path / "db", name="m", k=5, n_pairs=12, progress=None)
    assert len(seen) == 2 and len(mlp_refs) == 6  # two layers, gated MLPs
    assert all(w_in is None and w_out is None and w_gate is None and all(freed)
               for w_in, w_out, w_gate, freed in seen)


_FREED_BLOCK_MB = """
import ctypes, os, sys
if sys.argv[1] == "indexer":
    import indexer  # noqa: F401  (its allocator settings, indexer/__init__.py)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
MB = 1 << 20
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def touched(n):
    p = libc.malloc(n); ctypes.memset(p, 1, n); return p
libc.free(touched(20 * MB))  # glibc's default threshold now moves up to 20 MB
block = touched(5 * MB)
pin = touched(256 * 1024)  # above the block in the heap: its top can't be trimmed back past it
before = rss(); libc.free(block); print((before - rss()) / MB)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("imports, env, returned", [
    ("indexer", {}, True),  # a 5 MB block has a mapping of its own: freed, it leaves the resident set
    ("nothing", {}, False),  # glibc's default: it stays in the heap, resident
    ("indexer", {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**20)}, False),  # the user's setting wins
])
def test_indexer_hands_freed_large_blocks_back(imports, env, returned):
    # Memory-first builds (Llama-2-7B shapes) crept 0.7-0.9 GB through a layer's circuits on
    # heap blocks that stayed resident once freed (docs/BENCHMARKS.md §11, eighth round).
    run = subprocess.run([sys.executable, "-c", _FREED_BLOCK_MB, imports], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env, check=True)
    assert (float(run.stdout) >= 4.9) is returned, run.stdout


def test_make_bench_keeps_the_hand_written_sections_of_benchmarks_md():
    # `make bench` regenerates docs/BENCHMARKS.md; the sections it does not rerun (issue 24's
    # profiles, the cluster run) must survive it, in their place, while its own sections are new.
    from benchmarks.run_all import with_hand_written

    old = ("# Benchmarks\n\nold preamble\n\n## 1. Vectors\n\nold 1\n\n## 5. Query\n\nold 5\n\n"
           "## 5b. HTTP (written by hand from bench_remote)\n\nhand 5b\n\n## 6. Align\n\nold 6\n\n"
           "## 11. Profiles (written by hand: make bench does not rerun it)\n\nhand 11\n### Second round\n\nmore 11\n")
    new = "# Benchmarks\n\nnew preamble\n\n## 1. Vectors\n\nnew 1\n\n## 5. Query\n\nnew 5\n\n## 6. Align\n\nnew 6\n"
    page = with_hand_written(new, old)
    assert "old" not in page
    order = [page.index(x) for x in ("new preamble", "new 1", "new 5", "hand 5b", "new 6", "hand 11", "more 11")]
    assert order == sorted(order)
    assert with_hand_written(new, page) == page  # a second run changes nothing
    # The real page: every hand-written section survives a page that has none.
    real = (Path(__file__).parent.parent / "docs" / "BENCHMARKS.md").read_text()
    kept = with_hand_written("# Benchmarks\n", real)
    hand = [line for line in real.splitlines() if line.startswith("## ") and "written by hand" in line]
    assert len(hand) >= 4 and all(line in kept.splitlines() for line in hand)


def test_compare_builds_tells_an_identical_build_from_another(tmp_path, capsys):
    # benchmarks/compare_builds.py is how docs/BENCHMARKS.md §11 shows a faster build's tables are
    # today's: it must see two builds of the same settings as the same, and other lists as different.
    from benchmarks.compare_builds import compare
    from indexer.build import index_model
    from tests.tiny_models import save_tiny

    path = save_tiny("llama-gqa", tmp_path / "m")
    for db, pairs in (("a", 12), ("b", 12), ("c", 10)):
        index_model(str(path), tmp_path / db, name="m", k=5, n_pairs=pairs, progress=None)
    assert compare(tmp_path / "a", tmp_path / "b")
    assert not compare(tmp_path / "a", tmp_path / "c")
    assert "pairs " in capsys.readouterr().out


def test_ab_pairs_loads_an_older_kernel_that_agrees_with_todays():
    # benchmarks/ab_pairs.py is how docs/BENCHMARKS.md §11 measures a kernel change: the kernel it
    # loads from git must be a working top_pairs of its own (not today's module under another name).
    # (From the file's text: `old_kernel` adds only `git show REV:...`, and CI may have no git.)
    import torch

    import indexer.kernels.pairs as today
    from benchmarks.ab_pairs import kernel_from_source
    from benchmarks.bench_pairs import same

    old = kernel_from_source(Path(today.__file__).read_text())
    assert old is not today and old.top_pairs is not today.top_pairs
    A, B = torch.randn(2, 700, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert same(old.top_pairs(A, B, n=20, k=5), today.top_pairs(A, B, n=20, k=5))
