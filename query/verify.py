"""Finding damage inside a dataset's files when they are read: their sha256 against the manifest's.

DuckDB does not check Parquet page checksums (measured: pages overwritten in a file written with
``write_page_checksum=True`` give a wrong ``sum`` without an error), and a damaged data page
often decodes to other numbers. So a reader checks each listed file against the sha256 the
manifest records (``file_info``) before DuckDB sees it (docs/QUERY.md, "Damaged files"):

* **Locally**, once per version of a file: a verified file is recorded with its size,
  modification and change times and inode, in memory for the process and in
  ``CACHE/verified/<sha256 of the dataset path>.json`` across processes, so a warm open costs
  one ``stat`` per file. The change time cannot be set back by a user, so rewriting a file
  (``write``, ``touch -d``) always brings it back to hashing. Bit rot that changes no metadata
  is not seen until the record is gone: ``zeropass check`` hashes every file, every time.
* **Remotely**, where a Range read cannot be hashed against a whole-file digest, a file of at
  most ``WHOLE_MAX`` bytes is fetched whole on its first read and verified (``query.remote``);
  larger files are trusted as the publisher verified them (``publish`` checks every copy).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

from schemas.format import file_sha256, write_bytes_atomic

_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
_seen: dict[tuple, bool] = {}   # (real path, size, mtime_ns, ctime_ns, ino, sha256) -> verified, for this process
_seen_lock = threading.Lock()


def listed_digest(info: dict, rel: str) -> tuple[int | None, str | None]:
    """(bytes, sha256) the manifest records for ``rel``; None where it records none (or garbage)."""
    entry = info.get(rel)
    if not isinstance(entry, dict):
        return None, None
    size, sha = entry.get("bytes"), entry.get("sha256")
    size = size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None
    sha = sha.lower() if isinstance(sha, str) and _HEX64.match(sha.lower()) else None
    return size, sha


def mismatch(got_size: int, got_sha: str | None, size: int | None, sha: str | None) -> str | None:
    """Why a file with ``got_size`` bytes and digest ``got_sha`` is not the listed one, or None."""
    if size is not None and got_size != size:
        return f"it has {got_size} bytes, the manifest records {size}"
    if sha is not None and got_sha is not None and got_sha != sha:
        return (f"its sha256 {got_sha[:12]}… is not the {sha[:12]}… the manifest records: "
                f"its bytes changed after it was written")
    return None


class LocalVerifier:
    """Checks the files of the dataset at ``root`` against ``info`` (``schemas.layout.file_info``)."""

    def __init__(self, root: Path, record: Path | None):
        self.root = root
        self.record = record
        self._known: dict[str, list] | None = None

    def _load(self) -> dict[str, list]:
        if self._known is None:
            self._known = {}
            if self.record is not None:
                try:
                    fd = os.open(self.record, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                    with os.fdopen(fd, encoding="utf-8") as f:
                        data = json.load(f)
                    if isinstance(data, dict):
                        self._known = {k: v for k, v in data.items() if isinstance(v, list)}
                except (OSError, ValueError):
                    pass  # no record yet, or an unreadable one: hash again
        return self._known

    def damaged(self, info: dict, rels) -> dict[str, str]:
        """{rel: why} for each file of ``rels`` whose bytes are not the ones listed.

        A missing file is not reported here (the views report it as missing)."""
        bad: dict[str, str] = {}
        learned = False
        for rel in rels:
            size, sha = listed_digest(info, rel)
            if size is None and sha is None:
                continue  # nothing recorded to compare with (an older writer): trusted
            path = self.root / rel
            try:
                st = os.stat(path)
            except OSError:
                continue
            stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, sha]
            memo = (str(path), *stamp)
            with _seen_lock:
                if _seen.get(memo):
                    continue
            if self._load().get(rel) == stamp:
                with _seen_lock:
                    _seen[memo] = True
                continue
            why = mismatch(st.st_size, None, size, None)
            if why is None and sha is not None:
                try:
                    why = mismatch(st.st_size, file_sha256(path), size, sha)
                except OSError as e:
                    why = f"it cannot be read ({e.strerror or e})"
            if why is not None:
                bad[rel] = why
                continue
            with _seen_lock:
                _seen[memo] = True
            self._load()[rel] = stamp
            learned = True
        if learned:
            self._save()
        return bad

    def _save(self) -> None:
        """Best effort: an unwritable cache only costs the hashing again next time."""
        from .remote import _cache_dirs

        if self.record is None:
            return
        try:
            root = self.record.parent.parent
            if not _cache_dirs(root, self.record.parent):
                return
            # never through a link planted in a hostile cache directory (tests/test_read_hostile.py)
            write_bytes_atomic(self.record, json.dumps(self._known).encode("utf-8"), mode=0o600, durable=False)
        except OSError:
            pass


def record_path(cache_root: Path, root: Path) -> Path:
    return cache_root / "verified" / (hashlib.sha256(str(root).encode()).hexdigest()[:16] + ".json")
