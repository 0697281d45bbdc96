"""The JSON API's description, declared once: the /api page and /api/openapi.json are made from it."""
from __future__ import annotations

# (path, summary, [(param, required, description)], example query string)
ENDPOINTS = [
    ("/api/models", "The indexed models: the rows of `zeropass models --format json`.", [], ""),
    ("/api/heads", "Heads whose circuits list TOKEN, best first: `zeropass heads TOKEN --format json`.",
     [("token", True, "token text (case-insensitive, stripped; `exact=1` matches as given)"),
      ("model", False, "only this model (repeat for several)"), ("circuit", False, "ov or qk (repeat for both)"),
      ("side", False, "top (default), bottom or both"), ("limit", False, "at most this many rows (default 20, 0: all)"),
      ("exact", False, "1: match the decoded text exactly"), ("id", False, "a token id instead of token")],
     "token=paris"),
    ("/api/neurons", "Vectors whose top-k lists hold TOKEN: `zeropass neurons TOKEN --format json`.",
     [("token", True, "token text"), ("kind", False, "vector kind, e.g. ff_value (repeat for several)"),
      ("model", False, "only this model (repeat)"), ("max_rank", False, "only matches at this rank or better"),
      ("side", False, "top, bottom or both"), ("limit", False, "default 20, 0: all"), ("exact", False, "1: exact text"),
      ("id", False, "a token id instead of token")],
     "token=paris&kind=ff_value"),
    ("/api/show", "Everything stored about one unit, by section: `zeropass show MODEL UNIT --format json`.",
     [("model", True, "model slug"), ("unit", True, "L5.H3, L5.N123, L5.H3.d7, P12, L5.attn_bias"),
      ("limit", False, "ranks per list (default 10, 0: all)")], "model={model}&unit=L0.H0"),
    ("/api/similar", "Units of model IN whose top tokens overlap most with UNIT: `zeropass similar MODEL UNIT --in IN`.",
     [("model", True, "model slug"), ("unit", True, "unit name"), ("in", True, "the model searched (may be the same)"),
      ("limit", False, "default 10, 0: all")], "model={model}&unit=L0.N0&in={model}"),
    ("/api/tokens", "How TEXT maps to each vocabulary: `zeropass tokens TEXT --format json`.",
     [("text", True, "any text"), ("model", False, "only this model (repeat)")], "text=Paris is big"),
    ("/api/sql", "Read-only SQL, as `zeropass sql Q --format json` (or csv), capped at the explorer's row limit "
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
            "responses": {"200": {"description": "rows, as the CLI's --format json"}, "400": err, "403": err, "404": err},
        }}
    return {"openapi": "3.0.3", "info": {"title": "zeropass explorer", "version": "1"}, "paths": paths}
