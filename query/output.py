"""Printing Arrow results as an aligned terminal table, CSV or JSON, batch by batch.

``table`` is for reading: numbers rounded, strings with edge whitespace or control characters
shown quoted and escaped (so `` Paris`` and ``Paris`` differ visibly, and no escape sequence
reaches the terminal), columns cut to the terminal width, at most ``TABLE_ROWS`` rows for
``zeropass sql`` (the caller says how many more). ``csv`` and ``json`` are exact and complete
and are written while the rows arrive, so memory does not grow with the result.

Values (docs/QUERY.md, "Output"): TIME/DATE/TIMESTAMP as ISO 8601 text, INTERVAL as an ISO 8601
duration (``P1M2DT3.5S``), BLOB as hex, UUID as text, DECIMAL and HUGEINT as exact numbers,
NaN/±inf as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` in JSON and CSV (JSON has no
number for them; pandas and JavaScript's ``Number()`` read these spellings back), DATE/TIMESTAMP
values Python cannot hold (DuckDB's ``infinity``/``-infinity``, years past 9999) as DuckDB's
``infinity``/``-infinity`` and ISO 8601 expanded years (``+10000-01-02T03:04:05``), structs as objects, maps as objects
(string keys) or lists of ``[key, value]``, lists as arrays (JSON text inside CSV/table cells).
Duplicate column names: CSV and table keep the names as they are; a JSON object cannot, so
the second ``a`` is ``a_2`` (the next free ``a_N``). JSON escapes every non-printable character
(C0/C1 controls, bidi overrides, ...) as ``\\uXXXX`` — the data is unchanged once parsed. CSV
is byte-exact when redirected; written to a terminal, the same characters are escaped
(``terminal=True``), since a person is reading it then.
"""
from __future__ import annotations

import csv
import datetime as _dt
import decimal
import io
import json
import math
import shutil
import uuid
from typing import IO, Iterable, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

FORMATS = ("table", "csv", "json")
TABLE_ROWS = 1000  # rows `zeropass sql` shows as a table; csv/json print every row


class Written(NamedTuple):
    rows: int            # rows printed
    hidden_rows: int     # rows of the result not printed (table format cap)
    dropped_columns: int  # columns left out to fit the terminal (table format)


# -- values ------------------------------------------------------------------------------------

def visible(s: str) -> str:
    """``s`` with every non-printable character as ``\\uXXXX`` (escape sequences cannot act)."""
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else _u(c) for c in s)


def _u(c: str) -> str:
    n = ord(c)
    if n > 0xFFFF:  # as a JSON surrogate pair
        n -= 0x10000
        return f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}"
    return f"\\u{n:04x}"


def _json_str(s: str) -> str:
    text = json.dumps(s, ensure_ascii=False)
    return text if text.isprintable() else visible(text)


def _duration(v) -> str:
    """ISO 8601 duration of an Arrow month-day-nano interval: ``P1M2DT3.5S``."""
    months, days, ns = v.months, v.days, v.nanoseconds
    out = "P" + (f"{months}M" if months else "") + (f"{days}D" if days else "")
    if ns or out == "P":
        secs = decimal.Decimal(ns).scaleb(-9).normalize()
        out += f"T{secs:f}S"
    return out


def _is_map(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, tuple) and len(x) == 2 for x in v)


def _scalar_text(v) -> str | None:
    """Text of a non-container value, or None when it is a container / plain JSON value."""
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        return _duration(pa.MonthDayNano([0, v.days, (v.seconds * 10**6 + v.microseconds) * 1000]))
    if isinstance(v, pa.MonthDayNano):
        return _duration(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, uuid.UUID):
        return str(v)
    return None


def to_json_text(v) -> str:
    """One value as JSON text (exact decimals, non-finite floats as null, controls escaped)."""
    if v is None:
        return "null"
    if isinstance(v, pa.MonthDayNano):  # a named tuple: before the lists
        return _json_str(_duration(v))
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else f'"{_nonfinite(v)}"'
    if isinstance(v, decimal.Decimal):
        return f"{v:f}" if v.is_finite() else "null"
    if isinstance(v, str):
        return _json_str(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_json_str(str(k))}: {to_json_text(x)}" for k, x in v.items()) + "}"
    if _is_map(v):
        if all(isinstance(k, str) for k, _ in v):
            return "{" + ", ".join(f"{_json_str(k)}: {to_json_text(x)}" for k, x in v) + "}"
        return "[" + ", ".join(f"[{to_json_text(k)}, {to_json_text(x)}]" for k, x in v) + "]"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(to_json_text(x) for x in v) + "]"
    text = _scalar_text(v)
    return _json_str(text if text is not None else str(v))


def _nonfinite(v: float) -> str:
    """JSON's missing numbers, spelled as JavaScript and pandas read them back."""
    return "NaN" if v != v else "Infinity" if v > 0 else "-Infinity"


def _csv_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else _nonfinite(v)
    if isinstance(v, decimal.Decimal):
        return f"{v:f}"
    if isinstance(v, pa.MonthDayNano):
        return _duration(v)
    if isinstance(v, (list, tuple, dict)):
        return to_json_text(v)
    text = _scalar_text(v)
    return text if text is not None else str(v)


def _table_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, str):
        if v != v.strip() or not v.isprintable():
            return _json_str(v)
        return v
    if isinstance(v, pa.MonthDayNano):
        return _duration(v)
    if isinstance(v, (list, tuple)) and not _is_map(v) and all(isinstance(x, str) or x is None for x in v):
        return "; ".join(_table_cell(x) if x is not None else "null" for x in v)
    if isinstance(v, (list, tuple, dict)):
        return to_json_text(v)
    if isinstance(v, _dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, decimal.Decimal):
        return f"{v:f}"
    text = _scalar_text(v)
    return visible(text if text is not None else str(v))


def json_keys(names: list[str]) -> list[str]:
    """Object keys for ``names``: a repeated name becomes ``name_2`` (the next free ``name_N``)."""
    seen, out = set(names), []
    used: set[str] = set()
    for n in names:
        key = n
        if key in used:
            i = 2
            while f"{n}_{i}" in used or f"{n}_{i}" in seen:
                i += 1
            key = f"{n}_{i}"
        used.add(key)
        out.append(key)
    return out


def _columns(batch) -> list[list]:
    # By position: duplicate names would collapse in a dict (to_pylist of rows).
    return [pylist(batch.column(i)) for i in range(batch.num_columns)]


# DuckDB's infinite DATE/TIMESTAMP values in Arrow: the extreme int32/int64 values
_INF = {32: 2**31 - 1, 64: 2**63 - 1}


def pylist(arr) -> list:
    """``arr.to_pylist()``, except that DATE/TIMESTAMP values Python cannot hold (DuckDB's
    ``infinity``, years past 9999 or before 1) become text instead of raising OverflowError."""
    try:
        return arr.to_pylist()
    except (OverflowError, ValueError):
        pass
    t = arr.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        bits = 32 if pa.types.is_date32(t) else 64
        ints = pc.cast(arr, pa.int32() if bits == 32 else pa.int64()).to_pylist()
        return [None if v is None else _temporal_text(t, v, _INF[bits]) for v in ints]
    if pa.types.is_map(t):  # before lists: a MapArray is a ListArray of key/value structs
        entries = pylist(arr.values)
        offs = arr.offsets.to_pylist()
        return [None if not arr[i].is_valid else [(e["key"], e["value"]) for e in entries[offs[i]:offs[i + 1]]]
                for i in range(len(arr))]
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        values, offs = pylist(arr.values), arr.offsets.to_pylist()
        return [values[offs[i]:offs[i + 1]] if arr[i].is_valid else None for i in range(len(arr))]
    if pa.types.is_fixed_size_list(t):
        values, n = pylist(arr.flatten()), t.list_size
        return [values[i * n:(i + 1) * n] if arr[i].is_valid else None for i in range(len(arr))]
    if pa.types.is_struct(t):
        fields = [pylist(f) for f in arr.flatten()]
        names = [t.field(i).name for i in range(t.num_fields)]
        return [dict(zip(names, row)) if arr[i].is_valid else None for i, row in enumerate(zip(*fields))]
    return [_as_py_or_text(x) for x in arr]


def _as_py_or_text(scalar):
    try:
        return scalar.as_py()
    except (OverflowError, ValueError):
        return str(scalar)


def _temporal_text(t, v: int, inf: int) -> str:
    """ISO 8601 text of a DATE/TIMESTAMP stored as ``v`` (days, or ``t.unit`` since 1970), any year."""
    if v == inf:
        return "infinity"
    if v == -inf:
        return "-infinity"
    if pa.types.is_date(t):
        days, rest, per_second = (v if pa.types.is_date32(t) else v // 86_400_000), None, 1
    else:
        per_second = {"s": 1, "ms": 1000, "us": 10**6, "ns": 10**9}[t.unit]
        days, rest = divmod(v, 86_400 * per_second)
    y, m, d = _civil(days)
    year = f"{y:04d}" if 0 <= y <= 9999 else f"{y:+05d}"  # ISO 8601's expanded years carry a sign
    text = f"{year}-{m:02d}-{d:02d}"
    if rest is None:
        return text
    secs, frac = divmod(rest, per_second)
    text += f"T{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"
    if frac:
        digits = len(str(per_second)) - 1
        text += "." + (f"{frac:0{digits}d}" if digits > 6 else f"{frac * 10**(6 - digits):06d}")
    return text + ("+00:00" if t.tz else "")  # DuckDB's TIMESTAMPTZ values are UTC instants


def _civil(days: int) -> tuple[int, int, int]:
    """(year, month, day) of ``days`` since 1970-01-01, proleptic Gregorian, any year (H. Hinnant's algorithm)."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (m <= 2), m, d


# -- writers -----------------------------------------------------------------------------------

def write(batches: Iterable, schema: pa.Schema, fmt: str, out: IO[str], width: int | None = None,
          terminal: bool = False, table_rows: int | None = None) -> Written:
    """Write the rows of ``batches`` (record batches of ``schema``) to ``out`` in ``fmt``."""
    if fmt == "json":
        return _write_json(batches, schema, out)
    if fmt == "csv":
        return _write_csv(batches, schema, out, terminal)
    return _write_table(batches, schema, out, width, table_rows)


def _write_json(batches, schema, out) -> Written:
    keys = [_json_str(k) for k in json_keys(schema.names)]
    n = 0
    out.write("[")
    for batch in batches:
        for row in zip(*_columns(batch)):
            out.write(("\n" if n == 0 else ",\n") + "{" + ", ".join(f"{k}: {to_json_text(v)}" for k, v in zip(keys, row)) + "}")
            n += 1
    out.write("\n]\n" if n else "]\n")
    return Written(n, 0, 0)


def _csv_column(arr, terminal: bool) -> list:
    """The CSV cells of one column (None is written as an empty cell)."""
    t = arr.type
    if pa.types.is_integer(t):  # the common cases, converted in Arrow rather than per value
        return pc.cast(arr, pa.string()).to_pylist()
    if (pa.types.is_string(t) or pa.types.is_large_string(t)) and not terminal:
        return arr.to_pylist()
    cells = [None if v is None else _csv_cell(v) for v in pylist(arr)]
    return [None if c is None else visible(c) for c in cells] if terminal else cells


def _write_csv(batches, schema, out, terminal: bool) -> Written:
    w = csv.writer(out, lineterminator="\n")
    w.writerow([visible(n) if terminal else n for n in schema.names])
    n = 0
    for batch in batches:
        rows = zip(*(_csv_column(batch.column(i), terminal) for i in range(batch.num_columns)))
        if terminal or not _has_cr(batch):
            w.writerows(rows)
        else:
            for row in rows:
                if any(isinstance(c, str) and "\r" in c for c in row):
                    # Python's csv module (before 3.12) leaves a lone CR unquoted with a "\n" line end,
                    # and readers split the row there: quote such a row's cells ourselves.
                    out.write(",".join(_quote_csv(c) for c in row) + "\n")
                else:
                    w.writerow(row)
        n += batch.num_rows
    return Written(n, 0, 0)


# Types whose CSV text never holds a raw CR (nested values are JSON text, which escapes it; BLOB is hex).
_NO_CR = (pa.types.is_integer, pa.types.is_floating, pa.types.is_temporal, pa.types.is_nested, pa.types.is_decimal,
          pa.types.is_boolean, pa.types.is_null, pa.types.is_binary, pa.types.is_large_binary, pa.types.is_interval)


def _has_cr(batch) -> bool:
    """Whether a cell of ``batch`` may hold a carriage return (text columns checked in Arrow;
    containers are JSON text, which escapes it)."""
    for col in batch.columns:
        t = col.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            if pc.any(pc.match_substring(col, "\r")).as_py():
                return True
        elif not any(f(t) for f in _NO_CR):
            return True  # an ENUM's text, an extension type: look at the cells
    return False


def _quote_csv(c) -> str:
    if c is None:
        return ""
    return '"' + c.replace('"', '""') + '"' if any(ch in c for ch in ',"\r\n') else c


def _cut(s: str, width: int) -> str:
    return s if len(s) <= width else s[: max(0, width - 1)] + "…"


def _write_table(batches, schema, out, width: int | None, table_rows: int | None) -> Written:
    width = width or shutil.get_terminal_size((120, 24)).columns
    names = [_table_cell(n) for n in schema.names]
    cells: list[list[str]] = [[] for _ in names]
    shown = hidden = 0
    for batch in batches:
        take = batch.num_rows if table_rows is None else max(0, min(batch.num_rows, table_rows - shown))
        if take:
            for j, col in enumerate(_columns(batch.slice(0, take))):
                cells[j].extend(_table_cell(v) for v in col)
        shown += take
        hidden += batch.num_rows - take  # counted, not converted
    types = [f.type for f in schema]
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) for t in types]
    widths = [max([len(n)] + [len(x) for x in col]) for n, col in zip(names, cells)]
    sep = 2

    def total(ws):
        return sum(ws) + sep * (len(ws) - 1)

    # Shrink the widest columns first, down to a readable minimum, then drop trailing columns.
    floor = 8
    while widths and total(widths) > width:
        i = max(range(len(widths)), key=lambda j: widths[j])
        if widths[i] <= max(floor, len(names[i]) if numeric[i] else floor):
            break
        widths[i] -= 1
    dropped = 0
    while len(widths) > 1 and total(widths) > width:
        widths.pop()
        dropped += 1
    keep = len(widths)

    def fmt(values):
        parts = []
        for j in range(keep):
            s = _cut(values[j], widths[j])
            parts.append(s.rjust(widths[j]) if numeric[j] else s.ljust(widths[j]))
        return (" " * sep).join(parts).rstrip()

    lines = [fmt(names), (" " * sep).join("-" * w for w in widths)]
    lines += [fmt([cells[j][r] for j in range(len(names))]) for r in range(shown)]
    out.write("\n".join(lines) + "\n")
    return Written(shown, hidden, dropped)


# -- whole tables (the helpers' results) --------------------------------------------------------

def to_json(table: pa.Table) -> str:
    buf = io.StringIO()
    _write_json(table.to_batches(), table.schema, buf)
    return buf.getvalue().rstrip("\n")


def to_csv(table: pa.Table, terminal: bool = False) -> str:
    buf = io.StringIO()
    _write_csv(table.to_batches(), table.schema, buf, terminal)
    return buf.getvalue()


def to_table(table: pa.Table, width: int | None = None) -> tuple[str, int]:
    """(aligned text, number of columns left out to fit ``width``)."""
    buf = io.StringIO()
    written = _write_table(table.to_batches(), table.schema, buf, width, None)
    return buf.getvalue().rstrip("\n"), written.dropped_columns


def render(table: pa.Table, fmt: str, width: int | None = None, terminal: bool = False) -> tuple[str, int]:
    """Text for ``table`` in format ``fmt`` and the number of columns left out (table only)."""
    if fmt == "json":
        return to_json(table), 0
    if fmt == "csv":
        return to_csv(table, terminal).rstrip("\n"), 0
    return to_table(table, width)

