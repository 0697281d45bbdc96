"""Parsing the unit names a user types (``L5.H3``, ``L5.N123``, ``L5.H3.d7``, ``P12``, ``L5.attn_bias``,
and for mixtures of experts ``L5.E3.N123``, ``L5.E3.router``, ``L5.shared_router``).

The spelling itself, and its SQL twin, are declared once in ``schemas.units``; this module turns
text into a :class:`Unit` and checks it against a model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from schemas import TABLES
from schemas.format import settings_or_empty
from schemas.kinds import BIAS_KIND_OF_SUFFIX
from schemas.units import (FEATURE_UNIT, SHARED_ROUTER, FORMS, bias_unit, feature_unit, head_dim_unit, head_unit, neuron_unit,
                           position_unit, router_unit)

from .errors import BadUnit

_BIAS = "|".join(map(re.escape, BIAS_KIND_OF_SUFFIX))
_L, _H, _E = ("layer", "layer"), ("head", "head"), ("expert", "expert")
# (Unit.kind, pattern, (Unit field, what a user calls it) for each number the pattern captures)
_PATTERNS = [
    ("head_dim", re.compile(r"^L(\d+)\.H(\d+)\.D(\d+)$", re.IGNORECASE | re.ASCII), (_L, _H, ("index", "dimension"))),
    ("head", re.compile(r"^L(\d+)\.H(\d+)$", re.IGNORECASE | re.ASCII), (_L, _H)),
    ("neuron", re.compile(r"^L(\d+)\.N(\d+)$", re.IGNORECASE | re.ASCII), (_L, ("index", "neuron"))),
    ("neuron", re.compile(r"^L(\d+)\.E(\d+)\.N(\d+)$", re.IGNORECASE | re.ASCII), (_L, _E, ("index", "neuron"))),
    ("router", re.compile(r"^L(\d+)\.E(\d+)\.router$", re.IGNORECASE | re.ASCII), (_L, _E)),
    ("router", re.compile(rf"^L(\d+)\.{SHARED_ROUTER}$", re.IGNORECASE | re.ASCII), (_L,)),
    ("pos", re.compile(r"^P(\d+)$", re.IGNORECASE | re.ASCII), (("index", "position"),)),
    ("bias", re.compile(rf"^L(\d+)\.({_BIAS})$", re.IGNORECASE | re.ASCII), (_L,)),
]


def column_max(table: str, column: str) -> int:
    """Largest value the integer column ``table.column`` can hold (its declared width in schemas)."""
    return 2 ** (next(c for c in TABLES[table].columns if c.name == column).type.bit_width - 1) - 1


# A number beyond its column cannot name a stored unit; checked before any SQL sees it.
_MAX = {"layer": column_max("vectors", "layer"), "head": column_max("vectors", "head"), "index": column_max("vectors", "idx"),
        "expert": column_max("vectors", "expert")}


@dataclass(frozen=True)
class Unit:
    """A parsed unit. ``kind``: head, head_dim, neuron, pos, bias or router."""

    kind: str
    layer: int | None = None
    head: int | None = None
    index: int | None = None  # neuron, dimension or position
    bias: str | None = None   # a bias unit suffix: attn_bias / ff_bias
    expert: int | None = None  # a routed expert (neuron, router); None: dense / shared
    dictionary: str | None = None  # a feature's dictionary (index: the feature; layer: the dictionary's, once resolved)

    @property
    def name(self) -> str:
        """Canonical spelling, as stored in the ``unit`` columns (schemas.units)."""
        if self.kind == "head":
            return head_unit(self.layer, self.head)
        if self.kind == "head_dim":
            return head_dim_unit(self.layer, self.head, self.index)
        if self.kind == "neuron":
            return neuron_unit(self.layer, self.index, self.expert)
        if self.kind == "router":
            return router_unit(self.layer, self.expert)
        if self.kind == "pos":
            return position_unit(self.index)
        if self.kind == "feature":
            return feature_unit(self.dictionary, self.index)
        return bias_unit(self.layer, self.bias_kind)

    @property
    def bias_kind(self) -> str | None:
        """The ``vectors.kind`` of a bias unit (``bias_attn_out`` for ``L5.attn_bias``)."""
        return BIAS_KIND_OF_SUFFIX[self.bias] if self.bias is not None else None


def parse_unit(text: str) -> Unit:
    """Parse a unit name; raises BadUnit naming the accepted forms.

    >>> parse_unit("l5.h3.D7")
    Unit(kind='head_dim', layer=5, head=3, index=7, bias=None)
    """
    s = (text or "").strip()
    for kind, pattern, numbers in _PATTERNS:
        m = pattern.match(s)
        if not m:
            continue
        values: dict = {field: _number(s, what, digits, _MAX[field]) for (field, what), digits in zip(numbers, m.groups())}
        if kind == "bias":
            values["bias"] = m.group(2).lower()
        return Unit(kind, **values)
    m = FEATURE_UNIT.match(s)  # after the model units: no model unit has the ".F" of a feature
    if m:
        return Unit("feature", index=_number(s, "feature", m.group(2), _MAX["index"]), dictionary=m.group(1))
    raise BadUnit(f"malformed unit {quoted(text)}: use one of {FORMS}")


def _number(unit: str, what: str, digits: str, limit: int) -> int:
    # Compare lengths first: int() of a 100k-digit string is slow, and DuckDB would refuse the value.
    if len(digits.lstrip("0")) > len(str(limit)) or int(digits) > limit:
        raise BadUnit(f"unit {quoted(unit)}: {what} {_cut(digits)} is larger than any model has (at most {limit})")
    return int(digits)


def _cut(text: str, n: int = 40) -> str:
    return text if len(text) <= n else f"{text[:n]}…({len(text):,} digits)"


def quoted(text, n: int = 60) -> str:
    """``repr`` of a user's ``text`` for a one-line message, cut after ``n`` characters."""
    text = str(text)
    return repr(text) if len(text) <= n else f"{text[:n]!r}…({len(text):,} characters)"


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
    if unit.expert is not None or unit.kind == "router":
        n_experts = _n_experts(info)
        if not n_experts:
            raise BadUnit(f"{unit.name}: {model} is not a mixture of experts, so it has no expert or router units")
        if unit.expert is not None:
            out("expert", unit.expert, n_experts)
    if unit.kind == "neuron" and unit.expert is None and _n_experts(info):
        # A MoE model's plain L5.N123 neurons are its shared expert's (models.d_ff is a routed expert's width).
        shared = _conventions(info).get("d_ff_shared") or 0
        if not shared:
            raise BadUnit(f"{unit.name}: {model} has no dense or shared-expert FF neurons; name a routed expert's "
                          f"neuron, e.g. L{unit.layer}.E0.N{unit.index}")
        out("neuron", unit.index, shared)
    elif unit.kind == "neuron":
        out("neuron", unit.index, info.get("d_ff"))
    if unit.kind == "head_dim":
        out("dimension", unit.index, info.get("d_head"))
    if unit.kind == "pos":
        if not info.get("n_ctx"):
            raise BadUnit(f"{unit.name}: {model} has no learned positions (rotary or none), so no P units")
        out("position", unit.index, info.get("n_ctx"))


def _conventions(info: dict) -> dict:
    conv = settings_or_empty(info).get("conventions", {})  # settings of an older or damaged row: nothing known
    return conv if isinstance(conv, dict) else {}


def _n_experts(info: dict) -> int:
    """Routed experts per layer of a model (its settings' recorded conventions), 0 for a dense model."""
    n = _conventions(info).get("n_experts")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0
