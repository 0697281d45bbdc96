"""`zeropass merge`: datasets built apart become one; layer shards become one complete model.

Real tiny models indexed for real, real files, a real SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from schemas import TABLES  # noqa: E402
from schemas.layout import read_manifest, table_files  # noqa: E402
from tests.dataset_helpers import ROOT, assert_same_model, cli_argv, invoke_cli, table_rows  # noqa: E402

# merge and check in this process (same exit codes and Error: lines); the SIGKILL test starts a real one.
zp = invoke_cli


def build_sources(tmp):
    """Three tiny GPT-2 checkpoints and five datasets of them: whole, two layer shards, others."""
    from indexer.build import index_model
    from tests.tiny_models import save_tiny

    g = save_tiny("gpt2", tmp / "ckpt-g", seed=1)
    other = save_tiny("gpt2", tmp / "ckpt-other", seed=2)
    h = save_tiny("gpt2", tmp / "ckpt-h", seed=3)
    kw = dict(k=5, n_pairs=6, progress=None)
    index_model(str(g), tmp / "full", name="g", **kw)
    index_model(str(g), tmp / "shard0", name="g", layers="0-0", **kw)
    index_model(str(g), tmp / "shard1", name="g", layers="1-1", **kw)
    index_model(str(other), tmp / "other", name="g", **kw)
    index_model(str(h), tmp / "h", name="h", **kw)
    return tmp


@pytest.fixture(scope="module")
def built(tmp_path_factory, prebuilt):
    # built once per run (xdist workers share it), copied here
    return prebuilt(build_sources, tmp_path_factory.mktemp("merge") / "built")


def test_layer_shards_merge_into_the_one_machine_build(built, tmp_path):
    out = tmp_path / "merged"
    r = zp("merge", built / "shard0", built / "shard1", "--into", out)
    assert r.returncode == 0, r.stderr
    assert "assembled from 2 layer shards" in r.stderr
    assert_same_model(out, built / "full", "g")
    # the rebuilt vectors_by_token holds every vector row of both shards, in token order
    assert len(table_rows(out, "vectors_by_token", "g")) == len(table_rows(built / "full", "vectors", "g"))
    # the merged dataset verifies: every file's sha256 as recorded, catalog current
    c = zp("check", "--db", out)
    assert c.returncode == 0, c.stdout + c.stderr
    # merging the other way round, or again into the result, changes nothing
    before = (out / "manifest.json").read_bytes()
    r = zp("merge", built / "shard1", built / "full", "--into", out)
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").read_bytes() == before


def test_odd_paths(built, tmp_path):
    """DuckDB reads * ? [ as globs and commas in lists: the re-sort of vectors_by_token must not."""
    import shutil

    odd = tmp_path / "a*b,c'[1]é"
    shutil.copytree(built / "shard0", odd / "src 0")
    r = zp("merge", odd / "src 0", built / "shard1", "--into", odd / "in*to")
    assert r.returncode == 0, r.stderr
    assert_same_model(odd / "in*to", built / "full", "g")


def test_shard_into_a_target_that_holds_the_other_shard(built, tmp_path):
    import shutil

    out = tmp_path / "t"
    shutil.copytree(built / "shard0", out)
    r = zp("merge", built / "shard1", "--into", out)
    assert r.returncode == 0, r.stderr
    assert_same_model(out, built / "full", "g")
    assert zp("check", "--db", out).returncode == 0
    # the superseded models row / vectors_by_token of the old shard are gone from disk
    listed = {f for e in read_manifest(out)["models"].values() for fs in e["files"].values() for f in fs}
    on_disk = {p.relative_to(out).as_posix() for t in TABLES for p in (out / t).rglob("*.parquet")} if out.exists() else set()
    assert on_disk - listed - {f for v in read_manifest(out)["vocabularies"].values() for f in v["files"]} == set()


def test_family_merge_shares_tokens_and_keeps_alignments(built, tmp_path):
    import shutil

    a = tmp_path / "a"
    shutil.copytree(built / "full", a)
    shutil.copytree(built / "h", a.with_name("hh"))
    hh = a.with_name("hh")
    # an alignment built in a dataset that holds both models travels with them
    r = zp("merge", hh, "--into", a)
    assert r.returncode == 0, r.stderr
    assert zp("align", "g", "h", "--db", a, "--quiet").returncode == 0
    out = tmp_path / "out"
    r = zp("merge", a, "--into", out)
    assert r.returncode == 0, r.stderr
    m = read_manifest(out)
    assert sorted(m["models"]) == ["g", "h"]
    assert len(m["vocabularies"]) == 1  # one shared vocabulary, stored once
    assert list(m["alignments"]) == ["g|h"]
    assert table_rows(out, "alignments") == table_rows(a, "alignments")
    for model in ("g", "h"):
        assert_same_model(out, a, model)
    assert zp("check", "--db", out).returncode == 0


def test_same_name_other_weights_is_refused_in_one_line(built, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(built / "full", out)
    before = {p: p.read_bytes() for p in (out / "manifest.json", out / "catalog.duckdb")}
    r = zp("merge", built / "other", "--into", out)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: model 'g'") and "other weights" in r.stderr
    assert all(p.read_bytes() == b for p, b in before.items())
    # two sources disagreeing is refused too, before anything is written
    r = zp("merge", built / "shard0", built / "other", "--into", tmp_path / "new")
    assert r.returncode == 1 and "other weights" in r.stderr
    assert not (tmp_path / "new" / "vectors").exists()


def test_same_name_other_settings_is_refused(built, tmp_path):
    from indexer.build import index_model

    index_model(str(built / "ckpt-g"), tmp_path / "k7", name="g", k=7, n_pairs=6, progress=None)
    r = zp("merge", built / "full", tmp_path / "k7", "--into", tmp_path / "out")
    assert r.returncode == 1 and "other settings" in r.stderr and "k" in r.stderr


@pytest.mark.parametrize("case", ["missing", "not-a-dataset", "itself", "damaged-file", "manifest-junk"])
def test_bad_sources_one_line_and_target_untouched(built, tmp_path, case):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(built / "h", out)
    before = {p: p.read_bytes() for p in (out / "manifest.json", out / "catalog.duckdb")}
    src = tmp_path / "src"
    if case == "missing":
        pass
    elif case == "not-a-dataset":
        src.mkdir()
        (src / "notes.txt").write_text("x")
    elif case == "itself":
        src = out
    elif case == "damaged-file":
        shutil.copytree(built / "full", src)
        f = src / read_manifest(src)["models"]["g"]["files"]["vectors"][0]
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif case == "manifest-junk":
        shutil.copytree(built / "full", src)
        (src / "manifest.json").write_text("{not json")
    r = zp("merge", src, "--into", out)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("Error:"), r.stderr
    assert all(p.read_bytes() == b for p, b in before.items())
    # nothing was left behind: the copied files of a failed merge are gone
    listed = set(table_files(read_manifest(out), "vectors"))
    assert {p.relative_to(out).as_posix() for p in (out / "vectors").rglob("*.parquet")} == listed


def test_sigkill_mid_merge_leaves_the_target_as_it_was(built, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(built / "h", out)
    before = {p: p.read_bytes() for p in (out / "manifest.json", out / "catalog.duckdb")}
    listed_before = set(json.loads(before[out / "manifest.json"])["models"])
    proc = subprocess.Popen(cli_argv("merge", built / "shard0", built / "shard1", "--into", out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill as soon as the first copied file is in place: the merge is then mid-way
    deadline = time.time() + 60
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if (out / "vectors" / "model=g").exists():
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    proc.wait()
    assert killed, "the merge finished before it could be killed"
    assert all(p.read_bytes() == b for p, b in before.items())
    assert set(read_manifest(out)["models"]) == listed_before
    # the rerun finishes the job, and the killed run's files are cleaned up
    r = zp("merge", built / "shard0", built / "shard1", "--into", out)
    assert r.returncode == 0, r.stderr
    assert_same_model(out, built / "full", "g")
    assert zp("check", "--db", out).returncode == 0
    listed = set(table_files(read_manifest(out), "vectors"))
    assert {p.relative_to(out).as_posix() for p in (out / "vectors").rglob("*.parquet")} == listed


# -- issue 20: nested datasets, glob characters ----------------------------------------------------

@pytest.mark.parametrize("layout", ["target-inside-source", "source-inside-target"])
def test_a_target_inside_a_source_or_the_reverse_is_refused(built, tmp_path, layout):
    import shutil

    from indexer.merge import MergeError, merge

    outer = tmp_path / "outer"
    shutil.copytree(built / "h", outer)
    before = sorted(p.relative_to(outer) for p in outer.rglob("*"))
    if layout == "target-inside-source":
        src, into, match = outer, outer / "sub", "is inside merge source"
    else:
        shutil.copytree(built / "full", outer / "vectors" / "inner")
        before = sorted(p.relative_to(outer) for p in outer.rglob("*"))
        src, into, match = outer / "vectors" / "inner", outer, "is inside the target"
    with pytest.raises(MergeError, match=match):
        merge([src], into)
    assert sorted(p.relative_to(outer) for p in outer.rglob("*")) == before  # nothing created, nothing copied


def test_a_glob_character_in_a_source_path_is_refused_before_any_copy(built, tmp_path):
    """A listed path with `*` used to leave files literally named `*` in the target."""
    import shutil

    from indexer.merge import MergeError, merge

    src = tmp_path / "src"
    shutil.copytree(built / "full", src)
    manifest = json.loads((src / "manifest.json").read_text())
    files = manifest["models"]["g"]["files"]["vectors"]
    old = files[-1]
    new = old.rsplit("/", 1)[0] + "/*.parquet"
    (src / old).rename(src / new)
    files[-1] = new
    manifest["models"]["g"]["file_info"][new] = manifest["models"]["g"]["file_info"].pop(old)
    (src / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MergeError, match=r"glob character"):
        merge([built / "h", src], tmp_path / "out")
    assert not [p for p in (tmp_path / "out").rglob("*") if any(c in p.name for c in "*?[")]
    assert not list((tmp_path / "out").rglob("*.parquet"))
