"""The ``zeropass`` command line: each command parses options, calls the library, prints.

Data goes to stdout, progress and notices to stderr. Typed errors (``query.errors.QueryError``,
``indexer.errors.ZeropassError``) become one ``Error:`` line and exit code 1. The indexer (torch,
transformers) is imported only inside the commands that need it.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from itertools import chain

import click

from schemas.kinds import ALL_KINDS, FF_KINDS

from . import output
from .errors import Interrupted, QueryError

INDEX_DEPS = {"torch", "transformers", "safetensors", "numpy", "scipy", "gguf", "accelerate", "tokenizers"}


class _Group(click.Group):
    """Turns the library's typed errors into one-line ``Error:`` messages."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (Interrupted, KeyboardInterrupt):  # Ctrl-C, also before a query runs: one line, SIGINT's code
            click.echo("Error: interrupted", err=True)
            ctx.exit(130)
        except QueryError as e:
            raise click.ClickException(_message(e)) from None
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] in INDEX_DEPS:
                raise click.ClickException(
                    f"this command needs the indexing extra ({e.name} is not installed): pip install 'zeropass[index]'") from None
            raise
        except Exception as e:
            errors = sys.modules.get("indexer.errors")
            if errors is not None and isinstance(e, errors.ZeropassError):
                raise click.ClickException(_message(e)) from None
            raise


def _message(e: Exception) -> str:
    """The error's one line, with control characters (echoed user input) escaped for the terminal."""
    return output.visible(" ".join(str(e).splitlines()))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zeropass", message="zeropass %(version)s")
def cli():
    """zeropass: every parameter of a transformer projected into vocabulary space, queried with SQL.

    \b
      zeropass index path/to/model --name minilm
      zeropass heads paris
      zeropass sql "SELECT * FROM heads ORDER BY ov_copying_score DESC LIMIT 5"
    """


# -- shared options (declared once) ------------------------------------------------------------

def _keep_cache_dir(ctx, param, value):
    ctx.meta["zeropass.cache_dir"] = value
    return value


# Commands that write into --db (or, for check, read it as local files): a URL is read-only.
_LOCAL_DB_COMMANDS = {"index", "diff", "align", "check"}


def _check_db(ctx, param, value):
    from .remote import is_url

    if value is not None and ctx.info_name in _LOCAL_DB_COMMANDS and is_url(value):
        raise click.ClickException(
            f"--db {value} is a URL, and a dataset at a URL is read-only: run `zeropass {ctx.info_name}` on a local "
            f"directory, then `zeropass publish DIR {value}`")
    return value


def db_option(f):
    # --cache-dir rides along with --db (it only matters for a URL) without joining every signature.
    f = click.option("--cache-dir", envvar="ZEROPASS_CACHE", default=None, expose_value=False, callback=_keep_cache_dir,
                     type=click.Path(file_okay=False),
                     help="Where a remote dataset's metadata is cached (default $ZEROPASS_CACHE, else ~/.cache/zeropass).")(f)
    return click.option("--db", "db", envvar="ZEROPASS_DB", default="zeropass-db", show_default=True,
                        type=click.Path(file_okay=False), callback=_check_db,
                        help="Dataset directory or URL (default $ZEROPASS_DB, else ./zeropass-db).")(f)


def format_option(f):
    return click.option("--format", "fmt", type=click.Choice(output.FORMATS), default="table", show_default=True,
                        help="table (aligned, cut to the terminal), csv or json (exact and complete).")(f)


def model_option(f):
    return click.option("--model", "-m", "model", multiple=True,
                        help="Only these models (repeat, or a comma list). Default: all.")(f)


def quiet_option(f):
    return click.option("--quiet", "-q", is_flag=True, help="No progress or notices on stderr.")(f)


def output_options(f):
    return db_option(format_option(quiet_option(f)))


def token_options(f):
    f = click.option("--exact", is_flag=True, help="Match the decoded token text exactly as given (spaces count).")(f)
    f = click.option("--id", "token_id", type=int, default=None, help="Match this token id instead of TOKEN.")(f)
    f = click.option("--side", type=click.Choice(["top", "bottom", "both"]), default="top", show_default=True,
                     help="Search the top (largest) or bottom (most negative) lists.")(f)
    f = click.option("--limit", "-n", type=int, default=20, show_default=True, help="At most this many rows (0: all).")(f)
    return f


def index_options(f):
    # Ranges are checked by the library (indexer.build._check_options), before the model is loaded,
    # so that library callers get the same one-line BadOption as the command line.
    f = click.option("--k", "k", type=int, default=50, show_default=True,
                     help="Tokens kept per side for each vector (more than the vocabulary: the whole vocabulary).")(f)
    f = click.option("--pairs", "n_pairs", type=int, default=200, show_default=True,
                     help="Entries kept per side for each head circuit (QK, OV); 0: none.")(f)
    f = click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")(f)
    f = click.option("--layers", default=None, help="Only these layers, e.g. 0-5 or 0,3,7 (default: all).")(f)
    f = click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) checkpoints: runs code from the file.")(f)
    return f


def replace_option(f):
    return click.option("--replace", is_flag=True,
                        help="Replace a model of the same name indexed from another checkpoint (refused without it).")(f)


def _open(db):
    from .dataset import Dataset

    ctx = click.get_current_context(silent=True)
    return Dataset(db, cache_dir=ctx.meta.get("zeropass.cache_dir") if ctx else None)


def _progress(quiet: bool):
    return None if quiet else (lambda msg: click.echo(msg, err=True))


def _emit(table, fmt: str, quiet: bool, empty: str | None = None) -> None:
    if table.num_rows == 0 and empty:
        if not quiet:
            click.echo(empty, err=True)
        if fmt == "table":
            return
    text, dropped = output.render(table, fmt, terminal=sys.stdout.isatty())
    click.echo(text)
    if not quiet:
        _notices(dropped, 0)


def _notices(dropped_columns: int, hidden_rows: int) -> None:
    if dropped_columns:
        click.echo(f"({dropped_columns} more column{'s' if dropped_columns > 1 else ''} not shown: widen the terminal "
                   f"or use --format csv/json)", err=True)
    if hidden_rows:
        click.echo(f"({hidden_rows:,} more row{'s' if hidden_rows > 1 else ''} not shown: use --format csv or json "
                   f"for every row, or LIMIT)", err=True)


def _limit(n: int) -> int | None:
    return None if n == 0 else n


def _token_label(token, token_id) -> str:
    return f"token id {token_id}" if token_id is not None else repr(token)


# -- commands ----------------------------------------------------------------------------------

@cli.command()
@click.argument("model_ref", metavar="MODEL")
@db_option
@click.option("--name", help="Short name (slug) for the model in the dataset; default from MODEL.")
@click.option("--variant", type=click.Choice(["raw", "folded"]), default="raw", show_default=True,
              help="raw (the paper) or folded (norm gains folded in).")
@index_options
@click.option("--vocab-filter", default=None, metavar="alpha|words|FILE",
              help="Lists over readable tokens only: alpha (letters), words (common English words) or a word-list FILE.")
@replace_option
@quiet_option
def index(model_ref, db, name, variant, k, n_pairs, device, layers, allow_pickle, vocab_filter, replace, quiet):
    """Project every parameter of MODEL and add it to the dataset.

    MODEL is a local Hugging Face directory, a GGUF file or a hub id.

    \b
      zeropass index ./all-MiniLM-L6-v2 --name minilm --db zeropass-db
    """
    from indexer.build import index_model

    entry = index_model(model_ref, db, name=name, k=k, n_pairs=n_pairs, variant=variant, device=device,
                        layers=layers, allow_pickle=allow_pickle, replace=replace, progress=_progress(quiet),
                        vocab_filter=vocab_filter)
    if not quiet:
        rows = ", ".join(f"{t} {n}" for t, n in entry.get("row_counts", {}).items())
        click.echo(f"indexed {model_ref} into {db} ({rows})", err=True)


@cli.command()
@output_options
def models(db, fmt, quiet):
    """The indexed models, their dimensions and index settings.

    \b
      zeropass models --db zeropass-db
    """
    _emit(_open(db).models(), fmt, quiet, empty="No models indexed yet: add one with `zeropass index MODEL`.")


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
    # The help text (above) lists the tables from their declarations.
    ds = _open(db)
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
        _notices(written.dropped_columns, written.hidden_rows)


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
@click.argument("token", required=False)
@model_option
@click.option("--circuit", type=click.Choice(["ov", "qk"]), multiple=True, help="Only this circuit (default both).")
@click.option("--readable", is_flag=True, help="Leave out pairs whose other token is not letters (fragments, digits, punctuation).")
@token_options
@output_options
def heads(token, model, circuit, readable, exact, token_id, side, limit, db, fmt, quiet):
    """Attention heads whose circuits (top pairs, role lists) contain TOKEN, best first.

    Ranked by relevance = sum of 1/rank over the matching entries; the evidence column lists
    each (circuit, list, rank, tokens, score).

    \b
      zeropass heads paris --circuit ov --limit 10
    """
    table = _open(db).heads(token, model=model or None, circuit=circuit or None, side=side, limit=_limit(limit),
                            exact=exact, token_id=token_id, readable=readable)
    if readable and not quiet:
        hidden = int((table.schema.metadata or {}).get(b"hidden_rows", 0))
        click.echo(f"(--readable: {hidden:,} pair{'' if hidden == 1 else 's'} with an unreadable other token left out)", err=True)
    _emit(table, fmt, quiet, empty=f"No head lists {_token_label(token, token_id)} in its {side} entries.")


@cli.command()
@click.argument("token", required=False)
@model_option
@click.option("--kind", multiple=True, help=f"Vector kinds (repeat or comma list): {', '.join(ALL_KINDS)}. "
              f"Default: {', '.join(FF_KINDS)}.")
@click.option("--max-rank", type=int, default=None, help="Only matches at this rank or better.")
@click.option("--readable", is_flag=True, help="Add readable_rank: the rank once entries that are not letters are left out.")
@token_options
@output_options
def neurons(token, model, kind, max_rank, readable, exact, token_id, side, limit, db, fmt, quiet):
    """FF neurons (or other vectors, --kind) whose top-k tokens contain TOKEN, by rank then score.

    \b
      zeropass neurons paris --kind ff_value --max-rank 5
    """
    table = _open(db).neurons(token, model=model or None, kind=kind or None, max_rank=max_rank, side=side,
                              limit=_limit(limit), exact=exact, token_id=token_id, readable=readable)
    if readable and not quiet:
        hidden = int((table.schema.metadata or {}).get(b"hidden_rows", 0))
        click.echo(f"(--readable: {hidden:,} unreadable entr{'y' if hidden == 1 else 'ies'} above the matches left out of readable_rank)", err=True)
    _emit(table, fmt, quiet, empty=f"No vector lists {_token_label(token, token_id)} in its {side} tokens.")


@cli.command()
@click.argument("model")
@click.argument("unit")
@click.option("--limit", "-n", type=int, default=10, show_default=True, help="Ranks shown per list (0: all).")
@click.option("--readable", is_flag=True, help="Hide list entries whose text is not letters (fragments, digits, punctuation).")
@output_options
def show(model, unit, limit, readable, db, fmt, quiet):
    """Everything stored about one unit: L5.H3 (head), L5.N123 (neuron), L5.H3.d7, P12.

    \b
      zeropass show minilm L5.H3
      zeropass show minilm L2.N100 --format json
    """
    sections = _open(db).show(model, unit, limit=_limit(limit), readable=readable)
    if readable and not quiet:
        hidden = sum(int((t.schema.metadata or {}).get(b"hidden_rows", 0)) for t in sections.values())
        click.echo(f"(--readable: {hidden:,} list entr{'y' if hidden == 1 else 'ies'} hidden within the ranks shown)", err=True)
    if all(t.num_rows == 0 for t in sections.values()):
        if not quiet:
            click.echo(f"Nothing stored for {unit} of {model} (was its layer indexed?).", err=True)
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
            _emit(table, fmt, quiet)
        elif fmt == "csv":
            click.echo(output.to_csv(table).rstrip("\n"))


@cli.command()
@click.argument("text")
@model_option
@output_options
def tokens(text, model, db, fmt, quiet):
    """How TEXT maps to tokens of each model's vocabulary (greedy longest match, no tokenizer).

    \b
      zeropass tokens "Paris is big"
    """
    _emit(_open(db).tokens(text, model=model or None), fmt, quiet)


@cli.command()
@click.argument("model")
@click.argument("unit")
@click.option("--in", "in_model", required=True, help="The model to search (may be MODEL itself).")
@click.option("--limit", "-n", type=int, default=10, show_default=True, help="At most this many units (0: all).")
@output_options
def similar(model, unit, in_model, limit, db, fmt, quiet):
    """Units of another model whose top tokens overlap most with UNIT (weighted Jaccard).

    \b
      zeropass similar minilm L3.N17 --in mpnet
    """
    table = _open(db).similar(model, unit, in_model, limit=_limit(limit))
    _emit(table, fmt, quiet, empty=f"No unit of {in_model} shares a top token with {unit} of {model}.")


@cli.command()
@click.argument("model_ref", metavar="MODEL")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) checkpoints.")
@format_option
@quiet_option
def coverage(model_ref, allow_pickle, fmt, quiet):
    """Every tensor of MODEL's checkpoint: which table projects it, or why none does.

    \b
      zeropass coverage ./all-MiniLM-L6-v2 --format json
    """
    import pyarrow as pa

    from indexer.coverage import coverage_rows

    rows = coverage_rows(model_ref, allow_pickle=allow_pickle)
    cols = ["name", "shape", "layer", "role", "covered_by", "reason"]
    table = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows])
    _emit(table, fmt, quiet, empty=f"No tensors found in {model_ref}.")


def _model_ref(ref: str, db) -> tuple[str, str | None]:
    """A dataset slug resolves to the source it was indexed from; anything else is a MODEL."""
    from schemas.layout import read_manifest

    try:
        manifest = read_manifest(db) if db and os.path.isdir(db) else None
    except ValueError:
        manifest = None
    models = manifest.get("models") if isinstance(manifest, dict) else None
    entry = models.get(ref) if isinstance(models, dict) else None  # a malformed manifest names nothing
    if isinstance(entry, dict) and isinstance(entry.get("source"), str) and not os.path.exists(ref):
        return entry["source"], ref
    return ref, None


@cli.command()
@click.argument("model_a")
@click.argument("model_b")
@output_options
def align(model_a, model_b, db, fmt, quiet):
    """Align the layers and units of two models in embedding space (paper §5).

    MODEL_A / MODEL_B are checkpoints, or names of models in --db (their source is loaded).
    The results are stored in the `alignments` table of --db (replacing an earlier run for
    the same pair), so they can be queried with `zeropass sql` afterwards.

    \b
      zeropass align ./all-MiniLM-L6-v2 ./all-mpnet-base-v2
    """
    from indexer.align import align_models, format_layer_table

    (ref_a, name_a), (ref_b, name_b) = _model_ref(model_a, db), _model_ref(model_b, db)
    if not quiet:
        click.echo(f"aligning {ref_a} and {ref_b}", err=True)
    result, table = align_models(ref_a, ref_b, name_a=name_a, name_b=name_b)
    from indexer.dataset import store_alignment

    rel = store_alignment(db, result.model_a, result.model_b, table)
    if not quiet:
        click.echo(f"stored {table.num_rows:,} rows in the alignments table of {db} ({rel})", err=True)
    if fmt == "table":
        click.echo(format_layer_table(result))
    else:
        _emit(table, fmt, quiet)


@cli.command()
@click.argument("base")
@click.argument("tuned")
@db_option
@click.option("--name", help="Name of the diff model in the dataset (default: TUNED's name + -diff).")
@index_options
@replace_option
@quiet_option
def diff(base, tuned, db, name, k, n_pairs, device, layers, allow_pickle, replace, quiet):
    """Index the fine-tuning delta TUNED - BASE as its own model (paper §4).

    \b
      zeropass diff ./base ./tuned --name tuned-diff
      zeropass neurons paris --model tuned-diff
    """
    from indexer.build import index_diff

    entry = index_diff(base, tuned, db, name=name, k=k, n_pairs=n_pairs, device=device, layers=layers,
                       allow_pickle=allow_pickle, replace=replace, progress=_progress(quiet))
    if not quiet:
        rows = ", ".join(f"{t} {n}" for t, n in entry.get("row_counts", {}).items())
        click.echo(f"indexed {tuned} - {base} into {db} ({rows})", err=True)


@cli.command("index-many")
@click.argument("spec", type=click.Path(dir_okay=False))
@db_option
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Build on Ray: one task per model (per layer range for large ones); without ADDRESS a local Ray.")
@quiet_option
def index_many(spec, db, ray_address, quiet):
    """Index every model (and training-checkpoint series) a TOML SPEC lists into one dataset.

    A rerun does only what is missing; a model that fails is reported and the others go on.

    \b
      zeropass index-many family.toml --db family-db
      zeropass index-many family.toml --db family-db --ray ray://head:10001
    """
    from indexer.many import index_many as build_many

    report = build_many(spec, db, ray=ray_address or None, use_ray=ray_address is not None, progress=_progress(quiet))
    if report.failed:
        names = "; ".join(f"{n} ({why})" for n, why in report.failed.items())
        raise click.ClickException(f"{len(report.failed)} of {len(report.failed) + len(report.built) + len(report.skipped)} "
                                   f"models failed: {names}; rerun the same command to retry them")
    if not quiet:
        click.echo(f"{len(report.built)} model(s) indexed, {len(report.skipped)} already in {db}", err=True)


@cli.command()
@click.argument("series")
@click.argument("unit", required=False)
@click.option("--token", "token", default=None, help="Instead of UNIT: the units that have this token in their lists, per step.")
@click.option("--exact", is_flag=True, help="Match --token's decoded text exactly as given (spaces count).")
@click.option("--id", "token_id", type=int, default=None, help="Instead of --token: this token id.")
@click.option("--kind", multiple=True, help="UNIT: the list read (neuron: ff_value; head dim: o; head: its OV output). "
              "--token: kinds searched (default ff_value, o, ov_output).")
@click.option("--side", type=click.Choice(["top", "bottom", "both"]), default="top", show_default=True)
@click.option("--max-rank", type=int, default=10, show_default=True, help="A token counts as in a list down to this rank.")
@click.option("--limit", "-n", type=int, default=50, show_default=True, help="--token: at most this many units (0: all).")
@output_options
def history(series, unit, token, exact, token_id, kind, side, max_rank, limit, db, fmt, quiet):
    """How a unit's top tokens change across a training-checkpoint SERIES, or (--token) when units
    start promoting a token. One rank column per step; `change` says when it entered or left.

    \b
      zeropass history pythia-70m L3.N117
      zeropass history pythia-70m --token Paris
    """
    from .history import history as unit_history, token_history

    ds = _open(db)
    if (unit is None) == (token is None and token_id is None):
        raise click.UsageError("give either UNIT or --token TOKEN (or --id N)")
    if unit is not None:
        if len(kind) > 1:
            raise click.UsageError("UNIT takes one --kind")
        table = unit_history(ds, series, unit, kind=kind[0] if kind else None, side=side, max_rank=max_rank)
        _emit(table, fmt, quiet, empty=f"{unit} has no tokens in its first {max_rank} at any step of {series}.")
    else:
        table = token_history(ds, series, token, exact=exact, token_id=token_id, kind=list(kind) or None, side=side,
                              max_rank=max_rank, limit=_limit(limit))
        _emit(table, fmt, quiet, empty=f"No unit of {series} has that token in its first {max_rank} at any step.")


@cli.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(file_okay=False), metavar="SRC...")
@click.option("--into", "into", required=True, type=click.Path(file_okay=False), help="The dataset to merge into (created when new).")
@quiet_option
def merge(sources, into, quiet):
    """Merge datasets built elsewhere (or layer shards of one model) into one dataset.

    \b
      zeropass merge machine-a-db machine-b-db --into family-db
    """
    from indexer.merge import merge as merge_datasets

    merge_datasets(list(sources), into, progress=_progress(quiet))


@cli.command()
@db_option
@quiet_option
def compact(db, quiet):
    """Fold every table's per-model files into one file across models (faster helpers with many models).

    Atomic: a kill leaves the dataset as it was; rerun to finish. The per-model files stay (they
    are what a compaction is rebuilt from). Needs no torch.

    \b
      zeropass compact --db zeropass-db
    """
    from indexer.compact import compact as compacting

    section = compacting(db, progress=None if quiet else (lambda m: click.echo(m, err=True)))
    if not quiet:
        click.echo(f"compacted {len(section)} tables of {db}" if section else f"nothing to compact in {db} (fewer than 2 models)", err=True)


@cli.command()
@db_option
@click.option("--repair", is_flag=True, help="Rewrite a stale catalog and delete leftover files (under the writer lock).")
@click.option("--recover", is_flag=True, help="Rebuild a lost or unreadable manifest.json from the dataset's files.")
@click.option("--quick", is_flag=True, help="Skip the sha256 of every file (sizes, footers and row counts are still checked).")
@quiet_option
def check(db, repair, recover, quick, quiet):
    """Verify the dataset: manifest, files, Parquet footers, row counts, hashes, catalog, leftovers.

    Prints one line per problem, naming the model and the command that repairs it; exit code 0
    when the dataset is sound, 1 otherwise. Needs no torch.

    \b
      zeropass check --db zeropass-db
      zeropass check --db zeropass-db --repair
    """
    from indexer import check as checking

    if repair and recover:
        raise click.UsageError("give --repair or --recover, not both (recover first, then repair)")
    if recover:
        manifest = checking.recover(db)
        if not quiet:
            click.echo(f"rebuilt {db}/manifest.json from the files: {len(manifest['models'])} models "
                       f"({', '.join(sorted(manifest['models'])) or 'none'})", err=True)
    elif repair:
        checking.repair(db)
    report = checking.check_dataset(db, hashes=not quick, db=db)
    for problem in report.problems:
        click.echo(str(problem))
    if not quiet:
        for note in report.notes:
            click.echo(f"note: {note}", err=True)
        verdict = "ok" if report.ok else f"{len(report.problems)} problem{'s' * (len(report.problems) != 1)}"
        click.echo(f"{verdict}: {report.models} models, {report.files} files checked in {db}", err=True)
    if not report.ok:
        sys.exit(1)


@cli.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback: only this machine).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
def serve(db, host, port):
    """Browse the dataset in a web browser: search, unit and head pages, heatmaps, SQL, a JSON API.

    \b
      zeropass serve --db zeropass-db      # then open http://127.0.0.1:8765/
    """
    from .serve import serve as run

    run(_open(db), host=host, port=port, echo=lambda m: click.echo(m, err=True))


@cli.command()
@click.argument("db", type=click.Path(file_okay=False))
@click.argument("dest")
@click.option("--dry-run", is_flag=True, help="Say what would be copied and deleted; change nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def publish(db, dest, dry_run, quiet):
    """Copy dataset DB to DEST (a directory or an fsspec URL), data first, manifest last.

    Publishing again copies only what changed. Readers of DEST (`--db DEST`) never see a
    half-published dataset.

    \b
      zeropass publish zeropass-db /srv/www/zeropass-db
      zeropass publish zeropass-db s3://bucket/zeropass-db --dry-run
      zeropass publish zeropass-db hf://datasets/ORG/NAME
    """
    from indexer.publish import publish_dataset

    plan = publish_dataset(db, dest, dry_run=dry_run, progress=_progress(quiet))
    if dry_run:
        for rel in plan.upload:
            click.echo(f"copy {rel}")
        for rel in plan.delete:
            click.echo(f"delete {rel}")
    if not quiet or dry_run:
        click.echo(("would publish: " if dry_run else f"published {db} to {plan.dest}: ") + plan.summary(), err=True)


@cli.group()
def cache():
    """The local cache of remote datasets' metadata (manifests' revisions, Parquet footers)."""


@cache.command("clear")
@click.option("--cache-dir", envvar="ZEROPASS_CACHE", default=None, type=click.Path(file_okay=False),
              help="The cache to clear (default $ZEROPASS_CACHE, else ~/.cache/zeropass).")
def cache_clear(cache_dir):
    """Remove every cached footer and revision; the next remote query fetches them again.

    \b
      zeropass cache clear
    """
    from .remote import clear_cache

    where, freed = clear_cache(cache_dir)
    click.echo(f"cleared {where} ({freed:,} bytes)", err=True)


# -- enrich (issue 23) --------------------------------------------------------------------------

@cli.command()
@click.argument("tokens", nargs=-1)
@click.option("--tokens-file", default=None, metavar="FILE", help="One token a line ('#' comments).")
@click.option("--set", "sets", multiple=True, metavar="NAME", help="A named set shipped with zeropass (see --list-sets).")
@click.option("--list-sets", is_flag=True, help="List the named sets and their sources, then stop.")
@click.option("--matches", is_flag=True, help="Print which words match which token ids in each model, then stop.")
@model_option
@click.option("--kind", multiple=True, help="Lists to search (repeat or comma list): vector kinds, ov:source, ov:output, "
              "qk:query, qk:key. Default: FF neurons, head dimensions and head role lists.")
@click.option("--side", type=click.Choice(["top", "bottom", "both"]), default="top", show_default=True,
              help="Search the top (largest) or bottom (most negative) lists.")
@click.option("--limit", "-n", type=int, default=20, show_default=True, help="At most this many rows (0: all).")
@output_options
def enrich(tokens, tokens_file, sets, list_sets, matches, model, kind, side, limit, db, fmt, quiet):
    """Units whose stored token lists are enriched in a set of tokens (a concept), best first.

    \b
      zeropass enrich paris london berlin rome madrid
      zeropass enrich --set months --kind ff_value
      zeropass enrich --tokens-file capitals.txt --format json
    """
    from . import enrich as lib

    if list_sets:
        return _emit(lib.set_sources(), fmt, quiet)
    words = lib.gather(tokens, tokens_file=tokens_file, sets=sets)
    ds = _open(db)
    found = lib.set_matches(ds, words, model=model or None)
    if matches:
        return _emit(found, fmt, quiet)
    table = ds.enrich(words, model=model or None, kind=kind or None, side=side, limit=_limit(limit))
    if not quiet:
        for line in lib.match_summary(found):
            click.echo(line, err=True)
    _emit(table, fmt, quiet, empty="No list of the kinds searched holds a token of the set.")


def main(argv=None):
    """Console script entry point."""
    return cli.main(args=argv, prog_name="zeropass")


if __name__ == "__main__":
    main()
