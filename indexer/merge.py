"""`zeropass merge SRC... --into DB`: datasets built separately (other machines, other runs,
layer shards of one model) become one dataset. No torch here.

Rules (docs/DATASET.md "Merging and many models"):

* a model name stays unique: the same name in two places must be the same model, meaning the
  same weights (``weights_sha256``) and the same settings apart from ``layers`` and ``device``;
  anything else is refused (MergeConflict) before a byte is written;
* the same model with the same layers in two places is one model (the first place wins: the
  target's own copy if it has one, else the first SRC);
* the same model with different layers is a set of layer shards: each layer's partitions come
  from the first place that has the layer, the model-level partitions (parameters, positions)
  from the first place, and the ``models`` row and ``vectors_by_token`` are written anew, so the
  result equals a one-machine build of the union of the layers table by table;
* vocabularies are shared by ``vocab_id`` (copied once), alignments are kept when both of their
  models end up in DB;
* every file is copied with its sha256 checked against the source manifest's ``file_info``, and
  the whole merge is one :func:`indexer.dataset.commit`: a crash (even SIGKILL) before its
  manifest rename leaves DB as it was, and the copied files become leftovers the next write
  deletes.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import TABLES
from schemas.format import BadManifest, DigestMismatch, OtherVersion, check_version, copy_verified, first_line, \
    inside, read_manifest, settings_or_empty
from schemas.layout import BUILDS, manifest_files, partition_dir

from .dataset import (
    ZEROPASS_VERSION,
    check_writable,
    dataset_lock,
    open_dataset,
    commit,
    sort_by_token,
    vocabulary_damage,
    write_file_atomic,
    write_parquet_atomic,
)
from .errors import ZeropassError

Progress = Callable[[str], None]

# Settings that may differ between parts of one model: which layers a shard holds, and where it ran.
_SHARD_FREE = ("layers", "device")
# models columns that describe the checkpoint and the index settings: equal for one model.
_IDENTITY_COLUMNS = ("architecture", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_head", "d_ff", "d_vocab",
                     "n_ctx", "tied", "vocab_id", "variant", "k", "n_pairs", "series", "step")
# Partitions written anew for a model merged from shards.
_REGENERATED = ("models", "vectors_by_token")
_LAYER_DIR = re.compile(r"/layer=([0-9]+)/")


class MergeError(ZeropassError, ValueError):
    """A merge source cannot be used (not a dataset, another schema version, damaged files)."""


class MergeConflict(MergeError):
    """One model name stands for two different models (other weights or settings) in the sources."""


@dataclass
class _Part:
    """One model as one place (a source or the target) holds it."""

    root: Path
    entry: dict
    row: dict
    is_target: bool

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.settings.get("layers") or []))

    @property
    def settings(self) -> dict:
        return settings_or_empty(self.row)

    def identity(self) -> dict:
        ident = {c: self.row.get(c) for c in _IDENTITY_COLUMNS}
        ident["weights_sha256"] = _json(self.row.get("weights_sha256"))
        ident["settings"] = {k: v for k, v in self.settings.items() if k not in _SHARD_FREE}
        return ident


@dataclass
class MergeReport:
    """What a merge did: model names per outcome, and counts of shared parts copied."""

    added: list[str] = field(default_factory=list)
    combined: list[str] = field(default_factory=list)  # assembled from layer shards
    unchanged: list[str] = field(default_factory=list)
    vocabularies: int = 0
    alignments: int = 0
    files: int = 0
    bytes: int = 0

    def summary(self) -> str:
        parts = [f"{len(self.added)} model(s) added", f"{len(self.combined)} assembled from layer shards",
                 f"{len(self.unchanged)} already there", f"{self.vocabularies} vocabulary(ies)",
                 f"{self.alignments} alignment(s)", f"{self.files} file(s), {self.bytes:,} bytes copied"]
        return ", ".join(parts)


def _json(text) -> object:
    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return text


def _read_source(src: Path) -> dict:
    src = Path(src)
    if not src.is_dir():
        raise MergeError(f"merge source {src} is not a directory: give zeropass dataset directories")
    try:
        manifest = read_manifest(src)
    except BadManifest as e:
        raise MergeError(f"merge source {src}: {e}: repair it first with `zeropass check --db {src} --recover`") from None
    if manifest is None:
        raise MergeError(f"merge source {src} is not a zeropass dataset (it has no manifest.json)")
    try:
        check_version(manifest, f"merge source {src}")
    except OtherVersion as e:
        raise MergeError(str(e)) from None
    return manifest


def _model_row(root: Path, slug: str, entry: dict) -> dict:
    files = entry.get("files", {}).get("models", [])
    if len(files) != 1:
        raise MergeError(f"model {slug!r} in {root} lists {len(files)} models files, not 1: check it with "
                         f"`zeropass check --db {root}`")
    try:
        rows = pq.read_table(root / files[0]).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise MergeError(f"model {slug!r} in {root}: {files[0]} is not readable ({first_line(e)}): "
                         f"check it with `zeropass check --db {root}`") from None
    if len(rows) != 1:
        raise MergeError(f"model {slug!r} in {root}: {files[0]} has {len(rows)} rows, not 1")
    return rows[0]


def _conflict(slug: str, a: _Part, b: _Part) -> MergeConflict:
    ia, ib = a.identity(), b.identity()
    what = "weights" if ia["weights_sha256"] != ib["weights_sha256"] else "settings"
    keys = [k for k in ia if ia[k] != ib[k] and k != "weights_sha256"]
    if keys:
        what += " (" + ", ".join(keys if keys != ["settings"] else
                                 sorted(k for k in set(ia["settings"]) | set(ib["settings"])
                                        if ia["settings"].get(k) != ib["settings"].get(k))) + ")"
    return MergeConflict(f"model {slug!r} in {a.root} and in {b.root} has other {what}: a name must mean one model; "
                         f"rename one (index it again with --name NAME) or leave one source out")


def plan(parts_by_slug: dict[str, list[_Part]]) -> dict[str, str]:
    """slug -> ``keep`` (target's copy stands), ``copy`` (one source's copy) or ``combine`` (shards).

    Raises MergeConflict for the first name that stands for two models."""
    out = {}
    for slug, parts in sorted(parts_by_slug.items()):
        first = parts[0]
        for other in parts[1:]:
            if other.identity() != first.identity():
                raise _conflict(slug, first, other)
        union = sorted(set().union(*(p.layers for p in parts)))
        if tuple(union) == first.layers:
            out[slug] = "keep" if first.is_target else "copy"
        else:
            out[slug] = "combine"
    return out


def merge(sources: list[str | Path], into: str | Path, *, progress: Optional[Progress] = None) -> MergeReport:
    """Merge the datasets ``sources`` into ``into`` (created when new); returns what was done."""
    say = progress or (lambda _m: None)
    into = Path(into)
    if not sources:
        raise MergeError("nothing to merge: give at least one source dataset")
    real_into = os.path.realpath(into)
    srcs = []
    for s in sources:
        if os.path.realpath(s) == real_into:
            raise MergeError(f"merge source {s} is the target --into {into}: a dataset cannot be merged into itself")
        if inside(into, s):
            raise MergeError(f"the target --into {into} is inside merge source {s}: a dataset cannot hold another; "
                             f"choose a target outside every source")
        if inside(s, into) and not inside(s, into / BUILDS):  # index-many --ray merges its staged shards from there
            raise MergeError(f"merge source {s} is inside the target --into {into}: a dataset cannot hold another; "
                             f"move the source out first")
        if os.path.realpath(s) in (os.path.realpath(x) for x in srcs):
            continue  # the same source twice adds nothing
        srcs.append(Path(s))
    check_writable(into)
    manifests = {s: _read_source(s) for s in srcs}
    report = MergeReport()
    merge_id = uuid.uuid4().hex[:8]

    with dataset_lock(into):
        target = open_dataset(into)
        if target is None:
            target = commit(into, lambda m: [])
        parts_by_slug: dict[str, list[_Part]] = {}
        for slug, entry in target["models"].items():
            parts_by_slug.setdefault(slug, []).append(_Part(into, entry, _model_row(into, slug, entry), True))
        for s, manifest in manifests.items():
            for slug, entry in manifest["models"].items():
                parts_by_slug.setdefault(slug, []).append(_Part(s, entry, _model_row(s, slug, entry), False))
        decisions = plan(parts_by_slug)  # refuses conflicts before anything is written

        def change(manifest: dict) -> list[str]:
            listed = set(manifest_files(manifest))
            superseded: list[str] = []
            copier = _Copier(into, listed, merge_id, report)
            for slug, decision in decisions.items():
                parts = parts_by_slug[slug]
                if decision == "keep":
                    report.unchanged.append(slug)
                    continue
                if decision == "copy":
                    src = parts[0]
                    entry = dict(src.entry, files={}, file_info={})
                    for table, files in src.entry.get("files", {}).items():
                        for rel in files:
                            _add(entry, table, copier.copy(src, rel), copier.info)
                    manifest["models"][slug] = entry
                    report.added.append(slug)
                    say(f"[{slug}] copied from {src.root}")
                    continue
                old = manifest["models"].get(slug)
                manifest["models"][slug] = _combine(into, slug, parts, copier, merge_id)
                if old:
                    new_files = {f for fs in manifest["models"][slug]["files"].values() for f in fs}
                    superseded += [f for fs in old.get("files", {}).values() for f in fs if f not in new_files]
                report.combined.append(slug)
                say(f"[{slug}] assembled from {len(parts)} layer shards: layers "
                    f"{_ranges(sorted(set().union(*(p.layers for p in parts))))}")
            # vocabularies and alignments the merged models need
            needed_vocabs = {e.get("vocab_id") for e in manifest["models"].values()}
            for s, src_manifest in manifests.items():
                for vocab_id, vocab in src_manifest.get("vocabularies", {}).items():
                    have = manifest["vocabularies"].get(vocab_id)
                    if vocab_id not in needed_vocabs or (have and not vocabulary_damage(into, have)):
                        continue
                    new = dict(vocab, files=[], file_info={})
                    for rel in vocab.get("files", []):
                        new["files"].append(copier.copy(_Part(s, vocab, {}, False), rel))
                        new["file_info"][new["files"][-1]] = copier.info
                    if have:
                        superseded += have.get("files", [])
                    manifest["vocabularies"][vocab_id] = new
                    report.vocabularies += 1
                for key, al in src_manifest.get("alignments", {}).items():
                    a, _, b = key.partition("|")
                    if key in manifest["alignments"] or a not in manifest["models"] or b not in manifest["models"]:
                        continue
                    if decisions.get(a) == "keep" and decisions.get(b) == "keep":
                        continue  # the target's own models: its own alignment (or none) stands
                    new = dict(al, files=[], file_info={})
                    for rel in al.get("files", []):
                        new["files"].append(copier.copy(_Part(s, al, {}, False), rel))
                        new["file_info"][new["files"][-1]] = copier.info
                    manifest["alignments"][key] = new
                    report.alignments += 1
                # dictionaries (indexer/dictionaries) of the merged models, unless the target has one of that name
                for name, d in src_manifest.get("dictionaries", {}).items():
                    if name in manifest.get("dictionaries", {}) or d.get("model") not in manifest["models"]:
                        continue
                    new = dict(d, files={}, file_info={})
                    for table, files in d.get("files", {}).items():
                        for rel in files:
                            _add(new, table, copier.copy(_Part(s, d, {}, False), rel), copier.info)
                    manifest.setdefault("dictionaries", {})[name] = new
            return superseded

        commit(into, change)
    say(f"merged {len(srcs)} dataset(s) into {into}: {report.summary()}")
    return report


def _add(entry: dict, table: str, rel: str, info: dict) -> None:
    entry.setdefault("files", {}).setdefault(table, []).append(rel)
    entry.setdefault("file_info", {})[rel] = info


def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, l in enumerate(layers):
        if start is None:
            start = l
        if i + 1 == len(layers) or layers[i + 1] != l + 1:
            out.append(f"{start}-{l}" if l != start else f"{l}")
            start = None
    return ",".join(out)


def _combine(into: Path, slug: str, parts: list[_Part], copier: "_Copier", merge_id: str) -> dict:
    """The manifest entry of ``slug`` assembled from its layer shards (files copied into ``into``)."""
    owner: dict[int, _Part] = {}
    for p in parts:
        for l in p.layers:
            owner.setdefault(l, p)
    first = parts[0]
    entry = {k: v for k, v in first.entry.items() if k not in ("files", "file_info", "row_counts")}
    entry.update(files={}, file_info={}, build_id=f"merge-{merge_id}")
    for p in parts:
        for table, files in p.entry.get("files", {}).items():
            if table in _REGENERATED:
                continue
            for rel in files:
                m = _LAYER_DIR.search(rel)
                mine = owner.get(int(m.group(1))) is p if m else p is first
                if mine:
                    _add(entry, table, copier.copy(p, rel), copier.info)
    layers = sorted(owner)
    # the models row: the first shard's, with the union of the layers
    row = dict(first.row)
    settings = dict(first.settings, layers=layers)
    row.update(settings=json.dumps(settings, sort_keys=True, default=str),
               created_at=datetime.now(timezone.utc).replace(microsecond=0), zeropass_version=ZEROPASS_VERSION)
    rel = f"{partition_dir('models', model=slug)}/merge-{merge_id}.parquet"
    digest = write_parquet_atomic(into, rel, pa.Table.from_pylist([row], schema=TABLES["models"].schema))
    _add(entry, "models", rel, dict(digest, rows=1))
    copier.written(rel)
    rel = f"{partition_dir('vectors_by_token', model=slug)}/merge-{merge_id}.parquet"
    vectors = sorted(entry["files"].get("vectors", []))
    if vectors:
        rows, digest = sort_by_token(into, slug, vectors, rel)
    else:
        rows, digest = 0, write_parquet_atomic(into, rel, TABLES["vectors_by_token"].schema.empty_table())
    _add(entry, "vectors_by_token", rel, dict(digest, rows=rows))
    copier.written(rel)
    entry["files"] = {t: sorted(f) for t, f in sorted(entry["files"].items())}
    entry["file_info"] = dict(sorted(entry["file_info"].items()))
    counts: dict[str, int] = {}
    for table, files in entry["files"].items():
        counts[table] = sum(entry["file_info"][f].get("rows", 0) for f in files)
    entry["row_counts"] = dict(sorted(counts.items()))
    rebuild = first.entry.get("rebuild")
    if isinstance(rebuild, list) and "--layers" in rebuild:  # the command that rebuilds the whole union
        i = rebuild.index("--layers")
        rebuild = rebuild[:i] + rebuild[i + 2:]
        if layers != list(range(int(first.row.get("n_layers") or 0))):
            rebuild += ["--layers", ",".join(map(str, layers))]
        entry["rebuild"] = rebuild
    return entry


class _Copier:
    """Copies listed files into the target, checking each one's sha256 against its source's record."""

    def __init__(self, into: Path, listed: set[str], merge_id: str, report: MergeReport):
        self.into, self.listed, self.merge_id, self.report = into, listed, merge_id, report
        self.info: dict = {}

    def written(self, rel: str) -> None:
        self.listed.add(rel)

    def copy(self, part: _Part, rel: str) -> str:
        """Copy ``part.root/rel`` into the target; returns its path there (``self.info``: its digest)."""
        expected = part.entry.get("file_info", {}).get(rel, {})
        if part.is_target:
            self.info = expected or {}
            return rel
        dest = rel
        if dest in self.listed or (self.into / dest).exists():
            # the name is taken (the target's own file, or one copied a moment ago): a fresh one
            p = Path(rel)
            dest = str(p.with_name(f"{p.stem}-m{self.merge_id}{len(self.listed)}{p.suffix}"))
        src = part.root / rel

        def write(tmp: Path) -> None:
            try:
                with open(tmp, "wb") as fout:
                    copy_verified(src, fout, expected.get("sha256") or None)
            except FileNotFoundError:
                raise MergeError(f"{src} is listed by its dataset's manifest but missing: "
                                 f"check the source with `zeropass check --db {part.root}`") from None
            except DigestMismatch as e:
                raise MergeError(f"{e}: check the source with `zeropass check --db {part.root}`, "
                                 f"rebuild what it names") from None

        digest = write_file_atomic(self.into, dest, write)
        self.info = dict(digest, rows=expected.get("rows")) if "rows" in expected else dict(digest)
        if self.info.get("rows") is None:
            self.info["rows"] = pq.ParquetFile(self.into / dest).metadata.num_rows
        self.listed.add(dest)
        self.report.files += 1
        self.report.bytes += digest["bytes"]
        return dest
