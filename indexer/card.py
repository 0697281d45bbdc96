"""The dataset card (``README.md``) that ``zeropass publish`` writes next to the manifest.

Its YAML header makes the directory a Hugging Face dataset as it is: one ``configs`` entry per
table whose ``data_files`` are the files the manifest lists (exact paths: a file of an unfinished
or superseded build that a pattern would match is never listed), so ``datasets.load_dataset(DIR,
"vectors")``, the Hub's dataset viewer and its SQL console all see the committed tables. The
body says what is inside and how to query it with ``zeropass``, plain DuckDB and ``datasets``.
"""
from __future__ import annotations

import json
from pathlib import Path

from schemas import TABLES
from schemas.format import DICTIONARIES, settings_or_empty
from schemas.layout import dictionary_files, table_files

# The Hub's license identifiers for licenses models commonly carry; anything else is "other".
_HUB_LICENSES = {"apache-2.0", "mit", "bsd-3-clause", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "llama2", "llama3",
                 "llama3.1", "llama3.2", "gemma", "openrail", "bigscience-openrail-m", "other"}


def _rows(db: Path, files: list[str], key: str) -> list[dict]:
    """The rows of small files (pyarrow only; a file that cannot be read leaves its rows out of the table)."""
    import pyarrow.parquet as pq

    rows = []
    for rel in files:
        try:
            rows += pq.read_table(db / rel).to_pylist()
        except Exception:  # noqa: BLE001 (a damaged file: the card still names the model from the manifest)
            pass
    return sorted(rows, key=lambda r: r[key])


def _models(db: Path, manifest: dict) -> list[dict]:
    """The ``models`` rows."""
    return _rows(db, table_files(manifest, "models"), "model")


def _license(slug: str, entry: dict, row: dict | None) -> str | None:
    """A model's license where the dataset records one (the manifest entry or the index settings)."""
    if isinstance(entry.get("license"), str):
        return entry["license"]
    lic = settings_or_empty(row).get("license")
    return lic if isinstance(lic, str) else None


def _yaml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a YAML string


def render_card(db: Path, manifest: dict, url: str | None = None) -> str:
    """The README.md of the dataset ``db`` (``url``: where it is published, for the examples)."""
    rows = {r["model"]: r for r in _models(Path(db), manifest)}
    slugs = sorted(manifest.get("models", {}))
    licenses = {s: _license(s, manifest["models"][s], rows.get(s)) for s in slugs}
    known = {v.lower() for v in licenses.values() if v}
    if len(known) == 1 and None not in licenses.values() and next(iter(known)) in _HUB_LICENSES:
        license_id = next(iter(known))
    else:
        license_id = "other"
    counts: dict[str, int] = {}
    for entry in [*manifest.get("models", {}).values(), *manifest.get(DICTIONARIES, {}).values()]:
        for table, n in (entry.get("row_counts") or {}).items():
            counts[table] = counts.get(table, 0) + int(n)
    for vocab in manifest.get("vocabularies", {}).values():
        counts["tokens"] = counts.get("tokens", 0) + int(vocab.get("d_vocab") or 0)

    head = ["---", f"license: {license_id}", f"pretty_name: {_yaml_str('zeropass projections: ' + ', '.join(slugs))}",
            "tags:", "- zeropass", "- interpretability", "- embedding-space", "configs:"]
    for table in TABLES:
        files = table_files(manifest, table) + dictionary_files(manifest, table)  # a dictionary's rows are its table's rows
        if not files:
            continue
        head += [f"- config_name: {table}", "  data_files:", "  - split: train", "    path:"]
        head += [f"    - {_yaml_str(f)}" for f in files]
    head.append("---")

    where = url or "DIR"
    body = [
        "", f"# zeropass projections: {', '.join(slugs)}", "",
        "Every parameter of these transformer models projected into the space of its vocabulary (Dar et al., "
        "\"Analyzing Transformers in Embedding Space\", ACL 2023), stored once as Parquet: no forward pass, weights only. "
        "Built with [zeropass](https://github.com/) (`zeropass index`); `manifest.json` is the commit point and names "
        "every file of the dataset.", "",
        "## Models", "",
        "| model | source | architecture | layers | d_model | d_vocab | variant | k | pairs | license |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in slugs:
        r = rows.get(s, {})
        cells = [s, r.get("source") or manifest["models"][s].get("source") or "?", r.get("architecture", "?"),
                 r.get("n_layers", "?"), r.get("d_model", "?"), r.get("d_vocab", "?"),
                 r.get("variant") or manifest["models"][s].get("variant") or "?", r.get("k", "?"), r.get("n_pairs", "?"),
                 licenses[s] or "unknown (see the model's own card)"]
        body.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    dictionaries = _rows(Path(db), dictionary_files(manifest, "dictionaries"), "dictionary")
    if manifest.get(DICTIONARIES):
        body += ["", "## Dictionaries", "",
                 "Sparse autoencoders and transcoders of the models above, their features projected like the models' own "
                 "vectors (`features`, `feature_stats`, `feature_neighbours`; docs/DICTIONARIES.md of zeropass).", "",
                 "| dictionary | model | layer | site | features | architecture | source |", "|---|---|---|---|---|---|---|"]
        seen = {r["dictionary"]: r for r in dictionaries}
        for name in sorted(manifest[DICTIONARIES]):
            r = seen.get(name, {})
            cells = [name, manifest[DICTIONARIES][name].get("model", "?"), r.get("layer", "?"), r.get("site", "?"),
                     r.get("d_sae", "?"), r.get("architecture", "?"), r.get("source") or manifest[DICTIONARIES][name].get("source") or "?"]
            body.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    body += ["", "The license of each model's weights applies to what is derived from them here."
             + (" Where it says unknown, check the model's own card." if license_id == "other" else ""), "",
             "## Tables", "", "| table | rows |", "|---|---|"]
    body += [f"| `{t}` | {counts[t]:,} |" for t in TABLES if t in counts]
    built = [(s, manifest["models"][s].get("rebuild")) for s in slugs]
    if any(isinstance(args, list) and args for _, args in built):
        from .dataset import zeropass_command

        body += ["", "## How it was built", "", "```sh"]
        body += [zeropass_command(*args, "--db", "DB") if isinstance(args, list) and args else f"# {s}: command not recorded"
                 for s, args in built]
        body += ["```"]
    versions = sorted({str(r.get("zeropass_version")) for r in rows.values() if r.get("zeropass_version")})
    body += ["", f"Schema version {manifest.get('schema_version')}; written by zeropass {', '.join(versions) or '?'}. "
             "Column meanings: docs/TABLES.md of zeropass.", "",
             "## Query it", "",
             "```sh", "pip install zeropass",
             f"zeropass heads paris --db {where}", f"zeropass neurons paris --model {slugs[0] if slugs else 'M'} --db {where}",
             f"zeropass sql \"SELECT model, count(*) FROM vectors GROUP BY model\" --db {where}", "```", "",
             "Plain DuckDB, from inside a local copy (the catalog's views use relative paths):", "",
             "```sh", "duckdb catalog.duckdb -c \"SELECT * FROM models\"", "```", "",
             "With `datasets` (one config per table):", "",
             "```python", "from datasets import load_dataset",
             f"vectors = load_dataset({_yaml_str(_datasets_path(where))}, \"vectors\", split=\"train\")", "```", ""]
    return "\n".join(head + body)


def _datasets_path(where: str) -> str:
    """What ``datasets.load_dataset`` takes for ``where``: a Hub repo id for ``hf://datasets/ORG/NAME``."""
    if where.startswith("hf://datasets/"):
        return "/".join(where[len("hf://datasets/"):].split("@")[0].split("/")[:2])
    return where
