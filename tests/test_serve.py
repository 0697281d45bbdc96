"""`zeropass serve`: the explorer's JSON API and pages against a real server on a loopback port, and
a person's paths through it in a real headless Chromium (Debian's `chromium`, driven by Playwright).

Outside CI a missing web stack or browser skips these tests; in CI (`CI=true`) it fails them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow as pa
import pytest

from tests.builders import SHARED_TOKENS, synthetic_model

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
XSS = "<script>alert(1)</script>"
XSS_IMG = "<img src=x onerror=alert(2)>"


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        if IN_CI:
            raise
        pytest.skip(f"{module} is not installed (pip install 'zeropass[serve,dev]')", allow_module_level=True)


for _m in ("starlette", "uvicorn", "jinja2"):
    _need(_m)

from query.serve import PortUnavailable, bind, running  # noqa: E402
from query.errors import QueryTimeout  # noqa: E402
from query.serve.app import run_sql  # noqa: E402


# -- a server on a free loopback port ----------------------------------------------------------

def get(url: str, headers: dict | None = None, method: str = "GET"):
    """(status, headers, body text) of a real HTTP request."""
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def api(base: str, path: str, **params):
    status, _, body = get(f"{base}{path}?{urllib.parse.urlencode(params, doseq=True)}")
    return status, json.loads(body)


@pytest.fixture(scope="session")
def server(synthetic_db):
    with running(synthetic_db) as url:
        yield url


@pytest.fixture(scope="session")
def xss_db(tmp_path_factory) -> Path:
    """One tiny model whose vocabulary holds markup tokens, planted in every kind of list, and a
    stored alignment of it with itself."""
    from indexer.dataset import store_alignment
    from schemas import TABLES

    db = tmp_path_factory.mktemp("xss") / "db"
    vocab = SHARED_TOKENS + [(XSS, XSS, False), (XSS_IMG, XSS_IMG, False)]
    plant = {("xss", "L0.H0", "ov", "top", "src"): {1: XSS}, ("xss", "L0.H0", "ov", "top", "dst"): {1: XSS_IMG},
             ("xss", "L0.H0", "source", "top"): {1: XSS}, ("xss", "L0.H0", "output", "top"): {1: XSS_IMG},
             ("xss", "L0.N0", "ff_value", "top"): {1: XSS, 2: XSS_IMG}}
    synthetic_model(db, "xss", "vxss", vocab, 7, plant)
    rows = [dict(model_a="xss", model_b="xss", space="embedding", kind="layer", level="layer", layer_a=a, layer_b=b,
                 idx_a=None, idx_b=None, unit_a=None, unit_b=None, score=1.0 if a == b else 0.2, matched=a == b, n_tokens=60)
            for a in range(2) for b in range(2)]
    rows += [dict(model_a="xss", model_b="xss", space="embedding", kind="ff", level="unit", layer_a=a, layer_b=a, idx_a=0,
                  idx_b=0, unit_a=f"L{a}.N0", unit_b=f"L{a}.N0", score=0.9, matched=True, n_tokens=60) for a in range(2)]
    store_alignment(db, "xss", "xss", pa.Table.from_pylist(rows, schema=TABLES["alignments"].schema))
    return db


@pytest.fixture(scope="session")
def xss_server(xss_db):
    with running(xss_db) as url:
        yield url


def build_features(base: Path) -> Path:
    """A tiny GPT-2 (``tf``) whose vocabulary holds the markup tokens (in place of ``w0`` and
    ``night``), with one SAELens dictionary ``res`` at layer 1: feature 0 writes the direction
    of the first markup token and reads the second's, feature 1 writes ``Paris``'s."""
    import torch

    from indexer.build import index_model
    from indexer.dictionaries.index import index_dictionaries
    from tests.tiny_models import VOCAB, save_tiny

    src = save_tiny("gpt2", base / "gpt2")
    tj = json.loads((src / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab[XSS], vocab[XSS_IMG] = vocab.pop("w0"), vocab.pop("night")
    (src / "tokenizer.json").write_text(json.dumps(tj))
    db = base / "db"
    index_model(str(src), db, name="tf", k=8, n_pairs=0, progress=None)  # no pairs: the head circuits are not what is tested here
    from safetensors.torch import load_file, save_file

    W_E = next(v for k, v in load_file(str(src / "model.safetensors")).items() if k.endswith("wte.weight"))
    g = torch.Generator().manual_seed(7)
    W_enc, W_dec = torch.randn(W_E.shape[1], 8, generator=g), torch.randn(8, W_E.shape[1], generator=g)
    W_dec[0], W_enc[:, 0] = 10 * W_E[VOCAB.index("w0")], 10 * W_E[VOCAB.index("night")]
    W_dec[1] = 10 * W_E[VOCAB.index("Paris")]
    sae = base / "sae"
    sae.mkdir()
    save_file({"W_enc": W_enc.contiguous(), "W_dec": W_dec.contiguous(), "b_enc": torch.arange(8.0), "b_dec": torch.zeros(W_E.shape[1]),
               "threshold": torch.full((8,), 0.5)}, str(sae / "sae_weights.safetensors"))
    (sae / "cfg.json").write_text(json.dumps({"d_in": W_E.shape[1], "d_sae": 8, "architecture": "jumprelu",
                                              "metadata": {"hook_name": "blocks.1.hook_resid_post"}}))
    index_dictionaries(str(sae), db, model="tf", name="res", n_neighbours=3, progress=None)
    return db


@pytest.fixture(scope="session")
def features_db(tmp_path_factory, prebuilt) -> Path:
    pytest.importorskip("torch")
    return prebuilt(build_features, tmp_path_factory.mktemp("features") / "f") / "db"


@pytest.fixture(scope="session")
def features_server(features_db):
    with running(features_db) as url:
        yield url


# -- the JSON API: the CLI's --format json rows --------------------------------------------------

def cli_json(db, *args):
    from click.testing import CliRunner

    from cli import cli

    r = CliRunner().invoke(cli, [*args, "--db", str(db), "--format", "json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("path,params,args", [
    pytest.param("/api/models", {}, ["models"], id="models"),
    pytest.param("/api/heads", {"token": "paris"}, ["heads", "paris"], id="heads"),
    pytest.param("/api/heads", {"token": "paris", "circuit": "ov", "model": "alpha", "limit": "0"},
                 ["heads", "paris", "--circuit", "ov", "-m", "alpha", "--limit", "0"], id="heads-filters"),
    pytest.param("/api/neurons", {"token": "paris", "kind": "ff_value"}, ["neurons", "paris", "--kind", "ff_value"], id="neurons"),
    pytest.param("/api/show", {"model": "alpha", "unit": "L1.H0"}, ["show", "alpha", "L1.H0"], id="show-head"),
    pytest.param("/api/show", {"model": "gamma", "unit": "L0.N0"}, ["show", "gamma", "L0.N0"], id="show-neuron"),
    pytest.param("/api/similar", {"model": "alpha", "unit": "L0.N1", "in": "gamma"},
                 ["similar", "alpha", "L0.N1", "--in", "gamma"], id="similar"),
    pytest.param("/api/tokens", {"text": "Paris is big"}, ["tokens", "Paris is big"], id="tokens"),
    pytest.param("/api/sql", {"q": "SELECT model, layer, head, ov_norm FROM heads ORDER BY ALL"},
                 ["sql", "SELECT model, layer, head, ov_norm FROM heads ORDER BY ALL"], id="sql"),
])
def test_api_rows_are_the_cli_json(server, synthetic_db, path, params, args):
    status, rows = api(server, path, **params)
    assert status == 200
    assert rows == cli_json(synthetic_db, *args)
    assert rows  # every case has an answer


@pytest.mark.parametrize("path,params,status,says", [
    pytest.param("/api/show", {"model": "nope", "unit": "L0.H0"}, 404, "unknown model 'nope'", id="unknown-model"),
    pytest.param("/api/show", {"model": "alpha,beta", "unit": "L0.H0"}, 404, "unknown model", id="comma-model"),
    pytest.param("/api/show", {"model": "alpha", "unit": "L9.H0"}, 400, "out of range", id="unit-out-of-range"),
    pytest.param("/api/show", {"model": "alpha", "unit": "H0"}, 400, "malformed unit", id="malformed-unit"),
    pytest.param("/api/heads", {"token": "zzqqxx"}, 404, "in no vocabulary", id="unknown-token"),
    pytest.param("/api/heads", {}, 400, "missing ?token=", id="no-token"),
    pytest.param("/api/heads", {"token": "paris", "limit": "many"}, 400, "limit must be a whole number", id="bad-limit"),
    pytest.param("/api/heads", {"token": "paris", "side": "left"}, 400, "unknown side", id="bad-side"),
    pytest.param("/api/neurons", {"token": "paris", "kind": "ff_nope"}, 400, "unknown kind", id="bad-kind"),
    pytest.param("/api/similar", {"model": "alpha", "unit": "L0.N1", "in": "nope"}, 404, "unknown model", id="bad-in"),
    pytest.param("/api/sql", {"q": "DROP TABLE models"}, 403, "DROP statements are not allowed", id="forbidden-sql"),
    pytest.param("/api/sql", {"q": "SELECT * FROM read_csv('/etc/passwd')"}, 403, "only the dataset's own files", id="outside-file"),
    pytest.param("/api/sql", {"q": "SELEC 1"}, 400, "syntax error", id="bad-sql"),
    pytest.param("/api/sql", {"q": "SELECT 1", "format": "xml"}, 400, "unknown format", id="bad-format"),
    pytest.param("/api/nothing", {}, 404, "no page at /api/nothing", id="no-endpoint"),
])
def test_api_errors_are_one_line_json(server, path, params, status, says):
    got, body = api(server, path, **params)
    assert got == status
    assert set(body) == {"error"} and says in body["error"] and "\n" not in body["error"]


def test_api_sql_row_cap_csv_and_the_truncation_header(server):
    status, headers, body = get(f"{server}/api/sql?" + urllib.parse.urlencode({"q": "SELECT range AS i FROM range(5000)"}))
    assert status == 200 and headers["X-Zeropass-Truncated"] == "true"
    assert [r["i"] for r in json.loads(body)] == list(range(1000))
    status, headers, body = get(f"{server}/api/sql?" + urllib.parse.urlencode({"q": "SELECT 1 AS a, 'x,y' AS b", "format": "csv"}))
    assert status == 200 and headers["X-Zeropass-Truncated"] == "false" and "attachment" in headers["Content-Disposition"]
    assert body == 'a,b\n1,"x,y"\n'


def test_slow_sql_is_stopped_and_holds_up_no_other_page(synthetic_db):
    """Each request reads through its own cursor: a long query neither blocks other pages nor outlives its limit."""
    slow = "/api/sql?" + urllib.parse.urlencode({"q": "SELECT sum(a.range * b.range) FROM range(100000000) a, range(100000) b"})
    with running(synthetic_db, sql_timeout=4.0) as base:
        got = {}
        t = threading.Thread(target=lambda: got.update(slow=(get(base + slow), time.monotonic())))
        t0 = time.monotonic()
        t.start()
        time.sleep(0.5)
        status, _, body = get(base + "/api/heads?token=paris")
        fast_done = time.monotonic()
        t.join(60)
        (status_slow, _, body_slow), slow_done = got["slow"]
    assert status == 200 and json.loads(body)[0]["unit"] == "L1.H0"
    assert fast_done < slow_done and fast_done - t0 < 3.5
    assert status_slow == 400 and "longer than 4 s" in json.loads(body_slow)["error"]


def test_api_is_documented(server):
    status, doc = api(server, "/api/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/api/models", "/api/heads", "/api/neurons", "/api/show", "/api/similar", "/api/sql"} <= set(doc["paths"])
    status, _, html = get(f"{server}/api")
    assert status == 200 and "/api/similar" in html


# -- run_sql: the one place user SQL runs ----------------------------------------------------------

@pytest.mark.parametrize("q,rows", [
    pytest.param("SELECT 42 AS x;", [{"x": 42}], id="trailing-semicolon"),
    pytest.param("SELECT 42 AS x -- a comment", [{"x": 42}], id="trailing-comment"),
    pytest.param("SELECT 1 AS x; SELECT 2 AS y", [{"y": 2}], id="two-statements"),
    pytest.param("PRAGMA version", None, id="pragma-not-wrappable"),
    pytest.param("EXPLAIN SELECT 1", None, id="explain-not-wrappable"),
    pytest.param("DESCRIBE heads", "many", id="describe"),
    pytest.param("WITH a AS (SELECT 5 AS x) SELECT * FROM a", [{"x": 5}], id="with"),
    pytest.param("SELECT range AS i FROM range(100) ORDER BY i DESC", [{"i": i} for i in range(99, 89, -1)], id="order-kept"),
])
def test_run_sql_caps_any_read(ds, q, rows):
    table, truncated = run_sql(ds, q, max_rows=10)
    if rows == "many":
        assert truncated and table.num_rows == 10
    elif rows is not None:
        assert table.to_pylist() == rows and truncated == (rows[0].get("i") == 99)
    else:
        assert table.num_rows == 1 and not truncated


def test_run_sql_cannot_be_unwrapped(ds):
    """Closing the wrapper's parenthesis from inside the query does not escape the statement check."""
    from query import BadSQL, ForbiddenSQL

    with pytest.raises((ForbiddenSQL, BadSQL)):
        run_sql(ds, "SELECT 1) ; DROP TABLE models; SELECT (1")


def test_run_sql_time_limit_interrupts_and_the_connection_recovers(ds):
    t = time.monotonic()
    with pytest.raises(QueryTimeout, match="longer than 0.3 s"):
        run_sql(ds, "SELECT sum(a.range * b.range) FROM range(100000000) a, range(100000) b", timeout=0.3)
    assert time.monotonic() - t < 10
    assert run_sql(ds, "SELECT 7 AS x")[0].to_pylist() == [{"x": 7}]


# -- pages over HTTP -----------------------------------------------------------------------------

@pytest.mark.parametrize("path,status,says", [
    pytest.param("/", 200, "alpha", id="home"),
    pytest.param("/search?q=paris", 200, "L1.H0", id="search"),
    pytest.param("/search?q=paris&model=gamma&kind=heads", 200, "L1.H1", id="search-filters"),
    pytest.param("/search?q=paris&layer_min=1&layer_max=1&kind=ff_key", 200, "L1.N2", id="search-layers"),
    pytest.param("/model/alpha", 200, "ov_copying_score", id="model"),
    pytest.param("/model/alpha?metric=ov_norm&token=paris", 200, "Heads listing", id="model-token"),
    pytest.param("/model/alpha/unit/L1.H0", 200, "OV top pairs", id="head"),
    pytest.param("/model/alpha/unit/L0.N1", 200, "ff_value", id="neuron"),
    pytest.param("/model/alpha/unit/L0.H1.d1", 200, "Part of head", id="head-dim"),
    pytest.param("/model/alpha/unit/P2", 200, "pos", id="position"),
    pytest.param("/model/alpha/unit/L1.attn_bias", 200, "bias_attn_out", id="bias"),
    pytest.param("/model/alpha/unit/L0.N1/neighbours", 200, "in gamma", id="neighbours"),
    pytest.param("/model/alpha/unit/L0.N1/neighbours?fragment=1", 200, '<section id="neighbours">', id="neighbours-fragment"),
    pytest.param("/model/alpha/unit/L9.N1/neighbours", 400, "out of range", id="neighbours-bad-unit"),
    pytest.param("/sql?q=SELECT+model+FROM+models", 200, "gamma", id="sql"),
    pytest.param("/model/nope", 404, "unknown model &#39;nope&#39;", id="unknown-model"),
    pytest.param("/model/alpha/unit/L9.H0", 400, "out of range", id="unit-out-of-range"),
    pytest.param("/model/alpha/unit/L1.Q0", 400, "malformed unit", id="malformed-unit"),
    pytest.param("/model/gamma/unit/P0", 400, "no learned positions", id="no-positions"),
    pytest.param("/model/alpha?metric=nope", 400, "unknown head metric", id="bad-metric"),
    pytest.param("/model/alpha?token=zzqqxx", 404, "in no vocabulary of alpha", id="model-unknown-token"),
    pytest.param("/search?q=zzqqxx", 404, "in no vocabulary", id="search-unknown-token"),
    pytest.param("/search?q=paris&kind=nope", 400, "unknown kind", id="search-bad-kind"),
    pytest.param("/search?q=paris&layer_min=x", 400, "layer_min must be a whole number", id="search-bad-layer"),
    pytest.param("/sql?q=DROP+TABLE+models", 403, "DROP statements are not allowed", id="sql-forbidden"),
    pytest.param("/align/alpha/beta", 404, "no alignment", id="no-alignment"),
    pytest.param("/static/../app.py", 404, "no page", id="path-escape"),
    pytest.param("/nowhere", 404, "no page at /nowhere", id="no-page"),
])
def test_pages(server, path, status, says):
    check_page(server + path, status, says)


def check_page(url: str, status: int, says: str) -> str:
    """The page at ``url``: its status, ``says`` in it, one error line when it fails, no traceback, the CSP."""
    got, headers, html = get(url)
    assert got == status and says in html, html[-2000:]
    assert "Traceback" not in html
    assert html.count('class="error"') == (1 if status >= 400 else 0)
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    return html


# -- dictionaries: features in search, the dictionary page, the feature page --------------------------

@pytest.mark.parametrize("path,status,says", [
    pytest.param("/", 200, 'href="/model/tf/dictionary/res"', id="home-lists-dictionaries"),
    pytest.param("/model/tf", 200, 'href="/model/tf/dictionary/res"', id="model-lists-dictionaries"),
    pytest.param("/search?q=paris", 200, 'class="feature-link" href="/model/tf/unit/res.F1"', id="search-features"),
    pytest.param("/search?q=paris&kind=features", 200, 'href="/model/tf/unit/res.F1"', id="search-features-only"),
    pytest.param("/model/tf/dictionary/res", 200, "d_in 32 → 8 features", id="dictionary"),
    pytest.param("/model/tf/dictionary/res?token=paris&kind=decoder", 200, 'href="/model/tf/unit/res.F1"', id="dictionary-token"),
    pytest.param("/model/tf/unit/res.F0", 200, "Nearest directions", id="feature"),
    pytest.param("/model/tf/unit/res.F0?readable=1", 200, "Readable only:", id="feature-readable"),
    pytest.param(f"/search?q={urllib.parse.quote(XSS)}&kind=features", 200, 'href="/model/tf/unit/res.F0"', id="search-markup-feature"),
    pytest.param("/model/tf/unit/res.F0", 200, "&lt;script&gt;alert(1)&lt;/script&gt;</text>", id="feature-markup-bar"),
    pytest.param("/model/tf/dictionary/nope", 404, "tf has no dictionary &#39;nope&#39; (its dictionaries: res)", id="unknown-dictionary"),
    pytest.param("/model/nope/dictionary/res", 404, "unknown model &#39;nope&#39;", id="dictionary-unknown-model"),
    pytest.param("/model/tf/dictionary/res?start=8", 400, "start must be a feature of res (0..7), got 8", id="dictionary-bad-start"),
    pytest.param("/model/tf/dictionary/res?start=x", 400, "start must be a whole number", id="dictionary-start-not-a-number"),
    pytest.param("/model/tf/dictionary/res?token=zzqqxx", 404, "in no vocabulary", id="dictionary-unknown-token"),
    pytest.param("/model/tf/dictionary/res?token=paris&side=left", 400, "unknown side", id="dictionary-bad-side"),
    pytest.param("/model/tf/unit/res.F8", 400, "feature 8 is out of range for res (features 0..7)", id="feature-out-of-range"),
    pytest.param("/model/tf/unit/nope.F1", 400, "tf has no dictionary &#39;nope&#39;", id="feature-unknown-dictionary"),
    pytest.param("/model/tf/unit/res.F1/neighbours", 200, "in tf", id="feature-neighbours"),
    pytest.param("/model/tf/unit/res.F8/neighbours", 400, "feature 8 is out of range for res", id="feature-neighbours-bad"),
])
def test_dictionary_pages(features_server, path, status, says):
    check_page(features_server + path, status, says)


def test_feature_page_is_show_with_links(features_db, features_server):
    """The feature page draws the rows `show` returns: every decoder/encoder token as a bar, the stats,
    and each stored neighbour linked to its own page (which answers)."""
    from query import Dataset

    with Dataset(features_db) as ds:
        sections = ds.show("tf", "res.F1", limit=20)
        rows = ds.features("paris", model="tf", dictionary="res", limit=None).to_pylist()
    status, _, html = get(features_server + "/model/tf/unit/res.F1")
    assert status == 200
    vectors = sections["vectors"].to_pylist()
    for kind in ("decoder", "encoder"):
        part = html.split(f'id="{kind}"')[1].split("</section>")[0]
        bars = [r for r in vectors if r["kind"] == kind]
        assert part.count('<g class="bar">') == 2 * len(bars)  # top and bottom
    assert any(r["kind"] == "decoder" and r["top"] == "Paris" for r in vectors)
    stats = sections["stats"].to_pylist()[0]
    assert f"<th>b_enc</th><td>{stats['b_enc']:g}</td>" in html and stats["b_enc"] == 1.0
    near = sections["neighbours"].to_pylist()
    assert len(near) == 3
    for r in near:
        link = f'href="/model/tf/unit/{r["neighbour"]}"'
        assert html.count(link) == 2  # the bar and the table row
        assert get(features_server + f"/model/tf/unit/{r['neighbour']}")[0] == 200
    # the search page lists exactly the helper's features for the token
    status, _, page = get(features_server + "/search?q=paris&kind=features&limit=0")
    assert [r["unit"] for r in rows] == [u.split('">')[0] for u in page.split('class="feature-link" href="/model/tf/unit/')[1:]]
    listing = get(features_server + "/model/tf/dictionary/res")[2]
    assert listing.count('class="feature-link"') == 8
    # each feature's row: its first three decoder and encoder tokens, as `features` holds them
    import html as html_lib

    with Dataset(features_db) as ds:
        for f in (0, 1):
            row = listing.split(f'href="/model/tf/unit/res.F{f}">')[1].split("</tr>")[0]
            cells = row.split('<td class="tok">')[1:]
            for cell, kind in zip(cells, ("decoder", "encoder")):
                want = [r["token"] for r in ds.rows("SELECT token FROM features WHERE dictionary = 'res' AND feature = $f "
                                                    "AND kind = $k AND side = 'top' AND rank <= 3 ORDER BY rank",
                                                    {"f": f, "k": kind})]
                assert cell.split("</td>")[0] == ", ".join(html_lib.escape(t, quote=True) for t in want), (f, kind)


def test_api_features_and_dictionaries_are_the_cli_json(features_db, features_server):
    status, rows = api(features_server, "/api/features", token="paris", dictionary="res")
    assert status == 200 and rows and rows == cli_json(features_db, "features", "paris", "--dictionary", "res")
    status, rows = api(features_server, "/api/dictionaries", model="tf")
    assert status == 200 and rows == cli_json(features_db, "dictionaries", "--model", "tf")
    assert [(r["dictionary"], r["layer"], r["site"], r["d_in"], r["d_sae"]) for r in rows] == [("res", 1, "resid_post", 32, 8)]
    assert api(features_server, "/api/dictionaries", model="nope")[0] == 404


# -- the readable toggle -------------------------------------------------------------------------

def test_readable_toggle_says_how_many_were_hidden(server, ds):
    """`?readable=1` on unit pages and the search: the helpers' own count of hidden entries is on the page."""
    import re

    for unit in ("L0.N1", "L1.H0"):
        sections = ds.show("alpha", unit, limit=20, readable=True)
        hidden = sum(int((t.schema.metadata or {}).get(b"hidden_rows", b"0")) for t in sections.values())
        status, _, html = get(f"{server}/model/alpha/unit/{unit}?readable=1")
        assert status == 200 and f"Readable only: {hidden} entr" in html, unit
        assert f'<a href="/model/alpha/unit/{unit}">Show every entry</a>' in html
        assert f'href="/model/alpha/unit/{unit}?readable=1">Readable only</a>' in get(f"{server}/model/alpha/unit/{unit}")[2]
    assert hidden > 0  # the synthetic lists hold fragments
    heads = ds.heads("paris", readable=True, limit=50)
    neurons = ds.neurons("paris", readable=True, limit=50)
    status, _, html = get(f"{server}/search?q=paris&readable=1")
    said = re.search(r'id="hidden">Readable only: (\d+) pair rows?.* (\d+) entr', html)
    assert status == 200 and said
    assert [int(x) for x in said.groups()] == [int(t.schema.metadata[b"hidden_rows"]) for t in (heads, neurons)]
    assert "<th>readable rank</th>" in html
    assert get(f"{server}/search?q=paris&readable=maybe")[0] == 400


# -- enrichment ----------------------------------------------------------------------------------

@pytest.mark.parametrize("query,status,says", [
    pytest.param({}, 200, 'id="enrich-form"', id="form"),
    pytest.param({"words": "paris france london city big", "model": "gamma"}, 200, 'class="enrich-unit" href="/model/gamma/unit/L0.N0"',
                 id="planted-first"),
    pytest.param({"words": "", "set": ""}, 400, "the token set is empty", id="empty-set"),
    pytest.param({"set": "nope"}, 400, "unknown token set &#39;nope&#39;: use one of", id="unknown-set"),
    pytest.param({"set": "months"}, 404, "no token of the set (January", id="named-set-no-match"),
    pytest.param([("set", "months"), ("set", "nope")], 400, "unknown token set &#39;nope&#39;", id="second-set-unknown"),
    pytest.param({"words": "zzqqxx"}, 404, "no token of the set (zzqqxx)", id="no-match"),
    pytest.param({"words": "paris", "kind": "nope"}, 400, "unknown kind &#39;nope&#39;", id="bad-kind"),
    pytest.param({"words": "paris", "model": "nope"}, 404, "unknown model &#39;nope&#39;", id="bad-model"),
    pytest.param({"words": "paris", "limit": "-1"}, 400, "limit", id="bad-limit"),
    pytest.param({"words": " ".join(f"w{i}" for i in range(100_000))}, 400, "more than 10,000 distinct tokens", id="100k-words"),
])
def test_enrich_page(server, query, status, says):
    check_page(f"{server}/enrich?{urllib.parse.urlencode(query)}", status, says)


def test_enrich_page_is_the_helper_with_heatmaps(server, ds):
    """The table is `enrich`'s rows; each heatmap cell links the best list of its layer x head or neuron band."""
    words = ["paris", "france", "london", "city", "big"]
    rows = ds.enrich(words, limit=None).to_pylist()
    status, _, html = get(f"{server}/enrich?" + urllib.parse.urlencode({"words": " ".join(words), "limit": "0"}))
    assert status == 200
    table = html.split('id="enrich-results"')[1]
    assert [u.split('">')[0] for u in table.split('class="enrich-unit" href="/model/')[1:]] == \
        [f"{r['model']}/unit/{r['unit']}" for r in rows]
    gamma = html.split("<h2>gamma ")[1].split("</section>")[0]
    neurons = gamma.split('class="plot enrich-neurons"')[1]
    best = min((r for r in rows if r["model"] == "gamma" and r["unit"].startswith("L0.N")), key=lambda r: r["p_value"])
    assert best["unit"] == "L0.N0" and 'href="/model/gamma/unit/L0.N0"' in neurons
    assert f"best L0.N0 {best['list']} p={best['p_value']:.3g}" in neurons
    # the JSON twin of the page's set is the helper's rows
    twin = html.split('JSON: <a href="')[1].split('"')[0].replace("&amp;", "&")
    status, body = api(server, twin.split("?")[0], **urllib.parse.parse_qs(twin.split("?")[1]))
    assert status == 200 and [r["unit"] for r in body] == [r["unit"] for r in rows]


def test_read_only_and_loopback_only(server):
    assert get(server + "/sql?q=SELECT+1", method="POST")[0] == 405
    # A page elsewhere that points a DNS name at 127.0.0.1 (rebinding) is refused.
    assert get(server + "/api/models", headers={"Host": "evil.example"})[0] == 400
    assert get(server + "/api/models", headers={"Host": "localhost"})[0] == 200


def test_port_in_use_is_one_line():
    sock = bind("127.0.0.1", 0)
    try:
        with pytest.raises(PortUnavailable, match=r"cannot listen on 127.0.0.1:\d+ .*pick another with --port"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()


def test_alignment_page(xss_server):
    status, _, html = get(xss_server + "/model/xss")
    assert status == 200 and 'href="/align/xss/xss"' in html
    status, _, html = get(xss_server + "/align/xss/xss")
    assert status == 200 and "L0↔L0, L1↔L1" in html and 'href="/model/xss/unit/L1.N0"' in html
    assert html.count('class="marked"') == 2
    status, _, html = get(xss_server + "/align/xss/xss?kind=ff")
    assert status == 400 and "no embedding/ff layer scores for xss / xss: use one of embedding/layer" in html


def test_real_tiny_model_head_page(tiny_db):
    """The tiny GPT-2 whose L1.H2 copies 'Paris': its head page leads with that OV pair."""
    with running(tiny_db) as base:
        status, _, html = get(base + "/model/tgpt2/unit/L1.H2")
        assert status == 200
        ov = html.split('id="ov-top"')[1].split("</table>")[0]
        first = ov.split("<tbody>")[1].split("</tr>")[0]
        assert "Paris" in first
        status, _, html = get(base + "/search?q=paris&kind=heads")
        assert status == 200 and html.index("tgpt2") < html.index("L1.H2")


def test_cli_serve_runs_and_says_where(synthetic_db):
    """`zeropass serve` in a real subprocess: it prints its URL, serves, and a busy port is one Error: line."""
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "cli", "serve", "--db", str(synthetic_db), "--port", str(port)]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd, cwd=root, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert f"http://127.0.0.1:{port}/" in line
        deadline = time.monotonic() + 20
        while True:
            try:
                status, _, _ = get(f"http://127.0.0.1:{port}/api/models")
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert status == 200
        busy = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=60)
        assert busy.returncode == 1 and busy.stderr.startswith("Error: cannot listen on") and busy.stderr.count("\n") == 1
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop, no traceback
        rc, err = proc.wait(20), proc.stderr.read()
        assert rc == 0 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# -- in a real browser ----------------------------------------------------------------------------

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def browser():
    exe = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("playwright is not installed (pip install 'zeropass[dev]')")
    if exe is None:
        if IN_CI:
            pytest.fail("no chromium on PATH: .ci/run installs Debian's chromium package")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = context.new_page()
    pg.dialogs = []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors


def test_browser_search_open_head_see_ov_pairs(server, page):
    page.goto(server + "/")
    page.fill("#home-q", "paris")
    page.press("#home-q", "Enter")
    page.wait_for_url("**/search?q=paris")
    first = page.locator("a.head-link").first
    assert first.inner_text() == "L1.H0"
    first.click()
    page.wait_for_url("**/model/alpha/unit/L1.H0")
    ov = page.locator("#ov-top table")
    assert ov.locator("tbody tr").first.locator("td").nth(1).inner_text() == '" Paris"'
    assert page.locator("#ov-top svg.bars g.bar").count() == 6
    # The neighbours arrive after the page, from their own URL.
    page.wait_for_selector("#neighbours h3")
    assert page.locator("#neighbours h3").all_inner_texts() == ["in alpha", "in beta", "in gamma"]


def test_browser_model_heatmaps_click_a_cell(server, page):
    page.goto(server + "/model/alpha")
    assert page.locator("#metric-heatmap a.cell").count() == 4  # 2 layers x 2 heads
    page.select_option("#metric-select", "ov_norm")
    page.locator("#metric button, #metric [type=submit]").first.click()
    page.wait_for_url("**metric=ov_norm**")
    page.locator("#metric-heatmap a.cell").first.click()
    page.wait_for_url("**/model/alpha/unit/L0.H0")
    assert "L0.H0" in page.locator("h1").inner_text()
    page.goto(server + "/model/alpha")
    page.fill("#token-q", "paris")
    page.press("#token-q", "Enter")
    page.wait_for_url("**token=paris**")
    cells = page.locator("#token-heads a.cell")
    assert cells.count() == 2  # L0.H1 (qk query #4) and L1.H0 (ov, rank 1)
    cells.last.click()
    page.wait_for_url("**/model/alpha/unit/L1.H0")
    page.go_back()
    page.locator("#token-vectors a.cell").first.click()
    page.wait_for_url("**/model/alpha/unit/L0.N1")


def test_browser_sql_query_and_forbidden(server, page):
    page.goto(server + "/sql")
    page.fill("#sql-q", "SELECT model, n_layers FROM models ORDER BY model")
    page.click("#sql-run")
    page.wait_for_selector("#sql-result")
    assert page.locator("#sql-result tbody tr").count() == 3
    assert page.locator("#sql-result tbody tr").first.locator("td").first.inner_text() == "alpha"
    assert page.locator("#sql-count").inner_text().startswith("3 rows")
    page.fill("#sql-q", "DROP TABLE models")
    with page.expect_response(lambda r: "/sql?" in r.url) as resp:
        page.keyboard.press("Control+Enter")  # the page's one script
    assert resp.value.status == 403
    assert "DROP statements are not allowed" in page.locator("#sql-error").inner_text()
    assert page.locator("#sql-result").count() == 0


def test_browser_markup_tokens_are_text_everywhere(xss_server, page):
    """`<script>alert(1)</script>` in a vocabulary: no dialog on any page, and the text is shown."""
    q = urllib.parse.quote(XSS)
    pages = [
        f"/search?q={q}", "/model/xss/unit/L0.H0", "/model/xss/unit/L0.N0", f"/model/xss?token={q}",
        "/sql?" + urllib.parse.urlencode({"q": "SELECT token FROM tokens WHERE token LIKE '<%' ORDER BY token"}),
        "/sql?" + urllib.parse.urlencode({"q": f"SELECT '{XSS}' AS \"{XSS}\""}), f"/search?q={urllib.parse.quote(XSS_IMG)}",
        f"/model/{q}", f"/model/xss/unit/{q}",
    ]
    for path in pages:
        page.goto(xss_server + path)
        if "/unit/L0" in path:
            page.wait_for_selector("#neighbours h3")  # filled in by the page's script
        assert page.locator("script").count() == 1, path  # only /static/app.js
        assert page.locator("img").count() == 0, path
        assert page.get_by_text(XSS).count() + page.get_by_text(XSS_IMG).count() >= 1, path
    assert page.dialogs == []


def test_browser_features_and_enrich_markup_is_text_and_cells_link(features_server, page):
    """Markup tokens in a dictionary's lists and in a token set stay text on the search, feature,
    dictionary and enrich pages; an enrich heatmap cell and a stored neighbour open their units."""
    q = urllib.parse.quote(XSS)
    pages = [f"/search?q={q}", "/model/tf/unit/res.F0", "/model/tf/dictionary/res", f"/model/tf/dictionary/res?token={q}",
             "/enrich?" + urllib.parse.urlencode({"words": f"{XSS} {XSS_IMG} Paris"})]
    for path in pages:
        page.goto(features_server + path)
        if "/unit/" in path:
            page.wait_for_selector("#neighbours h3")  # filled in by the page's script
        assert page.locator("script").count() == 1, path  # only /static/app.js
        assert page.locator("img").count() == 0, path
        assert page.get_by_text(XSS).count() + page.get_by_text(XSS_IMG).count() >= 1, path
    assert page.dialogs == []
    page.locator(".enrich-heads a.cell, .enrich-neurons a.cell").first.click()
    page.wait_for_url("**/model/tf/unit/**")
    page.goto(features_server + "/model/tf/unit/res.F0")
    page.click("#readable-toggle a")
    page.wait_for_url("**/model/tf/unit/res.F0?readable=1")
    assert "hidden" in page.locator("#readable-toggle").inner_text()
    page.locator("a.neighbour-link").first.click()
    page.wait_for_url("**/model/tf/unit/L*.N*")


@pytest.mark.parametrize("argv,says", [
    pytest.param(["--db", "/nonexistent/zp"], "Error: no dataset directory at /nonexistent/zp", id="no-dataset"),
    pytest.param(["--host", "no such host!"], "Error: cannot resolve host 'no such host!'", id="bad-host"),
    pytest.param(["--port", "70000"], "Error: Invalid value for '--port'", id="bad-port"),
])
def test_cli_serve_bad_arguments_are_one_line(synthetic_db, argv, says):
    from click.testing import CliRunner

    from cli import cli

    args = ["serve", *argv] if "--db" in argv else ["serve", "--db", str(synthetic_db), *argv]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code != 0 and says in r.output and "Traceback" not in r.output


def test_cli_serve_without_the_web_stack_says_what_to_install(synthetic_db):
    code = ("import sys; sys.modules['starlette'] = None; from cli import main; "
            f"main(['serve', '--db', {str(synthetic_db)!r}])")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr == "Error: zeropass serve needs the serve extra (starlette not installed): pip install 'zeropass[serve]'\n"


def test_explorer_imports_without_torch():
    code = "import sys, query.serve.app, cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True, timeout=60)
