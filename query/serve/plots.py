"""Geometry for the explorer's plots: score bars and heatmaps, drawn as inline SVG by the templates.

Only numbers and colours are computed here; every piece of text (tokens, unit names) is handed to
the Jinja templates as data and escaped there, so a token such as ``<script>`` stays text.
"""
from __future__ import annotations

import math

GREY = "#eeeeee"
LABEL_CHARS = 30


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> str:
    t = min(1.0, max(0.0, t))
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(a, b))


WHITE, RED, BLUE, DARK = (255, 255, 255), (178, 24, 43), (33, 102, 172), (8, 48, 107)


def colour(v, lo: float, hi: float, signed: bool) -> str:
    """Cell colour: diverging (blue < 0 < red) for signed data, white -> dark blue otherwise."""
    if not _finite(v):
        return GREY
    if signed:
        m = max(abs(lo), abs(hi)) or 1.0
        return _mix(WHITE, RED if v >= 0 else BLUE, abs(v) / m)
    return _mix(WHITE, DARK, (v - lo) / (hi - lo) if hi > lo else 1.0)


def short(text: str | None, n: int = LABEL_CHARS) -> str:
    """A label cut to ``n`` characters for a plot (the full text goes into its tooltip)."""
    if text is None:
        return ""
    return text if len(text) <= n else text[: n - 1] + "…"


def bars(items: list[dict], *, width: int = 500, label_w: int = 210, row_h: int = 18) -> dict:
    """Horizontal score bars. ``items``: dicts with ``label``, ``score`` and optional ``href``, ``title``.

    Bar length is |score| / max |score| of the list; the colour says the sign.
    """
    value_w = 64
    span = width - label_w - value_w
    m = max((abs(i["score"]) for i in items if _finite(i.get("score"))), default=0.0) or 1.0
    rows = []
    for n, it in enumerate(items):
        s = it.get("score")
        w = abs(s) / m * span if _finite(s) else 0.0
        rows.append(dict(it, y=n * row_h, w=round(max(w, 1.0), 1), fill="#d6604d" if (s or 0) >= 0 else "#4393c3",
                         short=short(it.get("label")), value="" if s is None else f"{s:.4g}"))
    return {"width": width, "height": max(len(items), 1) * row_h, "label_w": label_w, "row_h": row_h,
            "x0": label_w + 6, "value_x": label_w + 6 + span + 4, "rows": rows}


def heatmap(values: dict, rows: list, cols: list, *, row_label=str, col_label=str, href=None, title=None,
            marked: set | None = None, signed: bool | None = None, cell_w: int = 26, cell_h: int = 18,
            floor: float | None = None) -> dict:
    """A rows x cols grid; ``values`` maps (row, col) to a number (missing: grey, no link).

    ``floor``: the colour scale starts there (or lower) instead of at the smallest value, for a
    quantity whose zero means "nothing" (an enrichment's -log10 p).

    ``href(r, c)`` and ``title(r, c, v)`` give each present cell's link and tooltip; ``marked``
    cells get a black outline (the current head, matched layer pairs).
    """
    finite = [v for v in values.values() if _finite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    if floor is not None:
        lo, hi = min(lo, floor), max(hi, floor)
    if signed is None:
        signed = lo < 0 < hi or (lo < 0 and hi <= 0)
    left, top = 44, 22
    cells = []
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            v = values.get((r, c))
            present = (r, c) in values
            cells.append({
                "x": left + j * cell_w, "y": top + i * cell_h, "fill": colour(v, lo, hi, signed),
                "href": href(r, c) if (href and present) else None,
                "title": (title(r, c, v) if title else f"{row_label(r)} {col_label(c)}: {v}") if present
                else f"{row_label(r)} {col_label(c)}: no value",
                "marked": bool(marked and (r, c) in marked), "row": r, "col": c,
            })
    return {
        "width": left + len(cols) * cell_w + 4, "height": top + len(rows) * cell_h + 4, "cell_w": cell_w, "cell_h": cell_h,
        "cells": cells, "lo": lo, "hi": hi, "signed": signed,
        "row_labels": [{"y": top + i * cell_h + cell_h * 0.7, "text": row_label(r)} for i, r in enumerate(rows)],
        "col_labels": [{"x": left + j * cell_w + cell_w / 2, "text": col_label(c)} for j, c in enumerate(cols)],
        "left": left, "top": top, "lo_colour": colour(lo, lo, hi, signed), "hi_colour": colour(hi, lo, hi, signed),
    }
