"""Querying a zeropass dataset: DuckDB SQL, helper searches and the ``zeropass`` CLI.

>>> from query import Dataset                              # doctest: +SKIP
>>> ds = Dataset("zeropass-db")
>>> ds.sql("SELECT model, n_layers FROM models")           # pyarrow.Table
>>> ds.heads("paris", circuit="ov", limit=5)               # heads whose OV lists hold 'paris'
>>> ds.neurons("paris", kind="ff_value", max_rank=5)
>>> ds.show("minilm", "L5.H3")                             # {section: pyarrow.Table}
>>> ds.tokens("Paris is big")
>>> ds.features("paris", kind="decoder")                   # SAE / transcoder features (docs/DICTIONARIES.md)
>>> ds.similar("minilm", "L3.N17", "mpnet")
>>> ds.history("pythia-70m", "L3.N117")                     # a unit across a checkpoint series (also query.history(ds, ...))

Imports duckdb, pyarrow and click only: never torch or transformers (docs/QUERY.md).
"""
import os

# The `zeropass` process starts in this package, and pyarrow loads numpy (and its OpenBLAS) below.
# OpenBLAS reads this once, at load: its idle threads then sleep after a GEMM instead of spinning
# ~0.1 s on the cores that `zeropass index` needs next for top-k selection (indexer/kernels/vectors.py).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .dataset import Dataset, check_read_only, open_dataset
from .errors import (BadManifest, BadOption, BadSQL, BadToken, BadUnit, DamagedFile, ForbiddenSQL, Interrupted, NotADataset,
                     QueryError, QueryTimeout, SchemaMismatch, UnknownModel, UnknownToken,
                     RemoteUnreachable, RemoteDenied, DatasetChanged, RemoteTimeout, OutOfMemory, NotACache)
from .helpers import heads, match_tokens, models, neurons, norm, show, similar, tokens
# The function, exported like every helper; its module stays importable as ``query.history``
# through sys.modules (``from query.history import token_history``).
from .history import history, token_history
from .enrich import enrich
from .features import dictionaries, features
from .units import Unit, parse_unit

__all__ = [
    "Dataset", "open_dataset", "check_read_only", "heads", "neurons", "show", "tokens", "models", "similar", "history",
    "token_history", "features", "dictionaries", "enrich",
    "match_tokens", "norm", "Unit", "parse_unit", "QueryError", "NotADataset", "SchemaMismatch", "UnknownModel",
    "BadUnit", "UnknownToken", "BadToken", "BadOption", "ForbiddenSQL", "BadSQL", "BadManifest", "DamagedFile",
    "QueryTimeout", "Interrupted", "RemoteUnreachable", "RemoteDenied", "DatasetChanged", "RemoteTimeout",
    "OutOfMemory", "NotACache",
]
