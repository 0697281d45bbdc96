"""Reading a zeropass dataset where it is published: a URL instead of a directory.

``Dataset("https://host/path/db")`` (and ``--db URL``, ``$ZEROPASS_DB``) opens a dataset over
HTTP(S) with Range requests, or over any fsspec filesystem (``hf://datasets/ORG/NAME[@REV]``,
``s3://bucket/prefix``, ``memory://db``, ...). docs/DATASET.md, "Remote datasets", is the user's
view; the decisions:

* **The manifest is the commit point and names every file.** Nothing is listed or globbed
  remotely (HTTP cannot list). The manifest is fetched when the dataset is opened; its sha256
  is the dataset's *revision*. Files of a revision never change (their names carry the build
  id), so everything read for a revision may be cached under that revision.
* **DuckDB reads through one registered fsspec filesystem** (:class:`DatasetFS`, protocol
  ``zeropass``) that serves only the files the manifest lists, by relative path, from the
  store. User SQL therefore cannot reach another URL, another host or a local file through
  the remote setup: DuckDB's ``allowed_directories`` is ``zeropass://`` only and external
  access stays off, and the filesystem itself refuses anything unlisted. DuckDB's own httpfs
  is not used even where it loads: it would open any URL under the prefix and bypass the
  allow-list and the metadata cache (and its extension repository is often unreachable).
* **Read only what a query needs.** DuckDB asks for byte ranges (the footer, then the column
  chunks of the row groups its statistics cannot skip); each becomes one Range request. File
  sizes come from the manifest's ``file_info``, so opening a file costs no request.
* **Caches.** Recently read ranges stay in memory while the dataset is open (``MEMORY_CACHE``),
  so a repeated query fetches nothing. The tail of each file (the Parquet footer, up to ``TAIL_CACHE_MAX``
  bytes) is kept under ``CACHE/<dataset>/<revision>/``, so a second process reads no footer
  again. ``clear_cache`` removes it (``zeropass cache clear``).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import http.client
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

from schemas.format import TEMPORARY_SUFFIX, first_line, is_url, revision, write_bytes_atomic  # noqa: F401 (is_url: query.remote.is_url for callers)
from schemas.layout import MANIFEST, file_info, unsafe_relpath

from .errors import (DamagedFile, DatasetChanged, ForbiddenSQL, Interrupted, NotACache, NotADataset, OutOfMemory,
                     QueryError, QueryTimeout, RemoteDenied, RemoteTimeout, RemoteUnreachable)

PROTOCOL = "zeropass"
TAIL_CACHE_MAX = 4 << 20      # bytes of a file's tail kept on disk (its footer; a larger footer is read each time)
MANIFEST_MAX = 64 << 20       # a URL whose manifest.json is larger is not read whole (it is not ours)
WHOLE_MAX = 1 << 20           # a file this small is fetched whole on its first read and its sha256 verified
MEMORY_CACHE = 64 << 20       # bytes of recently read ranges kept per open dataset (a repeated query reads none again)
HTTP_TIMEOUT = 30.0           # seconds one socket read may wait
REMOTE_TIMEOUT = 60.0         # seconds an open, or one read of a query without --timeout, may take in all
CHUNK = 1 << 20               # bytes read from a response at a time (the deadline is checked between reads)


def local_path(path) -> str:
    """A ``file://`` URL as the directory it names; anything else unchanged."""
    s = str(path)
    if s.lower().startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlsplit(s).path)
    return s


def default_cache_dir() -> Path:
    """``$ZEROPASS_CACHE``, else the platform's user cache directory + ``/zeropass``."""
    if os.environ.get("ZEROPASS_CACHE"):
        return Path(os.environ["ZEROPASS_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "zeropass"
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "zeropass" / "Cache"
    if os.uname().sysname == "Darwin":
        return Path.home() / "Library" / "Caches" / "zeropass"
    return Path.home() / ".cache" / "zeropass"


# The cache's own layout: ROOT/CACHEDIR.TAG, ROOT/<url key>/<revision>/tails/<path key>.bin
# (and a writer's .tmp files). The tag (https://bford.info/cachedir/) tells backup tools and
# `cache clear` that the directory is a cache zeropass wrote; nothing else under ROOT is ours.
CACHE_TAG = "CACHEDIR.TAG"
_TAG_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n"
             "# This file is a cache directory tag created by zeropass (remote datasets' Parquet footers).\n")
# what the cache writes, by path under its root: KEY/REVISION/tails/KEY.bin and verified/KEY.json (+ .tmp)
_TMP = rf"(?:{TEMPORARY_SUFFIX})?"  # schemas.format.write_bytes_atomic's temporary files
_CACHE_DIR = re.compile(r"\A(?:[0-9a-f]{16}(?:/(?:[0-9a-f]{16}|none)(?:/tails)?)?|verified)\Z")
_CACHE_FILE = re.compile(rf"\A(?:[0-9a-f]{{16}}/(?:[0-9a-f]{{16}}|none)/tails/[0-9a-f]{{24}}\.bin|verified/[0-9a-f]{{16}}\.json){_TMP}\Z")


def clear_cache(cache_dir: str | Path | None = None) -> tuple[Path, int, list[str]]:
    """Remove what the metadata cache wrote under ``cache_dir``; returns (directory, bytes freed,
    entries left because the cache did not write them, relative to the directory).

    Raises NotACache when the directory has no tag written by zeropass (``--cache-dir ~`` deletes
    nothing). Links are never followed: a link is left where it is, whatever it points to.
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if not os.path.lexists(root):
        return root, 0, []
    try:
        tagged = _is_tag(root / CACHE_TAG)
    except OSError:
        tagged = False
    if not root.is_dir() or not tagged:
        raise NotACache(f"{root} is not a zeropass cache (no {CACHE_TAG} written by zeropass): nothing deleted; "
                        f"give the cache's own directory with --cache-dir, or delete it yourself")
    freed, left = 0, []

    def walk(d: Path):
        nonlocal freed
        for e in sorted(os.scandir(d), key=lambda e: e.name):
            path = Path(e.path)
            rel = path.relative_to(root).as_posix()
            if rel == CACHE_TAG:
                continue
            if e.is_symlink():
                left.append(rel)
            elif e.is_dir(follow_symlinks=False) and _CACHE_DIR.match(rel):
                walk(path)
                _rmdir_if_empty(path)
            elif e.is_file(follow_symlinks=False) and _CACHE_FILE.match(rel):
                freed += e.stat(follow_symlinks=False).st_size
                os.unlink(path)
            else:
                left.append(rel)

    walk(root)
    if not left:
        os.unlink(root / CACHE_TAG)
        _rmdir_if_empty(root)
    return root, freed, left


def _rmdir_if_empty(d: Path) -> None:
    try:
        os.rmdir(d)
    except OSError:  # something the cache did not write is left in it
        pass


def _is_tag(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        return f.read(len(_TAG_TEXT) + 1).decode("utf-8", "replace") == _TAG_TEXT


def _host(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return parts.netloc or parts.scheme


_TAIL_MAGIC = b"zeropass-tail-1\n"


def _no_links_below(root: Path, d: Path) -> bool:
    """Whether no directory from ``root`` (exclusive: the user may link the cache itself elsewhere)
    down to ``d`` is a symlink."""
    try:
        rel = d.relative_to(root)
    except ValueError:
        return False
    p = root
    for part in rel.parts:
        p = p / part
        if os.path.islink(p):
            return False
    return True


def _cache_dirs(root: Path, d: Path) -> bool:
    """Create ``d`` under the cache ``root`` (and the root's tag), refusing links on the way."""
    root.mkdir(parents=True, exist_ok=True)
    tag = root / CACHE_TAG
    if not os.path.lexists(tag):
        write_bytes_atomic(tag, _TAG_TEXT.encode("ascii"), mode=0o644, durable=False)
    p = root
    for part in d.relative_to(root).parts:
        p = p / part
        if os.path.islink(p):
            return False
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass
        if os.path.islink(p) or not p.is_dir():  # raced into a link
            return False
    return True


# -- stores: where the bytes are ---------------------------------------------------------------

class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows http(s) redirects only (urllib would follow one to ftp://), remembering where it went."""

    def __init__(self):
        self.last: str | None = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise RemoteUnreachable(f"{req.full_url} redirects to {newurl}, which is not http(s): refused; "
                                    f"check the URL, or ask its publisher to serve it over http(s)")
        self.last = newurl
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class HTTPStore:
    """Files under an http(s) base URL, read with Range requests (standard library only).

    Every request has a deadline (``self.deadline()``, a ``time.monotonic`` value): a server that
    trickles bytes is cut off at it, however often each socket read returns. A response is read
    in ``CHUNK``-sized pieces and never past what was asked, whatever the server sends.
    """

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        # spaces, brackets, non-ASCII in the path are sent percent-encoded (an existing %XX stays)
        parts = urllib.parse.urlsplit(self.url)
        self._base = urllib.parse.urlunsplit(parts._replace(path=urllib.parse.quote(parts.path, safe="/%:@!$&'()*+,;=~")))
        self.deadline = lambda: time.monotonic() + REMOTE_TIMEOUT
        self.timed_out = lambda what: RemoteTimeout(f"{what} took longer than {REMOTE_TIMEOUT:g} s")

    def _left(self, stop: float, what: str) -> float:
        left = stop - time.monotonic()
        if left <= 0:
            raise self.timed_out(what)
        return left

    def _request(self, rel: str, start: int | None = None, end: int | None = None, method: str = "GET"):
        url = f"{self.url}/{rel}"
        stop = self.deadline()
        try:
            req = urllib.request.Request(f"{self._base}/{urllib.parse.quote(rel)}", method=method,
                                         headers={"User-Agent": "zeropass"})
        except ValueError as e:
            raise RemoteUnreachable(f"{self.url} is not a usable URL ({first_line(e)}): check it") from None
        if start is not None:
            req.add_header("Range", f"bytes={start}-{end - 1}")
        redirects = _Redirects()
        try:
            r = urllib.request.build_opener(redirects).open(req, timeout=min(HTTP_TIMEOUT, self._left(stop, f"reading {url}")))
        except QueryError:
            raise
        except (ValueError, http.client.InvalidURL) as e:
            raise RemoteUnreachable(f"{self.url} is not a usable URL ({first_line(e)}): check it") from None
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 404 or e.code == 410:
                raise FileNotFoundError(f"{url}: HTTP {e.code}") from None
            if e.code in (401, 403):
                raise RemoteDenied(f"access to {url} was refused (HTTP {e.code}): check the URL and your credentials") from None
            raise RemoteUnreachable(f"{url} answered HTTP {e.code} {e.reason}: try again later, or check the URL") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, reset, cut short, timed out
            if time.monotonic() >= stop:
                raise self.timed_out(f"reading {url}") from None
            reason = getattr(e, "reason", None) or e
            where = _host(redirects.last or url)  # the host that failed, after any redirect
            raise RemoteUnreachable(f"cannot reach {where} ({reason}): check the URL and your network") from None
        r.zeropass_stop = stop
        return r

    def _read(self, r, n: int, what: str) -> bytes:
        """At most ``n`` bytes of the body, a chunk at a time, each read bounded by the deadline."""
        out = bytearray()
        while len(out) < n:
            left = self._left(r.zeropass_stop, what)
            sock = getattr(getattr(getattr(r, "fp", None), "raw", None), "_sock", None)
            if sock is not None:
                sock.settimeout(min(HTTP_TIMEOUT, left))
            try:
                piece = r.read1(min(CHUNK, n - len(out)))
            except TimeoutError:
                raise self.timed_out(what) from None
            except (http.client.HTTPException, OSError) as e:  # the connection dropped mid-body
                if time.monotonic() >= r.zeropass_stop:
                    raise self.timed_out(what) from None
                raise RemoteUnreachable(f"{what} failed ({first_line(e) or type(e).__name__}): "
                                        f"check your network and run it again") from None
            if not piece:
                break
            out += piece
        return bytes(out)

    def cat(self, rel: str, start: int | None = None, end: int | None = None, limit: int | None = None,
            size: int | None = None) -> bytes:
        """Bytes [start, end) of ``rel`` (all of it without a range; at most ``limit`` + 1 bytes when given).

        ``size``: the file's listed size. A server that ignores Range is read up to ``end`` only
        (the bytes before ``start`` are skipped a chunk at a time); one whose body is longer than
        ``size`` is refused (DatasetChanged), since that is not the file the manifest lists.
        """
        if start is not None and end <= start:
            return b""
        what = f"reading {self.url}/{rel}"
        with self._request(rel, start, end) as r:
            if start is None:
                return self._read(r, (limit + 1) if limit is not None else (size + 1 if size is not None else MANIFEST_MAX + 1), what)
            if r.status != 200:
                return self._read(r, end - start, what)
            # the server ignored Range and sends the whole file (or more): keep the part asked for
            length = r.headers.get("Content-Length")
            if size is not None and length is not None and length.isdigit() and int(length) != size:
                raise self._longer(rel, f"{int(length)} bytes")
            skipped = 0
            while skipped < start:
                got = len(self._read(r, min(CHUNK, start - skipped), what))
                if not got:
                    break
                skipped += got
            data = self._read(r, end - start, what)
            if size is not None and end >= size and self._read(r, 1, what):
                raise self._longer(rel, "an endless body")
            return data

    def _longer(self, rel: str, got: str) -> DatasetChanged:
        return DatasetChanged(f"{self.url}/{rel} is longer than the file the manifest lists (the server sent {got}): "
                              f"it is not that file; the dataset changed while it was read, or the server is broken; "
                              f"run the query again, or tell its publisher")

    def size(self, rel: str) -> int:
        with self._request(rel, method="HEAD") as r:
            n = r.headers.get("Content-Length")
        if n is None or not n.strip().isdigit():
            raise RemoteUnreachable(f"{self.url}/{rel}: the server gives no size (Content-Length)")
        return int(n)

    def exists(self, rel: str) -> bool:
        try:
            self.size(rel)
            return True
        except FileNotFoundError:
            return False


class FsspecStore:
    """Files under a prefix of any fsspec filesystem (``memory://``, ``s3://``, ``hf://``, ...)."""

    def __init__(self, url: str):
        import fsspec

        try:
            self.fs, self.base = fsspec.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise RemoteUnreachable(f"cannot open {url} ({first_line(e)}): install the fsspec filesystem for "
                                    f"{url.split('://')[0]}:// (e.g. pip install s3fs / gcsfs / huggingface_hub)") from None
        self.base = self.base.rstrip("/")
        self.url = url.rstrip("/")
        self.deadline = lambda: time.monotonic() + REMOTE_TIMEOUT
        self.timed_out = lambda what: RemoteTimeout(f"{what} took longer than {REMOTE_TIMEOUT:g} s")

    def _path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if self.base else rel

    def _call(self, rel, body):
        try:
            return body(self._path(rel))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url}/{rel}: not found") from None
        except PermissionError as e:
            raise RemoteDenied(f"access to {self.url}/{rel} was refused ({first_line(e)}): check your credentials") from None
        except QueryError:
            raise
        except Exception as e:  # noqa: BLE001 (each filesystem raises its own network errors)
            raise RemoteUnreachable(f"cannot read {self.url}/{rel} ({first_line(e)}): check the URL and your network") from None

    def cat(self, rel: str, start: int | None = None, end: int | None = None, limit: int | None = None,
            size: int | None = None) -> bytes:
        # fsspec filesystems keep their own timeouts; the deadline is checked before each call
        if time.monotonic() >= self.deadline():
            raise self.timed_out(f"reading {self.url}/{rel}")
        if limit is not None and start is None:
            start, end = 0, limit + 1  # fsspec clips a range past the end
        return self._call(rel, lambda p: self.fs.cat_file(p, start=start, end=end))

    def size(self, rel: str) -> int:
        return int(self._call(rel, lambda p: self.fs.size(p)))

    def exists(self, rel: str) -> bool:
        return bool(self._call(rel, lambda p: self.fs.exists(p)))


def store_for(url: str):
    """The store that reads ``url``: HTTP(S) with the standard library, anything else through fsspec."""
    if url.lower().startswith(("http://", "https://")):
        return HTTPStore(url)
    return FsspecStore(url)


# -- the remote dataset ------------------------------------------------------------------------

class Remote:
    """A dataset at ``url``: its manifest, its revision, and the filesystem DuckDB reads it through."""

    def __init__(self, url: str, cache_dir: str | Path | None = None):
        self.url = url.rstrip("/")
        self.store = store_for(self.url)
        self.stop: float | None = None    # time.monotonic() by which the current operation must end
        self.budget: float | None = None  # ... its length in seconds, for the message
        self.store.deadline = self._deadline
        self.store.timed_out = self._timed_out
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.revision: str | None = None
        self.manifest: dict | None = None
        self.info: dict[str, dict] = {}  # the manifest's file_info of every listed file, read once per revision
        self.sizes: dict[str, int | None] = {}
        self.fs = DatasetFS(self)
        self.bytes_read = 0           # bytes fetched from the store (not the cache), for the curious
        self.last_error: QueryError | None = None  # the typed error behind DuckDB's last failed read
        self.file_errors: dict[str, QueryError] = {}  # ... per listed file, until the views are bound again

    def _deadline(self) -> float:
        """When the request starting now must end: the operation's deadline, else REMOTE_TIMEOUT from now."""
        own = time.monotonic() + REMOTE_TIMEOUT
        return own if self.stop is None else min(own, self.stop)

    def _timed_out(self, what: str) -> RemoteTimeout:
        n = self.budget if self.stop is not None and self.budget is not None and self.budget < REMOTE_TIMEOUT else REMOTE_TIMEOUT
        why = "--timeout / timeout=" if n is self.budget else "the default for a remote read, query.remote.REMOTE_TIMEOUT"
        return RemoteTimeout(f"{what} took longer than {n:g} s ({why}) and was stopped: the server at {_host(self.url)} "
                             f"is too slow; try again later, or allow more time with --timeout")

    @contextmanager
    def within(self, seconds: float | None):
        """Every request made inside ends by ``seconds`` from now (None: REMOTE_TIMEOUT per request)."""
        old = self.stop, self.budget
        if seconds is not None:
            self.stop, self.budget = time.monotonic() + seconds, seconds
        try:
            yield
        finally:
            self.stop, self.budget = old

    def manifest_text(self) -> str:
        """Fetch the manifest (every open; it is the commit point). Sets ``revision``."""
        try:
            data = self.store.cat(MANIFEST, limit=MANIFEST_MAX)
        except FileNotFoundError:
            raise NotADataset(f"{self.url} is not a zeropass dataset (no {MANIFEST} at {self.url}/{MANIFEST}): "
                              f"check the URL, or publish one with `zeropass publish DB {self.url}`") from None
        self.bytes_read += len(data)
        if len(data) > MANIFEST_MAX:
            raise NotADataset(f"{self.url} is not a zeropass dataset ({MANIFEST} is larger than {MANIFEST_MAX >> 20} MB)")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise NotADataset(f"{self.url} is not a zeropass dataset ({MANIFEST} is not UTF-8 text)") from None
        self.revision = revision(data)
        return text

    def use(self, manifest: dict, owners) -> None:
        """Serve exactly the files ``manifest`` lists (sizes from its file_info where given)."""
        info = file_info(manifest)  # compacted files' sizes too (one HEAD request less each)
        sizes = {}
        for rel in owners:
            b = info[rel].get("bytes") if isinstance(info.get(rel), dict) else None
            # an untrusted manifest: anything but a plain count means "ask the store"
            sizes[rel] = b if isinstance(b, int) and not isinstance(b, bool) and b >= 0 else None
        self.sizes = sizes
        self.info = info
        self.manifest = manifest
        self.fs.reset()

    def path(self, rel: str) -> str:
        return f"{PROTOCOL}://{rel}"

    def attach(self, con) -> None:
        """Make ``con`` read the dataset through :class:`DatasetFS` and nothing else: user SQL
        can reach no other path, since ``zeropass://`` is the only allowed directory."""
        con.register_filesystem(self.fs.filesystem())
        con.execute(f"SET allowed_directories = ['{PROTOCOL}://']")

    def error_for(self, rel: str | None) -> QueryError | None:
        """The typed error behind DuckDB's last failed read (of ``rel`` when known), once.

        DuckDB reports an exception from the filesystem as its own message (a Python traceback
        while a view is bound); this is what actually went wrong."""
        err = self.file_errors.get(rel) if rel is not None else None
        err, self.last_error = err or self.last_error, None
        return err

    def failure(self) -> QueryError | None:
        """The last failed read's error when it is not the file's fault (a deadline, the network,
        Ctrl-C, memory), once: opening stops on it rather than taking the file for damaged."""
        err = self.last_error
        if isinstance(err, (QueryTimeout, Interrupted, RemoteUnreachable, RemoteDenied, OutOfMemory)):
            self.last_error = None
            return err
        return None

    @property
    def cache_dir(self) -> Path:
        key = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        return self.cache_root / key / (self.revision or "none")

    def exists(self, rel: str) -> bool:
        try:
            return self.store.exists(rel)
        except QueryError:
            return True  # cannot tell: do not call it missing


class DatasetFS:
    """The fsspec-style filesystem DuckDB reads the dataset through (``zeropass://REL``).

    Serves the manifest's files and nothing else; sizes from the manifest; each read one
    Range request unless the file's cached tail holds it.
    """

    protocol = PROTOCOL

    def __init__(self, remote: Remote):
        self.remote = remote
        self._lock = threading.Lock()
        self._tails: dict[str, tuple[int, bytes]] = {}
        self._recent: "OrderedDict[tuple[str, int, int], bytes]" = OrderedDict()
        self._recent_bytes = 0
        self._whole: "OrderedDict[str, bytes]" = OrderedDict()  # small files fetched whole and verified
        self._whole_bytes = 0
        # DuckDB's metadata cache compares modification times; files of a revision never change.
        self._mtime = _dt.datetime(2000, 1, 1, tzinfo=_dt.timezone.utc)
        self._impl = _fsspec_impl(self)

    def reset(self) -> None:
        with self._lock:
            self._tails.clear()
            self._recent.clear()
            self._recent_bytes = 0
            self._whole.clear()
            self._whole_bytes = 0

    # what DuckDB asks for a path: strip the protocol, undo DuckDB's glob escapes, check the list
    def listed(self, path: str) -> str | None:
        """The listed file ``path`` names, or None."""
        p = str(path)
        if p.startswith(PROTOCOL + "://"):
            p = p[len(PROTOCOL) + 3:]
        p = re.sub(r"\[(.)\]", r"\1", p)  # schemas.layout.duckdb_path's one-character classes
        return p if not unsafe_relpath(p) and p in self.remote.sizes else None

    def rel(self, path: str) -> str:
        p = self.listed(path)
        if p is None:
            err = ForbiddenSQL(f"cannot read {path}: only the files the manifest of {self.remote.url} lists can be read")
            self.remote.last_error = err
            raise PermissionError(str(err))
        return p

    def _failed(self, rel: str | None, err: QueryError) -> None:
        self.remote.last_error = err
        if rel is not None:
            self.remote.file_errors[rel] = err

    def size(self, rel: str) -> int:
        n = self.remote.sizes.get(rel)
        if n is None:
            n = self._guard(lambda: self.remote.store.size(rel), rel)
            self.remote.sizes[rel] = n
        return n

    def _guard(self, body, rel: str | None = None):
        """Run a read for DuckDB: whatever goes wrong is kept as a typed error (DuckDB reports an
        exception from this callback as a Python traceback) and DuckDB gets a plain OSError."""
        try:
            return body()
        except QueryError as e:
            self._failed(rel, e)
            raise OSError(str(e)) from None
        except FileNotFoundError as e:
            raise FileNotFoundError(str(e)) from None
        except KeyboardInterrupt:  # Ctrl-C while this thread waited on the network
            self._failed(rel, Interrupted("interrupted"))
            raise OSError("interrupted") from None
        except MemoryError:
            err = OutOfMemory(f"memory ran out reading {self.remote.url}/{rel}: narrow the query (fewer models, "
                              f"a LIMIT), or run it on a machine with more memory")
            self._failed(rel, err)
            raise OSError(str(err)) from None
        except Exception as e:  # noqa: BLE001 (a filesystem's own error: one line naming the file)
            err = RemoteUnreachable(f"reading {self.remote.url}/{rel} failed ({first_line(e)}): check the URL and your "
                                    f"network, and run it again")
            self._failed(rel, err)
            raise OSError(str(err)) from None

    def read(self, rel: str, start: int, end: int) -> bytes:
        size = self.size(rel)
        end = min(end, size)
        if start >= end:
            return b""
        tail = self._tail(rel)
        if tail is not None and start >= tail[0]:
            return tail[1][start - tail[0]:end - tail[0]]
        whole = self._verified_whole(rel, size)
        if whole is not None:
            return whole[start:end]
        key = (rel, start, end)
        with self._lock:
            data = self._recent.get(key)
            if data is not None:
                self._recent.move_to_end(key)
                return data
        data = self._guard(lambda: self.remote.store.cat(rel, start, end, size=size), rel)
        if len(data) != end - start:
            self._changed(rel, len(data), end - start, start)
        self.remote.bytes_read += len(data)
        if end == size and end - start <= TAIL_CACHE_MAX and (tail is None or start < tail[0]):
            self._keep_tail(rel, start, data)
        elif len(data) <= MEMORY_CACHE // 4:
            with self._lock:
                self._recent[key] = data
                self._recent_bytes += len(data)
                while self._recent_bytes > MEMORY_CACHE:
                    self._recent_bytes -= len(self._recent.popitem(last=False)[1])
        return data

    def _changed(self, rel: str, got: int, want: int, start: int):
        err = DatasetChanged(
            f"{self.remote.url}/{rel} is not the file the manifest lists (got {got} bytes of {want} "
            f"at offset {start}): the dataset changed while it was read; run the query again")
        self._failed(rel, err)
        raise OSError(str(err))

    def _verified_whole(self, rel: str, size: int) -> bytes | None:
        """A small file's bytes, fetched whole once and checked against its listed sha256
        (a range of a large file cannot be checked against a whole-file digest: None)."""
        from .verify import listed_digest, mismatch

        if size > WHOLE_MAX:
            return None
        with self._lock:
            if rel in self._whole:
                self._whole.move_to_end(rel)
                return self._whole[rel]
        listed_size, sha = listed_digest(self.remote.info, rel)
        if sha is None:
            return None
        data = self._guard(lambda: self.remote.store.cat(rel, 0, size, size=size), rel)
        if len(data) != size:
            self._changed(rel, len(data), size, 0)
        self.remote.bytes_read += len(data)
        why = mismatch(len(data), hashlib.sha256(data).hexdigest(), listed_size, sha)
        if why is not None:
            err = DamagedFile(why)
            err.rel, err.why = rel, why
            self._failed(rel, err)
            raise OSError(f"{rel}: {why}")
        if data.endswith(b"PAR1"):
            self._keep_tail(rel, 0, data)  # verified: the next process reads it from the cache
        with self._lock:
            self._whole[rel] = data
            self._whole_bytes += len(data)
            while self._whole_bytes > MEMORY_CACHE // 2:
                self._whole_bytes -= len(self._whole.popitem(last=False)[1])
        return data

    def _tail_file(self, rel: str) -> Path:
        return self.remote.cache_dir / "tails" / (hashlib.sha256(rel.encode()).hexdigest()[:24] + ".bin")

    def _tail_seal(self, rel: str, data: bytes) -> bytes:
        """What a cached tail must carry to be trusted: a digest of its bytes bound to this file
        of this revision (its URL, path, listed size and listed sha256), so a tail that was
        damaged on disk, or copied in from another file or revision, is fetched again."""
        info = self.remote.info.get(rel)
        listed = info.get("sha256") if isinstance(info, dict) else None
        key = "\0".join([self.remote.url, str(self.remote.revision), rel, str(self.size(rel)), str(listed)])
        return hashlib.sha256(key.encode() + b"\0" + data).digest()

    def _tail(self, rel: str):
        with self._lock:
            if rel in self._tails:
                return self._tails[rel]
        path = self._tail_file(rel)
        try:
            if not _no_links_below(self.remote.cache_root, path.parent):
                return None
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as f:
                blob = f.read(TAIL_CACHE_MAX + len(_TAIL_MAGIC) + 33)
        except OSError:
            return None
        head, seal, data = blob[:len(_TAIL_MAGIC)], blob[len(_TAIL_MAGIC):len(_TAIL_MAGIC) + 32], blob[len(_TAIL_MAGIC) + 32:]
        size = self.size(rel)
        if head != _TAIL_MAGIC or len(data) > size or not data.endswith(b"PAR1") or seal != self._tail_seal(rel, data):
            return None  # damaged, foreign or from another file: read the footer again (and write it anew)
        tail = (size - len(data), data)
        with self._lock:
            self._tails[rel] = tail
        return tail

    def _keep_tail(self, rel: str, start: int, data: bytes) -> None:
        with self._lock:
            self._tails[rel] = (start, data)
        path = self._tail_file(rel)
        try:  # best effort: a read-only or full cache directory only costs speed
            if not _cache_dirs(self.remote.cache_root, path.parent):
                return  # a link under the cache: it would send the write elsewhere
            write_bytes_atomic(path, _TAIL_MAGIC + self._tail_seal(rel, data) + data, mode=0o600, durable=False)
        except OSError:
            pass

    def filesystem(self):
        """The fsspec AbstractFileSystem instance to hand to ``con.register_filesystem``."""
        return self._impl


def _fsspec_impl(owner: DatasetFS):
    """An fsspec filesystem over ``owner`` (fsspec is imported only when a remote dataset is opened)."""
    import io

    from fsspec import AbstractFileSystem

    class _File(io.RawIOBase):
        def __init__(self, rel: str):
            self.rel, self.pos, self.size = rel, 0, owner.size(rel)

        def readable(self):
            return True

        def seekable(self):
            return True

        def seek(self, offset, whence=0):
            self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
            return self.pos

        def tell(self):
            return self.pos

        def read(self, n=-1):
            end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
            data = owner.read(self.rel, self.pos, end)
            self.pos += len(data)
            return data

        def readinto(self, b):
            data = self.read(len(b))
            b[:len(data)] = data
            return len(data)

    class _FS(AbstractFileSystem):
        protocol = PROTOCOL
        cachable = False

        def info(self, path, **kw):
            rel = owner.rel(path)
            return {"name": rel, "size": owner.size(rel), "type": "file"}

        def ls(self, path, detail=True, **kw):  # nothing is listed: the manifest names the files
            raise PermissionError("a remote zeropass dataset cannot be listed")

        def glob(self, path, **kw):
            return [owner.rel(path)]

        def exists(self, path, **kw):
            return owner.listed(path) is not None

        def modified(self, path):
            owner.rel(path)
            return owner._mtime

        def _open(self, path, mode="rb", **kw):
            if "r" not in mode or "+" in mode:
                raise PermissionError("a remote zeropass dataset is read-only")
            return _File(owner.rel(path))

    return _FS(skip_instance_cache=True)
