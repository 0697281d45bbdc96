"""Printing Arrow tables as an aligned terminal table, CSV or JSON.

``table`` is for reading: numbers rounded, strings with edge whitespace or control characters
shown quoted (so `` Paris`` and ``Paris`` differ visibly), columns cut to the terminal width.
``csv`` and ``json`` are exact and complete. Lists and structs are JSON inside table/CSV cells.
"""
from __future__ import annotations

import csv
import datetime as _dt
import decimal
import io
import json
import math
import shutil

import pyarrow as pa

FORMATS = ("table", "csv", "json")


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (_dt.datetime, _dt.date)):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def to_json(table: pa.Table) -> str:
    return json.dumps([_jsonable(r) for r in table.to_pylist()], ensure_ascii=False, indent=1)


def _csv_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(_jsonable(v), ensure_ascii=False)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (_dt.datetime, _dt.date)):
        return v.isoformat()
    return str(v)


def to_csv(table: pa.Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.column_names)
    for row in table.to_pylist():
        w.writerow([_csv_cell(row[c]) for c in table.column_names])
    return buf.getvalue()


def _table_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, str):
        if v != v.strip() or not v.isprintable():
            return json.dumps(v, ensure_ascii=False)
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) or x is None for x in v):
        return "; ".join(_table_cell(x) if x is not None else "null" for x in v)
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(_jsonable(v), ensure_ascii=False)
    if isinstance(v, _dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return str(v)


def _cut(s: str, width: int) -> str:
    return s if len(s) <= width else s[: max(0, width - 1)] + "…"


def to_table(table: pa.Table, width: int | None = None) -> tuple[str, int]:
    """(aligned text, number of columns left out to fit ``width``)."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    names = table.column_names
    cells = [[_table_cell(v) for v in table.column(c).to_pylist()] for c in names]
    numeric = [pa.types.is_integer(table.schema.field(c).type) or pa.types.is_floating(table.schema.field(c).type)
               or pa.types.is_decimal(table.schema.field(c).type) for c in names]
    widths = [max([len(n)] + [len(x) for x in col]) for n, col in zip(names, cells)]
    sep = 2

    def total(ws):
        return sum(ws) + sep * (len(ws) - 1)

    # Shrink the widest columns first, down to a readable minimum, then drop trailing columns.
    floor = 8
    while total(widths) > width:
        i = max(range(len(widths)), key=lambda j: widths[j])
        if widths[i] <= max(floor, len(names[i]) if numeric[i] else floor):
            break
        widths[i] -= 1
    dropped = 0
    while len(widths) > 1 and total(widths) > width:
        widths.pop()
        dropped += 1
    keep = len(widths)
    lines = []

    def fmt(values):
        out = []
        for j in range(keep):
            s = _cut(values[j], widths[j])
            out.append(s.rjust(widths[j]) if numeric[j] else s.ljust(widths[j]))
        return (" " * sep).join(out).rstrip()

    lines.append(fmt(names))
    lines.append((" " * sep).join("-" * w for w in widths))
    for r in range(table.num_rows):
        lines.append(fmt([cells[j][r] for j in range(len(names))]))
    return "\n".join(lines), dropped


def render(table: pa.Table, fmt: str, width: int | None = None) -> tuple[str, int]:
    """Text for ``table`` in format ``fmt`` and the number of columns left out (table only)."""
    if fmt == "json":
        return to_json(table), 0
    if fmt == "csv":
        return to_csv(table).rstrip("\n"), 0
    return to_table(table, width)
