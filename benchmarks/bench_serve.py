"""Page render times of `zeropass serve` (target: every page under 300 ms), and its screenshots.

    python -m benchmarks.bench_serve [--db bench-out/db] [--repeat 10] [--screenshots docs/img]

Starts the explorer on a free loopback port over DB (default: bench-out/db when it exists, else a
tiny dataset of two random tiny models indexed into a temporary directory), requests each page
REPEAT times over real HTTP after one warm-up request, and prints the median and maximum wall
time per page as the client sees it (server-side time is in each response's Server-Timing header).
With --screenshots, headless Chromium (Debian's `chromium`) saves a PNG of each main page.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_MS = 300


def tiny_dataset(base: Path) -> Path:
    """Two tiny random models (the test suite's tiny_db, tests/builders.py) and a dictionary: needs the index extra."""
    from tests.builders import build_tiny

    db = build_tiny(base)
    _tiny_dictionary(base / "sae", db)
    return db


def _tiny_dictionary(path: Path, db: Path, d_sae: int = 256) -> None:
    """A random SAELens dictionary of tgpt2's layer 1 (``res``), for the dictionary and feature pages."""
    import json

    import torch
    from safetensors.torch import save_file

    from indexer.dictionaries.index import index_dictionaries
    from tests.tiny_models import D_MODEL

    g = torch.Generator().manual_seed(0)
    path.mkdir(parents=True)
    save_file({"W_enc": torch.randn(D_MODEL, d_sae, generator=g), "W_dec": torch.randn(d_sae, D_MODEL, generator=g),
               "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(D_MODEL)}, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"d_in": D_MODEL, "d_sae": d_sae, "architecture": "standard",
                                               "metadata": {"hook_name": "blocks.1.hook_resid_post"}}))
    index_dictionaries(str(path), db, model="tgpt2", name="res", progress=None)


def pages(ds, token: str) -> list[tuple[str, str]]:
    """(label, path) of each page worth timing, chosen from the dataset's own answers."""
    from query.enrich import named_set

    q = urllib.parse.quote
    models = ds.model_names()
    m = models[0]
    heads = ds.heads(token, limit=1).to_pylist()
    hm, hu = (heads[0]["model"], heads[0]["unit"]) if heads else (m, "L0.H0")
    neurons = ds.neurons(token, limit=1).to_pylist()
    nm, nu = (neurons[0]["model"], neurons[0]["unit"]) if neurons else (m, "L0.N0")
    out = [
        ("home", "/"),
        (f"search {token}", f"/search?q={q(token)}"),
        (f"model {m}", f"/model/{q(m)}"),
        (f"model {m} + token", f"/model/{q(m)}?token={q(token)}"),
        (f"head {hm} {hu}", f"/model/{q(hm)}/unit/{q(hu)}"),
        (f"neuron {nm} {nu}", f"/model/{q(nm)}/unit/{q(nu)}"),
        (f"neighbours {nm} {nu}", f"/model/{q(nm)}/unit/{q(nu)}/neighbours?fragment=1"),
        (f"head dim {hm} {hu}.d0", f"/model/{q(hm)}/unit/{q(hu + '.d0')}"),
        ("sql page", "/sql?" + urllib.parse.urlencode({"q": "SELECT model, layer, head, ov_copying_score FROM heads "
                                                          "ORDER BY ov_copying_score DESC NULLS LAST LIMIT 10"})),
        ("api heads", f"/api/heads?token={q(token)}"),
        ("api neurons", f"/api/neurons?token={q(token)}"),
        ("api show head", f"/api/show?model={q(hm)}&unit={q(hu)}"),
        ("api similar", f"/api/similar?model={q(nm)}&unit={q(nu)}&in={q(models[-1])}"),
    ]
    out += [
        (f"search {token} readable", f"/search?q={q(token)}&readable=1"),
        (f"neuron {nm} {nu} readable", f"/model/{q(nm)}/unit/{q(nu)}?readable=1"),
        ("enrich capitals", "/enrich?set=capitals"),
        ("api enrich capitals", "/api/enrich?" + urllib.parse.urlencode([("tokens", w) for w in named_set("capitals")])),
    ]
    for d in ds.rows("SELECT model, dictionary FROM dictionaries ORDER BY ALL LIMIT 1"):
        dm, dn = d["model"], d["dictionary"]
        out += [(f"dictionary {dm} {dn}", f"/model/{q(dm)}/dictionary/{q(dn)}"),
                (f"dictionary {dn} + token", f"/model/{q(dm)}/dictionary/{q(dn)}?token={q(token)}"),
                (f"feature {dm} {dn}.F0", f"/model/{q(dm)}/unit/{q(dn + '.F0')}")]
    for a in ds.rows("SELECT DISTINCT model_a, model_b FROM alignments ORDER BY ALL LIMIT 1"):
        out.append((f"align {a['model_a']} / {a['model_b']}", f"/align/{q(a['model_a'])}/{q(a['model_b'])}"))
    return out


def fetch(url: str) -> tuple[int, float]:
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    return status, (time.perf_counter() - t) * 1000


def screenshots(base: str, shots: list[tuple[str, str]], out: Path) -> None:
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("no chromium on PATH: apt-get install chromium")
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        for name, path in shots:
            page.goto(base + path, wait_until="networkidle")  # the neighbours arrive after the page
            target = out / f"explorer-{name}.png"
            page.screenshot(path=str(target))
            print(f"  {target} ({target.stat().st_size // 1024} KB)", file=sys.stderr)
        browser.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", default=None, help="dataset (default: bench-out/db when present, else a tiny one)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--token", default="paris")
    p.add_argument("--screenshots", type=Path, default=None, help="save PNGs of the main pages here")
    args = p.parse_args(argv)

    from query import Dataset
    from query.serve import running

    db = args.db or ("bench-out/db" if os.path.isdir("bench-out/db") else None)
    tmp = None
    if db is None:
        tmp = tempfile.mkdtemp(prefix="zeropass-bench-serve-")
        print("no bench-out/db: indexing two tiny random models", file=sys.stderr)
        db = str(tiny_dataset(Path(tmp)))
    try:
        with Dataset(db) as ds:
            names = ds.model_names()
            todo = pages(ds, args.token)
        print(f"dataset {db}: models {', '.join(names)}; {args.repeat} requests per page after one warm-up, "
              f"wall time over HTTP on 127.0.0.1; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
        slow = 0
        with running(db) as base:
            print(f"{'page':<44} {'status':>6} {'median ms':>10} {'max ms':>8}")
            for label, path in todo:
                status, _ = fetch(base + path)
                times = [fetch(base + path)[1] for _ in range(args.repeat)]
                med = statistics.median(times)
                slow += med > TARGET_MS
                flag = "" if med <= TARGET_MS else f"  over {TARGET_MS} ms"
                print(f"{label[:44]:<44} {status:>6} {med:>10.1f} {max(times):>8.1f}{flag}")
            if args.screenshots:
                by = dict(todo)
                shots = [("home", "/"), ("search", by[f"search {args.token}"]),
                         ("model", next(pth for lbl, pth in todo if lbl.endswith("+ token"))),
                         ("head", next(pth for lbl, pth in todo if lbl.startswith("head "))),
                         ("neuron", next(pth for lbl, pth in todo if lbl.startswith("neuron "))),
                         ("sql", by["sql page"])]
                shots += [("align", pth) for lbl, pth in todo if lbl.startswith("align ")]
                shots += [("enrich", by["enrich capitals"])]
                shots += [(lbl.split()[0], pth) for lbl, pth in todo if lbl.startswith(("dictionary ", "feature ")) and "+" not in lbl]
                screenshots(base, shots, args.screenshots)
        print(f"{len(todo) - slow} of {len(todo)} pages under {TARGET_MS} ms (median)")
        return 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
