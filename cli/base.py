"""The click group and the options every command shares, each declared once.

Typed errors (``query.errors.QueryError``, ``indexer.errors.ZeropassError``) become one ``Error:``
line and exit code 1. A helper's arguments and options are made from its declaration in
``query.params`` (:func:`helper_options`), so the command line, the JSON API and the Python
signature cannot disagree.
"""
from __future__ import annotations

import sys

import click

from query import output
from query.errors import BadOption, Interrupted, QueryError
from query.params import HELPERS, Param
from query.remote import is_url, local_path

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
            raise click.ClickException(message(e)) from None
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] in INDEX_DEPS:
                raise click.ClickException(
                    f"this command needs the indexing extra ({e.name} is not installed): pip install 'zeropass[index]'") from None
            raise
        except Exception as e:
            errors = sys.modules.get("indexer.errors")
            if errors is not None and isinstance(e, errors.ZeropassError):
                raise click.ClickException(message(e)) from None
            raise


def message(e: Exception) -> str:
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


# -- where a dataset is: write intent is a property of the option ------------------------------

class Place(click.ParamType):
    """A dataset's place (or a cache's): a directory, or, where only read, a URL.

    ``write=True`` (the command writes there) and ``local=True`` (it reads local files, or it is a
    cache) refuse a URL here, while the arguments are parsed: before any command body runs, so
    no directory or lock is ever made from a URL's text (``./https:/host/d/.lock``). A
    ``file://`` URL is the directory it names.
    """

    name = "directory"

    def __init__(self, *, write: bool = False, local: bool = False):
        self.write, self.local = write, local

    def convert(self, value, param, ctx):
        if value is None or not isinstance(value, str):
            return value
        if (self.write or self.local) and is_url(value):
            command = ctx.command_path if ctx is not None else "zeropass"
            what = param.opts[0] if param is not None and param.opts and param.param_type_name == "option" else \
                (param.human_readable_name if param is not None else "the dataset")
            if self.write:
                raise click.ClickException(
                    f"{what} {value} is a URL, and a dataset at a URL is read-only: run `{command}` on a local "
                    f"directory, then `zeropass publish DIR {value}`")
            raise click.ClickException(f"{what} {value} is a URL: `{command}` needs a local directory")
        return local_path(value) if (self.write or self.local) else value


def _keep_cache_dir(ctx, param, value):
    ctx.meta["zeropass.cache_dir"] = value
    return value


CACHE_HELP = "Where a remote dataset's metadata is cached (default $ZEROPASS_CACHE, else ~/.cache/zeropass)."


def db_option(f=None, *, write: bool = False, local: bool = False):
    """``--db`` (and ``--cache-dir`` riding along). ``write=True``: the command writes into it;
    ``local=True``: it reads the directory's files itself. Either refuses a URL."""
    def decorate(f):
        # --cache-dir only matters for a URL, so it joins no signature.
        f = click.option("--cache-dir", envvar="ZEROPASS_CACHE", default=None, expose_value=False, callback=_keep_cache_dir,
                         type=Place(local=True), help=CACHE_HELP)(f)
        return click.option("--db", "db", envvar="ZEROPASS_DB", default="zeropass-db", show_default=True,
                            type=Place(write=write, local=local),
                            help="Dataset directory or URL (default $ZEROPASS_DB, else ./zeropass-db)." if not (write or local)
                            else "Dataset directory (default $ZEROPASS_DB, else ./zeropass-db).")(f)
    return decorate(f) if f is not None else decorate


def format_option(f):
    return click.option("--format", "fmt", type=click.Choice(output.FORMATS), default="table", show_default=True,
                        help="table (aligned, cut to the terminal), csv or json (exact and complete).")(f)


def quiet_option(f):
    return click.option("--quiet", "-q", is_flag=True, help="No progress or notices on stderr.")(f)


def output_options(f):
    return db_option(format_option(quiet_option(f)))


# -- a helper's parameters, from their one declaration -----------------------------------------

class Spec(click.ParamType):
    """A ``query.params.Param``'s own parser as a click type: the text means what it means in a URL."""

    def __init__(self, p: Param):
        self.p = p
        self.name = p.metavar or getattr(p.parse, "metavar", None) or (
            f"[{'|'.join(p.choices)}]" if p.choices and len(p.choices) < 5 else "TEXT")

    def convert(self, value, param, ctx):
        if not isinstance(value, str):  # a default
            return value
        try:
            return self.p.parse(self.p.cli_name if not self.p.argument else self.p.name.upper(), value)
        except BadOption as e:
            self.fail(str(e), param, ctx)


def helper_options(name: str):
    """The click arguments and options of helper ``name`` (``query.params.HELPERS``), in its order."""
    def decorate(f):
        for p in reversed(HELPERS[name].params):
            if p.argument:
                label, more = p.name.upper(), "..." if p.multiple else ""  # a repeated argument: TOKENS...
                f = click.argument(p.name, required=p.required, type=Spec(p), nargs=-1 if p.multiple else 1,
                                   metavar=f"{label}{more}" if p.required else f"[{label}]{more}")(f)
                continue
            decls = [p.cli_name] + ([p.short] if p.short else []) + [p.name]
            if p.flag:
                f = click.option(*decls, is_flag=True, default=p.default, help=p.help)(f)
            elif p.multiple:
                f = click.option(*decls, multiple=True, type=Spec(p), help=p.help, metavar=Spec(p).name)(f)
            else:
                f = click.option(*decls, type=Spec(p), default=p.default, show_default=p.default is not None,
                                 required=p.required, help=p.help, metavar=Spec(p).name)(f)
        return f
    return decorate


def helper_values(name: str, given: dict) -> dict:
    """The helper's keyword arguments from a command's parsed values (nothing repeated: None, as in a URL)."""
    return {p.name: (list(given[p.name]) or None) if p.multiple else given[p.name] for p in HELPERS[name].params}


# -- reading and printing ----------------------------------------------------------------------

def open_dataset(db, timeout: float | None = None):
    from query.dataset import Dataset

    ctx = click.get_current_context(silent=True)
    return Dataset(db, cache_dir=ctx.meta.get("zeropass.cache_dir") if ctx else None, timeout=timeout)


def progress(quiet: bool):
    return None if quiet else (lambda msg: click.echo(msg, err=True))


def emit(table, fmt: str, quiet: bool, empty: str | None = None) -> None:
    if table.num_rows == 0 and empty:
        if not quiet:
            click.echo(empty, err=True)
        if fmt == "table":
            return
    text, dropped = output.render(table, fmt, terminal=sys.stdout.isatty())
    click.echo(text)
    if not quiet:
        notices(dropped, 0)


def notices(dropped_columns: int, hidden_rows: int) -> None:
    if dropped_columns:
        click.echo(f"({dropped_columns} more column{'s' if dropped_columns > 1 else ''} not shown: widen the terminal "
                   f"or use --format csv/json)", err=True)
    if hidden_rows:
        click.echo(f"({hidden_rows:,} more row{'s' if hidden_rows > 1 else ''} not shown: use --format csv or json "
                   f"for every row, or LIMIT)", err=True)
