"""The JSON API's description, declared once: the /api page and /api/openapi.json are made from it."""
from __future__ import annotations

from ..params import HELPERS

# What each helper endpoint's example asks ({model}: the first indexed model).
_EXAMPLES = {"models": "", "heads": "token=paris", "neurons": "token=paris&kind=ff_value",
             "show": "model={model}&unit=L0.H0", "similar": "model={model}&unit=L0.N0&in={model}",
             "tokens": "text=Paris is big", "history": "series=SERIES&unit=L0.N0",
             "features": "token=paris&kind=decoder", "dictionaries": "", "enrich": "tokens=january&tokens=february&tokens=march"}


def _helper_endpoint(name: str) -> tuple:
    spec = HELPERS[name]
    params = [(p.query_key, p.required, p.help) for p in spec.params]
    return (f"/api/{name}", f"{spec.summary} The rows of `zeropass {name} ... --format json`.", params, _EXAMPLES[name])


# (path, summary, [(param, required, description)], example query string): the helpers' from
# their one declaration (query/params.py), then SQL.
ENDPOINTS = [_helper_endpoint(name) for name in HELPERS] + [
    ("/api/sql", "Read-only SQL, as `zeropass sql Q --format json` (or csv), capped at the explorer's row and byte limits "
                 "(header X-Zeropass-Truncated says whether rows were left out) and time limit.",
     [("q", True, "SQL: SELECT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN, PRAGMA, CALL"),
      ("format", False, "json (default) or csv"), ("download", False, "any value: sent as a file")],
     "q=SELECT model, n_layers FROM models"),
]


def openapi() -> dict:
    """An OpenAPI 3 document for ENDPOINTS (every answer is JSON; errors are {"error": "..."})."""
    err = {"description": "one-line error", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"error": {"type": "string"}}}}}}
    paths = {}
    for path, summary, params, _ in ENDPOINTS:
        paths[path] = {"get": {
            "summary": summary,
            "parameters": [{"name": n, "in": "query", "required": req, "description": d, "schema": {"type": "string"}}
                           for n, req, d in params],
            "responses": {"200": {"description": "rows, as the CLI's --format json"}, "400": err, "403": err, "404": err,
                          "503": err},
        }}
    return {"openapi": "3.0.3", "info": {"title": "zeropass explorer", "version": "1"}, "paths": paths}
