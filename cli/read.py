"""The read commands: SQL, the helpers (their options made from ``query.params``), serve, the cache."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from itertools import chain

import click

from query import output
from query.errors import Interrupted
from query.params import HELPERS, call

from .base import Place, cli, db_option, emit, helper_options, helper_values, notices, open_dataset, output_options


def _say_hidden(v: dict, quiet: bool, tables, one: str, many: str) -> None:
    """With ``readable``: how many rows it left out (the helpers record it in each table's metadata)."""
    if v["readable"] and not quiet:
        hidden = sum(int((t.schema.metadata or {}).get(b"hidden_rows", 0)) for t in tables)
        click.echo(f"(--readable: {hidden:,} {one if hidden == 1 else many})", err=True)


def _token_label(token, token_id) -> str:
    return f"token id {token_id}" if token_id is not None else repr(token)


@cli.command()
@output_options
def models(db, fmt, quiet):
    """The indexed models, their dimensions and index settings.

    \b
      zeropass models --db zeropass-db
    """
    emit(call(HELPERS["models"], open_dataset(db), {}), fmt, quiet,
         empty="No models indexed yet: add one with `zeropass index MODEL`.")


def _tables_help(width: int = 72) -> str:
    """One line per table of schemas.TABLES: its name and columns (cut to ``width``)."""
    from schemas import TABLES

    pad = max(map(len, TABLES)) + 2
    lines = []
    for name, table in TABLES.items():
        cols = ", ".join(table.column_names)
        room = width - pad
        lines.append(f"  {name:<{pad}}{cols if len(cols) <= room else cols[:room - 2].rsplit(', ', 1)[0] + ', …'}")
    return "\n".join(lines)


@cli.command(help=f"""Run read-only SQL over the dataset's tables (columns and types: docs/TABLES.md, or DESCRIBE heads).

Rows are printed as they are computed: csv and json print every row, table shows the first
1000 and says how many more there are.

\b
{_tables_help()}

\b
  zeropass sql "SELECT layer, head, ov_copying_score FROM heads ORDER BY 3 DESC LIMIT 5"
  zeropass sql "SELECT * FROM tokens WHERE norm = \\$w" -p w paris --format csv
""")
@click.argument("query")
@click.option("--param", "-p", "params", nargs=2, multiple=True, metavar="NAME VALUE",
              help="Bind $NAME to VALUE (a string); repeatable.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Stop the query after this many seconds (Ctrl-C stops it any time).")
@output_options
def sql(query, params, timeout, db, fmt, quiet):
    # The help text (above) lists the tables from their declarations. --timeout covers the open too.
    ds = open_dataset(db, timeout)
    out = sys.stdout
    with _interrupt_on_sigint(ds), ds.stream(query, dict(params) or None, timeout=timeout) as batches:
        rows = iter(batches)
        first = next((b for b in rows if b.num_rows), None)
        if first is None:
            if not quiet:
                click.echo("No rows.", err=True)
            if fmt == "table":
                return
        try:
            written = output.write(chain([first] if first is not None else [], rows), batches.schema, fmt, out,
                                   terminal=out.isatty(), table_rows=output.TABLE_ROWS)
            out.flush()
        except BrokenPipeError:  # `zeropass sql ... | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # no second error at exit
            sys.exit(0)
    if not quiet:
        notices(written.dropped_columns, written.hidden_rows)


@contextmanager
def _interrupt_on_sigint(ds):
    """Ctrl-C stops the running query: ``Dataset.interrupt`` then one ``Error: interrupted`` line.

    While DuckDB computes, the main thread is inside C++ and Python's signal handler waits for
    it; the handler's wakeup fd is written at once, so a watcher thread interrupts DuckDB.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    r, w = os.pipe()
    os.set_blocking(w, False)

    def handler(signum, frame):
        ds.interrupt()
        raise Interrupted("interrupted")

    def watch():
        while data := os.read(r, 64):
            if signal.SIGINT in data:
                ds.interrupt()

    old = signal.signal(signal.SIGINT, handler)
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGINT, old)
        os.close(w)  # the watcher's read returns b"" and it ends
        watcher.join(5)
        os.close(r)


@cli.command()
@helper_options("heads")
@output_options
def heads(db, fmt, quiet, **given):
    """Attention heads whose circuits (top pairs, role lists) contain TOKEN, best first.

    Ranked by relevance = sum of 1/rank over the matching entries; the evidence column lists
    each (circuit, list, rank, tokens, score).

    \b
      zeropass heads paris --circuit ov --limit 10
    """
    v = helper_values("heads", given)
    table = call(HELPERS["heads"], open_dataset(db), v)
    _say_hidden(v, quiet, [table], "pair with an unreadable other token left out", "pairs with an unreadable other token left out")
    emit(table, fmt, quiet,
         empty=f"No head lists {_token_label(v['token'], v['token_id'])} in its {v['side']} entries.")


@cli.command()
@helper_options("neurons")
@output_options
def neurons(db, fmt, quiet, **given):
    """FF neurons (or other vectors, --kind) whose top-k tokens contain TOKEN, by rank then score.

    \b
      zeropass neurons paris --kind ff_value --max-rank 5
    """
    v = helper_values("neurons", given)
    table = call(HELPERS["neurons"], open_dataset(db), v)
    _say_hidden(v, quiet, [table], "unreadable entry above the matches left out of readable_rank",
                "unreadable entries above the matches left out of readable_rank")
    emit(table, fmt, quiet,
         empty=f"No vector lists {_token_label(v['token'], v['token_id'])} in its {v['side']} tokens.")


@cli.command()
@helper_options("show")
@output_options
def show(db, fmt, quiet, **given):
    """Everything stored about one unit: L5.H3 (head), L5.N123 (neuron), L5.H3.d7, P12.

    \b
      zeropass show minilm L5.H3
      zeropass show minilm L2.N100 --format json
    """
    v = helper_values("show", given)
    sections = call(HELPERS["show"], open_dataset(db), v)
    _say_hidden(v, quiet, sections.values(), "list entry hidden within the ranks shown",
                "list entries hidden within the ranks shown")
    if all(t.num_rows == 0 for t in sections.values()):
        if not quiet:
            click.echo(f"Nothing stored for {v['unit']} of {v['model']} (was its layer indexed?).", err=True)
        if fmt != "json":
            return
    if fmt == "json":
        click.echo(json.dumps({name: json.loads(output.to_json(t)) for name, t in sections.items()}, ensure_ascii=False, indent=1))
        return
    first = True
    for name, table in sections.items():
        if not first:
            click.echo("")
        first = False
        click.echo(f"# {name}")
        if table.num_rows:
            emit(table, fmt, quiet)
        elif fmt == "csv":
            click.echo(output.to_csv(table).rstrip("\n"))


@cli.command()
@helper_options("tokens")
@output_options
def tokens(db, fmt, quiet, **given):
    """How TEXT maps to tokens of each model's vocabulary (greedy longest match, no tokenizer).

    \b
      zeropass tokens "Paris is big"
    """
    emit(call(HELPERS["tokens"], open_dataset(db), helper_values("tokens", given)), fmt, quiet)


@cli.command()
@helper_options("features")
@output_options
def features(db, fmt, quiet, **given):
    """Dictionary features (SAEs, transcoders) whose decoder or encoder tokens contain TOKEN, by rank then score.

    \b
      zeropass features paris --kind decoder --max-rank 5
    """
    v = helper_values("features", given)
    emit(call(HELPERS["features"], open_dataset(db), v), fmt, quiet,
         empty=f"No feature lists {_token_label(v['token'], v['token_id'])} in its {v['side']} tokens.")


@cli.command()
@helper_options("dictionaries")
@output_options
def dictionaries(db, fmt, quiet, **given):
    """The indexed dictionaries (SAEs, transcoders) of each model: layer, site, width, source.

    \b
      zeropass dictionaries --model gpt2
    """
    emit(call(HELPERS["dictionaries"], open_dataset(db), helper_values("dictionaries", given)), fmt, quiet,
         empty="No dictionaries indexed: add one with `zeropass index-sae PATH --model M`.")


@cli.command()
@helper_options("enrich")
@click.option("--tokens-file", default=None, metavar="FILE", help="One token a line ('#' comments).")
@click.option("--set", "sets", multiple=True, metavar="NAME", help="A named set shipped with zeropass (see --list-sets).")
@click.option("--list-sets", is_flag=True, help="List the named sets and their sources, then stop.")
@click.option("--matches", is_flag=True, help="Print which words match which token ids in each model, then stop.")
@output_options
def enrich(db, fmt, quiet, tokens_file, sets, list_sets, matches, **given):
    """Units whose stored token lists are enriched in a set of tokens (a concept), best first.

    \b
      zeropass enrich paris london berlin rome madrid
      zeropass enrich --set months --kind ff_value
      zeropass enrich --tokens-file capitals.txt --format json
    """
    from query.enrich import gather, match_summary, set_matches, set_sources

    if list_sets:
        return emit(set_sources(), fmt, quiet)
    v = helper_values("enrich", given)
    v["tokens"] = gather(v["tokens"] or (), tokens_file=tokens_file, sets=sets)
    ds = open_dataset(db)
    found = set_matches(ds, v["tokens"], model=v["model"])
    if matches:
        return emit(found, fmt, quiet)
    table = call(HELPERS["enrich"], ds, v)
    if not quiet:
        for line in match_summary(found):
            click.echo(line, err=True)
    emit(table, fmt, quiet, empty="No list of the kinds searched holds a token of the set.")


@cli.command()
@helper_options("similar")
@output_options
def similar(db, fmt, quiet, **given):
    """Units of another model whose top tokens overlap most with UNIT (weighted Jaccard).

    \b
      zeropass similar minilm L3.N17 --in mpnet
    """
    v = helper_values("similar", given)
    emit(call(HELPERS["similar"], open_dataset(db), v), fmt, quiet,
         empty=f"No unit of {v['in_model']} shares a top token with {v['unit']} of {v['model']}.")


@cli.command()
@helper_options("history")
@output_options
def history(db, fmt, quiet, **given):
    """How a unit's top tokens change across a training-checkpoint SERIES, or (--token) when units
    start promoting a token. One rank column per step; `change` says when it entered or left.

    \b
      zeropass history pythia-70m L3.N117
      zeropass history pythia-70m --token Paris
    """
    v = helper_values("history", given)
    table = call(HELPERS["history"], open_dataset(db), v)
    if v["unit"] is not None:
        empty = f"{v['unit']} has no tokens in its first {v['max_rank']} at any step of {v['series']}."
    else:
        empty = f"No unit of {v['series']} has that token in its first {v['max_rank']} at any step."
    emit(table, fmt, quiet, empty=empty)


@cli.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback: only this machine).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
def serve(db, host, port):
    """Browse the dataset in a web browser: search, unit and head pages, heatmaps, SQL, a JSON API.

    \b
      zeropass serve --db zeropass-db      # then open http://127.0.0.1:8765/
    """
    from query.serve import serve as run

    run(open_dataset(db), host=host, port=port, echo=lambda m: click.echo(m, err=True))


@cli.group()
def cache():
    """The local cache of remote datasets' metadata (manifests' revisions, Parquet footers)."""


@cache.command("clear")
@click.option("--cache-dir", envvar="ZEROPASS_CACHE", default=None, type=Place(local=True),
              help="The cache to clear (default $ZEROPASS_CACHE, else ~/.cache/zeropass).")
def cache_clear(cache_dir):
    """Remove every cached footer and revision; the next remote query fetches them again.

    \b
      zeropass cache clear
    """
    from query.remote import clear_cache

    where, freed, left = clear_cache(cache_dir)
    kept = f"; left {len(left)} entries the cache did not write (e.g. {left[0]})" if left else ""
    click.echo(f"cleared {where} ({freed:,} bytes){kept}", err=True)
