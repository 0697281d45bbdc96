"""Which checkpoint tensors zeropass projects, and why the others are not (docs/DESIGN.md §2).

    >>> rows = coverage_rows("path/to/minilm")            # doctest: +SKIP
    >>> print(format_coverage(rows))                      # doctest: +SKIP

The CLI's ``zeropass coverage MODEL [--format json]`` prints ``coverage_rows``.
"""
from __future__ import annotations

from dataclasses import asdict

from .canonical import ParamRole

COLUMNS = ("name", "shape", "role", "covered_by", "reason", "layer")


def coverage(loaded) -> list[ParamRole]:
    """One ParamRole per checkpoint tensor of a ``Loaded`` model, in checkpoint order."""
    return list(loaded.canonical.parameters)


def coverage_rows(model_ref: str, allow_pickle: bool = False) -> list[dict]:
    """Plain dicts (name, shape, role, covered_by, reason, layer) for MODEL, ready to print."""
    from .load import load_canonical

    return [as_row(p) for p in coverage(load_canonical(model_ref, allow_pickle=allow_pickle))]


def as_row(p: ParamRole) -> dict:
    row = asdict(p)
    row["shape"] = list(p.shape)
    return {k: row[k] for k in COLUMNS}


def summary(rows: list[dict]) -> dict:
    """Counts of tensors and parameters projected vs. not (for a one-line footer)."""
    def numel(r):
        n = 1
        for s in r["shape"]:
            n *= s
        return n

    covered = [r for r in rows if r["covered_by"]]
    return {"tensors": len(rows), "covered_tensors": len(covered),
            "parameters": sum(map(numel, rows)), "covered_parameters": sum(map(numel, covered))}


def format_coverage(rows: list[dict]) -> str:
    """A plain-text table, one tensor per line, with a footer of totals."""
    shown = [(r["name"], "x".join(map(str, r["shape"])) or "scalar", r["role"],
              r["covered_by"] or "-", r["reason"] or "") for r in rows]
    head = ("name", "shape", "role", "covered_by", "reason")
    widths = [max(len(h), *(len(s[i]) for s in shown)) if shown else len(h)
              for i, h in enumerate(head[:-1])]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1]
    s = summary(rows)
    footer = (f"{s['covered_tensors']}/{s['tensors']} tensors projected "
              f"({s['covered_parameters']:,}/{s['parameters']:,} parameters)")
    return "\n".join([line(head)] + [line(r) for r in shown] + [footer])
