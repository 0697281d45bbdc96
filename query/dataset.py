"""Opening a dataset (a directory or a URL) read-only: :class:`Dataset`, the helpers' front.

A Dataset is put together from its jobs, one module each:

* ``query.catalog``: the manifest (untrusted input, its files' digests checked) and the views;
* ``query.connection``: what user SQL may run (docs/QUERY.md, "SQL safety"), running it with
  timeouts and interrupts, and DuckDB's failures as typed one-line errors;
* ``query.remote``: the store, deadlines and caches of a dataset read at a URL;
* here: opening and closing, and the helpers (``query.helpers``, ``query.history``) as methods
  with their real signatures.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
import threading
import weakref
from contextlib import nullcontext
from pathlib import Path

import pyarrow as pa

from . import remote, verify
from .catalog import Catalog, validate_manifest  # noqa: F401 (public names kept here)
from .connection import Connection, check_read_only  # noqa: F401
from .errors import BadSQL, NotADataset


class Dataset(Catalog, Connection):
    """A zeropass dataset directory, opened read-only.

    >>> ds = Dataset("zeropass-db")                      # doctest: +SKIP
    >>> ds.sql("SELECT model, n_layers FROM models")     # doctest: +SKIP
    pyarrow.Table ...

    The helpers (``heads``, ``neurons``, ``show``, ``tokens``, ``similar``) are methods too;
    see ``query.helpers`` for what each returns. One Dataset may be shared by threads: its
    queries take turns on its one connection.
    """

    def __init__(self, path: str | Path, cache_dir: str | Path | None = None, timeout: float | None = None):
        """``timeout``: seconds opening a remote dataset may take in all (default
        ``query.remote.REMOTE_TIMEOUT``); a local directory opens without network waits."""
        if timeout is not None and (not isinstance(timeout, (int, float)) or not timeout > 0 or timeout != timeout):
            raise BadSQL(f"timeout must be a positive number of seconds, not {timeout!r}")
        # A URL is read where it is published (query.remote); its root is the URL, for messages.
        self._remote = remote.Remote(str(path), cache_dir) if remote.is_url(path) else None
        if self._remote is not None:
            self.root = self._remote.url
        else:
            self.root = Path(remote.local_path(path)).expanduser().resolve()
        if self._remote is None and not self.root.is_dir():
            raise NotADataset(
                f"no dataset directory at {self.root}: build one with `zeropass index MODEL --db {path}` "
                f"or point --db / $ZEROPASS_DB at an existing one")
        self._given = path
        self._cache_dir = cache_dir
        self._lock = threading.RLock()          # this connection's (or cursor's) one query at a time
        self._catalog_lock = threading.RLock()  # one writer of the shared views, with the cursor() twins
        self._sources: dict[tuple, str] = {}   # (table, models, layers) -> view name
        self._unreadable: dict[str, str] = {}  # listed file -> why DuckDB could not bind it
        self._no_compacted: set[str] = set()   # tables whose compacted file could not be bound
        self._why_stopped: str | None = None   # "timeout" / "interrupt" while a query is stopped
        self._timeout: float | None = None     # the running query's timeout, for its message
        self._corrupt: dict[str, str] = {}     # listed file -> why its bytes are not the listed ones (query.verify)
        self._verifier = None if self._remote is not None else verify.LocalVerifier(
            self.root, verify.record_path(Path(cache_dir).expanduser() if cache_dir else remote.default_cache_dir(), self.root))
        # Opening reads the manifest and the first footer of each view: over a network, all of it
        # within one deadline (a server that trickles bytes cannot hold the open for longer).
        opening = self._remote.within(timeout or remote.REMOTE_TIMEOUT) if self._remote is not None else nullcontext()
        with opening:
            self._read_manifest()
            # DuckDB spills to, and allows reading from, its temp directory: give it one nobody else controls.
            self._tmp = tempfile.mkdtemp(prefix="zeropass-duckdb-")  # mode 0700
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)
            try:
                self.con = self._connect()
            except BaseException:
                self._cleanup()
                raise

    # -- running SQL ------------------------------------------------------------------------------

    def reopen(self) -> "Dataset":
        """Another Dataset over the same place (its own connection, e.g. one per server thread)."""
        return Dataset(self._given, cache_dir=self._cache_dir)

    def cursor(self) -> "Dataset":
        """This dataset for another thread, read through a cursor of the same connection (DuckDB's way).

        The twin shares the views, settings, lock-down and Parquet footer cache (nothing is opened
        again); it has its own running query, time limit and interrupt. Closing it closes only
        its cursor.
        """
        twin = copy.copy(self)
        with self._lock:
            twin.con = self.con.cursor()
        twin._lock = threading.RLock()
        twin._why_stopped = twin._timeout = None
        twin._cleanup = lambda: None  # the temp directory is the owner's
        return twin

    def close(self) -> None:
        with self._lock:
            self.con.close()
        self._cleanup()

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Dataset({str(self.root)!r}, models={self.model_names()})"

    # -- helpers (implemented in query.helpers and query.history; the signatures are theirs) ------

    def models(self) -> pa.Table:
        """The ``models`` table, most useful columns first (``query.helpers.models``)."""
        from . import helpers

        return helpers.models(self)

    def heads(self, token: str | None = None, *, model=None, circuit=None, side: str = "top",
              limit: int | None = 20, exact: bool = False, token_id: int | None = None,
              readable: bool = False) -> pa.Table:
        """Heads whose stored circuit entries contain TOKEN, best first (``query.helpers.heads``)."""
        from . import helpers

        return helpers.heads(self, token, model=model, circuit=circuit, side=side, limit=limit, exact=exact,
                             token_id=token_id, readable=readable)

    def neurons(self, token: str | None = None, *, model=None, kind=None, max_rank: int | None = None,
                side: str = "top", limit: int | None = 20, exact: bool = False,
                token_id: int | None = None, readable: bool = False) -> pa.Table:
        """Vectors whose top-k list holds TOKEN (``query.helpers.neurons``)."""
        from . import helpers

        return helpers.neurons(self, token, model=model, kind=kind, max_rank=max_rank, side=side, limit=limit,
                               exact=exact, token_id=token_id, readable=readable)

    def show(self, model: str, unit: str, *, limit: int | None = 10, readable: bool = False) -> dict[str, pa.Table]:
        """Everything stored about one unit, as named sections (``query.helpers.show``)."""
        from . import helpers

        return helpers.show(self, model, unit, limit=limit, readable=readable)

    def enrich(self, tokens=None, *, model=None, kind=None, side: str = "top", limit: int | None = 20) -> pa.Table:
        """Units whose stored lists are enriched in a token set, most significant first (``query.enrich.enrich``)."""
        from .enrich import enrich  # (``query.enrich`` is this function; the module is in sys.modules)

        return enrich(self, tokens, model=model, kind=kind, side=side, limit=limit)

    def tokens(self, text: str, *, model=None) -> pa.Table:
        """How TEXT maps to tokens of each selected vocabulary (``query.helpers.tokens``)."""
        from . import helpers

        return helpers.tokens(self, text, model=model)

    def similar(self, model: str, unit: str, in_model: str, *, limit: int | None = 10) -> pa.Table:
        """Units of ``in_model`` whose top token lists overlap most with ``unit`` (``query.helpers.similar``)."""
        from . import helpers

        return helpers.similar(self, model, unit, in_model, limit=limit)

    def history(self, series: str, unit: str | None = None, *, token: str | None = None, exact: bool = False,
                token_id: int | None = None, kind=None, side: str = "top", max_rank: int | None = 10,
                limit: int | None = 50) -> pa.Table:
        """``unit``'s top tokens across the checkpoints of ``series``, or the units that list a
        token (``token``/``token_id``) there (``query.history.history``)."""
        from .history import history  # (``query.history`` is this function; the module is ``query.history`` in sys.modules)

        return history(self, series, unit, token=token, exact=exact, token_id=token_id, kind=kind, side=side,
                       max_rank=max_rank, limit=limit)

    def token_history(self, series: str, token: str | None = None, *, exact: bool = False,
                      token_id: int | None = None, kind=None, side: str = "top", max_rank: int = 10,
                      limit: int | None = 50) -> pa.Table:
        """The units that have TOKEN in their first ``max_rank`` at some step of ``series``
        (``query.history.token_history``)."""
        from .history import token_history

        return token_history(self, series, token, exact=exact, token_id=token_id, kind=kind, side=side,
                             max_rank=max_rank, limit=limit)

    def dictionaries(self, *, model=None) -> pa.Table:
        """The indexed dictionaries (SAEs, transcoders) of each model (``query.features.dictionaries``)."""
        from .features import dictionaries

        return dictionaries(self, model=model)

    def features(self, token: str | None = None, *, model=None, dictionary=None, kind=None, side: str = "top",
                 max_rank: int | None = None, limit: int | None = 20, exact: bool = False,
                 token_id: int | None = None) -> pa.Table:
        """Dictionary features whose decoder or encoder lists hold TOKEN (``query.features.features``)."""
        from .features import features  # (``query.features`` is this function; the module is in sys.modules)

        return features(self, token, model=model, dictionary=dictionary, kind=kind, side=side,
                        max_rank=max_rank, limit=limit, exact=exact, token_id=token_id)


def open_dataset(path: str | Path) -> Dataset:
    """Open the dataset directory ``path`` read-only."""
    return Dataset(path)

