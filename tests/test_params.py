"""Each helper's parameters are declared once (query/params.py): the Python signature, the command's
options and the JSON API's keys must all be that declaration."""
from __future__ import annotations

import inspect

import click
import pytest

from cli import cli
from query.errors import BadOption
from query.params import HELPERS, from_query, function
from query.serve.api import ENDPOINTS, openapi


@pytest.mark.parametrize("name", list(HELPERS))
def test_the_python_signature_is_the_declaration(name):
    spec = HELPERS[name]
    params = list(inspect.signature(function(spec)).parameters.values())
    assert params[0].name == "ds"
    params = params[1:]
    assert [p.name for p in params] == spec.names()
    for p, d in zip(params, spec.params):
        assert p.kind != p.VAR_KEYWORD and p.kind != p.VAR_POSITIONAL, p  # explicit, no **kw
        # arguments are positional (as on the command line); optional options keyword-only; a
        # required option (similar's --in) may be either, since it is always passed by name
        if d.argument:
            assert p.kind == p.POSITIONAL_OR_KEYWORD, p
        elif not d.required:
            assert p.kind == p.KEYWORD_ONLY, p
        assert p.kind != p.POSITIONAL_ONLY, p
        if d.required:
            assert p.default is p.empty, p
        else:
            assert p.default == d.default, (p, d.default)


# Options of the command line alone: they gather or inspect the set before the helper runs
# (a file, the shipped sets), so neither the Python function nor a URL takes them.
CLI_ONLY = {"enrich": {"tokens_file", "sets", "list_sets", "matches"}}


@pytest.mark.parametrize("name", list(HELPERS))
def test_the_command_is_the_declaration(name):
    spec = HELPERS[name]
    cmd = cli.commands[name]
    shared = {"db", "cache_dir", "fmt", "quiet", "help"} | CLI_ONLY.get(name, set())
    mine = [p for p in cmd.params if p.name not in shared]
    assert [p.name for p in mine] == spec.names()
    for p, d in zip(mine, spec.params):
        assert isinstance(p, click.Argument) == d.argument, p
        if isinstance(p, click.Option):
            assert d.cli_name in p.opts and p.help == d.help and p.multiple == d.multiple and p.is_flag == d.flag, p
            if not d.multiple:
                assert p.default == d.default, p


@pytest.mark.parametrize("name", [n for n in HELPERS])
def test_the_api_is_the_declaration(name):
    spec = HELPERS[name]
    path = f"/api/{name}"
    endpoint = next(e for e in ENDPOINTS if e[0] == path)
    assert [k for k, _, _ in endpoint[2]] == [p.query_key for p in spec.params]
    documented = [q["name"] for q in openapi()["paths"][path]["get"]["parameters"]]
    assert documented == [p.query_key for p in spec.params]


def _get(qs: dict):
    return lambda key: qs.get(key, [])


@pytest.mark.parametrize("qs,needle", [
    pytest.param({"token": ["paris"], "limit": ["abc"]}, "limit must be a whole number, got 'abc'", id="limit-text"),
    pytest.param({"token": ["paris"], "exact": ["maybe"]}, "exact must be 1 or 0", id="exact-maybe"),
    pytest.param({"token": ["paris"], "side": ["left"]}, "unknown side 'left'", id="side"),
    pytest.param({"token": ["paris"], "limit": ["1", "2"]}, "?limit= given 2 times", id="limit-twice"),
    pytest.param({"token": ["paris"], "circuit": ["ov", "xx"]}, "unknown circuit 'xx'", id="circuit"),
    pytest.param({"limit": ["3"]}, "missing ?token= or ?id=", id="no-token"),
    pytest.param({"id": ["x"]}, "id must be a whole number", id="id-text"),
])
def test_one_parser_refuses_what_it_cannot_read(qs, needle):
    with pytest.raises(BadOption, match=None) as e:
        from_query(HELPERS["heads"], _get(qs))
    assert needle in str(e.value)


def test_one_parser_reads_what_the_command_line_reads():
    values = from_query(HELPERS["heads"], _get({"token": ["paris"], "limit": ["0"], "exact": ["1"], "model": ["a", "b"]}))
    assert values == {"token": "paris", "model": ["a", "b"], "circuit": None, "side": "top", "limit": None, "exact": True,
                      "token_id": None, "readable": False}
    assert from_query(HELPERS["neurons"], _get({"id": ["7"]}))["token_id"] == 7
    assert from_query(HELPERS["show"], _get({"model": ["m"], "unit": ["L0.H0"]}))["limit"] == 10
    with pytest.raises(BadOption, match=r"missing \?unit="):
        from_query(HELPERS["show"], _get({"model": ["m"]}))


@pytest.mark.parametrize("name", list(HELPERS))
def test_every_helper_is_exported_from_query(name):
    import query

    assert name in query.__all__ and getattr(query, name) is function(HELPERS[name])
