"""Datasets read where they are published (query/remote.py): a loopback HTTP server with Range
support that counts the bytes it serves, fsspec's in-memory filesystem, and a local directory.

Every remote answer is compared with the same query on the local copy.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from query import Dataset
from schemas import SCHEMA_VERSION
from query.errors import (DatasetChanged, ForbiddenSQL, NotADataset, RemoteDenied, RemoteUnreachable, SchemaMismatch)
from tests.builders import build_synthetic, build_three
from tests.conftest import ROOT
from tests.dataset_helpers import cli_argv, invoke_cli
from tests.rangeserver import RangeServer

QUERIES = [
    "SELECT * FROM models ORDER BY model",
    "SELECT * FROM tokens ORDER BY vocab_id, token_id",
    "SELECT model, layer, kind, unit, side, rank, token, score FROM vectors ORDER BY ALL",
    "SELECT * FROM pairs ORDER BY ALL",
    "SELECT * FROM heads ORDER BY ALL",
    "SELECT count(*) AS n FROM vectors_by_token",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory, prebuilt):
    """(server, local dataset, its URL): the synthetic dataset behind a loopback HTTP server."""
    base = tmp_path_factory.mktemp("served")
    db = prebuilt(build_synthetic, base / "db")
    (base / "secret.txt").write_text("not yours")
    with RangeServer(base, deny=("/denied",)) as srv:
        yield srv, db, srv.url + "/db"


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def helper_answers(ds) -> dict:
    return {
        "models": ds.models(),
        "heads": ds.heads("paris"),
        "heads_qk": ds.heads("paris", circuit="qk", model="alpha"),
        "neurons": ds.neurons("paris"),
        "neurons_beta": ds.neurons("Paris", model="beta", kind="ff_key", exact=True),
        "tokens": ds.tokens("Paris is big"),
        "similar": ds.similar("alpha", "L0.N1", "beta"),
        **{f"show_{k}": v for k, v in ds.show("alpha", "L1.H0").items()},
        **{f"show_n_{k}": v for k, v in ds.show("gamma", "L0.N0").items()},
    }


# -- 1. every helper and sql equal the local answers -------------------------------------------

def test_http_dataset_answers_equal_local(served, cache):
    srv, db, url = served
    with Dataset(db) as local, Dataset(url, cache_dir=cache) as remote:
        for q in QUERIES:
            assert remote.sql(q).equals(local.sql(q)), q
        want, got = helper_answers(local), helper_answers(remote)
        for key in want:
            assert got[key].equals(want[key]), key
        assert remote.model_names() == local.model_names()


def test_memory_filesystem_dataset(synthetic_db, cache):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(str(synthetic_db), "/zp-test/db", recursive=True)
    try:
        with Dataset(synthetic_db) as local, Dataset("memory://zp-test/db", cache_dir=cache) as remote:
            for q in QUERIES:
                assert remote.sql(q).equals(local.sql(q)), q
            assert remote.neurons("paris").equals(local.neurons("paris"))
    finally:
        fs.rm("/zp-test", recursive=True)


def test_file_url_is_the_local_directory(synthetic_db):
    with Dataset(synthetic_db.as_uri()) as ds:
        assert ds.root == synthetic_db.resolve()
        assert ds.model_names() == ["alpha", "beta", "gamma"]


def test_cli_db_url_and_env(served, cache):
    srv, db, url = served
    run = invoke_cli
    local = run("neurons", "paris", "--format", "json", "--db", str(db))
    remote = run("neurons", "paris", "--format", "json", "--db", url, "--cache-dir", str(cache))
    assert remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout) == json.loads(local.stdout)
    assert list(cache.rglob("*.bin")), "--cache-dir holds the footers"
    import os
    env = dict(os.environ, ZEROPASS_DB=url, ZEROPASS_CACHE=str(cache))
    sql = run("sql", "SELECT count(*) AS n FROM vectors", "--format", "json", env=env)
    assert sql.returncode == 0, sql.stderr
    assert json.loads(sql.stdout) == json.loads(run("sql", "SELECT count(*) AS n FROM vectors", "--format", "json",
                                                    "--db", str(db)).stdout)


# -- the SQL allow-list holds through the remote setup (the attacker's tests) -----------------

@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One metadata cache for the 70 cases below: each opens the dataset again, from the footers the
    first one cached (a cold open fetches every footer: half of each case's time)."""
    return tmp_path_factory.mktemp("shared-cache")


@pytest.mark.parametrize("target", [
    pytest.param("{url}/../secret.txt", id="dotdot-over-http"),
    pytest.param("{root}/secret.txt", id="same-host-other-file"),
    pytest.param("{root}/db/manifest.json", id="same-dataset-unlisted-over-http"),
    pytest.param("http://127.0.0.2:{port}/secret.txt", id="another-host"),
    pytest.param("https://example.com/x", id="https"),
    pytest.param("file:///etc/passwd", id="file-url"),
    pytest.param("/etc/passwd", id="local-path"),
    pytest.param("{db}/manifest.json", id="local-copy-of-the-dataset"),
    pytest.param("zeropass://manifest.json", id="unlisted-through-the-dataset-fs"),
    pytest.param("zeropass://../secret.txt", id="dotdot-through-the-dataset-fs"),
    pytest.param("zeropass://vectors/../../secret.txt", id="nested-dotdot"),
    pytest.param("zeropass://*", id="glob"),
    pytest.param("zeropass://vectors/**/*.parquet", id="recursive-glob"),
    pytest.param("memory://zp/x", id="memory-fs"),
])
@pytest.mark.parametrize("reader", ["read_text", "read_blob", "read_parquet", "read_csv", "glob"])
def test_user_sql_cannot_read_outside_the_listed_files(served, shared_cache, target, reader):
    srv, db, url = served
    cache = shared_cache
    path = target.format(url=url, root=srv.url, port=srv.port, db=db)
    with Dataset(url, cache_dir=cache) as ds:
        srv.reset()
        with pytest.raises(ForbiddenSQL):
            ds.sql(f"SELECT * FROM {reader}('{path}')")
        assert not [r for r in srv.requests if "secret" in r[1] or r[1].endswith("manifest.json")]
        assert ds.sql("SELECT count(*) AS n FROM models").column("n").to_pylist() == [3]  # still works


def test_remote_dataset_is_read_only(served, cache):
    srv, db, url = served
    with Dataset(url, cache_dir=cache) as ds:
        for q in ["COPY models TO 'zeropass://x.parquet'", "ATTACH 'zeropass://x.db'", "INSTALL httpfs", "LOAD httpfs",
                  "SET enable_external_access = true", "SET allowed_directories = ['http://']"]:
            with pytest.raises(ForbiddenSQL):
                ds.sql(q)


# -- 2. bytes read, and the metadata cache -----------------------------------------------------

@pytest.fixture(scope="module")
def three_models(tmp_path_factory, prebuilt):
    """The three-model dataset behind the loopback server."""
    base = tmp_path_factory.mktemp("three")
    db = prebuilt(build_three, base / "db")
    with RangeServer(base) as srv:
        yield srv, db, srv.url + "/db"


def _dataset_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in db.rglob("*.parquet")) + (db / "manifest.json").stat().st_size


def test_one_model_query_reads_under_ten_percent(three_models, cache):
    srv, db, url = three_models
    total = _dataset_bytes(db)
    with Dataset(db) as local:
        want = local.neurons("w123", model="two")
    assert want.num_rows > 0
    srv.reset()
    with Dataset(url, cache_dir=cache) as ds:     # cold: nothing cached
        got = ds.neurons("w123", model="two")
    assert got.equals(want)
    cold = srv.bytes_served
    assert cold < 0.10 * total, f"read {cold:,} of {total:,} bytes"
    # no file of the other models was opened beyond what every open binds (their footers)
    others = [r for r in srv.requests if "model=one/" in r[1] or "model=three/" in r[1]]
    assert all(r[2] is not None for r in others)  # only ranges, never a whole file
    cold_requests = list(srv.requests)
    srv.reset()
    with Dataset(url, cache_dir=cache) as ds:     # warm: footers from the cache
        assert [r[1] for r in srv.requests] == [f"/{db.name}/manifest.json"]  # opening fetched only the manifest
        assert ds.neurons("w123", model="two").equals(want)
    assert srv.bytes_served < cold, (srv.bytes_served, cold)
    # what is fetched again is data (the vocabulary's norm column, the token's row group), never a footer
    assert set(srv.requests) < set(cold_requests)
    assert len(srv.requests) <= len(cold_requests) - 6


def test_cache_is_per_revision_and_can_be_cleared(served, tmp_path):
    srv, db, url = served
    cache = tmp_path / "c"
    with Dataset(url, cache_dir=cache) as ds:
        ds.neurons("paris")
        revision = ds._remote.revision
    assert (cache / next(iter(p.name for p in cache.iterdir() if p.name != "CACHEDIR.TAG")) / revision / "tails").is_dir()
    r = invoke_cli("cache", "clear", "--cache-dir", cache)
    assert r.returncode == 0, r.stderr
    assert "cleared" in r.stderr and not cache.exists()


def test_server_without_range_support_still_answers(synthetic_db, cache):
    with RangeServer(synthetic_db.parent, ignore_range=True) as srv, Dataset(synthetic_db) as local, \
            Dataset(srv.url + "/" + synthetic_db.name, cache_dir=cache) as ds:
        assert ds.neurons("paris").equals(local.neurons("paris"))


# -- 3. one-line errors ------------------------------------------------------------------------

def _cli_error(*args) -> str:
    r = invoke_cli(*args)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def test_unreachable_host(cache):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(RemoteUnreachable, match="cannot reach 127.0.0.1"):
        Dataset(f"http://127.0.0.1:{port}/db", cache_dir=cache)
    assert "cannot reach" in _cli_error("models", "--db", f"http://127.0.0.1:{port}/db")


def test_404_403_and_not_a_dataset(served, cache):
    srv, db, url = served
    with pytest.raises(NotADataset, match="not a zeropass dataset"):
        Dataset(srv.url + "/nothing-here", cache_dir=cache)
    with pytest.raises(RemoteDenied, match="HTTP 403"):
        Dataset(srv.url + "/denied/db", cache_dir=cache)
    assert "HTTP 403" in _cli_error("models", "--db", srv.url + "/denied/db")
    assert "not a zeropass dataset" in _cli_error("models", "--db", srv.url + "/nothing-here")


@pytest.mark.parametrize("content, error", [
    pytest.param(b"<html>hello</html>", NotADataset, id="html"),
    pytest.param(b"\xff\xfe\x00", NotADataset, id="binary"),
    pytest.param(json.dumps({"format": "something-else", "models": {}}).encode(), NotADataset, id="other-format"),
    pytest.param(json.dumps({"format": "zeropass-dataset", "schema_version": 999, "models": {}}).encode(), SchemaMismatch,
                 id="other-schema-version"),
    pytest.param(json.dumps({"format": "zeropass-dataset", "schema_version": SCHEMA_VERSION,
                             "models": {"m": {"files": {"vectors": ["../../secret.txt"]}}}}).encode(), NotADataset,
                 id="path-out-of-the-dataset"),
])
def test_url_that_is_not_a_zeropass_dataset(tmp_path, cache, content, error):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "manifest.json").write_bytes(content)
    with RangeServer(tmp_path) as srv:
        with pytest.raises(error):
            Dataset(srv.url + "/site", cache_dir=cache)
        _cli_error("models", "--db", srv.url + "/site")


def test_dataset_replaced_while_read(tmp_path, prebuilt, cache):
    """A file rewritten in place (not how zeropass publishes) is caught by its size, in one line."""
    db = prebuilt(build_synthetic, tmp_path / "db")
    with RangeServer(tmp_path) as srv, Dataset(srv.url + "/db", cache_dir=cache) as ds:
        manifest = json.loads((db / "manifest.json").read_text())
        rel = manifest["models"]["beta"]["files"]["vectors_by_token"][0]
        (db / rel).write_bytes((db / rel).read_bytes()[:100])
        with pytest.raises((DatasetChanged,)) as e:
            ds.neurons("paris", model="beta")
        assert "changed while it was read" in str(e.value)


def test_republished_dataset_is_followed(tmp_path, prebuilt, cache):
    """Old files gone, a new manifest in place: the reader re-reads the manifest and answers from it."""
    db = prebuilt(build_synthetic, tmp_path / "db")
    with RangeServer(tmp_path) as srv, Dataset(srv.url + "/db", cache_dir=cache) as ds:
        before = ds.sql("SELECT count(*) AS n FROM vectors WHERE model = 'beta'")
        old = json.loads((db / "manifest.json").read_text())
        shutil.rmtree(db)
        build_synthetic(db)  # new build ids, new files, new manifest
        assert json.loads((db / "manifest.json").read_text()) != old
        assert ds.sql("SELECT count(*) AS n FROM vectors WHERE model = 'beta'").equals(before)


# -- 4. publish --------------------------------------------------------------------------------

def _answers(ds) -> dict:
    return {q: ds.sql(q) for q in QUERIES} | {"neurons": ds.neurons("paris"), "heads": ds.heads("paris")}


def _assert_same(a: dict, b: dict) -> None:
    for key in a:
        assert b[key].equals(a[key]), key


def test_publish_to_directory_then_query_it_in_place(tmp_path, prebuilt, cache):
    from indexer.publish import publish_dataset

    db = prebuilt(build_synthetic, tmp_path / "db")
    dest = tmp_path / "www" / "pub"
    dry = publish_dataset(db, str(dest), dry_run=True)
    assert not dest.exists() and dry.upload[-1] == "manifest.json" and not dry.skip
    plan = publish_dataset(db, str(dest))
    assert plan.upload == dry.upload
    assert (dest / "manifest.json").read_bytes() == (db / "manifest.json").read_bytes()  # same revision
    # the manifest was written last
    files = [p for p in dest.rglob("*") if p.is_file()]
    assert max(files, key=lambda p: p.stat().st_mtime_ns).name == "manifest.json"
    with Dataset(db) as local:
        want = _answers(local)
    with Dataset(dest) as ds:
        _assert_same(want, _answers(ds))
    with RangeServer(tmp_path / "www") as srv, Dataset(srv.url + "/pub", cache_dir=cache) as ds:
        _assert_same(want, _answers(ds))
    # again: nothing changed, nothing copied
    again = publish_dataset(db, str(dest))
    assert again.upload == [] and again.upload_bytes == 0 and len(again.skip) == len(plan.upload) - 3


def test_republish_copies_only_what_changed_and_deletes_the_superseded(tmp_path, prebuilt):
    from indexer.publish import publish_dataset
    from tests.builders import PLANTED, SHARED_TOKENS, synthetic_model

    db = prebuilt(build_synthetic, tmp_path / "db")
    dest = tmp_path / "pub"
    publish_dataset(db, str(dest))
    old = json.loads((dest / "manifest.json").read_text())
    synthetic_model(db, "beta", "vshared", SHARED_TOKENS, 22, PLANTED["beta"])  # beta re-indexed: new files
    plan = publish_dataset(db, str(dest))
    beta_old = {f for fs in old["models"]["beta"]["files"].values() for f in fs}
    beta_new = {f for fs in json.loads((db / "manifest.json").read_text())["models"]["beta"]["files"].values() for f in fs}
    assert set(plan.upload) == beta_new | {"README.md", "catalog.duckdb", "manifest.json"}
    assert set(plan.delete) == beta_old
    assert not any((dest / f).exists() for f in beta_old)
    with Dataset(db) as local, Dataset(dest) as pub:
        _assert_same(_answers(local), _answers(pub))


def test_publish_to_memory_filesystem(tmp_path, prebuilt, cache):
    import fsspec

    from indexer.publish import publish_dataset

    db = prebuilt(build_synthetic, tmp_path / "db")
    fs = fsspec.filesystem("memory")
    try:
        publish_dataset(db, "memory://zp-pub/db")
        assert publish_dataset(db, "memory://zp-pub/db").upload == []
        with Dataset(db) as local, Dataset("memory://zp-pub/db", cache_dir=cache) as ds:
            _assert_same(_answers(local), _answers(ds))
    finally:
        fs.rm("/zp-pub", recursive=True)


def test_damaged_file_stops_publish_and_readers_keep_the_old_revision(tmp_path, prebuilt):
    """A file that fails its sha256 stops the publish before the manifest: DEST's readers see no change."""
    from indexer.publish import PublishError, publish_dataset
    from tests.builders import PLANTED, SHARED_TOKENS, synthetic_model

    db = prebuilt(build_synthetic, tmp_path / "db")
    dest = tmp_path / "pub"
    publish_dataset(db, str(dest))
    with Dataset(dest) as ds:
        before = _answers(ds)
    synthetic_model(db, "beta", "vshared", SHARED_TOKENS, 22, PLANTED["beta"])
    manifest = json.loads((db / "manifest.json").read_text())
    rel = manifest["models"]["beta"]["files"]["vectors"][-1]
    data = bytearray((db / rel).read_bytes())
    data[100] ^= 0xFF
    (db / rel).write_bytes(bytes(data))
    with pytest.raises(PublishError, match="sha256"):
        publish_dataset(db, str(dest))
    assert not list(dest.rglob("*.tmp*"))
    with Dataset(dest) as ds:
        _assert_same(before, _answers(ds))
    msg = _cli_error("publish", str(db), str(dest), "--quiet")
    assert "sha256" in msg


def test_publish_errors_are_one_line(tmp_path, prebuilt):
    assert "not a zeropass dataset" in _cli_error("publish", str(tmp_path / "nothing"), str(tmp_path / "d"))
    assert not (tmp_path / "nothing").exists()  # nothing created on the way
    db = prebuilt(build_synthetic, tmp_path / "db")
    assert "DB itself" in _cli_error("publish", str(db), str(db))
    (tmp_path / "blocker").write_text("a file")
    assert "blocker/pub" in _cli_error("publish", str(db), str(tmp_path / "blocker" / "pub"))  # a file where DEST goes
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text("{\"not\": \"ours\"}")
    assert "not a zeropass manifest" in _cli_error("publish", str(db), str(tmp_path / "other"))


def test_publish_cli_dry_run(tmp_path, prebuilt):
    db = prebuilt(build_synthetic, tmp_path / "db")
    r = invoke_cli("publish", db, tmp_path / "pub", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "copy manifest.json" and "would publish" in r.stderr
    assert not (tmp_path / "pub").exists()


# -- 5. the dataset card -----------------------------------------------------------------------

def test_card_configs_load_with_datasets(tmp_path, prebuilt):
    datasets = pytest.importorskip("datasets")
    from indexer.publish import publish_dataset

    db = prebuilt(build_synthetic, tmp_path / "db")
    dest = tmp_path / "pub"
    publish_dataset(db, str(dest))
    card = (dest / "README.md").read_text()
    assert card.startswith("---\nlicense: other\n") and "config_name: vectors" in card and "zeropass heads paris" in card
    with Dataset(dest) as ds:
        for table in ("vectors", "tokens", "models", "pairs"):
            n = ds.sql(f"SELECT count(*) AS n FROM {table}").column("n")[0].as_py()
            loaded = datasets.load_dataset(str(dest), table, split="train", cache_dir=str(tmp_path / "hf-cache"))
            assert loaded.num_rows == n, table


# -- odd places --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    pytest.param("d b", id="space"), pytest.param("a,b'c", id="comma-quote"), pytest.param("db[1]", id="bracket"),
    pytest.param("a*b?", id="glob-chars"), pytest.param("donnée", id="non-ascii"), pytest.param("50%25", id="percent"),
])
def test_odd_dataset_names_over_http(tmp_path, prebuilt, cache, name):
    db = prebuilt(build_synthetic, tmp_path / "site" / name)
    import urllib.parse
    with RangeServer(tmp_path / "site") as srv, Dataset(db) as local:
        # as typed (a URL's '?' starts its query and '%' an escape, so those names only percent-encoded)
        urls = {f"{srv.url}/{urllib.parse.quote(name)}"} | ({f"{srv.url}/{name}"} if not set(name) & set("?%") else set())
        for url in urls:
            with Dataset(url, cache_dir=cache) as ds:
                assert ds.neurons("paris").equals(local.neurons("paris"))


def test_bad_urls_are_one_line(cache):
    assert "not a usable URL" in _cli_error("models", "--db", "http://127.0.0.1:port/db")
    assert "cannot reach" in _cli_error("models", "--db", "http://127.0.0.1:9/a\nb")  # sent as %0A
    assert "install the fsspec filesystem" in _cli_error("models", "--db", "nosuch://x/y")


def test_remote_query_timeout_and_interrupt(three_models, cache):
    """A slow remote query stops on its timeout like a local one (the connection stays usable)."""
    from query.errors import QueryTimeout

    srv, db, url = three_models
    with Dataset(url, cache_dir=cache) as ds:
        with pytest.raises(QueryTimeout):
            ds.sql("SELECT count(*) FROM range(100000000) a, vectors v WHERE a.range % 7 = v.idx", timeout=0.5)
        assert ds.sql("SELECT count(*) AS n FROM models").column("n").to_pylist() == [3]


def test_publish_killed_midway_never_shows_half_a_dataset(three_models, tmp_path, cache):
    """SIGKILL during a publish: DEST has no manifest or a complete dataset; publishing again finishes it."""
    import os
    import signal
    import time

    srv, db, url = three_models
    dest = tmp_path / "pub"
    proc = subprocess.Popen(cli_argv("publish", db, dest), cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()  # "copying ...": the copy is under way
    assert first.startswith("copying"), first
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    with Dataset(db) as local:
        want = local.neurons("w123", model="two")
    if (dest / "manifest.json").exists():   # it finished before the kill: then it is whole
        with Dataset(dest) as ds:
            assert ds.neurons("w123", model="two").equals(want)
    else:
        with pytest.raises(NotADataset):
            Dataset(dest)
    r = invoke_cli("publish", db, dest, "-q")
    assert r.returncode == 0, r.stderr
    assert not [p for p in dest.rglob("*") if ".tmp" in p.name]
    with Dataset(dest) as ds:
        assert ds.neurons("w123", model="two").equals(want)


def test_damaged_published_file_is_one_line(tmp_path, prebuilt, cache):
    """Same size, wrong bytes (a damaged footer on the server): a DamagedFile naming the file; other models answer.

    (Zeroed data pages give DuckDB's "TProtocolException: Invalid data", which names no file, locally too.)
    """
    from query.errors import DamagedFile

    db = prebuilt(build_synthetic, tmp_path / "db")
    rel = json.loads((db / "manifest.json").read_text())["models"]["beta"]["files"]["vectors_by_token"][0]
    data = bytearray((db / rel).read_bytes())
    data[-4:] = b"XXXX"  # the closing magic
    (db / rel).write_bytes(bytes(data))
    with RangeServer(tmp_path) as srv, Dataset(srv.url + "/db", cache_dir=cache) as ds:
        with pytest.raises(DamagedFile, match="published copy is damaged") as e:
            ds.neurons("paris", model="beta")
        assert rel in str(e.value) and "\n" not in str(e.value)
        assert ds.neurons("paris", model="alpha").num_rows > 0


def test_unusable_cache_dir_only_costs_speed(served, tmp_path):
    srv, db, url = served
    (tmp_path / "a-file").write_text("x")
    with Dataset(db) as local, Dataset(url, cache_dir=tmp_path / "a-file" / "cache") as ds:
        assert ds.neurons("paris").equals(local.neurons("paris"))


def test_card_license_and_build_commands(synthetic_db):
    from indexer.card import render_card

    manifest = json.loads((synthetic_db / "manifest.json").read_text())
    assert render_card(synthetic_db, manifest).startswith("---\nlicense: other\n")
    for entry in manifest["models"].values():
        entry["license"] = "MIT"
    entry["rebuild"] = ["index", "./my model", "--name", "gamma"]
    card = render_card(synthetic_db, manifest, url="https://example.org/db")
    assert card.startswith("---\nlicense: mit\n")
    assert "zeropass index './my model' --name gamma --db DB" in card
    assert "zeropass heads paris --db https://example.org/db" in card
    manifest["models"]["alpha"]["license"] = "apache-2.0"  # mixed: other, each model's named in the table
    card = render_card(synthetic_db, manifest)
    assert card.startswith("---\nlicense: other\n") and "| apache-2.0 |" in card


def test_huge_manifest_is_not_read_whole(tmp_path, cache, monkeypatch):
    import query.remote

    monkeypatch.setattr(query.remote, "MANIFEST_MAX", 1000)  # stands for 64 MB
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "manifest.json").write_bytes(b" " * 5000)
    with RangeServer(tmp_path) as srv:
        with pytest.raises(NotADataset, match="larger than"):
            Dataset(srv.url + "/site", cache_dir=cache)


def test_hostile_file_info_sizes(tmp_path, prebuilt, cache):
    """Sizes in an untrusted manifest that are not counts are ignored (the server's size is used)."""
    db = prebuilt(build_synthetic, tmp_path / "db")
    manifest = json.loads((db / "manifest.json").read_text())
    for i, info in enumerate(manifest["models"]["alpha"]["file_info"].values()):
        info["bytes"] = [True, -5, "12", None, 1.5][i % 5]
    (db / "manifest.json").write_text(json.dumps(manifest))
    with RangeServer(tmp_path) as srv, Dataset(db) as local, Dataset(srv.url + "/db", cache_dir=cache) as ds:
        assert ds.neurons("paris").equals(local.neurons("paris"))


def test_refused_read_does_not_color_the_next_error(served, cache):
    """A refused path, then a plain syntax error: the second is reported as itself."""
    from query.errors import BadSQL

    srv, db, url = served
    with Dataset(url, cache_dir=cache) as ds:
        with pytest.raises(ForbiddenSQL):
            ds.sql("SELECT * FROM read_text('zeropass://manifest.json')")
        with pytest.raises(BadSQL):
            ds.sql("SELECT * FROM models WHERE nosuchcolumn = 1")


@pytest.mark.parametrize("args", [
    pytest.param(["index", "./some-model"], id="index"), pytest.param(["diff", "a", "b"], id="diff"),
    pytest.param(["align", "a", "b"], id="align"), pytest.param(["check"], id="check"),
])
def test_writing_commands_refuse_a_url_db(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)  # where a relative "http:" directory would be made
    r = invoke_cli(*args, "--db", "http://127.0.0.1:9/db")  # in this process: no interpreter start per command
    assert r.returncode == 1 and r.stderr.startswith("Error: ") and "read-only" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []  # no "http:" directory made on the way


def test_host_gone_mid_session_is_one_line(tmp_path, prebuilt, cache):
    db = prebuilt(build_synthetic, tmp_path / "db")
    srv = RangeServer(tmp_path).__enter__()
    ds = Dataset(srv.url + "/db", cache_dir=cache)
    try:
        srv.__exit__(None, None, None)  # the host goes away; the pairs rows were never read
        with pytest.raises(RemoteUnreachable, match="cannot reach 127.0.0.1"):
            ds.sql("SELECT * FROM pairs")
    finally:
        ds.close()
