"""The vector kinds of the ``vectors`` table, declared once (docs/DESIGN.md §3, §4).

Each kind says which side of the residual stream its vectors are on (``read``: scored against
the input embedding, ``scores = W_E @ r``; ``write``: scored against the unembedding,
``scores = w @ W_U``) and how its vectors are grouped into units (one per FF neuron, per head
dimension, per layer for a bias, per position). The order of ``KINDS`` is the display order.

The indexer (which vectors it projects, and on which basis), the query helpers (``--kind``, the
channels of ``similar``, the order of ``show``), the alignment and the column docs all read
this table. Imports the standard library only.

>>> [k.name for k in KINDS if k.side == READ]
['ff_key', 'ff_gate', 'q', 'k', 'v', 'router', 'encoder']
"""
from __future__ import annotations

from dataclasses import dataclass

# Kind.side: the basis a vector is scored on.
READ = "read"    # scores = W_E @ r (the vector reads the residual stream)
WRITE = "write"  # scores = w @ W_U (the vector writes to it)

# Kind.group: what one unit of the kind is (and so how its unit is named, schemas.units).
FF = "ff"              # one FF neuron of a layer: L5.N123
HEAD_DIM = "head_dim"  # one dimension of a head's Q/K/V/O: L5.H3.d7
BIAS = "bias"          # one output bias of a layer: L5.attn_bias
POS = "pos"            # one learned position: P12
ROUTER = "router"      # one expert's router row: L5.E3.router (the shared-expert gate: L5.shared_router)
FEATURE = "feature"    # one feature of a dictionary (SAE, transcoder): res-L8.F17 (docs/DICTIONARIES.md)


@dataclass(frozen=True)
class Kind:
    """One vector kind: its ``vectors.kind`` name, side (READ/WRITE), group, and what it is."""

    name: str
    side: str
    group: str
    doc: str
    unit_suffix: str | None = None  # BIAS only: the unit is L<layer>.<unit_suffix>
    kv: bool = False  # HEAD_DIM only: the vector belongs to a key/value head (vectors.head is the kv head)


KINDS: tuple[Kind, ...] = (
    Kind("ff_key", READ, FF, "FF key, column of W_in"),
    Kind("ff_gate", READ, FF, "FF gate of a gated MLP, column of W_gate"),
    Kind("ff_value", WRITE, FF, "FF value, row of W_out"),
    Kind("q", READ, HEAD_DIM, "column of W_Q[h]"),
    Kind("k", READ, HEAD_DIM, "column of W_K[kv]", kv=True),
    Kind("v", READ, HEAD_DIM, "column of W_V[kv]", kv=True),
    Kind("o", WRITE, HEAD_DIM, "row of W_O[h]"),
    Kind("bias_attn_out", WRITE, BIAS, "attention output bias b_O", unit_suffix="attn_bias"),
    Kind("bias_ff_out", WRITE, BIAS, "FF output bias b_out", unit_suffix="ff_bias"),
    Kind("pos", WRITE, POS, "learned position, row of W_pos"),
    Kind("router", READ, ROUTER, "mixture of experts: expert e's router row, column e of W_router (the shared "
         "expert's gate when `expert` is null)"),
    # Dictionaries (docs/DICTIONARIES.md): rows with `vectors.dictionary` set, read by the `features` view.
    Kind("decoder", WRITE, FEATURE, "dictionary feature's decoder direction, row of W_dec (through the heads' W_O for "
         "hook_z)"),
    Kind("encoder", READ, FEATURE, "dictionary feature's encoder direction, column of W_enc"),
)

KIND: dict[str, Kind] = {k.name: k for k in KINDS}


def names(*, group: str | None = None, side: str | None = None) -> tuple[str, ...]:
    """Kind names in display order, optionally only one group and/or side."""
    return tuple(k.name for k in KINDS if (group is None or k.group == group) and (side is None or k.side == side))


ALL_KINDS = names()
FF_KINDS = names(group=FF)              # ff_key, ff_gate, ff_value
HEAD_DIM_KINDS = names(group=HEAD_DIM)  # q, k, v, o
BIAS_KINDS = names(group=BIAS)          # bias_attn_out, bias_ff_out
POS_KINDS = names(group=POS)            # pos
ROUTER_KINDS = names(group=ROUTER)      # router
FEATURE_KINDS = names(group=FEATURE)    # decoder, encoder
KV_KINDS = tuple(k.name for k in KINDS if k.kv)                               # k, v: indexed by kv head
QUERY_HEAD_KINDS = tuple(k for k in HEAD_DIM_KINDS if k not in KV_KINDS)      # q, o: indexed by query head
READ_KINDS = names(side=READ)
WRITE_KINDS = names(side=WRITE)
# Bias unit suffix -> kind: L5.attn_bias is the vector of kind bias_attn_out.
BIAS_KIND_OF_SUFFIX: dict[str, str] = {k.unit_suffix: k.name for k in KINDS if k.group == BIAS}


def order_sql(expr: str, kinds: tuple[str, ...] = ALL_KINDS) -> str:
    """SQL ordering key of a kind column ``expr`` by display order (the names are trusted constants)."""
    return f"array_position([{', '.join(repr(k) for k in kinds)}], {expr})"
