"""Typed errors of the query layer. The CLI turns each into one ``Error:`` line (exit 1).

Every message names the bad value and says how to fix it.
"""


class QueryError(Exception):
    """Base of every query-layer error a user can cause; its message is the whole story."""


class NotADataset(QueryError, FileNotFoundError):
    """The --db directory does not exist or holds no zeropass manifest."""


class SchemaMismatch(QueryError, ValueError):
    """The dataset was written with another schema version than this zeropass reads."""


class UnknownModel(QueryError, LookupError):
    """A model slug that is not indexed in the dataset."""


class BadUnit(QueryError, ValueError):
    """A unit name that is malformed or outside the model (e.g. layer 99)."""


class UnknownToken(QueryError, LookupError):
    """A token that is in none of the selected vocabularies."""


class BadToken(QueryError, ValueError):
    """A token argument that cannot be matched (e.g. only whitespace without --exact)."""


class ForbiddenSQL(QueryError, PermissionError):
    """SQL that would change the dataset or read outside it."""


class BadSQL(QueryError, ValueError):
    """SQL that DuckDB rejects (syntax, unknown column, ...)."""


class BadOption(QueryError, ValueError):
    """An option value outside its accepted set (e.g. --kind foo)."""


class BadManifest(NotADataset):
    """manifest.json is not what zeropass writes (wrong shape, or a path outside the dataset)."""


class DamagedFile(QueryError, OSError):
    """A Parquet file the manifest lists is missing, truncated or unreadable."""


class QueryTimeout(QueryError, TimeoutError):
    """A query ran longer than its timeout and was stopped."""


class Interrupted(QueryError):
    """A query was stopped by Ctrl-C (SIGINT); the CLI exits with 130."""


class RemoteUnreachable(QueryError, OSError):
    """A remote dataset's host cannot be reached, or it answered with a server error."""


class RemoteDenied(QueryError, PermissionError):
    """A remote dataset's host refused access (HTTP 401/403, missing credentials)."""


class DatasetChanged(QueryError):
    """A remote dataset was replaced while it was being read (its files no longer match its manifest)."""


class RemoteTimeout(QueryTimeout):
    """A remote dataset's server did not deliver within the operation's deadline (--timeout, or the default)."""


class OutOfMemory(QueryError, MemoryError):
    """Memory ran out while a file of the dataset was read; the query was stopped."""


class NotACache(QueryError, PermissionError):
    """A directory given as the cache that zeropass did not create as one (it deletes nothing there)."""
