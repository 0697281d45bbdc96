"""Shared test helpers over whole datasets: running the CLI in a process, comparing datasets
table by table, and a larger synthetic dataset (three models, two vocabularies) for remote reads."""
from __future__ import annotations

import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

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



VOCAB = 20000


def _big_model(root: Path, slug: str, vocab_id: str, vocab: pa.Table, seed: int, n_layers=4, d_ff=512, k=32):
    """A model with enough vectors that reading it whole would show (about 1.5 MB per table)."""
    from indexer.dataset import Build

    rng = np.random.default_rng(seed)
    texts = vocab.column("token").to_pylist()
    b = Build(root, slug, {"big": seed})
    for layer in range(n_layers):
        n = d_ff * 2 * 2 * k  # (ff_key, ff_value) x (top, bottom) x k
        idx = np.repeat(np.arange(d_ff), 4 * k)
        kind = np.tile(np.repeat(["ff_key", "ff_value"], 2 * k), d_ff)
        side = np.tile(np.repeat(["top", "bottom"], k), 2 * d_ff)
        rank = np.tile(np.arange(1, k + 1), 4 * d_ff)
        tid = rng.integers(1, VOCAB, n)
        b.write("vectors", pa.table({
            "model": [slug] * n, "layer": pa.array(np.full(n, layer), pa.int16()), "kind": kind,
            "head": pa.nulls(n, pa.int16()), "idx": pa.array(idx, pa.int32()),
            "unit": [f"L{layer}.N{i}" for i in idx], "side": side, "rank": pa.array(rank, pa.int32()),
            "token_id": pa.array(tid, pa.int32()), "token": [texts[t] for t in tid],
            "score": pa.array(rng.standard_normal(n), pa.float32())}), layer=layer)
    b.commit(dict(source=f"synthetic:{slug}", revision=None, architecture="gpt2", hf_architecture=None,
                  n_layers=n_layers, n_heads=1, n_kv_heads=1, d_model=8, d_head=8, d_ff=d_ff, d_vocab=VOCAB, n_ctx=None,
                  tied=True, vocab_id=vocab_id, variant="raw", k=k, n_pairs=0, settings="{}", weights_sha256="{}"),
             vocab_id, vocab)


def build_three(db: Path) -> Path:
    """Three models (two vocabularies of 20,000 tokens), 131,072 vector rows each (15.5 MB in all)."""
    from indexer.tokens import normalise

    words = ["Paris"] + [f"w{i}" for i in range(1, VOCAB)]
    vocab = lambda vid: pa.table({"vocab_id": [vid] * VOCAB, "token_id": pa.array(range(VOCAB), pa.int32()),  # noqa: E731
                                  "piece": words, "token": words, "norm": [normalise(w) for w in words],
                                  "special": [False] * VOCAB})
    _big_model(db, "one", "va", vocab("va"), 1)
    _big_model(db, "two", "va", vocab("va"), 2)
    _big_model(db, "three", "vb", vocab("vb"), 3)
    return db
