"""`zeropass serve` under load and odd results, against a real server on 127.0.0.1 (issue 20, "serve").

Slow SQL takes one of a few turns and cannot starve the pages; a full queue is a one-line 503;
results are capped by bytes as well as rows; any DuckDB value renders; pages read their
parameters with the API's parser.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("jinja2")

from query import Dataset  # noqa: E402
from query.serve import running  # noqa: E402
from query.serve.app import ResultTooLarge, run_sql  # noqa: E402

SLOW = "SELECT sum(a.range * b.range) FROM range(100000000) a, range(100000) b"


def get(url: str):
    """(status, headers, body) of a real HTTP request."""
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def sql_url(base: str, q: str, path: str = "/api/sql") -> str:
    return f"{base}{path}?{urllib.parse.urlencode({'q': q})}"


def test_slow_sql_fills_its_turns_not_the_pages_and_the_next_is_a_503(synthetic_db):
    # Before: four slow queries took the whole pool and `/` waited 9 s behind them.
    with running(synthetic_db, sql_timeout=1.0, sql_slots=1, sql_queue=1) as base:
        answers = []
        threads = [threading.Thread(target=lambda: answers.append((get(sql_url(base, SLOW)), time.monotonic())))
                   for _ in range(3)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(0.3)  # one runs, one waits, one was refused
        pages = [get(base + path) for path in ("/", "/api/heads?token=paris", "/search?q=paris")]
        pages_done = time.monotonic()
        for t in threads:
            t.join(30)
    assert [p[0] for p in pages] == [200, 200, 200]
    assert pages_done - t0 < 0.3 + 0.9  # answered while both SQL turns were held, not after them
    statuses = sorted(a[0][0] for a in answers)
    assert statuses == [400, 400, 503], [a[0][2] for a in answers]
    busy = next(a for a in answers if a[0][0] == 503)
    error = json.loads(busy[0][2])["error"]
    assert "try again" in error and "\n" not in error
    assert busy[1] - t0 < 0.5  # refused at once, not after waiting


def test_a_busy_sql_page_is_a_503_page(synthetic_db):
    with running(synthetic_db, sql_timeout=1.0, sql_slots=1, sql_queue=0) as base:
        t = threading.Thread(target=get, args=(sql_url(base, SLOW),))
        t.start()
        time.sleep(0.3)
        status, headers, body = get(sql_url(base, "SELECT 1", "/sql"))
        t.join(30)
    assert status == 503 and headers["Content-Type"].startswith("text/html") and b"try again" in body


def test_sql_results_are_capped_by_bytes(synthetic_db):
    with Dataset(synthetic_db) as ds:
        table, more = run_sql(ds, "SELECT repeat('x', 1000000) AS s FROM range(5)", max_bytes=2_500_000)
        assert table.num_rows == 2 and more
        table, more = run_sql(ds, "SELECT repeat('x', 10) AS s FROM range(5)", max_bytes=2_500_000)
        assert table.num_rows == 5 and not more
        with pytest.raises(ResultTooLarge, match="first row of the result is larger than"):
            run_sql(ds, "SELECT repeat('x', 3000000) AS s", max_bytes=2_500_000)


def test_a_50_mb_value_is_refused_not_sent(synthetic_db):
    with running(synthetic_db) as base:
        status, _, body = get(sql_url(base, "SELECT repeat('x', 50000000) AS s"))
    assert status == 400 and len(body) < 1000 and "larger than the explorer" in json.loads(body)["error"]


ODD = ("SELECT 'infinity'::TIMESTAMP AS t, DATE '-infinity' AS d, TIMESTAMP '12000-01-01 00:00:00' AS y, "
       "['infinity'::DATE] AS l, DATE '2020-01-02' AS ok")


def test_any_duckdb_value_renders(synthetic_db):
    with running(synthetic_db) as base:
        status, _, body = get(sql_url(base, ODD))
        page, _, html = get(sql_url(base, ODD, "/sql"))
    assert status == 200, body
    row = json.loads(body)[0]
    assert (row["t"], row["d"], row["y"], row["l"]) == ("infinity", "-infinity", "12000-01-01 00:00:00", "[infinity]")
    assert row["ok"].startswith("2020-01-02")  # a date Python holds is written as before
    assert page == 200 and b"-infinity" in html and b"12000-01-01" in html


@pytest.mark.parametrize("query,status,needle", [
    pytest.param("q=paris&limit=abc", 400, b"limit must be a whole number", id="limit-text"),
    pytest.param("q=paris&limit=-1", 400, b"limit -1 is out of range", id="limit-negative"),
    pytest.param("q=paris&exact=maybe", 400, b"exact must be 1 or 0", id="exact-maybe"),
    pytest.param("q=paris&side=left", 400, b"unknown side", id="side"),
    pytest.param("q=paris&circuit=xx", 400, b"unknown circuit", id="circuit"),
    pytest.param("q=paris&limit=1&kind=heads", 200, b"Heads (1)", id="limit-applies"),
])
def test_pages_read_parameters_with_the_api_parser(server, query, status, needle):
    got, _, body = get(f"{server}/search?{query}")
    assert got == status and needle in body, body[:300]


def test_history_is_an_api_endpoint_like_every_helper(server):
    status, _, body = get(server + "/api/history?series=nope&unit=L0.N0")
    assert status == 404 and "no series 'nope'" in json.loads(body)["error"]
    status, _, body = get(server + "/api/history?series=nope")
    assert status == 400 and "missing ?unit= or ?token= or ?id=" in json.loads(body)["error"]


@pytest.fixture(scope="module")
def server(synthetic_db):
    with running(synthetic_db) as url:
        yield url


# -- one connection, a cursor per thread -------------------------------------------------------

def test_a_cursor_twin_shares_the_views_and_the_lock_down(synthetic_db):
    import duckdb
    import pyarrow as pa

    from query.errors import QueryTimeout

    with Dataset(synthetic_db) as ds:
        twin = ds.cursor()
        assert twin.con is not ds.con
        assert twin.sql("SELECT count(*) AS n FROM heads").equals(ds.sql("SELECT count(*) AS n FROM heads"))
        assert twin.heads("paris").equals(ds.heads("paris"))
        secret = pa.table({"a": [1]})  # noqa: F841 (a replacement scan would find it by name)
        with pytest.raises(duckdb.CatalogException):
            twin.con.execute("SELECT * FROM secret")  # a plain SET is not inherited by a cursor
        with pytest.raises(duckdb.Error):
            twin.con.execute("SET enable_external_access = true")
        # a time limit stops the twin's query only
        done = {}
        t = threading.Thread(target=lambda: done.update(n=ds.rows("SELECT count(*) AS n FROM range(3000000)")[0]["n"]))
        with pytest.raises(QueryTimeout):
            t.start()
            twin.sql(SLOW, timeout=0.5)
        t.join(30)
        assert done["n"] == 3000000
        twin.close()
        assert ds.rows("SELECT count(*) AS n FROM models")[0]["n"] > 0  # the owner reads on


def test_pages_read_through_cursors_of_one_connection_and_sql_through_its_own(synthetic_db):
    from query.serve.app import Explorer

    with Dataset(synthetic_db) as ds:
        ex = Explorer(ds, pool_size=2, sql_slots=1)
        with ex.session() as a, ex.session() as b:  # two pages at once
            assert a.ds is ds and b.ds.con is not ds.con and b.ds._tmp == ds._tmp  # a cursor twin, no second database
            assert b.ds.heads("paris").equals(ds.heads("paris"))
        with ex.sql_turn(), ex.session(sql=True) as c:
            assert c.ds._tmp != ds._tmp  # user SQL has a database of its own (docs/EXPLORER.md says why)
            assert c.ds.sql("SELECT count(*) AS n FROM models").equals(ds.sql("SELECT count(*) AS n FROM models"))
        ex.close()
        assert ds.rows("SELECT count(*) AS n FROM models")[0]["n"] > 0  # the owner's Dataset stays open
