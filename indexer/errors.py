"""Typed errors of the indexer. The CLI turns each into one ``Error:`` line (exit 1).

Every message names the bad value and says how to fix it.
"""


class ZeropassError(Exception):
    """Base of every error a user can cause; its message is the whole story."""


class ModelNotFound(ZeropassError, FileNotFoundError):
    """The MODEL argument is neither a local directory/file nor a reachable hub id."""


class BadCheckpoint(ZeropassError, ValueError):
    """The checkpoint exists but cannot be read (no config, corrupt weights, pickle refused)."""


class UnsupportedArchitecture(ZeropassError, ValueError):
    """No adapter for this architecture."""


class MissingDependency(ZeropassError, ImportError):
    """An optional package (torch, transformers, gguf) is needed for this step."""


class DatasetError(ZeropassError, OSError):
    """The dataset directory cannot be written (permissions, full disk, locked)."""


class IncompatibleModels(ZeropassError, ValueError):
    """Two models cannot be compared or subtracted (different architecture, dims or vocabulary)."""


class NonFiniteWeights(BadCheckpoint):
    """A weight (or a value computed from the weights) is NaN or infinite: nothing can be ranked."""


class NameTaken(ZeropassError, ValueError):
    """The model name is already used in the dataset by a model indexed from another source."""


class NotADatasetDir(DatasetError):
    """--db names a non-empty directory that is not a usable zeropass dataset (refused untouched)."""
