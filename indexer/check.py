"""`zeropass check`: verify a dataset directory and name the command that repairs each problem.

Needs only the query extra (pyarrow, duckdb): nothing here imports torch, so a person who only
reads a shared dataset can check it (tested in tests/test_check.py).

What is verified (docs/DATASET.md, "Failure handling"):

* the manifest: valid JSON, the expected structure, this schema version, every listed path
  relative and inside the dataset (``schemas.format.validate_manifest``);
* every listed file: it exists (and is no link out of the dataset), has the recorded size, its
  Parquet footer reads, its row count equals the recorded one, the per-table sums equal the
  model's ``row_counts``, and (unless ``hashes=False``) its sha256 equals the recorded one;
* the catalog: present and built from this manifest (each view's comment holds the digest of
  the files it reads, ``indexer.dataset.catalog_digest``);
* leftovers: temporary files, spill directories, files of superseded or abandoned builds.

Repairs: a damaged model or vocabulary is rebuilt by re-indexing (the command is recorded in
the manifest at commit); the catalog and leftovers by :func:`repair`; a lost or unreadable
manifest by :func:`recover`, which rebuilds it from the files' own contents.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import TABLES
from schemas.layout import (
    BUILDS,
    CATALOG,
    MANIFEST,
    BadManifest,
    empty_manifest,
    read_manifest,
)
from schemas.format import (OtherVersion, check_version, file_digest, first_line, links_out, model_settings,
                            settings_or_empty, write_json_atomic)

from .dataset import (
    ZEROPASS_VERSION,
    catalog_comment,
    dataset_lock,
    directory_state,
    delete_files,
    leftovers,
    open_dataset,
    parquet_rows,
    commit,
    unfinished_builds,
    write_catalog,
    writer_active,
    zeropass_command,
)
from .errors import DatasetError


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: what (naming the model or file) and the command that repairs it."""

    what: str
    repair: str

    def __str__(self) -> str:
        return f"{self.what}: repair with `{self.repair}`"


@dataclass
class Report:
    problems: list[Problem]
    notes: list[str]
    models: int = 0
    files: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(root: str | Path, *, hashes: bool = True, db: str | None = None) -> Report:
    """Verify the dataset at ``root``; ``db`` is how the user named it (used in repair commands)."""
    root = Path(root)
    db = str(root) if db is None else db
    recover_cmd = zeropass_command("check", "--db", db, "--recover")
    repair_cmd = zeropass_command("check", "--db", db, "--repair")
    if not root.is_dir():
        raise DatasetError(f"no dataset directory at {root}: check the --db path")
    report = Report([], [])
    try:
        manifest = read_manifest(root)
    except BadManifest as e:
        report.problems.append(Problem(str(e), recover_cmd))
        return report
    if manifest is None:
        if directory_state(root) == "ours":
            report.problems.append(Problem(f"{root} has zeropass data but no {MANIFEST}", recover_cmd))
            return report
        raise DatasetError(f"{root} is not a zeropass dataset (no {MANIFEST}, no zeropass files): check the --db path")
    try:
        check_version(manifest, root)
    except OtherVersion as e:
        report.problems.append(Problem(str(e), zeropass_command("index", "MODEL", "--db", "NEWDIR") + " (once per model)"))
        return report

    real_root = root.resolve()
    for slug, entry in sorted(manifest["models"].items()):
        report.models += 1
        fix = _reindex_command(slug, entry, db)
        sums: dict[str, int] = {}
        for table, files in sorted(entry.get("files", {}).items()):
            for rel in files:
                report.files += 1
                rows, why = _check_file(root, real_root, rel, entry.get("file_info", {}).get(rel), hashes)
                if why:
                    report.problems.append(Problem(f"model {slug}: {why}", fix))
                sums[table] = sums.get(table, 0) + (rows or 0)
        for table, want in sorted(entry.get("row_counts", {}).items()):
            if sums.get(table, 0) != want and not any(p.what.startswith(f"model {slug}:") for p in report.problems):
                report.problems.append(Problem(
                    f"model {slug}: table {table} has {sums.get(table, 0)} rows in its files, the manifest says {want}", fix))
        vocab = entry.get("vocab_id")
        if vocab and vocab not in manifest["vocabularies"]:
            report.problems.append(Problem(f"model {slug}: its vocabulary {vocab} is not in the manifest", fix))

    for vocab_id, vocab in sorted(manifest["vocabularies"].items()):
        users = sorted(s for s, e in manifest["models"].items() if e.get("vocab_id") == vocab_id)
        fix = _reindex_command(users[0], manifest["models"][users[0]], db) if users else repair_cmd
        for why in _listed_file_problems(root, real_root, vocab, vocab.get("d_vocab"), "the vocabulary has", hashes, report):
            used = f" (used by {', '.join(users)})" if users else ""
            report.problems.append(Problem(f"vocabulary {vocab_id}{used}: {why}", fix))

    for pair, entry in sorted(manifest.get("alignments", {}).items()):
        a, _, b = pair.partition("|")
        for why in _listed_file_problems(root, real_root, entry, entry.get("rows"), "the manifest says", hashes, report):
            report.problems.append(Problem(f"alignment {a} / {b}: {why}", zeropass_command("align", a, b, "--db", db)))

    for name, entry in sorted(manifest.get("dictionaries", {}).items()):  # indexer/dictionaries: listed like a model's files
        fix = zeropass_command("index-sae", entry.get("source") or "PATH", "--model", entry.get("model"), "--name", name,
                               "--db", db, "--replace")
        if entry.get("model") not in manifest["models"]:
            report.problems.append(Problem(f"dictionary {name}: its model {entry.get('model')} is not in the manifest", fix))
        for table, files in sorted(entry.get("files", {}).items()):
            for why in _listed_file_problems(root, real_root, {"files": files, "file_info": entry.get("file_info", {})},
                                             None, "", hashes, report):
                report.problems.append(Problem(f"dictionary {name}: {why}", fix))

    for table, entry in sorted(manifest.get("compacted", {}).items()):
        # A derived copy of the per-model files (still listed and checked above): readers skip a
        # damaged one, and `zeropass compact` rebuilds it from them.
        for why in _listed_file_problems(root, real_root, entry, None, "", hashes, report):
            report.problems.append(Problem(f"compacted {table} (a copy of {len(entry.get('models', {}))} models' files): {why}",
                                           zeropass_command("compact", "--db", db)))

    if manifest.get("compacted"):
        from schemas.layout import compacted_models

        outside = sorted(set(manifest["models"]) - set(compacted_models(manifest, "vectors")))
        if outside:
            report.notes.append(f"{len(outside)} model{'s' * (len(outside) != 1)} committed since the last compaction "
                                f"{'are' if len(outside) != 1 else 'is'} read from {'their' if len(outside) != 1 else 'its'} "
                                f"own files: `{zeropass_command('compact', '--db', db)}` folds them in")

    stale = _catalog_problem(root, manifest)
    if stale:
        report.problems.append(Problem(stale, repair_cmd))

    if writer_active(root):
        report.notes.append("a writer holds the dataset lock now: leftovers are not listed (its files are in progress)")
    else:
        for what in _group_leftovers(root, leftovers(root, manifest)):
            report.problems.append(Problem(what, repair_cmd))
    for slug, rec in sorted(unfinished_builds(root, manifest).items()):
        report.notes.append(
            f"unfinished build of {slug} ({len(rec['done'])} partitions, not visible): rerun the command that started it "
            f"to resume, or discard it with `rm {_q(root / BUILDS / (slug + '.json'))}` and then `{repair_cmd}`")
    return report


def _q(path) -> str:
    import shlex

    return shlex.quote(str(path))


def _reindex_command(slug: str, entry: dict, db: str) -> str:
    args = entry.get("rebuild") or ["index", entry.get("source") or "MODEL", "--name", slug]
    return zeropass_command(*args, "--db", db, "--replace")


def _listed_file_problems(root: Path, real_root: Path, entry: dict, expected_rows: int | None, says: str,
                          hashes: bool, report) -> Iterator[str]:
    """Why each file of a manifest entry (a vocabulary, an alignment, a compacted table) is
    unusable, counting the files in ``report``; a row count other than ``expected_rows`` reads
    "REL has N rows, {says} M"."""
    for rel in entry.get("files", []):
        report.files += 1
        rows, why = _check_file(root, real_root, rel, entry.get("file_info", {}).get(rel), hashes)
        if not why and expected_rows is not None and rows != expected_rows:
            why = f"{rel} has {rows} rows, {says} {expected_rows}"
        if why:
            yield why


def _check_file(root: Path, real_root: Path, rel: str, info: dict | None, hashes: bool) -> tuple[int | None, str | None]:
    """(rows, None) for a good file, (rows or None, why) for a damaged one."""
    info = info or {}
    path = root / rel
    if links_out(real_root, [rel]):
        return None, f"{rel} is a link out of the dataset (the dataset holds its files itself)"
    if not path.is_file():
        return None, f"{rel} is missing"
    size = path.stat().st_size
    if "bytes" in info and size != info["bytes"]:
        return None, f"{rel} has {size} bytes, {info['bytes']} were written"
    try:
        rows = parquet_rows(path)
    except (OSError, pa.ArrowException) as e:
        return None, f"{rel} is not a readable Parquet file ({first_line(e)})"
    if "rows" in info and rows != info["rows"]:
        return rows, f"{rel} has {rows} rows, {info['rows']} were written"
    if hashes and "sha256" in info and file_digest(path)["sha256"] != info["sha256"]:
        return rows, f"{rel} does not have the content that was written (sha256 differs)"
    return rows, None


def _catalog_problem(root: Path, manifest: dict) -> str | None:
    import duckdb

    path = root / CATALOG
    if not path.is_file():
        return f"{CATALOG} is missing"
    want = catalog_comment(manifest)
    try:
        con = duckdb.connect(str(path), read_only=True)
        try:
            views = dict(con.execute("SELECT view_name, comment FROM duckdb_views() WHERE NOT internal").fetchall())
        finally:
            con.close()
    except duckdb.Error as e:
        return f"{CATALOG} cannot be opened ({first_line(e)})"
    if set(views) != set(TABLES) or any(c != want for c in views.values()):
        return f"{CATALOG} does not match {MANIFEST} (stale: written before the last change, or by an older zeropass)"
    return None


def _group_leftovers(root: Path, paths: list[Path]) -> list[str]:
    """One line per kind of leftover (and per model for Parquet files), with a count and an example."""
    groups: dict[str, list[Path]] = {}
    for p in paths:
        rel = p.relative_to(root).as_posix()
        model = next((part.split("=", 1)[1] for part in rel.split("/") if part.startswith("model=")), None)
        if p.suffix == ".parquet" and model:
            key = f"model {model}: leftover files of superseded or abandoned builds"
        elif p.suffix == ".json":
            key = "leftover progress files of committed or unreadable builds"
        elif p.name.endswith(".spill"):
            key = "leftover DuckDB spill directories"
        else:
            key = "leftover temporary files of interrupted writes"
        groups.setdefault(key, []).append(p)
    return [f"{key}: {len(ps)} ({ps[0].relative_to(root).as_posix()}{', ...' if len(ps) > 1 else ''})"
            for key, ps in sorted(groups.items())]


def repair(root: str | Path) -> None:
    """Rewrite the catalog from the manifest and delete leftovers (under the dataset lock).

    Damaged model files are not touched: they are repaired by re-indexing (`check` names how).
    """
    root = Path(root)
    with dataset_lock(root):  # re-entrant: commit takes it again
        manifest = open_dataset(root)  # a missing or malformed manifest: --recover, said in one line
        if manifest is not None:
            # Leftovers first: a merge that failed on a full disk leaves its copies there, and
            # the commit below writes (catalog, manifest) before it deletes.
            delete_files(root, leftovers(root, manifest))
        commit(root, lambda manifest: [])


def recover(root: str | Path) -> dict:
    """Rebuild a lost or unreadable manifest from the dataset's files; returns it.

    Each model's newest build that reached its commit (its ``models`` file, written last, is
    there) is listed with all its files, the row counts and digests read from them, and the
    settings from its ``models`` row; vocabularies and alignments likewise. The unreadable
    manifest, if any, is kept as ``manifest.json.damaged``. Nothing is deleted (a later
    ``--repair`` removes what the recovered manifest does not list).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"no dataset directory at {root}: check the --db path")
    if directory_state(root) != "ours":  # before the lock, which would create .lock in a stranger's directory
        raise DatasetError(f"{root} holds no zeropass files: nothing to recover (check the --db path)")
    with dataset_lock(root):
        try:
            if read_manifest(root) is not None:
                raise DatasetError(f"{root / MANIFEST} is readable: nothing to recover (run `zeropass check` without --recover)")
            if directory_state(root) != "ours":
                raise DatasetError(f"{root} holds no zeropass files: nothing to recover (check the --db path)")
        except BadManifest:
            os.replace(root / MANIFEST, root / f"{MANIFEST}.damaged")
        manifest = empty_manifest()
        manifest["zeropass_version"] = ZEROPASS_VERSION
        for slug, (build_id, row) in sorted(_newest_committed_builds(root).items()):
            manifest["models"][slug] = _recovered_entry(root, slug, build_id, row)
            vocab_id = row.get("vocab_id")
            rel = f"tokens/vocab_id={vocab_id}/{vocab_id}.parquet"
            if vocab_id and vocab_id not in manifest["vocabularies"] and (root / rel).is_file():
                try:
                    rows = parquet_rows(root / rel)
                except (OSError, pa.ArrowException):
                    rows = None
                manifest["vocabularies"][vocab_id] = {"files": [rel], "d_vocab": rows,
                                                      "file_info": {rel: dict(file_digest(root / rel), rows=rows)}}
        _recover_dictionaries(root, manifest)
        for pair_dir in sorted((root / "alignments").glob("model_a=*/model_b=*")):
            files = sorted(pair_dir.glob("*.parquet"), key=lambda p: p.stat().st_mtime)
            if files:
                rel = files[-1].relative_to(root).as_posix()
                rows = _rows_or_none(files[-1])
                pair = f"{pair_dir.parent.name.split('=', 1)[1]}|{pair_dir.name.split('=', 1)[1]}"
                manifest["alignments"][pair] = {"files": [rel], "rows": rows,
                                                "file_info": {rel: dict(file_digest(files[-1]), rows=rows)}}
        try:
            write_catalog(root, manifest)
            write_json_atomic(root / MANIFEST, manifest)
        except OSError as e:
            raise DatasetError(f"cannot write to {root}: {e.strerror or e}") from None
    return manifest


def _rows_or_none(path: Path) -> int | None:
    try:
        return parquet_rows(path)
    except (OSError, pa.ArrowException):
        return None


def _recover_dictionaries(root: Path, manifest: dict) -> None:
    """The newest committed build of each dictionary (its `dictionaries` file is there) of a recovered
    model, listed with its files (docs/DICTIONARIES.md); the source and origin come from its row."""
    from schemas.layout import DICTIONARY_TABLES

    newest: dict[str, tuple[str, dict]] = {}
    for f in sorted((root / "dictionaries").glob("model=*/dictionary=*/*.parquet")):
        try:
            [row] = pq.read_table(f).to_pylist()
        except (OSError, pa.ArrowException, ValueError):
            continue
        if row.get("model") in manifest["models"] and (
                row["dictionary"] not in newest or str(row.get("created_at")) > str(newest[row["dictionary"]][1].get("created_at"))):
            newest[row["dictionary"]] = (f.stem, row)
    for name, (build_id, row) in sorted(newest.items()):
        files: dict[str, list[str]] = {}
        info: dict[str, dict] = {}
        for table in DICTIONARY_TABLES:
            for f in sorted((root / table / f"model={row['model']}").rglob(f"dictionary={name}/{build_id}.parquet")):
                rel = f.relative_to(root).as_posix()
                files.setdefault(table, []).append(rel)
                info[rel] = dict(file_digest(f), rows=_rows_or_none(f))
        settings = settings_or_empty(row)  # a damaged settings column: the origin is not known
        manifest.setdefault("dictionaries", {})[name] = {
            "model": row["model"], "build_id": build_id, "source": row.get("source"), "origin": settings.get("path"),
            "files": files, "file_info": info,
            "row_counts": {t: sum(info[f]["rows"] or 0 for f in fs) for t, fs in files.items()}}


def _newest_committed_builds(root: Path) -> dict[str, tuple[str, dict]]:
    """slug -> (build id, models row) of its newest build whose models file reads.

    Builds of one name from other weights (or, where a row records no digests, another source)
    are not resolved by age: which one is the model is the user's call (DatasetError naming both)."""
    out: dict[str, tuple[str, dict]] = {}
    where: dict[str, Path] = {}
    for f in sorted((root / "models").glob("model=*/*.parquet")):
        try:
            [row] = pq.read_table(f).to_pylist()
        except (OSError, pa.ArrowException, ValueError):
            continue  # damaged or not ours: that build cannot be recovered
        slug = f.parent.name.split("=", 1)[1]
        if slug in out and _checkpoint(row) != _checkpoint(out[slug][1]):
            a, b = where[slug].relative_to(root).as_posix(), f.relative_to(root).as_posix()
            raise DatasetError(
                f"model {slug} has builds of two different checkpoints ({a} from {out[slug][1].get('source')}, "
                f"{b} from {row.get('source')}): --recover cannot tell which one is {slug}; move the files of the "
                f"other build (named by its build id) out of {root}, then rerun")
        if slug not in out or str(row.get("created_at")) > str(out[slug][1].get("created_at")):
            out[slug], where[slug] = (f.stem, row), f
    return out


def _checkpoint(row: dict) -> object:
    """What identifies a build's checkpoint: its weights' digests, else its source."""
    weights = row.get("weights_sha256")
    return ("weights", weights) if weights not in (None, "", "{}", "null") else ("source", row.get("source"))


def _recovered_entry(root: Path, slug: str, build_id: str, row: dict) -> dict:
    files: dict[str, list[str]] = {}
    info: dict[str, dict] = {}
    counts: dict[str, int] = {}
    for table in TABLES:
        base = root / table / f"model={slug}"
        for f in sorted(base.rglob(f"{build_id}.parquet")) if base.is_dir() else []:
            rel = f.relative_to(root).as_posix()
            rows = _rows_or_none(f)
            files.setdefault(table, []).append(rel)
            info[rel] = dict(file_digest(f), rows=rows)
            counts[table] = counts.get(table, 0) + (rows or 0)
    settings = model_settings(row)
    rebuild = ["index", str(row.get("source")), "--variant", str(row.get("variant") or "raw"), "--name", slug]
    if row.get("variant") == "diff":
        rebuild = ["diff", "BASE", "TUNED", "--name", slug]  # the two sources are in models.settings
    if settings.get("k") is not None:
        rebuild += ["--k", str(settings["k"]), "--pairs", str(settings.get("n_pairs"))]
    if settings.get("layers") and row.get("n_layers") and settings["layers"] != list(range(row["n_layers"])):
        rebuild += ["--layers", ",".join(map(str, settings["layers"]))]
    created = row.get("created_at")
    return {
        "build_id": build_id,
        "files": {t: sorted(fs) for t, fs in sorted(files.items())},
        "file_info": dict(sorted(info.items())),
        "row_counts": dict(sorted(counts.items())),
        "committed_at": created.isoformat() if hasattr(created, "isoformat") else created,
        "source": row.get("source"),
        "origin": None,  # unknown after a loss: the name-collision rule cannot apply to it
        "rebuild": rebuild,
        "variant": row.get("variant"),
        "vocab_id": row.get("vocab_id"),
        "recovered": True,
    }
