"""Unit names as people say them (docs/DESIGN.md §4), declared once with their SQL twin.

``L5.N123`` (FF neuron 123 of layer 5), ``L5.H3`` (head 3), ``L5.H3.d7`` (dimension 7 of that
head's Q/K/V/O), ``P12`` (position 12), ``L5.attn_bias`` / ``L5.ff_bias`` (output biases).
Mixture of experts: ``L5.E3.N123`` (neuron 123 of routed expert 3; a shared expert's neurons are
plain ``L5.N123``), ``L5.E3.router`` (expert 3's router row), ``L5.shared_router`` (the shared
expert's gate, Qwen2-MoE).

The indexer writes the ``unit`` columns with the Python functions; the query layer computes the
same names in SQL (``vectors_by_token`` stores no unit text) with the ``*_sql`` functions.
tests/test_index.py checks that both agree on every stored row. Parsing a name typed by a user
is the query layer's job (``query.units.parse_unit``). Imports the standard library only.

>>> vector_unit("ff_value", 5, None, 123), head_unit(5, 3), vector_unit("bias_ff_out", 2, None, 0)
('L5.N123', 'L5.H3', 'L2.ff_bias')
"""
from __future__ import annotations

import re

from .kinds import BIAS, FEATURE, FF, HEAD_DIM, KIND, KINDS, POS, ROUTER

# What a user may type, for error messages and docs.
FORMS = ("L5.H3 (head), L5.N123 (FF neuron), L5.H3.d7 (dimension of a head's Q/K/V/O), P12 (position), "
         + ", ".join(f"L5.{k.unit_suffix}" for k in KINDS if k.group == BIAS)
         + ", L5.E3.N123 (neuron of expert 3), L5.E3.router (expert 3's router row), L5.shared_router")
FORMS += ", res-L8.F17 (feature 17 of dictionary res-L8)"
SHARED_ROUTER = "shared_router"  # the unit suffix of a shared expert's gate (router row, expert null)


def neuron_unit(layer: int, neuron: int, expert: int | None = None) -> str:
    return f"L{layer}.N{neuron}" if expert is None else f"L{layer}.E{expert}.N{neuron}"


def router_unit(layer: int, expert: int | None) -> str:
    """``L5.E3.router``; ``L5.shared_router`` for the shared expert's gate (expert None)."""
    return f"L{layer}.{SHARED_ROUTER}" if expert is None else f"L{layer}.E{expert}.router"


def head_unit(layer: int, head: int) -> str:
    return f"L{layer}.H{head}"


def head_dim_unit(layer: int, head: int, dim: int) -> str:
    return f"L{layer}.H{head}.d{dim}"


def position_unit(position: int) -> str:
    return f"P{position}"


def bias_unit(layer: int, kind: str) -> str:
    """``L5.attn_bias`` for kind ``bias_attn_out``."""
    return f"L{layer}.{KIND[kind].unit_suffix}"


# A dictionary's name (``index-sae --name``): no dot, so ``NAME.F17`` splits at its only dot, and
# the ``.F`` suffix keeps it apart from every model unit (``L5.N123``, ``L5.H3``, ``P12``, ...).
DICTIONARY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", re.ASCII)
FEATURE_UNIT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_-]{0,63})\.F([0-9]+)$", re.ASCII)


def feature_unit(dictionary: str, feature: int) -> str:
    """``res-L8.F17``: feature 17 of dictionary ``res-L8`` (its decoder and encoder rows)."""
    return f"{dictionary}.F{feature}"


def vector_unit(kind: str, layer: int | None, head: int | None, idx: int, expert: int | None = None,
                dictionary: str | None = None) -> str:
    """The unit name of a ``vectors`` row from its kind, layer, head, idx, expert and dictionary columns."""
    group = KIND[kind].group
    if group == FEATURE:
        return feature_unit(dictionary, idx)
    if group == FF:
        return neuron_unit(layer, idx, expert)
    if group == ROUTER:
        return router_unit(layer, expert)
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
    """SQL for :func:`vector_unit` over the kind, layer, head, idx, expert and dictionary columns of table alias ``alias``.

    ``alias`` is a trusted identifier written by the caller, never user input.
    """
    a = alias
    whens = []
    expert = f"CASE WHEN {a}.expert IS NULL THEN '' ELSE '.E' || {a}.expert END"
    router = f"CASE WHEN {a}.expert IS NULL THEN '.{SHARED_ROUTER}' ELSE '.E' || {a}.expert || '.router' END"
    for group, name_sql in ((FF, f"'L' || {a}.layer || {expert} || '.N' || {a}.idx"),
                            (ROUTER, f"'L' || {a}.layer || {router}"),
                            (HEAD_DIM, f"'L' || {a}.layer || '.H' || {a}.head || '.d' || {a}.idx"),
                            (POS, f"'P' || {a}.idx"),
                            (FEATURE, f"{a}.dictionary || '.F' || {a}.idx")):
        kinds = ", ".join(f"'{k.name}'" for k in KINDS if k.group == group)
        whens.append(f"WHEN {a}.kind IN ({kinds}) THEN {name_sql}")
    whens += [f"WHEN {a}.kind = '{k.name}' THEN 'L' || {a}.layer || '.{k.unit_suffix}'" for k in KINDS if k.group == BIAS]
    return f"CASE {' '.join(whens)} END"
