"""`make demo`: index the real all-MiniLM-L6-v2 (shipped in a PyPI package) and query it.

    python -m cli.demo [--db DIR]

Indexes into ./zeropass-db (or $ZEROPASS_DB) unless a complete ``minilm`` is already there
(models are published atomically, so "in the manifest" means complete), then runs a few
example commands and prints their results. Progress goes to stderr.
"""
from __future__ import annotations

import os
import shlex
import sys
import time

import click

EXAMPLES = [
    ["models"],
    ["heads", "paris", "--limit", "5"],
    ["neurons", "paris", "--kind", "ff_value", "--limit", "5"],
    ["show", "minilm", "L5.H3", "--limit", "5"],
    ["tokens", "Paris is the capital of France"],
    ["sql", "SELECT layer, head, round(ov_copying_score, 3) AS ov_copying, round(ov_self_top1_frac, 3) AS self_top1 "
            "FROM heads WHERE model = 'minilm' ORDER BY ov_copying_score DESC NULLS LAST LIMIT 5"],
    ["similar", "minilm", "L5.N100", "--in", "minilm", "--limit", "5"],
    ["enrich", "--set", "months", "--limit", "5"],
]


def ensure_minilm(db: str) -> None:
    from schemas.format import OtherVersion, check_version, read_manifest

    manifest = read_manifest(db) if os.path.isdir(db) else None
    try:
        if manifest:
            check_version(manifest, db)
    except OtherVersion as e:
        raise click.ClickException(
            f"{e}; for the demo, delete it (rm -rf {shlex.quote(db)}) or set ZEROPASS_DB to a new directory, then rerun")
    if manifest and "minilm" in manifest.get("models", {}):
        click.echo(f"minilm already indexed in {db}", err=True)
        return
    from indexer.build import index_model
    from indexer.packaged import minilm_path

    t = time.perf_counter()
    index_model(str(minilm_path()), db, name="minilm", progress=lambda m: click.echo(m, err=True))
    click.echo(f"indexed minilm into {db} in {time.perf_counter() - t:.0f} s", err=True)


@click.command()
@click.option("--db", envvar="ZEROPASS_DB", default="zeropass-db", show_default=True, help="Dataset directory.")
def main(db):
    """Index MiniLM (once) and print example queries."""
    from cli import cli

    ensure_minilm(db)
    for args in EXAMPLES:
        click.echo(f"\n$ zeropass {shlex.join(args)}")
        sys.stdout.flush()
        cli.main(args=args + ["--db", db], prog_name="zeropass", standalone_mode=False)
    shown = "" if db == "zeropass-db" else f" --db {shlex.quote(db)}"
    click.echo(f"\nTo click through it: .venv/bin/zeropass serve{shown}  then open http://127.0.0.1:8765/ : search a token "
               "(e.g. paris) for the heads and neurons that list it, open a head for its OV/QK pairs and score bars, "
               "see layer x head heatmaps of its metrics, and run read-only SQL; JSON at /api.")


if __name__ == "__main__":
    main()
