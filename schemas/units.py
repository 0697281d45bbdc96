"""Unit names as people say them (DESIGN §4), declared once with their SQL twin.

``L5.N123`` (FF neuron 123 of layer 5), ``L5.H3`` (head 3), ``L5.H3.d7`` (dimension 7 of that
head's Q/K/V/O), ``P12`` (position 12), ``L5.attn_bias`` / ``L5.ff_bias`` (output biases).

The indexer writes the ``unit`` columns with the Python functions; the query layer computes the
same names in SQL (``vectors_by_token`` stores no unit text) with the ``*_sql`` functions.
tests/test_index.py checks that both agree on every stored row. Parsing a name typed by a user
is the query layer's job (``query.units.parse_unit``). Imports the standard library only.

>>> vector_unit("ff_value", 5, None, 123), head_unit(5, 3), vector_unit("bias_ff_out", 2, None, 0)
('L5.N123', 'L5.H3', 'L2.ff_bias')
"""
from __future__ import annotations

from .kinds import BIAS, FF, HEAD_DIM, KIND, KINDS, POS

# What a user may type, for error messages and docs.
FORMS = ("L5.H3 (head), L5.N123 (FF neuron), L5.H3.d7 (dimension of a head's Q/K/V/O), P12 (position), "
         + ", ".join(f"L5.{k.unit_suffix}" for k in KINDS if k.group == BIAS))


def neuron_unit(layer: int, neuron: int) -> str:
    return f"L{layer}.N{neuron}"


def head_unit(layer: int, head: int) -> str:
    return f"L{layer}.H{head}"


def head_dim_unit(layer: int, head: int, dim: int) -> str:
    return f"L{layer}.H{head}.d{dim}"


def position_unit(position: int) -> str:
    return f"P{position}"


def bias_unit(layer: int, kind: str) -> str:
    """``L5.attn_bias`` for kind ``bias_attn_out``."""
    return f"L{layer}.{KIND[kind].unit_suffix}"


def vector_unit(kind: str, layer: int | None, head: int | None, idx: int) -> str:
    """The unit name of a ``vectors`` row from its kind, layer, head and idx columns."""
    group = KIND[kind].group
    if group == FF:
        return neuron_unit(layer, idx)
    if group == HEAD_DIM:
        return head_dim_unit(layer, head, idx)
    if group == BIAS:
        return bias_unit(layer, kind)
    if group == POS:
        return position_unit(idx)
    raise ValueError(f"kind {kind!r} has group {group!r}, which has no unit name here")  # a new group: name it here and in SQL


def head_unit_sql(alias: str) -> str:
    """SQL for :func:`head_unit` over the ``layer`` and ``head`` columns of table alias ``alias``."""
    return f"'L' || {alias}.layer || '.H' || {alias}.head"


def vector_unit_sql(alias: str) -> str:
    """SQL for :func:`vector_unit` over the kind, layer, head and idx columns of table alias ``alias``.

    ``alias`` is a trusted identifier written by the caller, never user input.
    """
    a = alias
    whens = []
    for group, name_sql in ((FF, f"'L' || {a}.layer || '.N' || {a}.idx"),
                            (HEAD_DIM, f"'L' || {a}.layer || '.H' || {a}.head || '.d' || {a}.idx"),
                            (POS, f"'P' || {a}.idx")):
        kinds = ", ".join(f"'{k.name}'" for k in KINDS if k.group == group)
        whens.append(f"WHEN {a}.kind IN ({kinds}) THEN {name_sql}")
    whens += [f"WHEN {a}.kind = '{k.name}' THEN 'L' || {a}.layer || '.{k.unit_suffix}'" for k in KINDS if k.group == BIAS]
    return f"CASE {' '.join(whens)} END"
