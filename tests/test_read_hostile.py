"""The read side's hardening (issue 20): odd values in every output format, damaged files found
when they are read, hostile and broken servers, and a cache that deletes only what it wrote.

Each test failed on the code before its fix (the commit that adds it says which case it is).
"""
from __future__ import annotations

import csv
import io
import json

import pandas as pd
import pytest
from click.testing import CliRunner

from cli import cli


# -- output: every value renders, losslessly ---------------------------------------------------

def test_csv_quotes_a_carriage_return(synthetic_cli):
    r = synthetic_cli("sql", "SELECT 'a' || chr(13) || 'b' AS v, 1 AS n UNION ALL SELECT 'c', 2 ORDER BY n", "--format", "csv")
    assert r.exit_code == 0
    assert r.stdout == 'v,n\n"a\rb",1\nc,2\n'
    df = pd.read_csv(io.StringIO(r.stdout))
    assert df.v.tolist() == ["a\rb", "c"] and df.n.tolist() == [1, 2]
    assert list(csv.reader(io.StringIO(r.stdout, newline=""))) == [["v", "n"], ["a\rb", "1"], ["c", "2"]]


NONFINITE = "SELECT 'nan'::DOUBLE AS a, 'inf'::DOUBLE AS b, '-inf'::FLOAT AS c, 1.5::DOUBLE AS d, [ 'inf'::DOUBLE ] AS l"


def test_non_finite_numbers_are_written_as_named_strings(synthetic_cli):
    r = synthetic_cli("sql", NONFINITE, "--format", "json")
    assert r.exit_code == 0
    (row,) = json.loads(r.stdout)
    assert row == {"a": "NaN", "b": "Infinity", "c": "-Infinity", "d": 1.5, "l": ["Infinity"]}
    r = synthetic_cli("sql", NONFINITE, "--format", "csv")
    assert r.stdout.splitlines()[1] == 'NaN,Infinity,-Infinity,1.5,"[""Infinity""]"'
    df = pd.read_csv(io.StringIO(r.stdout))
    import math
    assert math.isnan(df.a[0]) and df.b[0] == float("inf") and df.c[0] == float("-inf")


ODD_TIMES = ("SELECT 'infinity'::TIMESTAMP AS a, DATE '-infinity' AS b, TIMESTAMP '10000-01-02 03:04:05.5' AS c, "
             "DATE '12345-06-07' AS d, '-infinity'::TIMESTAMPTZ AS e, [DATE 'infinity', DATE '2024-01-01'] AS f, "
             "{'t': 'infinity'::TIMESTAMP} AS g, DATE '2024-02-29' AS h, TIMESTAMP '0001-01-01' AS i, "
             "'infinity'::TIMESTAMP_S AS j, TIMESTAMP_MS '20000-01-01 00:00:00.25' AS k")


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_every_timestamp_duckdb_holds_renders(synthetic_cli, fmt):
    r = synthetic_cli("sql", ODD_TIMES, "--format", fmt)
    assert r.exit_code == 0, r.stderr
    if fmt == "json":
        (row,) = json.loads(r.stdout)
        assert row == {"a": "infinity", "b": "-infinity", "c": "+10000-01-02T03:04:05.500000", "d": "+12345-06-07",
                       "e": "-infinity", "f": ["infinity", "2024-01-01"], "g": {"t": "infinity"}, "h": "2024-02-29",
                       "i": "0001-01-01T00:00:00", "j": "infinity", "k": "+20000-01-01T00:00:00.250000"}
    elif fmt == "csv":
        assert r.stdout.splitlines()[1].startswith("infinity,-infinity,+10000-01-02T03:04:05.500000,+12345-06-07,-infinity,")
    else:
        assert "infinity" in r.stdout and "+12345-06-07" in r.stdout


# -- hostile and broken servers ----------------------------------------------------------------

import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from query import Dataset  # noqa: E402
from query.errors import DatasetChanged, ForbiddenSQL, QueryTimeout, RemoteUnreachable  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.dataset_helpers import invoke_cli  # noqa: E402
from tests.rangeserver import RangeServer  # noqa: E402


def _cli(*args, timeout=60):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=timeout)
    return r, time.monotonic() - t0


def test_a_trickling_server_meets_the_open_deadline(synthetic_db, tmp_path):
    with RangeServer(synthetic_db.parent, hostile="trickle", trickle_s=0.05) as srv:
        url = f"{srv.url}/{synthetic_db.name}"
        t0 = time.monotonic()
        with pytest.raises(QueryTimeout, match="127.0.0.1") as e:
            Dataset(url, cache_dir=tmp_path / "c", timeout=1)
        assert time.monotonic() - t0 < 3 and "\n" not in str(e.value)


def test_a_trickling_server_meets_the_default_deadline(synthetic_db, tmp_path, monkeypatch):
    from query import remote

    monkeypatch.setattr(remote, "REMOTE_TIMEOUT", 1.0)
    with RangeServer(synthetic_db.parent, hostile="trickle", trickle_s=0.05) as srv:
        t0 = time.monotonic()
        with pytest.raises(QueryTimeout):
            Dataset(f"{srv.url}/{synthetic_db.name}", cache_dir=tmp_path / "c")
        assert time.monotonic() - t0 < 3


def test_sql_timeout_covers_opening_and_reading_a_trickling_dataset(synthetic_db, tmp_path):
    # the manifest comes at once; every Parquet byte trickles (the footers the open reads, then the data)
    with RangeServer(synthetic_db.parent, hostile="trickle", hostile_paths=(".parquet",), trickle_s=0.05) as srv:
        r, took = _cli("sql", "SELECT count(*) FROM vectors", "--timeout", "2", "--db", f"{srv.url}/{synthetic_db.name}",
                       "--cache-dir", str(tmp_path / "c"))
    assert r.returncode == 1 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and took < 15, (took, r.stderr)  # 2 s + a loaded machine's start-up; it was 60 s


def test_an_endless_body_is_refused_in_bounded_memory(synthetic_db, tmp_path):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with RangeServer(synthetic_db.parent, hostile="endless", hostile_paths=(".parquet",)) as srv:
        t0 = time.monotonic()
        with pytest.raises((DatasetChanged, RemoteUnreachable)) as e:
            with Dataset(f"{srv.url}/{synthetic_db.name}", cache_dir=tmp_path / "c") as ds:
                ds.sql("SELECT count(*) FROM vectors")
        took = time.monotonic() - t0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100 and took < 10, (grown_mb, took)
    assert "longer than" in str(e.value) and ".parquet" in str(e.value) and "Traceback" not in str(e.value)


def test_an_endless_manifest_is_one_line(synthetic_db, tmp_path):
    from query.errors import NotADataset

    with RangeServer(synthetic_db.parent, hostile="endless", hostile_paths=("manifest.json",)) as srv:
        with pytest.raises(NotADataset, match="larger than"):
            Dataset(f"{srv.url}/{synthetic_db.name}", cache_dir=tmp_path / "c")


def test_a_redirect_off_http_is_refused_naming_its_target(synthetic_db, tmp_path):
    with RangeServer(synthetic_db.parent, hostile="redirect", redirect_to="ftp://ftp.invalid/x") as srv:
        with pytest.raises(RemoteUnreachable) as e:
            Dataset(f"{srv.url}/{synthetic_db.name}", cache_dir=tmp_path / "c")
    msg = str(e.value)
    assert "ftp://ftp.invalid/x" in msg and "refused" in msg and "cannot reach 127.0.0.1" not in msg


def test_dotdot_after_a_listed_file_is_a_refused_path_not_damage(synthetic_db, tmp_path):
    import json as _json

    rel = _json.loads((synthetic_db / "manifest.json").read_text())["models"]["alpha"]["files"]["vectors"][0]
    with RangeServer(synthetic_db.parent) as srv, Dataset(f"{srv.url}/{synthetic_db.name}", cache_dir=tmp_path / "c") as ds:
        for reader in ("read_parquet", "read_blob"):
            with pytest.raises(ForbiddenSQL) as e:
                ds.sql(f"SELECT * FROM {reader}('zeropass://{rel}/../../x')")
            assert "damaged" not in str(e.value)


@pytest.mark.parametrize("query", ["SELECT count(*) FROM models", "SELECT sum(score) FROM vectors"])
def test_ctrl_c_during_a_remote_read_is_one_line(synthetic_db, tmp_path, query):
    import signal

    with RangeServer(synthetic_db.parent, hostile="trickle", hostile_paths=(".parquet",), trickle_s=0.05) as srv:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "sql", query, "--db",
                                 f"{srv.url}/{synthetic_db.name}", "--cache-dir", str(tmp_path / "c")],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()  # Ctrl-C once it waits on a Parquet read (not while Python starts up)
        while not any(r[1].endswith(".parquet") for r in srv.requests) and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and err == "Error: interrupted\n", (proc.returncode, err)


# -- the cache deletes only what it wrote; links and damaged entries are not trusted ----------

@pytest.fixture
def served_db(synthetic_db):
    with RangeServer(synthetic_db.parent) as srv:
        yield srv, f"{srv.url}/{synthetic_db.name}"


def _fill(url, cache):
    with Dataset(url, cache_dir=cache) as ds:
        ds.neurons("paris")
        return ds._remote.cache_dir


@pytest.mark.parametrize("how", ["option", "env"])
def test_cache_clear_refuses_a_directory_it_did_not_write(tmp_path, how):
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "thesis.tex").write_text("years of work")
    (home / "notes.txt").write_text("keep")
    args = ["cache", "clear"] + (["--cache-dir", str(home)] if how == "option" else [])
    env = None if how == "option" else {"ZEROPASS_CACHE": str(home)}
    r = invoke_cli(*args, env=env)  # in this process (click's runner sets the variable for the call)
    assert r.returncode == 1 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "not a zeropass cache" in r.stderr
    assert (home / "docs" / "thesis.tex").read_text() == "years of work" and (home / "notes.txt").exists()


def test_cache_clear_deletes_only_its_own_layout(served_db, tmp_path):
    from query.remote import clear_cache

    srv, url = served_db
    cache = tmp_path / "cache"
    where = _fill(url, cache)
    assert any((where / "tails").iterdir())
    (cache / "mine.txt").write_text("a file the user put here")
    (where / "tails" / "odd name").write_text("not the cache's")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_text("x")
    (cache / "0123456789abcdef").symlink_to(outside, target_is_directory=True)  # a key-shaped link
    _, freed, left = clear_cache(cache)
    assert freed > 0 and (cache / "mine.txt").exists() and (where / "tails" / "odd name").exists()
    assert (outside / "x").exists() and sorted(left) == sorted(["0123456789abcdef", "mine.txt",
                                                                 str((where / "tails" / "odd name").relative_to(cache))])
    assert not [p for p in cache.rglob("*.bin")]


def test_a_link_in_the_cache_does_not_redirect_its_writes(served_db, tmp_path):
    srv, url = served_db
    cache = tmp_path / "cache"
    where = _fill(url, cache)  # the layout exists; now point the revision's tails elsewhere
    victim = tmp_path / "victim"
    victim.mkdir()
    import shutil
    shutil.rmtree(where / "tails")
    (where / "tails").symlink_to(victim, target_is_directory=True)
    _fill(url, cache)
    assert list(victim.iterdir()) == []


def test_a_damaged_cached_footer_is_not_trusted(served_db, synthetic_db, tmp_path):
    srv, url = served_db
    cache = tmp_path / "cache"
    where = _fill(url, cache)
    with Dataset(synthetic_db) as local:
        want = local.neurons("paris")
    for f in (where / "tails").iterdir():  # flip bytes inside every cached footer
        data = bytearray(f.read_bytes())
        for i in range(len(data) // 3, len(data) - 8, 7):
            data[i] ^= 0x5A
        f.write_bytes(bytes(data))
    with Dataset(url, cache_dir=cache) as ds:
        assert ds.neurons("paris").equals(want)


# -- damage inside a file is found when it is read ---------------------------------------------

import shutil  # noqa: E402

from query.errors import DamagedFile  # noqa: E402


def _listed(db, model, table):
    return json.loads((db / "manifest.json").read_text())["models"][model]["files"][table][0]


def _overwrite_middle(path, frac=0.5):
    """Bytes inside a data page: same size, the footer intact (DuckDB reads it without complaint)."""
    data = bytearray(path.read_bytes())
    off = int(len(data) * frac) & ~7
    data[off:off + 8] = b"\xaa" * 8
    path.write_bytes(bytes(data))


@pytest.fixture
def damaged_copy(synthetic_db, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(synthetic_db, db)
    return db


@pytest.mark.parametrize("frac", [0.1, 0.3, 0.5])
def test_overwritten_bytes_in_a_data_page_are_damage_naming_file_model_and_repair(damaged_copy, frac, synthetic_cli):
    db = damaged_copy
    rel = _listed(db, "beta", "vectors")
    with Dataset(db) as ds:
        want_alpha = ds.neurons("paris", model="alpha")
    _overwrite_middle(db / rel, frac)
    with Dataset(db) as ds:
        with pytest.raises(DamagedFile) as e:
            ds.sql("SELECT sum(score) FROM vectors")
        msg = str(e.value)
        assert rel in msg and "'beta'" in msg and "zeropass index" in msg and "sha256" in msg and "\n" not in msg
        assert ds.neurons("paris", model="alpha").equals(want_alpha)  # the other models still answer
    r = CliRunner().invoke(cli, ["sql", "SELECT sum(score) FROM vectors", "--db", str(db)])
    assert r.exit_code == 1 and rel in r.output and "Traceback" not in r.output


def test_a_damaged_compacted_file_falls_back_to_the_models_files(damaged_copy):
    from indexer.compact import compact

    db = damaged_copy
    with Dataset(db) as ds:
        want = ds.sql("SELECT sum(score) AS s, count(*) AS n FROM vectors")
    compact(db)
    comp = json.loads((db / "manifest.json").read_text())["compacted"]
    rel = next(iter(comp["vectors"]["files"] if isinstance(comp["vectors"], dict) else comp["vectors"]))
    _overwrite_middle(db / rel)
    with Dataset(db) as ds:
        assert ds.sql("SELECT sum(score) AS s, count(*) AS n FROM vectors").equals(want)


def test_a_warm_open_hashes_nothing(damaged_copy, monkeypatch):
    from query import verify

    with Dataset(damaged_copy):
        pass
    calls = []
    monkeypatch.setattr(verify, "file_sha256", lambda p: calls.append(p))
    with Dataset(damaged_copy):
        pass
    assert calls == []


def test_damage_over_http_is_found_and_named(damaged_copy, tmp_path):
    db = damaged_copy
    rel = _listed(db, "beta", "vectors")
    _overwrite_middle(db / rel)
    with RangeServer(db.parent) as srv, Dataset(f"{srv.url}/{db.name}", cache_dir=tmp_path / "c") as ds:
        with pytest.raises(DamagedFile) as e:
            ds.sql("SELECT sum(score) FROM vectors")
        msg = str(e.value)
        assert rel in msg and "'beta'" in msg and "publish" in msg and "sha256" in msg
        assert ds.neurons("paris", model="alpha").num_rows > 0


def test_dotdot_after_a_listed_file_is_a_refused_path_locally_too(synthetic_db):
    rel = _listed(synthetic_db, "alpha", "vectors")
    with Dataset(synthetic_db) as ds:
        for reader in ("read_parquet", "read_blob"):
            with pytest.raises(ForbiddenSQL) as e:
                ds.sql(f"SELECT * FROM {reader}('{synthetic_db}/{rel}/../../../../../../etc/passwd')")
            assert "damaged" not in str(e.value)
