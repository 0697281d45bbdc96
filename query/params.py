"""Each helper's parameters, declared once (docs/DESIGN.md §6): the CLI's options, the JSON API and the explorer's pages derive from here.

A :class:`Param` names a helper's keyword, its one parser (the text a user typed on the command
line or sent in a URL -> the value the helper gets), its default, help and choices. ``cli/`` makes
click arguments and options of them (``cli.base.helper_options``), ``query.serve`` parses query
strings with :func:`from_query` and documents ``/api`` with them, and ``tests/test_params.py``
checks that each helper's Python signature has exactly these names and defaults.

>>> HELPERS["heads"].names()
['token', 'model', 'circuit', 'side', 'limit', 'exact', 'token_id']
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from schemas.kinds import ALL_KINDS, FF_KINDS

from .errors import BadOption

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


# -- the parsers: text -> value, BadOption naming the parameter --------------------------------

def text(name: str, raw: str) -> str:
    return raw


def whole(*, zero_is_all: bool = False) -> Callable[[str, str], int | None]:
    """A whole number; with ``zero_is_all`` 0 means no bound (None), as ``--limit 0`` always has.

    Ranges are the helper's to check (``query.helpers._bound``), so a Python caller, the command
    line and a URL get the same message for ``limit=-1``.
    """
    def parse(name: str, raw: str) -> int | None:
        try:
            n = int(str(raw).strip())
        except ValueError:  # also text of more than 4,300 digits
            raise BadOption(f"{name} must be a whole number, got {raw!r}") from None
        return None if zero_is_all and n == 0 else n
    parse.metavar = "INTEGER"
    return parse


def boolean(name: str, raw: str) -> bool:
    """1/true/yes/on or 0/false/no/off (empty: false); anything else is refused, not read as false."""
    v = str(raw).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE or v == "":
        return False
    raise BadOption(f"{name} must be 1 or 0 (true/false), got {raw!r}")


def choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw not in allowed:
            raise BadOption(f"unknown {name} {raw!r}: use one of {', '.join(allowed)}")
        return raw
    return parse


@dataclass(frozen=True)
class Param:
    """One keyword of a helper, as the command line and the HTTP API both take it."""

    name: str                      # the helper's keyword
    parse: Callable[[str, str], object] = text  # (name, text) -> value; raises BadOption
    default: object = None
    help: str = ""
    choices: tuple[str, ...] | None = None  # shown in --help and /api; multiple values are checked by the helper
    multiple: bool = False         # repeatable (each may be a comma list): the helper gets a list, or None for none
    argument: bool = False         # positional on the command line (TOKEN, MODEL, UNIT)
    required: bool = False
    flag: bool = False             # a switch: --exact on the command line, exact=1 in a URL
    option: str | None = None      # the command line's spelling, e.g. "--id" (default --name-with-dashes)
    short: str | None = None       # e.g. "-n"
    key: str | None = None         # the query-string key, e.g. "id", "in" (default: name)
    metavar: str | None = None

    @property
    def cli_name(self) -> str:
        return self.option or "--" + self.name.replace("_", "-")

    @property
    def query_key(self) -> str:
        return self.key or self.name

    def read(self, values: list[str], key: str | None = None):
        """This parameter's value from every value sent for it (none: the default)."""
        key = key or self.query_key
        if not values:
            if self.required:
                raise BadOption(f"missing ?{key}=: give {self.help or self.name}")
            return self.default
        if self.multiple:
            return [self.parse(key, v) for v in values]
        if len(values) > 1:
            raise BadOption(f"?{key}= given {len(values)} times: give it once")
        return (boolean if self.flag else self.parse)(key, values[0])


@dataclass(frozen=True)
class Helper:
    """A helper's parameters, in the order of its Python signature (after ``ds``)."""

    name: str
    params: tuple[Param, ...]
    summary: str = ""
    needs: tuple[tuple[str, ...], ...] = field(default=())  # of each group, at least one must be given

    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def __getitem__(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)


def from_query(helper: Helper, get: Callable[[str], list[str]]) -> dict:
    """The helper's keyword arguments from a query string (``get(key)``: every value sent for key).

    One parser for the JSON API and the pages: a missing required value, a value that does not
    parse and a single-valued key sent twice are each a BadOption naming the key.
    """
    out = {p.name: p.read(get(p.query_key)) for p in helper.params}
    for group in helper.needs:
        if all(out[n] in (None, "") for n in group):
            keys = " or ".join(f"?{helper[n].query_key}=" for n in group)
            raise BadOption(f"missing {keys}: give {helper[group[0]].help or group[0]}")
    return out


# -- the declarations --------------------------------------------------------------------------

_MODEL = Param("model", multiple=True, short="-m", help="Only these models (repeat, or a comma list). Default: all.")
_SIDE = Param("side", choice("top", "bottom", "both"), "top", choices=("top", "bottom", "both"),
              help="Search the top (largest) or bottom (most negative) lists.")
_EXACT = Param("exact", boolean, False, flag=True, help="Match the decoded token text exactly as given (spaces count).")
_ID = Param("token_id", whole(), option="--id", key="id", metavar="N", help="Match this token id instead of TOKEN.")
_TOKEN = Param("token", argument=True, help="a token, e.g. paris (case-insensitive, stripped)")


def _readable(what: str) -> Param:
    return Param("readable", boolean, False, flag=True, help=what)


def _limit(default: int, what: str = "rows") -> Param:
    return Param("limit", whole(zero_is_all=True), default, short="-n", help=f"At most this many {what} (0: all).")


HELPERS: dict[str, Helper] = {h.name: h for h in [
    Helper("models", (), "The indexed models, their dimensions and index settings."),
    Helper("heads", (
        _TOKEN, _MODEL,
        Param("circuit", choice("ov", "qk"), multiple=True, choices=("ov", "qk"), help="Only this circuit (default both)."),
        _SIDE, _limit(20), _EXACT, _ID,
        _readable("Leave out pairs whose other token is not letters (fragments, digits, punctuation)."),
    ), "Heads whose circuits (top pairs, role lists) contain TOKEN, best first.", needs=(("token", "token_id"),)),
    Helper("neurons", (
        _TOKEN, _MODEL,
        Param("kind", multiple=True, choices=tuple(ALL_KINDS),
              help=f"Vector kinds (repeat or comma list): {', '.join(ALL_KINDS)}. Default: {', '.join(FF_KINDS)}."),
        Param("max_rank", whole(), help="Only matches at this rank or better."),
        _SIDE, _limit(20), _EXACT, _ID,
        _readable("Add readable_rank: the rank once entries that are not letters are left out."),
    ), "FF neurons (or other vectors, kind) whose top-k tokens contain TOKEN.", needs=(("token", "token_id"),)),
    Helper("show", (
        Param("model", argument=True, required=True, help="a model, e.g. minilm"),
        Param("unit", argument=True, required=True, help="a unit: L5.H3, L5.N123, L5.H3.d7, P12, L5.attn_bias"),
        _limit(10, "ranks per list"),
        _readable("Hide list entries whose text is not letters (fragments, digits, punctuation)."),
    ), "Everything stored about one unit."),
    Helper("tokens", (
        Param("text", argument=True, required=True, help="a text, e.g. Paris is big"), _MODEL,
    ), "How TEXT maps to tokens of each model's vocabulary."),
    Helper("similar", (
        Param("model", argument=True, required=True, help="a model, e.g. minilm"),
        Param("unit", argument=True, required=True, help="a unit, e.g. L3.N17"),
        Param("in_model", option="--in", key="in", required=True, help="The model to search (may be MODEL itself)."),
        _limit(10, "units"),
    ), "Units of another model whose top tokens overlap most with UNIT."),
    Helper("history", (
        Param("series", argument=True, required=True, help="a training-checkpoint series, e.g. pythia-70m"),
        Param("unit", argument=True, help="a unit, e.g. L3.N117 (or give token)"),
        Param("token", help="Instead of UNIT: the units that have this token in their lists, per step."),
        Param("exact", boolean, False, flag=True, help="Match the token's decoded text exactly as given (spaces count)."),
        Param("token_id", whole(), option="--id", key="id", metavar="N", help="Instead of a token: this token id."),
        Param("kind", multiple=True, choices=tuple(ALL_KINDS) + ("ov_output",),
              help="UNIT: the list read (neuron: ff_value; head dim: o; head: its OV output). "
                   "token: kinds searched (default ff_value, o, ov_output)."),
        _SIDE,
        Param("max_rank", whole(), 10, help="A token counts as in a list down to this rank."),
        _limit(50, "units (token only)"),
    ), "How a unit's top tokens change across a checkpoint series, or when units start promoting a token.",
        needs=(("unit", "token", "token_id"),)),
    Helper("features", (
        _TOKEN, _MODEL,
        Param("dictionary", multiple=True, short="-d", help="Only these dictionaries (repeat or comma list)."),
        Param("kind", multiple=True, choices=("decoder", "encoder"),
              help="decoder (what a feature writes) and/or encoder (what it reads). Default: both."),
        _SIDE,
        Param("max_rank", whole(), help="Only matches at this rank or better."),
        _limit(20), _EXACT, _ID,
    ), "Dictionary features (SAEs, transcoders) whose decoder or encoder tokens contain TOKEN.",
        needs=(("token", "token_id"),)),
    Helper("dictionaries", (_MODEL,), "The indexed dictionaries (SAEs, transcoders) of each model: layer, site, width, source."),
    Helper("enrich", (
        Param("tokens", argument=True, multiple=True, help="the token set, e.g. paris london berlin (a concept)"),
        _MODEL,
        Param("kind", multiple=True, help="Lists to search (repeat or comma list): vector kinds, ov:source, ov:output, "
                                          "qk:query, qk:key. Default: FF neurons, head dimensions and head role lists."),
        _SIDE, _limit(20),
    ), "Units whose stored token lists are enriched in a set of tokens (a concept), most significant first.",
        needs=(("tokens",),)),
]}

# The module of each helper that is not in query.helpers.
_MODULE = {"history": "query.history", "features": "query.features", "dictionaries": "query.features", "enrich": "query.enrich"}


def function(helper: Helper) -> Callable:
    """The helper's Python function (``query.helpers.<name>``, or its own module's: ``_MODULE``)."""
    import importlib

    return getattr(importlib.import_module(_MODULE.get(helper.name, "query.helpers")), helper.name)


def call(helper: Helper, ds, values: dict):
    """Run ``helper`` on ``ds`` with ``values`` (keyword -> value, as :func:`from_query` or the CLI made them).

    Arguments go by position and the rest by keyword, exactly as the signature declares them.
    """
    args = [values[p.name] for p in helper.params if p.argument]
    kwargs = {p.name: values[p.name] for p in helper.params if not p.argument}
    return function(helper)(ds, *args, **kwargs)
