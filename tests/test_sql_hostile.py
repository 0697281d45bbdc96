"""The SQL path under attack: reading outside the dataset, statements that write, queries that
never end or never fit in memory, awkward types and names, damaged or changing datasets.

Every case: one typed error (library) / one ``Error:`` line (CLI), or a correct result.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from query import BadSQL, Dataset, ForbiddenSQL, NotADataset, QueryError
from cli import cli
from tests.dataset_helpers import CLI_MODULE, invoke_cli

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _cli(*argv, env=None):
    """The real `zeropass` in a subprocess (signals, memory and exit codes are the real ones)."""
    return subprocess.run([sys.executable, "-m", "cli", *argv], capture_output=True, text=True, cwd=str(ROOT),
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="100", **(env or {})))


def _cli_here(*argv):
    """The same command line in this process (click's runner: the console script's parsing, Error:
    lines and exit codes; an exception it does not turn into an Error: line propagates), for the
    cases where no signal, memory bound or pipe is under test: no interpreter start."""
    return invoke_cli(*argv, env={"COLUMNS": "100"})


def _one_line(stderr: str, *fragments):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture
def copy_db(tmp_path, synthetic_db):
    """A private copy of the synthetic dataset, free to damage."""
    dst = tmp_path / "db"
    shutil.copytree(synthetic_db, dst)
    return dst


# -- 1. nothing outside the dataset is readable ----------------------------------------------

READERS = [
    "SELECT content FROM read_text('{p}/passwd')",
    "SELECT * FROM read_csv('{p}/passwd')",
    "SELECT * FROM read_blob('{p}/passwd')",
    "SELECT * FROM read_json('{p}/passwd')",
    "SELECT * FROM read_parquet('{p}/passwd')",
    "SELECT * FROM '{p}/passwd'",
    "SELECT * FROM glob('{p}/*')",
    "SELECT * FROM sniff_csv('{p}/passwd')",
]


@pytest.mark.parametrize("query", READERS)
def test_a_tmp_symlink_in_the_working_directory_is_not_readable(tmp_path, synthetic_db, monkeypatch, query):
    # DuckDB's default temp directory is ./.tmp, which it allows on top of allowed_directories.
    monkeypatch.chdir(tmp_path)
    os.symlink("/etc", tmp_path / ".tmp")
    with Dataset(synthetic_db) as ds:
        for p in (".tmp", str(tmp_path / ".tmp"), f"{synthetic_db}/../../.tmp"):
            try:
                rows = ds.sql(query.format(p=p)).to_pylist()
            except QueryError as e:
                assert "\n" not in str(e)
                continue
            assert "root:" not in json.dumps(rows, default=str) and not rows, (p, rows)


def test_temp_directory_is_private_and_removed_on_close(synthetic_db):
    ds = Dataset(synthetic_db)
    (tmp,) = ds.sql("SELECT current_setting('temp_directory') AS t").column("t").to_pylist()
    assert tmp and os.path.isabs(tmp) and not tmp.startswith(str(synthetic_db))
    assert os.stat(tmp).st_uid == os.getuid() and (os.stat(tmp).st_mode & 0o777) == 0o700
    ds.close()
    assert not os.path.exists(tmp)


@pytest.mark.parametrize("query", [
    "SELECT content FROM read_text('{root}/etc/passwd')",
    "SELECT content FROM read_text('{root}/passwd-link')",
    "SELECT * FROM glob('{root}/etc/*')",
    "SELECT content FROM read_text('{root}/../../../../../../etc/passwd')",
    "SELECT content FROM read_text('/etc/passwd')",
    "SELECT content FROM read_text('https://example.com/x')",
    "SELECT * FROM read_parquet('s3://bucket/x.parquet')",
    "SELECT getenv('HOME')",
])
def test_symlinks_inside_the_dataset_and_other_ways_out(copy_db, query):
    os.symlink("/etc", copy_db / "etc")
    os.symlink("/etc/passwd", copy_db / "passwd-link")
    with Dataset(copy_db) as ds:
        with pytest.raises(QueryError) as e:
            ds.sql(query.format(root=copy_db))
        assert "\n" not in str(e.value) and "root:" not in str(e.value)


def test_python_variables_are_not_tables(ds):
    secret = pa.table({"password": ["hunter2"]})  # noqa: F841  (DuckDB's replacement scan would find it)
    with pytest.raises(BadSQL, match="secret"):
        ds.sql("SELECT * FROM secret")


# -- the manifest is untrusted input ---------------------------------------------------------

def _edit_manifest(root: Path, edit) -> None:
    m = json.loads((root / "manifest.json").read_text())
    m = edit(m)
    (root / "manifest.json").write_text(json.dumps(m))


def _set(path, value):
    def edit(m):
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return m
    return edit


@pytest.mark.parametrize("edit", [
    pytest.param(lambda m: [1, 2], id="not-an-object"),
    pytest.param(lambda m: "x", id="a-string"),
    pytest.param(_set(["models"], ["alpha"]), id="models-a-list"),
    pytest.param(_set(["models", "alpha"], 3), id="model-entry-a-number"),
    pytest.param(_set(["models", "alpha", "files"], "vectors"), id="files-a-string"),
    pytest.param(_set(["models", "alpha", "files", "vectors"], [1, 2]), id="file-not-a-string"),
    pytest.param(_set(["models", "alpha", "files", "vectors"], ["../../etc/passwd"]), id="dotdot"),
    pytest.param(_set(["models", "alpha", "files", "vectors"], ["/etc/passwd"]), id="absolute"),
    pytest.param(_set(["models", "alpha", "files", "vectors"], ["vectors/../../../etc/passwd"]), id="inner-dotdot"),
    pytest.param(_set(["models", "alpha", "files", "pairs"], ["vectors/model=alpha/x.parquet"]), id="other-table"),
    pytest.param(_set(["vocabularies", "vshared", "files"], ["/etc/passwd"]), id="vocab-absolute"),
    pytest.param(_set(["vocabularies"], None), id="vocabularies-null"),
    pytest.param(_set(["alignments"], {"a|b": {"files": ["../x.parquet"]}}), id="alignment-dotdot"),
    pytest.param(lambda m: {k: v for k, v in m.items() if k != "models"}, id="no-models"),
])
def test_malformed_manifest_is_refused_in_one_line(copy_db, edit):
    _edit_manifest(copy_db, edit)
    with pytest.raises(NotADataset, match="manifest") as e:
        Dataset(copy_db)
    assert "\n" not in str(e.value)
    r = _cli_runner("sql", "SELECT 1", "--db", str(copy_db))
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("content", [b"", b"\xff\xfe{", b"{", b"null", b"1e999999", None], ids=[
    "empty", "not-utf8", "truncated", "null", "huge-number", "a-directory"])
def test_unreadable_manifest_is_one_line(copy_db, content):
    m = copy_db / "manifest.json"
    m.unlink()
    if content is None:
        m.mkdir()
    else:
        m.write_bytes(content)
    with pytest.raises(NotADataset) as e:
        Dataset(copy_db)
    assert "\n" not in str(e.value) and "manifest.json" in str(e.value)


def test_a_listed_file_that_is_a_symlink_out_of_the_dataset_is_refused(copy_db, tmp_path):
    import pyarrow.parquet as pq

    outside = tmp_path / "outside.parquet"
    pq.write_table(pa.table({"a": [1]}), outside)
    listed = json.loads((copy_db / "manifest.json").read_text())["models"]["alpha"]["files"]["heads"][0]
    (copy_db / listed).unlink()
    os.symlink(outside, copy_db / listed)
    with pytest.raises(NotADataset, match="outside the dataset"):
        Dataset(copy_db)


def test_a_listed_directory_that_is_a_symlink_out_of_the_dataset_is_refused(copy_db, tmp_path):
    """The link may be any directory on a listed file's way (the readers resolve each shared
    directory once, schemas.format.real_paths): a model's partition directory moved out and linked."""
    import shutil

    listed = json.loads((copy_db / "manifest.json").read_text())["models"]["alpha"]["files"]["vectors"][0]
    part = (copy_db / listed).parent
    shutil.move(str(part), str(tmp_path / "moved"))
    os.symlink(tmp_path / "moved", part)
    with pytest.raises(NotADataset, match="outside the dataset"):
        Dataset(copy_db)


def test_real_paths_resolve_as_realpath(tmp_path):
    from schemas.format import real_paths as _real_paths

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f").write_text("x")
    (tmp_path / "a" / "l").symlink_to(tmp_path / "out")  # absolute link out
    (tmp_path / "a" / "b" / "f").symlink_to("../l/f")  # relative link through a link
    (tmp_path / "a" / "rel").symlink_to("b")  # relative link inside
    (tmp_path / "a" / "loop").symlink_to("loop")
    rels = ["a/b/f", "a/l/f", "a/rel/f", "a/missing/x", "a/l", "a/rel/g", "a/b/f", "a/loop/x"]
    root = os.path.realpath(tmp_path)
    for rel, real in _real_paths(root, rels):
        assert real == os.path.realpath(tmp_path / rel), rel


def _cli_runner(*argv):
    return CliRunner().invoke(cli, list(argv), catch_exceptions=False)


# -- 2. only statements and functions that read ----------------------------------------------

def _evil_import_dir(root: Path) -> Path:
    """A directory inside the dataset (so readable) that PRAGMA import_database would run."""
    evil = root / "evil"
    evil.mkdir()
    (evil / "schema.sql").write_text("CREATE TABLE pwned AS SELECT 1 AS x;\n")
    (evil / "load.sql").write_text(f"COPY (SELECT 1) TO '{root}/pwned.csv';\nDROP VIEW models;\n")
    return evil


HOSTILE = [
    "PRAGMA import_database('{evil}')",
    "pragma IMPORT_DATABASE('{evil}')",
    "/* c */ PRAGMA import_database('{evil}')",
    "-- c\nPRAGMA import_database('{evil}')",
    "PRAGMA /* c */ import_database('{evil}')",
    "/* /* */ PRAGMA version */ PRAGMA import_database('{evil}')",
    "/* /* */ EXPLAIN SELECT 1 */ EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1",
    "PRAGMA version; PRAGMA import_database('{evil}')",
    "PRAGMA \"import_database\"('{evil}')",
    "PRAGMA table_info('models'); PRAGMA import_database('{evil}')",
    "PRAGMA table_info((SELECT 'models'))",
    "EXPORT DATABASE '{root}/exp'",
    "PRAGMA enable_profiling",
    "PRAGMA enable_profiling='json'",
    "PRAGMA profiling_output='{root}/profile.json'",
    "PRAGMA profile_output='{root}/profile.json'",
    "PRAGMA memory_limit='1GB'",
    "PRAGMA threads=1",
    "PRAGMA threads(1)",
    "PRAGMA force_checkpoint",
    "PRAGMA enable_checkpoint_on_shutdown",
    "PRAGMA disable_optimizer",
    "PRAGMA lock_configuration=false",
    "PRAGMA json_execute_serialized_sql('x')",
    "PRAGMA copy_database('memory', 'x')",
    "CALL checkpoint()",
    "CHECKPOINT",
    "FORCE CHECKPOINT",
    "CALL enable_logging()",
    "CALL enable_profiling()",
    "CALL query('CREATE TABLE x AS SELECT 1')",
    "CALL range(1), query('SELECT 1')",
    "CALL range((SELECT count(*) FROM query('SELECT 1')))",
    "SELECT * FROM query('SELECT 1')",
    "SELECT * FROM main.query('SELECT 1')",
    "SELECT * FROM \"QUERY\"('SELECT 1')",
    "SELECT * FROM query_table('models')",
    "SELECT (SELECT count(*) FROM enable_profiling())",
    "SELECT 1 UNION ALL SELECT 1 FROM checkpoint()",
    "WITH x AS (SELECT * FROM force_checkpoint()) SELECT 1",
    "SELECT * FROM json_execute_serialized_sql('x')",
    "SELECT * FROM truncate_duckdb_logs()",
    "SELECT write_log('x')",
    "SELECT * FROM arrow_scan(1, 2, 3)",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{root}/x.csv'",
    "/* c */ EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1",
    "-- c\nEXPLAIN ANALYZE CREATE TABLE x AS SELECT 1",
    "EXPLAIN /* c */ ANALYZE CREATE TABLE x AS SELECT 1",
    "EXPLAIN (FORMAT json) CREATE TABLE x AS SELECT 1",
    "EXPLAIN ANALYZE SELECT * FROM query('SELECT 1')",
    "EXPLAIN ANALYZE PRAGMA import_database('{evil}')",
    "DESCRIBE SELECT * FROM query('SELECT 1')",
    "SUMMARIZE SELECT * FROM checkpoint()",
    "SELECT * FROM range(2) t, LATERAL (SELECT * FROM query_table('models'))",
    "SELECT * FROM duckdb_logs_parsed('x')",
    "COPY models FROM '{root}/x.csv'",
    "DETACH memory",
    "USE memory",
    "VACUUM",
    "ANALYZE",
    "LOAD parquet",
    "INSTALL json",
    "CREATE MACRO m() AS 1",
    "CREATE TEMP TABLE t AS SELECT 1",
    "CREATE SECRET s (TYPE s3)",
    "SET VARIABLE v = 1",
    "RESET lock_configuration",
    "SET lock_configuration = false",
    "SET GLOBAL enable_external_access = true",
    "SELECT 1; SET enable_external_access = true",
    "SELECT 1; ATTACH '{root}/catalog.duckdb' AS c",
    "PIVOT models ON model USING count(*)",
    "BEGIN TRANSACTION",
    "PREPARE p AS SELECT 1",
]


@pytest.mark.parametrize("query", HOSTILE)
def test_statements_that_write_or_reconfigure_are_refused(copy_db, query):
    _evil_import_dir(copy_db)
    before = _snapshot(copy_db)
    with Dataset(copy_db) as ds:
        with pytest.raises((ForbiddenSQL, BadSQL)) as e:  # BadSQL: DuckDB cannot parse it either
            ds.sql(query.format(root=copy_db, evil=copy_db / "evil"))
        assert "\n" not in str(e.value)
        assert ds.sql("SELECT count(*) AS n FROM models").to_pylist() == [{"n": 3}]
        assert ds.sql("SELECT count(*) AS n FROM duckdb_tables()").to_pylist() == [{"n": 0}]
        assert ds.sql("SELECT current_setting('lock_configuration') AS v").to_pylist() == [{"v": True}]
    assert _snapshot(copy_db) == before


@pytest.mark.parametrize("query", [
    "PRAGMA version",
    "PRAGMA table_info('models')",
    "pragma show_tables",
    "PRAGMA show_tables_expanded;",
    "PRAGMA database_size",
    "CALL pragma_version()",
    "CALL pragma_table_info('models')",
    "/* c */ SELECT 1 AS x",
    "FROM models",
    "SUMMARIZE models",
    "DESCRIBE models",
    "SHOW TABLES",
    "EXPLAIN ANALYZE SELECT count(*) FROM vectors",
    "-- c\nEXPLAIN ANALYZE SELECT 1",
    "/* c */ EXPLAIN ANALYZE SELECT 1",
    "SELECT * FROM range(3)",
    "SELECT * FROM duckdb_settings() WHERE name = 'threads'",
    "SELECT * FROM parquet_metadata('{first}')",
    "SELECT current_setting('temp_directory') AS t",
    "UNPIVOT (SELECT 1 AS a, 2 AS b) ON a, b INTO NAME n VALUE v",
])
def test_statements_that_read_run(ds, synthetic_db, query):
    first = sorted((synthetic_db / "models").rglob("*.parquet"))[0]
    t = ds.sql(query.format(first=first))
    assert t.num_rows >= 1


def test_explain_analyze_in_the_cli_is_not_a_traceback(synthetic_db):
    for q in ("/* c */ EXPLAIN ANALYZE SELECT 1", "EXPLAIN ANALYZE SELECT 1"):
        r = _cli_here("sql", q, "--db", str(synthetic_db))
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


def test_import_database_left_nothing_behind(copy_db):
    _evil_import_dir(copy_db)
    r = _cli_here("sql", f"PRAGMA import_database('{copy_db / 'evil'}')", "--db", str(copy_db))
    assert r.returncode == 1
    _one_line(r.stderr, "import_database", "not allowed")
    assert not (copy_db / "pwned.csv").exists()


# -- 3. interrupts and timeouts --------------------------------------------------------------

ENDLESS = "SELECT count(*) FROM range(1000000000000)"


def test_ctrl_c_stops_a_running_query(synthetic_db):
    p = subprocess.Popen([sys.executable, "-m", "cli", "sql", ENDLESS, "--db", str(synthetic_db)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    # Wait until DuckDB is counting: more CPU than starting Python and importing ever takes (those
    # take 0.5 s; the count runs on one thread, so the 3 s this waited for were 3 s of wall time).
    cpu = 0.0
    deadline = time.monotonic() + 90
    while cpu < 1.5 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
        fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    assert p.poll() is None and cpu >= 1.5
    p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("SIGINT did not stop the query")
    assert p.returncode == 130, err
    _one_line(err, "interrupted")
    assert out == ""


def test_cli_timeout(synthetic_db):
    t0 = time.monotonic()
    r = _cli("sql", ENDLESS, "--timeout", "0.5", "--db", str(synthetic_db))
    assert time.monotonic() - t0 < 30
    assert r.returncode == 1
    _one_line(r.stderr, "0.5", "--timeout")
    r = _cli("sql", "SELECT 1 AS x", "--timeout", "5", "--db", str(synthetic_db), "--format", "csv")
    assert r.returncode == 0 and r.stdout == "x\n1\n"
    r = _cli("sql", "SELECT 1", "--timeout", "-1", "--db", str(synthetic_db))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_library_timeout_leaves_the_dataset_usable(ds):
    from query.errors import QueryTimeout

    with pytest.raises(QueryTimeout, match="0.2 s") as e:
        ds.sql(ENDLESS, timeout=0.2)
    assert "\n" not in str(e.value)
    assert ds.sql("SELECT 41 + 1 AS x", timeout=5).to_pylist() == [{"x": 42}]
    time.sleep(0.3)  # a timer that fired late must not hit the next query
    assert ds.sql("SELECT 1 AS x").to_pylist() == [{"x": 1}]


def test_library_interrupt_from_another_thread(ds):
    from query.errors import Interrupted

    timer = threading.Timer(0.3, ds.interrupt)
    timer.start()
    with pytest.raises(Interrupted, match="interrupted"):
        ds.sql(ENDLESS)
    timer.join()
    assert ds.sql("SELECT 1 AS x", {}).to_pylist() == [{"x": 1}]


# -- 4. results stream: memory stays flat, rows are complete ---------------------------------

WIDE = "SELECT i, repeat('x', 100) AS s FROM range({n}) t(i)"


# Peak memory from the child's own VmHWM: the rusage of a forked child also counts the
# parent's pages from before exec (pytest's, over 1 GB when torch is loaded).
_MEASURED = ("import atexit, sys\n"
             "def hwm():\n"
             "    kb = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
             "    sys.stderr.write('VmHWM ' + kb + '\\n')\n"
             "atexit.register(hwm)\n"
             "from cli import main\n"
             "main(sys.argv[1:])\n")


def _run_measured(argv, count):
    """Run the CLI, count stdout as it streams; (returncode, stderr, counted, peak RSS in MiB)."""
    p = subprocess.Popen([sys.executable, "-c", _MEASURED, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
    err = []
    t = threading.Thread(target=lambda: err.append(p.stderr.read()))
    t.start()
    counted = count(p.stdout)
    p.wait()
    t.join()
    lines = err[0].decode().splitlines()
    peak = int(lines[-1].split()[1]) / 1024 if lines and lines[-1].startswith("VmHWM ") else float("inf")
    return p.returncode, "\n".join(lines[:-1]), counted, peak


def _count_lines(stream):
    n = 0
    while chunk := stream.read(1 << 20):
        n += chunk.count(b"\n")
    return n


def test_csv_streams_in_constant_memory(synthetic_db):
    n = 1_000_000
    rc, err, lines, peak = _run_measured(["sql", WIDE.format(n=n), "--db", str(synthetic_db), "--format", "csv"], _count_lines)
    assert rc == 0, err
    assert lines == n + 1
    assert peak < 400, f"peak RSS {peak:.0f} MiB: the result was materialised"


def test_json_streams_and_stays_one_valid_array(synthetic_db):
    n = 300_000

    def parse(stream):
        return json.loads(stream.read())

    rc, err, rows, _ = _run_measured(["sql", "SELECT i FROM range({}) t(i)".format(n), "--db", str(synthetic_db),
                                      "--format", "json"], parse)
    assert rc == 0, err
    assert len(rows) == n and rows[0] == {"i": 0} and rows[-1] == {"i": n - 1}
    rc, err, rows, _ = _run_measured(["sql", "SELECT 1 AS x WHERE false", "--db", str(synthetic_db), "--format", "json"], parse)
    assert rc == 0 and rows == []


def test_table_format_caps_rows_and_says_how_many_more(synthetic_db):
    r = _cli_here("sql", "SELECT i FROM range(5000) t(i)", "--db", str(synthetic_db))
    assert r.returncode == 0
    from query.output import TABLE_ROWS

    assert len(r.stdout.splitlines()) == TABLE_ROWS + 2
    assert f"{5000 - TABLE_ROWS:,} more rows not shown" in r.stderr and "--format csv" in r.stderr


def test_a_closed_pipe_ends_quietly(synthetic_db):
    p = subprocess.run(f"{sys.executable} -m cli sql 'SELECT i FROM range(3000000) t(i)' --format csv "
                       f"--db {synthetic_db} | head -2", shell=True, capture_output=True, text=True, cwd=str(ROOT),
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert p.stdout == "i\n0\n" and p.stderr == "", p.stderr


def test_library_stream(ds):
    with ds.stream("SELECT i FROM range(100000) t(i)", batch_rows=10000) as reader:
        batches = list(reader)
    assert sum(b.num_rows for b in batches) == 100000 and len(batches) >= 2
    assert ds.sql("SELECT 1 AS x").to_pylist() == [{"x": 1}]


# -- 5/6. every type, duplicate names, escape sequences ----------------------------------------

def test_duplicate_column_names_keep_every_column(synthetic_cli):
    q = "SELECT 1 AS a, 2 AS a, 3 AS a_2, 4 AS A"
    r = synthetic_cli("sql", q, "--format", "csv")
    assert r.exit_code == 0 and r.stdout == "a,a,a_2,A\n1,2,3,4\n"
    r = synthetic_cli("sql", q, "--format", "json")
    assert r.exit_code == 0
    row = json.loads(r.stdout)[0]
    assert sorted(row.values()) == [1, 2, 3, 4] and list(row)[0] == "a" and len(row) == 4
    r = synthetic_cli("sql", q)
    assert r.exit_code == 0 and r.stdout.split("\n")[2].split() == ["1", "2", "3", "4"]


TYPES = """SELECT TIME '12:34:56.5' AS t, DATE '2024-02-29' AS d, TIMESTAMP '2024-01-01 01:02:03' AS ts,
    TIMESTAMPTZ '2024-01-01 01:02:03+00' AS tz, INTERVAL 1 MONTH + INTERVAL 2 DAY + INTERVAL 3.5 SECOND AS iv,
    '0f3a64a2-55b4-4f5c-9d6a-5b3a5a8e8a10'::UUID AS u, '\\x00\\xFFab'::BLOB AS b, 170141183460469231731687303715884105727::HUGEINT AS h,
    340282366920938463463374607431768211455::UHUGEINT AS uh, 12345678901234567.891::DECIMAL(38, 3) AS dec,
    {'x': 1, 'y': [1, 2]} AS st, MAP {'k': 1} AS mp, MAP {1: 'a'} AS mp_int, 'nan'::DOUBLE AS nan, 'inf'::DOUBLE AS inf,
    '-inf'::FLOAT AS ninf, [1.5, NULL] AS l, 'a'::ENUM_T AS e, 1::UTINYINT AS ut, true AS bo, NULL AS nul,
    [[1]]::INTEGER[1][] AS arr, union_value(k := 1) AS un, '{"j": 1}'::JSON AS js, TIME WITH TIME ZONE '12:00:00+01' AS ttz,
    1e300::DOUBLE AS big, BIT '101' AS bits, 'x'::VARINT AS vi"""


def _types_query():
    return TYPES.replace("'a'::ENUM_T", "'a'::ENUM('a', 'b')").replace("'x'::VARINT", "12::BIGNUM")


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_every_duckdb_type_prints(synthetic_cli, fmt):
    r = synthetic_cli("sql", _types_query(), "--format", fmt)
    assert r.exit_code == 0, r.stderr
    if fmt == "json":
        (row,) = json.loads(r.stdout)
        assert row["t"] == "12:34:56.500000" and row["d"] == "2024-02-29" and row["nan"] == "NaN" and row["inf"] == "Infinity"
        assert row["u"] == "0f3a64a2-55b4-4f5c-9d6a-5b3a5a8e8a10" and row["h"] == 2**127 - 1 and row["uh"] == str(2**128 - 1)
        assert '"dec": 12345678901234567.891,' in r.stdout and row["st"] == {"x": 1, "y": [1, 2]} and row["mp"] == {"k": 1}
        assert row["b"] == "00ff6162" and row["iv"] == "P1M2DT3.5S" and row["l"] == [1.5, None] and row["nul"] is None
    if fmt == "csv":
        header, values = r.stdout.splitlines()[:2]
        assert header.startswith("t,d,ts") and values.startswith("12:34:56.500000,2024-02-29,")
        assert "12345678901234567.891" in values and ",NaN,Infinity,-Infinity," in values


def test_streams_of_many_batches_keep_types(synthetic_cli):
    r = synthetic_cli("sql", "SELECT i, TIME '01:00:00' + INTERVAL (i) SECOND AS t FROM range(5000) t(i)", "--format", "json")
    rows = json.loads(r.stdout)
    assert len(rows) == 5000 and rows[4999]["t"] == "02:23:19"


ESC_NAME = 'SELECT 1 AS "a\x1b[31mred\x07", \'x\x1b]0;title\x07\x9b2J\u202edcba\' AS "v\u202e"'


def test_escape_sequences_never_reach_the_terminal_in_table_output(synthetic_cli):
    r = synthetic_cli("sql", ESC_NAME)
    assert r.exit_code == 0
    for bad in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert bad not in r.stdout and bad not in r.stderr
    assert "\\u001b[31m" in r.stdout and "\\u202e" in r.stdout


def test_error_lines_echo_no_escape_sequences(synthetic_cli):
    r = synthetic_cli("sql", 'SELECT "\x1b[2J\u202e" FROM models')
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
    assert "\x1b" not in r.stderr and "\u202e" not in r.stderr and "\\u001b[2J" in r.stderr


def test_json_escapes_controls_and_keeps_the_data(synthetic_cli):
    r = synthetic_cli("sql", ESC_NAME, "--format", "json")
    for bad in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert bad not in r.stdout
    (row,) = json.loads(r.stdout)
    assert row == {"a\x1b[31mred\x07": 1, "v\u202e": "x\x1b]0;title\x07\x9b2J\u202edcba"}


def test_csv_is_exact_when_piped(synthetic_cli):
    r = synthetic_cli("sql", ESC_NAME, "--format", "csv")
    assert r.stdout.splitlines()[1] == "1,x\x1b]0;title\x07\x9b2J\u202edcba"


def test_csv_to_a_terminal_escapes_controls():
    from query import output

    buf = __import__("io").StringIO()
    output.write(iter([pa.record_batch({"c\x1b": ["a\x1bb"]})]), pa.schema([("c\x1b", pa.string())]), "csv", buf,
                 terminal=True)
    assert "\x1b" not in buf.getvalue() and "\\u001b" in buf.getvalue()


# -- 9. parameters: exactly the ones the SQL uses --------------------------------------------

@pytest.mark.parametrize("query,params,match", [
    ("SELECT $a AS a", {"a": 1, "b": 2}, "b"),
    ("SELECT $a AS a, $c AS c", {"a": 1}, "c"),
    ("SELECT 1 AS a", {"a": 1}, "a"),
    ("SELECT ? AS a", [1, 2], "2"),
    ("SELECT ? AS a, ? AS b", [1], "2"),
    ("SELECT $a AS a", [1], "a"),
    ("SELECT $a AS a", "x", "a dict .* or a list"),
])
def test_unknown_or_missing_parameters_are_refused(ds, query, params, match):
    with pytest.raises(BadSQL, match=match) as e:
        ds.sql(query, params)
    assert "\n" not in str(e.value)


def test_cli_unused_param_is_one_line(synthetic_cli):
    r = synthetic_cli("sql", "SELECT $a AS a", "-p", "a", "1", "-p", "b", "2")
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and "b" in r.stderr and r.stderr.count("\n") == 1


# -- 7. damage stays with its file and model -------------------------------------------------

def _listed(root: Path, model: str, table: str) -> list[str]:
    return json.loads((root / "manifest.json").read_text())["models"][model]["files"][table]


def test_damaged_and_missing_files_stay_with_their_model(copy_db):
    from query.errors import DamagedFile

    truncated = _listed(copy_db, "alpha", "vectors")[1]
    os.truncate(copy_db / truncated, 100)
    missing = _listed(copy_db, "beta", "pairs")[0]
    (copy_db / missing).unlink()
    first = _listed(copy_db, "gamma", "heads")[0]
    (copy_db / first).write_bytes(b"garbage")  # gamma's heads file: the first one a view would bind from
    with Dataset(copy_db) as ds:  # opening reads no footer
        assert ds.sql("SELECT count(*) AS n FROM models").to_pylist() == [{"n": 3}]
        # helpers on other models keep working
        assert ds.neurons("paris", model="gamma").num_rows > 0
        assert ds.heads("paris", model="alpha").num_rows > 0
        assert set(ds.show("beta", "L1.N2")) and ds.show("alpha", "L0.H0")["metrics"].num_rows > 0
        for query, file, model in [("SELECT count(*) FROM vectors", truncated, "alpha"),
                                   ("SELECT count(*) FROM pairs", missing, "beta"),
                                   ("SELECT count(*) FROM pairs_by_token", missing, "beta"),  # derived from pairs
                                   ("SELECT * FROM heads", first, "gamma")]:
            with pytest.raises(DamagedFile) as e:
                ds.sql(query)
            msg = str(e.value)
            assert "\n" not in msg and file in msg and f"model {model!r}" in msg, msg
            assert f"zeropass check --db {copy_db}" in msg and f"--name {model} --replace" in msg, msg
        with pytest.raises(DamagedFile, match="alpha"):
            ds.show("alpha", "L1.N0")
        with pytest.raises(DamagedFile, match="beta"):  # heads reads beta's pairs through pairs_by_token
            ds.heads("paris", model="beta")
    r = _cli_here("sql", "SELECT count(*) FROM pairs", "--db", str(copy_db))
    assert r.returncode == 1
    _one_line(r.stderr, missing, "beta", "--replace")


# -- 8. readers during a re-index ------------------------------------------------------------

def _reindex(root: Path, seed: int) -> None:
    from tests.builders import PLANTED, SHARED_TOKENS, synthetic_model

    synthetic_model(root, "alpha", "vshared", SHARED_TOKENS, seed, PLANTED["alpha"])


def test_an_open_dataset_follows_a_reindex(copy_db):
    q = "SELECT sum(score) AS s FROM vectors WHERE model = 'alpha'"
    with Dataset(copy_db) as ds:
        before = ds.sql(q).to_pylist()
        old_files = _listed(copy_db, "alpha", "vectors")
        _reindex(copy_db, 11)
        assert not any((copy_db / f).exists() for f in old_files)  # the writer removed them
        after = ds.sql(q).to_pylist()
        assert after != before
        with Dataset(copy_db) as fresh:
            assert fresh.sql(q).to_pylist() == after
        assert ds.neurons("paris", model="alpha").num_rows > 0
        assert ds.show("alpha", "L1.N0")["vectors"].num_rows > 0
        assert ds.heads("paris", model="alpha").num_rows > 0


def test_concurrent_readers_never_fail_during_reindexes(copy_db):
    stop = threading.Event()
    errors, done = [], []

    def long_lived():
        with Dataset(copy_db) as ds:
            n = 0
            while not stop.is_set():
                try:
                    ds.sql("SELECT count(*) FROM vectors WHERE model = 'alpha'")
                    ds.neurons("paris", model="alpha")
                    n += 1
                except Exception as e:  # noqa: BLE001 (any failure is the bug)
                    errors.append(repr(e))
                # A breath between queries: four readers in tight loops starved the writer of the
                # interpreter lock (3 s alone, up to 26 s beside another test worker in CI); they
                # still query all through every reindex.
                time.sleep(0.002)
            done.append(n)

    def fresh_each_time():  # like one CLI process per query
        n = 0
        while not stop.is_set():
            try:
                with Dataset(copy_db) as ds:
                    ds.sql("SELECT count(*) FROM pairs")
                n += 1
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
            time.sleep(0.002)
        done.append(n)

    threads = [threading.Thread(target=f) for f in (long_lived, long_lived, fresh_each_time, fresh_each_time)]
    for t in threads:
        t.start()
    try:
        for seed in range(20, 24):
            _reindex(copy_db, seed)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert errors == []
    assert len(done) == 4 and min(done) > 0


# A reader process: the CLI's command run again and again (it says "ready" after the first) until the
# writer is done (the file named by argv[1] exists), then once more. One interpreter start per reader instead of one per query.
_READER = """
import json, pathlib, sys
from click.testing import CliRunner
from {module} import cli
stop, argv, n = pathlib.Path(sys.argv[1]), sys.argv[2:], 0
while True:
    last = stop.exists()
    r = CliRunner().invoke(cli, argv)
    if r.exit_code != 0 or not json.loads(r.stdout):
        sys.exit(f"query {{n}} failed: exit {{r.exit_code}}: {{r.stderr or r.exception!r}}")
    n += 1
    if n == 1:
        print("ready", flush=True)
    if last:
        break
print(n)
"""


def test_cli_queries_during_reindexes_all_succeed(copy_db, tmp_path):
    # Readers in other processes (file locks are per process) query while the writer reindexes.
    stop = tmp_path / "writer-done"
    argv = ["neurons", "paris", "--model", "alpha", "--format", "json", "--db", str(copy_db)]
    procs = [subprocess.Popen([sys.executable, "-c", _READER.format(module=CLI_MODULE), str(stop), *argv],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                              env=dict(os.environ, PYTHONPATH=str(ROOT))) for _ in range(3)]
    try:
        assert [p.stdout.readline() for p in procs] == ["ready\n"] * 3  # every reader has answered once
        for seed in range(30, 33):
            _reindex(copy_db, seed)
    finally:
        stop.touch()
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    failed = [(rc, err) for _, err, rc in results if rc != 0]
    assert failed == [], failed
    # each reader ran a query at least once after the writer began and once after it ended
    assert all(int(out) >= 2 for out, _, _ in results), results
