"""Unit names as people say them (DESIGN §4): ``L5.H3``, ``L5.N123``, ``L5.H3.d7``, ``P12``."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BadUnit

FORMS = "L5.H3 (head), L5.N123 (FF neuron), L5.H3.d7 (dimension of a head's Q/K/V/O), P12 (position), L5.attn_bias, L5.ff_bias"

_PATTERNS = [
    ("head_dim", re.compile(r"^L(\d+)\.H(\d+)\.D(\d+)$", re.IGNORECASE)),
    ("head", re.compile(r"^L(\d+)\.H(\d+)$", re.IGNORECASE)),
    ("neuron", re.compile(r"^L(\d+)\.N(\d+)$", re.IGNORECASE)),
    ("pos", re.compile(r"^P(\d+)$", re.IGNORECASE)),
    ("bias", re.compile(r"^L(\d+)\.(attn_bias|ff_bias)$", re.IGNORECASE)),
]

BIAS_KIND = {"attn_bias": "bias_attn_out", "ff_bias": "bias_ff_out"}


@dataclass(frozen=True)
class Unit:
    """A parsed unit. ``kind``: head, head_dim, neuron, pos or bias."""

    kind: str
    layer: int | None = None
    head: int | None = None
    index: int | None = None  # neuron, dimension or position
    bias: str | None = None   # attn_bias / ff_bias

    @property
    def name(self) -> str:
        """Canonical spelling, as stored in the ``unit`` columns."""
        if self.kind == "head":
            return f"L{self.layer}.H{self.head}"
        if self.kind == "head_dim":
            return f"L{self.layer}.H{self.head}.d{self.index}"
        if self.kind == "neuron":
            return f"L{self.layer}.N{self.index}"
        if self.kind == "pos":
            return f"P{self.index}"
        return f"L{self.layer}.{self.bias}"


def unit_sql(v: str) -> str:
    """SQL for the unit name of a ``vectors_by_token`` row (table alias ``v``), spelled as
    `Unit.name` and as the ``vectors.unit`` column (tests/test_index.py checks every row)."""
    bias = " ".join(f"WHEN '{kind}' THEN 'L' || {v}.layer || '.{name}'" for name, kind in BIAS_KIND.items())
    return (f"CASE {v}.kind WHEN 'pos' THEN 'P' || {v}.idx {bias} "
            f"ELSE 'L' || {v}.layer || CASE WHEN {v}.head IS NULL THEN '.N' || {v}.idx "
            f"ELSE '.H' || {v}.head || '.d' || {v}.idx END END")


def parse_unit(text: str) -> Unit:
    """Parse a unit name; raises BadUnit naming the accepted forms."""
    s = (text or "").strip()
    for kind, pattern in _PATTERNS:
        m = pattern.match(s)
        if not m:
            continue
        g = m.groups()
        if kind == "head":
            return Unit("head", int(g[0]), int(g[1]))
        if kind == "head_dim":
            return Unit("head_dim", int(g[0]), int(g[1]), int(g[2]))
        if kind == "neuron":
            return Unit("neuron", int(g[0]), index=int(g[1]))
        if kind == "pos":
            return Unit("pos", index=int(g[0]))
        return Unit("bias", int(g[0]), bias=g[1].lower())
    raise BadUnit(f"malformed unit {text!r}: use one of {FORMS}")


def check_unit(unit: Unit, info: dict) -> None:
    """Raise BadUnit when ``unit`` lies outside the model described by its ``models`` row."""
    model = info["model"]

    def out(what: str, value: int, limit: int | None) -> None:
        if limit is not None and value >= limit:
            raise BadUnit(f"{unit.name}: {what} {value} is out of range for {model} ({what}s 0..{limit - 1})")

    if unit.layer is not None:
        out("layer", unit.layer, info.get("n_layers"))
    if unit.head is not None:
        out("head", unit.head, info.get("n_heads"))
    if unit.kind == "neuron":
        out("neuron", unit.index, info.get("d_ff"))
    if unit.kind == "head_dim":
        out("dimension", unit.index, info.get("d_head"))
    if unit.kind == "pos":
        if not info.get("n_ctx"):
            raise BadUnit(f"{unit.name}: {model} has no learned positions (rotary or none), so no P units")
        out("position", unit.index, info.get("n_ctx"))
