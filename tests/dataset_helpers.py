"""Shared test helpers over whole datasets: running the CLI in a process and comparing datasets
table by table (the datasets themselves: tests/builders.py)."""
from __future__ import annotations

import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


from schemas import TABLES
from schemas.layout import read_manifest, table_files

ROOT = Path(__file__).resolve().parents[1]


# The one place tests name the command line's module: `python -m CLI_MODULE` in a subprocess, and
# its click group ``cli`` in this process.
CLI_MODULE = "cli"


def cli_argv(*args) -> list[str]:
    """The argv of the real `zeropass` in a subprocess (for tests that start and signal it themselves)."""
    return [sys.executable, "-m", CLI_MODULE, *map(str, args)]


def run_cli(*args, **kw) -> subprocess.CompletedProcess:
    """The real `zeropass` in a subprocess. Costs an interpreter start and its imports (torch for the
    write commands, about a second of CPU): use it where the process is what the test proves (exit
    codes of the process, signals, SIGKILL, what imported libraries print to the real stderr)."""
    return subprocess.run(cli_argv(*args), capture_output=True, text=True, cwd=ROOT, **kw)


zp = run_cli  # the older name, kept for its many callers


@dataclass
class CliResult:
    """What `invoke_cli` saw, under the names of ``subprocess.CompletedProcess``."""
    returncode: int
    stdout: str
    stderr: str


def invoke_cli(*args, env: dict | None = None) -> CliResult:
    """The command line run in this process by click's CliRunner: the same parsing, `Error:` lines
    and exit codes as the console script, without an interpreter start. An exception the CLI does
    not turn into an `Error:` line propagates (a traceback would be the bug)."""
    from click.testing import CliRunner

    cli = importlib.import_module(CLI_MODULE).cli
    r = CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)
    return CliResult(r.exit_code, r.stdout, r.stderr)


def table_rows(db: Path, table: str, model: str | None = None) -> list[tuple]:
    """Every row of ``table`` (of ``model``) in a stable order; ``created_at`` left out."""
    import duckdb

    manifest = read_manifest(db)
    files = table_files(manifest, table, [model] if model else None)
    if not files:
        return []
    cols = [c for c in TABLES[table].column_names if c != "created_at"]
    q = ", ".join("'" + str(db / f).replace("'", "''") + "'" for f in files)
    con = duckdb.connect()
    try:
        return con.execute(f"SELECT {', '.join(cols)} FROM read_parquet([{q}], hive_partitioning=false) ORDER BY ALL").fetchall()
    finally:
        con.close()


MODEL_TABLES = [t for t in TABLES if t not in ("tokens", "alignments")]


def assert_same_model(a: Path, b: Path, model: str) -> None:
    for table in MODEL_TABLES:
        ra, rb = table_rows(a, table, model), table_rows(b, table, model)
        assert ra == rb, f"{table} differs"
    assert table_rows(a, "tokens") == table_rows(b, "tokens")
