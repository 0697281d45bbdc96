"""Write intent is a property of the option: every command that writes refuses a URL in one line, creating nothing.

Before, a hand-kept list of command names missed `compact` and `index-many` and never looked at
`merge --into`: `zeropass compact --db https://example.invalid/d` made ./https:/example.invalid/d/.lock.
"""
from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from cli import cli
from cli.base import Place

URL = "https://example.invalid/d"


@pytest.mark.parametrize("args", [
    pytest.param(["index", "./some-model", "--db", URL], id="index"),
    pytest.param(["index-many", "family.toml", "--db", URL], id="index-many"),
    pytest.param(["merge", "a-db", "--into", URL], id="merge-into"),
    pytest.param(["merge", URL, "--into", "b-db"], id="merge-source"),
    pytest.param(["compact", "--db", URL], id="compact"),
    pytest.param(["check", "--db", URL], id="check"),
    pytest.param(["check", "--repair", "--db", URL], id="check-repair"),
    pytest.param(["check", "--recover", "--db", URL], id="check-recover"),
    pytest.param(["diff", "base", "tuned", "--db", URL], id="diff"),
    pytest.param(["align", "a", "b", "--db", URL], id="align"),
    pytest.param(["publish", URL, "dest"], id="publish-source"),
    pytest.param(["cache", "clear", "--cache-dir", URL], id="cache-clear"),
    pytest.param(["heads", "paris", "--db", URL, "--cache-dir", URL], id="read-with-a-url-cache"),
])
def test_a_url_where_a_local_directory_is_needed_is_one_line_and_creates_nothing(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, args)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert "is a URL" in lines[0] and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []  # no ./https:/example.invalid/d/.lock on the way


@pytest.mark.parametrize("command", ["compact", "index", "index-many"])
def test_a_url_from_the_environment_is_refused_too(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    args = {"compact": [], "index": ["./m"], "index-many": ["spec.toml"]}[command]
    r = CliRunner().invoke(cli, [command, *args], env={"ZEROPASS_DB": URL})
    assert r.exit_code == 1 and "--db https://example.invalid/d is a URL" in r.stderr, r.output
    assert "read-only" in r.stderr and f"zeropass publish DIR {URL}" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_file_url_is_the_directory_it_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["compact", "--db", f"file://{tmp_path}/nothing"])
    assert r.exit_code == 1 and "Traceback" not in r.output and f"{tmp_path}/nothing" in r.stderr, r.output
    assert not (tmp_path / "file:").exists()  # the path it names, not ./file:/...


READS = {"models", "sql", "heads", "neurons", "show", "tokens", "similar", "history", "features", "dictionaries", "enrich", "serve", "coverage"}
WRITES = {"index", "index-sae", "diff", "align", "index-many", "merge", "compact", "check", "publish", "cache clear"}


def _commands(group: click.Group, prefix: str = ""):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + name + " ")
        else:
            yield prefix + name, cmd


def test_every_command_says_whether_it_writes_where_it_is_told():
    # A new command must be placed in one of the two sets, and a writing one must declare it on
    # the option (Place(write=True) or local=True), not in a list kept by hand.
    names = dict(_commands(cli))
    assert set(names) == READS | WRITES, set(names) ^ (READS | WRITES)
    for name in WRITES:
        places = [p for p in names[name].params if isinstance(p.type, Place) and p.name != "cache_dir"]
        assert places or name == "cache clear", name
        assert all(p.type.write or p.type.local for p in places), name
    for name in READS:
        dbs = [p for p in names[name].params if p.name == "db"]
        assert all(isinstance(p.type, Place) and not p.type.write and not p.type.local for p in dbs), name
