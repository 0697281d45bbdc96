"""``zeropass publish DB DEST``: copy a dataset to where others read it (docs/DATASET.md, "Remote datasets").

DEST is a local directory or any fsspec URL (``memory://``, ``s3://bucket/prefix``,
``hf://datasets/ORG/NAME``). Readers never see a half-published dataset, because a reader
trusts only the manifest and the manifest goes last:

1. the data files the manifest lists (each checked against its sha256 in ``file_info`` while
   it is copied: local damage is refused, not published), then ``README.md`` (the dataset card,
   ``indexer.card``) and ``catalog.duckdb``;
2. ``manifest.json`` - the commit point, the exact bytes of DB's manifest, so the published
   revision (its sha256) is the local one;
3. files that DEST's previous manifest listed and the new one does not are deleted (a reader
   still on the old revision finds them gone, re-reads the manifest and follows).

Publishing again copies only what changed: a file whose name, size and sha256 the previous
manifest at DEST already records (and which DEST still holds at that size) is skipped. File
names carry the build id, so a re-indexed model has new names and the old ones are deleted.

On the Hugging Face Hub (``hf://``) the same plan becomes one commit (``HfApi.create_commit``):
data, card and manifest appear together. That path needs the network and is untested here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from schemas.format import (
    MANIFEST,
    BadManifest,
    DigestMismatch,
    OtherVersion,
    check_version,
    copy_verified,
    first_line,
    has_scheme,
    inside,
    is_temporary,
    parse_manifest,
    revision,
    write_atomic,
    write_bytes_atomic,
)
from schemas import TABLES
from schemas.layout import CATALOG, file_info, manifest_files

from .errors import DatasetError, ZeropassError

CARD = "README.md"
CHUNK = 8 << 20


class PublishError(ZeropassError, OSError):
    """DB cannot be published to DEST (not a dataset, damaged file, DEST unreachable or not writable)."""


@dataclass
class Plan:
    """What a publish copies, skips and deletes (``dry_run`` returns it without doing it)."""

    dest: str
    revision: str
    upload: list[str] = field(default_factory=list)      # data files, card, catalog, then the manifest
    skip: list[str] = field(default_factory=list)        # unchanged since DEST's manifest
    delete: list[str] = field(default_factory=list)      # listed by DEST's old manifest only
    upload_bytes: int = 0
    skip_bytes: int = 0

    def summary(self) -> str:
        return (f"{len(self.upload)} files ({self.upload_bytes:,} bytes) to copy, {len(self.skip)} unchanged "
                f"({self.skip_bytes:,} bytes), {len(self.delete)} old files to delete; revision {self.revision}")


class _Dest:
    """DEST as an fsspec filesystem + prefix (a local directory through fsspec's local filesystem)."""

    def __init__(self, dest: str):
        import fsspec

        self.url = str(dest).rstrip("/") or str(dest)
        try:
            if has_scheme(self.url):
                self.fs, self.base = fsspec.url_to_fs(self.url)
            else:
                self.fs, self.base = fsspec.filesystem("file"), str(Path(self.url).expanduser().resolve())
        except (ImportError, ValueError) as e:
            raise PublishError(f"cannot write to {self.url} ({first_line(e)}): install the fsspec filesystem for it "
                               f"(e.g. pip install s3fs / huggingface_hub)") from None
        from fsspec.implementations.local import LocalFileSystem

        self.base = self.base.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)  # there a temporary name + rename makes each file appear whole

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if self.base else rel

    def manifest(self) -> dict | None:
        """DEST's current manifest (None when there is none); its bytes in ``self.manifest_bytes``."""
        self.manifest_bytes = None
        try:
            data = self.fs.cat_file(self.path(MANIFEST))
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 (each filesystem has its own errors)
            raise PublishError(f"cannot read {self.url}/{MANIFEST} ({first_line(e)}): check DEST and your access") from None
        try:
            manifest = parse_manifest(data, f"{self.url}/{MANIFEST}")
            check_version(manifest, self.url)
        except (BadManifest, OtherVersion) as e:
            raise PublishError(f"{self.url} holds a {MANIFEST} that is not a zeropass manifest of this version "
                               f"({first_line(e)}): publish to an empty place, or remove it first") from None
        self.manifest_bytes = data
        return manifest

    def strangers(self) -> list[str]:
        """Top-level entries of a DEST without a manifest that no publish writes.

        A killed first publish leaves table directories, temporary files and (last before the
        manifest) our card and catalog: a rerun finishes it. Anything else is someone's data: a
        README.md or catalog.duckdb there would be overwritten, so the publish is refused. Our
        card is told from a user's README by its front matter (``tags: - zeropass``).
        """
        try:
            names = [e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self.base, detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except Exception:  # noqa: BLE001 (a DEST we cannot list: the writes below say why)
            return []
        if names == [self.base.rsplit("/", 1)[-1]] and self.fs.isfile(self.base):
            return names  # DEST is a file
        ours = set(TABLES) | ({CARD, CATALOG} if CARD in names and self._card_is_ours() else set())
        return sorted(n for n in names if n not in ours and not is_temporary(n))

    def _card_is_ours(self) -> bool:
        try:
            head = self.fs.cat_file(self.path(CARD), start=0, end=4096)
        except Exception:  # noqa: BLE001
            return False
        return head.startswith(b"---\n") and b"\ntags:\n- zeropass\n" in head.split(b"\n---", 1)[0]

    def unlisted(self, listed: set[str]) -> list[str]:
        """Parquet files in DEST's table directories that ``listed`` does not name: what a publish
        killed between its manifest and its deletions left (the old manifest is gone by then)."""
        out = []
        for table in TABLES:
            try:
                found = self.fs.find(self.path(table))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for path in found:
                rel = path[len(self.base) + 1:] if self.base else path
                if rel.endswith(".parquet") and rel not in listed:
                    out.append(rel)
        return sorted(out)

    def size(self, rel: str) -> int | None:
        try:
            return int(self.fs.size(self.path(rel)))
        except (FileNotFoundError, OSError):
            return None

    def put(self, rel: str, source: Path, sha256: str | None) -> None:
        """Copy ``source`` to ``rel``, checking its sha256 on the way; a local DEST sees it appear whole."""
        target = self.path(rel)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)

        def copy(tmp) -> None:
            with self.fs.open(str(tmp), "wb") as out:
                copy_verified(source, out, sha256, CHUNK)

        try:
            if self.local:
                write_atomic(target, copy)
            else:
                try:
                    copy(target)
                except BaseException:
                    try:
                        self.fs.rm_file(target)
                    except Exception:  # noqa: BLE001
                        pass
                    raise
        except DigestMismatch as e:
            raise PublishError(f"{e}: DEST's manifest is unchanged; run `zeropass check` on the dataset") from None

    def put_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        if "/" in rel:
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        if self.local:
            self.fs.makedirs(self.base, exist_ok=True)
            write_bytes_atomic(target, data)
        else:
            self.fs.pipe_file(target, data)

    def sweep(self) -> None:
        """Remove temporary files a killed publish left in a local DEST (never anything else)."""
        if not self.local:
            return
        for path in Path(self.base).rglob("*.tmp*"):
            if is_temporary(path.name) and path.is_file():
                path.unlink(missing_ok=True)

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass


def _read_source(db: Path) -> tuple[bytes, dict]:
    path = db / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PublishError(f"{db} is not a zeropass dataset (no {MANIFEST}): build one with "
                           f"`zeropass index MODEL --db {db}`") from None
    except OSError as e:
        raise PublishError(f"cannot read {path} ({e.strerror or e})") from None
    try:
        manifest = parse_manifest(data, path)
        check_version(manifest, db)
    except BadManifest as e:
        raise PublishError(f"{path} is not a valid manifest ({first_line(e)}): run `zeropass check --db {db}`") from None
    except OtherVersion as e:
        raise PublishError(str(e)) from None
    if not manifest.get("models"):
        raise PublishError(f"{db} holds no models yet: index one with `zeropass index MODEL --db {db}` before publishing")
    return data, manifest


def plan(db: str | Path, dest: str) -> tuple[Plan, bytes, dict, "_Dest"]:
    """What publishing ``db`` to ``dest`` would do (reads DEST's manifest, writes nothing)."""
    db = Path(db).expanduser().resolve()
    data, manifest = _read_source(db)
    target = _Dest(dest)
    if target.local and Path(target.base) == db:
        raise PublishError(f"DEST is DB itself ({db}): publish to another place")
    if target.local and (inside(target.base, db) or inside(db, target.base)):
        raise PublishError(f"DEST {target.url} and DB {db} lie one inside the other: a dataset cannot hold another; "
                           f"publish to a place outside DB")
    old = target.manifest() or {}
    if not old and target.strangers():
        names = target.strangers()
        raise PublishError(f"DEST {target.url} is not empty and not a zeropass dataset (it holds "
                           f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): publish to an empty or new place")
    new_info, old_info = file_info(manifest), file_info(old)
    p = Plan(dest=target.url, revision=revision(data))
    for rel in sorted(manifest_files(manifest)):
        size = new_info.get(rel, {}).get("bytes")
        if size is None:
            try:
                size = (db / rel).stat().st_size
            except OSError:
                raise PublishError(f"{db / rel} is listed in the manifest but missing: run `zeropass check --db {db}`") from None
        same = old_info.get(rel) and {k: old_info[rel].get(k) for k in ("bytes", "sha256")} == \
            {k: new_info.get(rel, {}).get(k) for k in ("bytes", "sha256")} and new_info.get(rel, {}).get("sha256")
        if same and target.size(rel) == size:
            p.skip.append(rel)
            p.skip_bytes += size
        else:
            p.upload.append(rel)
            p.upload_bytes += size
    if p.upload or target.manifest_bytes != data or any(target.size(r) is None for r in (CARD, MANIFEST)):
        # the card and catalog follow the manifest: written again whenever it changes
        p.upload += [CARD] + ([CATALOG] if (db / CATALOG).is_file() else []) + [MANIFEST]
    listed = set(manifest_files(manifest))
    p.delete = sorted({rel for rel in manifest_files(old) if rel not in listed} | set(target.unlisted(listed)))
    return p, data, manifest, target


def publish_dataset(db: str | Path, dest: str, *, dry_run: bool = False, progress=None) -> Plan:
    """Publish dataset ``db`` to ``dest`` (data first, manifest last; only what changed).

    >>> publish_dataset("zeropass-db", "s3://bucket/zeropass-db", dry_run=True).summary()  # doctest: +SKIP
    """
    from .card import render_card
    from .dataset import dataset_lock

    db = Path(db).expanduser().resolve()
    say = progress or (lambda msg: None)
    _read_source(db)  # before the lock, which would create DB
    try:
        lock = dataset_lock(db)
        lock.__enter__()  # no writer may delete a listed file while it is copied
    except DatasetError:
        lock = None        # a read-only DB: the sha256 checks still catch a file that changed
    try:
        p, data, manifest, target = plan(db, dest)
        if dry_run:
            return p
        info = file_info(manifest)
        if str(dest).startswith("hf://"):
            _publish_hf(p, db, data, manifest, render_card(db, manifest, url=_card_url(dest)), dest, say)
            return p
        try:
            for rel in p.upload:
                if rel == MANIFEST:
                    continue
                say(f"copying {rel}")
                if rel == CARD:
                    target.put_bytes(CARD, render_card(db, manifest, url=_card_url(dest)).encode("utf-8"))
                else:
                    target.put(rel, db / rel, info.get(rel, {}).get("sha256") if rel != CATALOG else None)
            target.put_bytes(MANIFEST, data)  # the commit point
            for rel in p.delete:
                target.remove(rel)
            target.sweep()
        except ZeropassError:
            raise
        except Exception as e:  # noqa: BLE001 (the destination's own errors: permissions, network, full disk)
            raise PublishError(f"publishing to {target.url} failed ({first_line(e)}): nothing a reader sees changed "
                               f"(the manifest goes last); fix it and run the same command again") from None
        return p
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def _card_url(dest: str) -> str | None:
    """DEST as the card's examples should name it (a local DEST: the examples say DIR)."""
    return str(dest).rstrip("/") if has_scheme(dest) else None


def _publish_hf(p: Plan, db: Path, data: bytes, manifest: dict, card: str, dest: str, say) -> None:
    """One commit on the Hugging Face Hub: changed files, card and manifest together (untested offline)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    rest = dest[len("hf://"):]
    kind, _, rest = rest.partition("/")
    if kind != "datasets":
        raise PublishError(f"{dest}: publish to a dataset repository, hf://datasets/ORG/NAME")
    parts = rest.split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    prefix = f"{sub}/" if sub else ""
    ops = []
    for rel in p.upload:
        if rel == CARD:
            ops.append(CommitOperationAdd(prefix + rel, card.encode("utf-8")))
        elif rel == MANIFEST:
            ops.append(CommitOperationAdd(prefix + rel, data))
        else:
            ops.append(CommitOperationAdd(prefix + rel, str(db / rel)))
    ops += [CommitOperationDelete(prefix + rel) for rel in p.delete]
    say(f"committing {len(ops)} operations to {repo}")
    api = HfApi()
    api.create_repo(repo, repo_type="dataset", exist_ok=True)
    api.create_commit(repo, ops, commit_message=f"zeropass publish (revision {p.revision})", repo_type="dataset",
                      revision=revision)
