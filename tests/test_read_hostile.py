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

from query.cli import cli


@pytest.fixture
def run_cli(synthetic_db):
    def _run(*args):
        return CliRunner().invoke(cli, list(args) + ["--db", str(synthetic_db)], env={"COLUMNS": "200"},
                                  catch_exceptions=False)
    return _run


# -- output: every value renders, losslessly ---------------------------------------------------

def test_csv_quotes_a_carriage_return(run_cli):
    r = run_cli("sql", "SELECT 'a' || chr(13) || 'b' AS v, 1 AS n UNION ALL SELECT 'c', 2 ORDER BY n", "--format", "csv")
    assert r.exit_code == 0
    assert r.stdout == 'v,n\n"a\rb",1\nc,2\n'
    df = pd.read_csv(io.StringIO(r.stdout))
    assert df.v.tolist() == ["a\rb", "c"] and df.n.tolist() == [1, 2]
    assert list(csv.reader(io.StringIO(r.stdout, newline=""))) == [["v", "n"], ["a\rb", "1"], ["c", "2"]]


NONFINITE = "SELECT 'nan'::DOUBLE AS a, 'inf'::DOUBLE AS b, '-inf'::FLOAT AS c, 1.5::DOUBLE AS d, [ 'inf'::DOUBLE ] AS l"


def test_non_finite_numbers_are_written_as_named_strings(run_cli):
    r = run_cli("sql", NONFINITE, "--format", "json")
    assert r.exit_code == 0
    (row,) = json.loads(r.stdout)
    assert row == {"a": "NaN", "b": "Infinity", "c": "-Infinity", "d": 1.5, "l": ["Infinity"]}
    r = run_cli("sql", NONFINITE, "--format", "csv")
    assert r.stdout.splitlines()[1] == 'NaN,Infinity,-Infinity,1.5,"[""Infinity""]"'
    df = pd.read_csv(io.StringIO(r.stdout))
    import math
    assert math.isnan(df.a[0]) and df.b[0] == float("inf") and df.c[0] == float("-inf")


ODD_TIMES = ("SELECT 'infinity'::TIMESTAMP AS a, DATE '-infinity' AS b, TIMESTAMP '10000-01-02 03:04:05.5' AS c, "
             "DATE '12345-06-07' AS d, '-infinity'::TIMESTAMPTZ AS e, [DATE 'infinity', DATE '2024-01-01'] AS f, "
             "{'t': 'infinity'::TIMESTAMP} AS g, DATE '2024-02-29' AS h, TIMESTAMP '0001-01-01' AS i, "
             "'infinity'::TIMESTAMP_S AS j, TIMESTAMP_MS '20000-01-01 00:00:00.25' AS k")


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_every_timestamp_duckdb_holds_renders(run_cli, fmt):
    r = run_cli("sql", ODD_TIMES, "--format", fmt)
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
