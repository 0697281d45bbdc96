"""The dataset format's one home: every rule a writer and a reader must agree on, written once.

The writer (``indexer.dataset``), ``check``, ``merge``, ``publish``, ``compact`` and the readers
(``query``) call these functions instead of keeping their own copies, so that a rule has one
definition and one message (docs/DATASET.md, "The format's one home"):

* reading a manifest, validating its shape (``validate_manifest``) and gating its format and
  schema version (``check_version``, one typed error that says how to rebuild);
* the dataset **revision**: the first 16 hex digits of the manifest bytes' sha256 (``publish``
  writes those bytes, a remote reader names what it read by them);
* digests of files, copying a file while checking its sha256, atomic local writes and the names
  of their temporary files;
* the settings of a ``models`` row; "is this a URL"; the first line of an exception;
* the link rule: a listed file may be a link only when it resolves inside the dataset.

Imports only the standard library and ``schemas``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable

from . import SCHEMA_VERSION, TABLES

MANIFEST = "manifest.json"
FORMAT = "zeropass-dataset"
# The manifest section of dictionaries (SAEs, transcoders; docs/DICTIONARIES.md): name -> {"model",
# "files": {table: [...]}, "file_info", "row_counts", "build_id", "source", "origin"}, like a model's entry.
DICTIONARIES = "dictionaries"
# Tables a dictionary entry lists files of.
DICTIONARY_TABLES = ("vectors", "vectors_by_token", "dictionaries", "feature_stats", "feature_neighbours")
CHUNK = 1 << 20


# -- manifest: read, validate, gate ---------------------------------------------------------

class BadManifest(ValueError):
    """manifest.json exists but is not a well-formed zeropass manifest (its message says why)."""

    def __init__(self, message: str, why: str | None = None):
        super().__init__(message)
        self.why = why or message


class OtherVersion(ValueError):
    """A manifest of another format or schema version than this zeropass reads and writes."""


class OtherFormat(OtherVersion):
    """A manifest.json of another program (its ``format`` is not ``zeropass-dataset``)."""


def empty_manifest() -> dict:
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "models": {}, "vocabularies": {}, "alignments": {}}


def parse_manifest(data: bytes | str, where: Path | str = MANIFEST) -> dict:
    """``data`` (a manifest's bytes) as a validated manifest; raises BadManifest."""
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadManifest(f"{where} is not valid JSON ({first_line(e)})", "not valid JSON") from None
    validate_manifest(manifest, where)
    return manifest


def read_manifest(root: Path | str) -> dict | None:
    """The manifest of dataset ``root``, or None when there is none yet.

    Raises BadManifest when the file is not JSON, lacks the expected structure, or lists a
    file outside the dataset (an absolute path or ``..``): every reader and the writer then
    refuse it in one line instead of reading whatever a damaged or hostile manifest names.
    """
    path = Path(root) / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return parse_manifest(data, path)


def check_version(manifest: dict, where: Path | str) -> None:
    """Raise OtherVersion unless ``manifest`` is of this zeropass's format and schema version.

    The one gate every writer and reader passes; ``where`` names the dataset in the message.
    A dataset of another version is never converted in place: it is rebuilt into a new one.
    """
    fmt = manifest.get("format", FORMAT)
    if fmt != FORMAT:
        raise OtherFormat(f"{where} is not a zeropass dataset ({MANIFEST} has format {fmt!r}, not {FORMAT!r})")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        models = manifest.get("models")
        sources = sorted({str(m.get("source")) for m in models.values() if isinstance(m, dict) and m.get("source")}) \
            if isinstance(models, dict) else []
        hint = f" (models: {', '.join(sources)})" if sources else ""
        raise OtherVersion(
            f"{where} was written with schema version {version} and this zeropass reads and writes version "
            f"{SCHEMA_VERSION}: rebuild it into a new directory with `zeropass index MODEL --db NEWDIR` for each "
            f"model{hint}")


def validate_manifest(manifest, path: Path | str = MANIFEST) -> None:
    """Raise BadManifest unless ``manifest`` has the structure the writer produces.

    The one check of a manifest's shape, shared by the writer, `zeropass check`, `merge`,
    `publish` and the query layer: objects where objects belong, known tables, and every
    listed file a relative, normalised path to a Parquet file inside its table's directory
    (see ``unsafe_relpath``). Format and schema version: ``check_version``.
    """
    from .layout import COMPACTED_ORDER, SHARED  # layout builds on this module

    def bad(why: str):
        raise BadManifest(f"{path} is malformed: {why}", why)

    def kind(v) -> str:
        return "null" if v is None else "a " + type(v).__name__

    if not isinstance(manifest, dict):
        bad(f"{kind(manifest)}, not an object")
    if "models" not in manifest:
        bad("it has no 'models' object")
    for key in ("models", "vocabularies", "alignments", "compacted"):
        if not isinstance(manifest.get(key, {}), dict):
            bad(f"{key!r} is {kind(manifest.get(key))}, not an object")
    for slug, entry in manifest.get("models", {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("files", {}), dict):
            bad(f"model {slug!r} has no 'files' object")
        for table, files in entry.get("files", {}).items():
            if table not in TABLES or table in (t for t, _ in SHARED.values()):
                bad(f"model {slug!r} lists files of an unknown table {table!r}")
            _check_files(files, table, f"model {slug!r}", bad)
    for key, (table, _) in SHARED.items():
        for name, entry in manifest.get(key, {}).items():
            if not isinstance(entry, dict):
                bad(f"{key} entry {name!r} is {kind(entry)}, not an object")
            _check_files(entry.get("files", []), table, f"{key} entry {name!r}", bad)
    for table, entry in manifest.get("compacted", {}).items():
        if table not in COMPACTED_ORDER:
            bad(f"'compacted' lists a table {table!r} that is not compacted")
        if not isinstance(entry, dict) or not isinstance(entry.get("models", {}), dict) \
                or not all(isinstance(b, str) for b in entry.get("models", {}).values()):
            bad(f"compacted entry {table!r} is not an object with a 'models' object of build ids")
        _check_files(entry.get("files", []), table, f"compacted entry {table!r}", bad)
    _check_dictionaries(manifest, bad, kind)


def _check_dictionaries(manifest: dict, bad, kind) -> None:
    """validate_manifest's part for the "dictionaries" section."""
    section = manifest.get(DICTIONARIES, {})
    if not isinstance(section, dict):
        bad(f"{DICTIONARIES!r} is {kind(section)}, not an object")
    for name, entry in section.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("files", {}), dict):
            bad(f"dictionary {name!r} has no 'files' object")
        if not isinstance(entry.get("model"), str):
            bad(f"dictionary {name!r} names no model")
        for table, files in entry.get("files", {}).items():
            if table not in DICTIONARY_TABLES:
                bad(f"dictionary {name!r} lists files of an unknown table {table!r}")
            _check_files(files, table, f"dictionary {name!r}", bad)


def _check_files(files, table: str, owner: str, bad) -> None:
    if not isinstance(files, list):
        bad(f"{owner}: 'files' is not a list")
    for f in files:
        why = unsafe_relpath(f)
        if why is None and (PurePosixPath(f).parts[0] != table or PurePosixPath(f).suffix != ".parquet"):
            why = f"which is not a Parquet file under {table}/"
        if why:
            bad(f"{owner} lists {f!r}, {why}")


def unsafe_relpath(rel) -> str | None:
    """Why ``rel`` cannot name a file inside a dataset, or None when it can.

    Manifest paths are relative, forward-slashed, without ``..``: a dataset can then be moved
    as a whole, and no manifest can make a reader open a file outside the directory. Glob
    characters (``*``, ``?``, ``[``, ``]``) are refused too: the writer never names a file with
    them, and fsspec and DuckDB would read them as patterns (a merge left files named ``*``).
    """
    if not isinstance(rel, str) or not rel:
        return "which is not a path"
    if "\\" in rel or "\0" in rel:
        return "which holds a backslash or NUL"
    if any(c in rel for c in "*?[]"):
        return "which holds a glob character (* ? [ ])"
    p = PurePosixPath(rel)
    if p.is_absolute():
        return "an absolute path (manifest paths are relative to the dataset)"
    if any(part in ("..", ".", "") for part in rel.split("/")):
        return "which leaves the dataset or is not normalised ('..', '.', '//')"
    return None


def revision(manifest_bytes: bytes) -> str:
    """The dataset revision: what a published manifest's exact bytes are called (16 hex digits)."""
    return hashlib.sha256(manifest_bytes).hexdigest()[:16]


def model_settings(row: dict | None) -> dict:
    """The ``settings`` JSON of a ``models`` row as a dict (``{}`` when absent).

    Raises ValueError when the column holds something other than a JSON object.
    """
    settings = json.loads((row or {}).get("settings") or "{}")
    if not isinstance(settings, dict):
        raise ValueError(f"models.settings is {type(settings).__name__}, not a JSON object")
    return settings


def settings_or_empty(row: dict | None) -> dict:
    """``model_settings``, or ``{}`` when they cannot be read: for a reader that carries on without them."""
    try:
        return model_settings(row)
    except (ValueError, TypeError):
        return {}


# -- files: digests, verified copies, atomic writes ----------------------------------------

def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path | str) -> dict:
    """``{"bytes", "sha256"}`` of a file (what the manifest records and `zeropass check` verifies)."""
    return {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}


class DigestMismatch(ValueError):
    """A file's bytes are not the ones its manifest records (damaged since it was written)."""


def copy_verified(source: Path | str, out: BinaryIO, sha256: str | None, chunk: int = CHUNK) -> str:
    """Copy ``source`` into the open file ``out``, hashing on the way; returns the sha256.

    Raises DigestMismatch (after the copy, which the caller discards) when ``sha256`` is given
    and differs: a damaged file is refused, never passed on.
    """
    h = hashlib.sha256()
    with open(source, "rb") as src:
        for block in iter(lambda: src.read(chunk), b""):
            h.update(block)
            out.write(block)
    if sha256 is not None and h.hexdigest() != sha256:
        raise DigestMismatch(f"{source} does not match the sha256 its manifest records (damaged since it was written)")
    return h.hexdigest()


# What ``temporary_name`` appends (a pattern: the pid and 8 random hex digits).
TEMPORARY_SUFFIX = r"\.tmp\d+-[0-9a-f]{8}"
_TMP = re.compile(TEMPORARY_SUFFIX + r"\Z")


def temporary_name(path: str) -> str:
    """Where a file is written before its rename to ``path`` (``is_temporary`` recognises it)."""
    return f"{path}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of ``temporary_name``'s (a killed writer's leftover, never data)."""
    return bool(_TMP.search(name))


def write_atomic(path: Path | str, write: Callable[[Path], object], tmp: Path | str | None = None, *,
                 durable: bool = True):
    """``write(tmp)`` writes the file; it then appears at ``path`` complete or not at all.

    The temporary file (``temporary_name(path)`` unless ``tmp`` names one) is fsynced before the
    rename (``durable=False``: not, when ``write`` did or a lost file costs nothing); on any failure
    (a full disk, a signal) it is removed and the old file at ``path`` is left as it was. Returns
    what ``write`` returned.
    """
    path = Path(path)
    tmp = Path(tmp if tmp is not None else temporary_name(str(path)))
    try:
        out = write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        return out
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def write_bytes_atomic(path: Path | str, data: bytes, *, mode: int = 0o666, durable: bool = True) -> None:
    """``data`` at ``path``, complete or not at all (``write_atomic``).

    The temporary file is created new (O_EXCL) and never through a link (O_NOFOLLOW), so a link
    planted at its name (a cache directory others can write) fails the write instead of sending
    it elsewhere. ``mode``: its permissions before the umask. ``durable=False`` skips the fsync,
    for caches, where a lost write only costs reading the data again.
    """
    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())

    write_atomic(path, write, durable=False)


def write_json_atomic(path: Path | str, obj: dict) -> None:
    """Write JSON so that a reader sees the old or the new content, never a mix."""
    write_bytes_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))


# -- links ------------------------------------------------------------------------------------

def real_paths(real_root: str, rels: Iterable[str]) -> Iterable[tuple[str, str]]:
    """(rel, os.path.realpath(real_root/rel)) for each relative path, resolving each shared
    directory once: a link anywhere on the way is followed as realpath follows it. At 200 models
    (2,411 files) this is 25 ms instead of realpath's 115 ms (one lstat per component per file)."""
    known: dict[str, str] = {}
    for rel in rels:
        parts = rel.split("/")
        at = real_root
        for i, part in enumerate(parts):
            prefix = "/".join(parts[: i + 1])
            hit = known.get(prefix)
            if hit is None:
                step = os.path.join(at, part)
                hit = known[prefix] = os.path.realpath(step) if os.path.islink(step) else step
            at = hit
        yield rel, at


def links_out(root: Path | str, rels: Iterable[str]) -> list[tuple[str, str]]:
    """The link rule: which of ``rels`` (listed files of dataset ``root``) resolve outside it,
    as (rel, where it resolves).

    A link that stays inside the dataset is accepted (it reads the dataset's own bytes, and a
    moved or copied dataset keeps it valid); one that leaves it is refused by every reader and
    reported by `zeropass check`, because the manifest's digests then vouch for bytes the
    dataset does not hold.
    """
    real_root = os.path.realpath(root)
    return [(rel, real) for rel, real in real_paths(real_root, rels) if not _under(real, real_root)]


def _under(real: str, real_root: str) -> bool:
    return os.path.commonpath([real, real_root]) == real_root


def inside(path: Path | str, root: Path | str) -> bool:
    """Whether local ``path`` is ``root`` or lies inside it, links resolved (``path`` need not exist).

    A dataset never holds another: a target inside a source (or the reverse) would copy a
    dataset into itself, and the outer one's `check --repair` would then delete the inner one's
    files as its own leftovers.
    """
    return _under(os.path.realpath(path), os.path.realpath(root))


# -- small shared words ------------------------------------------------------------------------

_URL = re.compile(r"\A[A-Za-z][A-Za-z0-9+.\-]*://")


def has_scheme(path) -> bool:
    """Whether ``path`` is written as a URL (``scheme://...``, ``file://`` included)."""
    return bool(_URL.match(str(path)))


def is_url(path) -> bool:
    """Whether ``path`` names a remote dataset (a URL other than ``file://``)."""
    return has_scheme(path) and not str(path).lower().startswith("file://")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
