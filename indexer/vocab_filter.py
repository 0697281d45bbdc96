"""Readable vocabularies (issue 23): index a model's lists over allowed tokens only.

The paper read its projections through filtered vocabularies (``only_alnum``, ``only_from_list``)
because the raw top-k of a BPE model is full of fragments. ``zeropass index --vocab-filter``:

* ``alpha``: tokens whose decoded text, stripped of surrounding whitespace (the word-boundary
  marker of byte-level BPE and SentencePiece decodes to a space), is letters only
  (``str.isalpha``); WordPiece continuations (``##ing``) are not letters and are left out;
* ``words``: tokens whose search form (``schemas.tokens.normalise``) is a word of the common
  English word list shipped with the format (``schemas/token_sets/common_words.txt``, read by both halves), and
  letters only;
* a FILE: tokens whose search form is one of the file's lines (one word a line, ``#`` comments).

Special tokens are never allowed. The filter is exact by construction: the bases (rows of W_E,
columns of W_U, hence the circuits' factor rows) are restricted to the allowed ids, every list is
computed over them, and positions are mapped back to the vocabulary's token ids
(:func:`restrict`). Every table of the model is therefore about the restricted vocabulary, head
metrics included. The ``tokens`` table stays the whole vocabulary (same ``vocab_id``), so token
search and enrichment match as for any model; ``models.settings.vocab_filter`` records the
filter, how many tokens it allowed and a digest of the allowed ids.
"""
from __future__ import annotations

import dataclasses
import hashlib
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa

from schemas.format import model_settings
from schemas.tokens import normalise

from .errors import ZeropassError

FILTERS = ("alpha", "words")
MAX_FILE_BYTES = 10_000_000  # a word list, not a corpus


class BadVocabFilter(ZeropassError, ValueError):
    """A --vocab-filter that cannot be used (unknown, unreadable, allowing no token)."""


def _file_words(path: Path) -> set[str]:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise BadVocabFilter(f"--vocab-filter {str(path)!r} is neither {' nor '.join(FILTERS)} nor an existing file") from None
    except OSError as e:
        raise BadVocabFilter(f"--vocab-filter file {str(path)!r} cannot be read: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise BadVocabFilter(f"--vocab-filter file {str(path)!r} is over {MAX_FILE_BYTES:,} bytes: give a word list")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadVocabFilter(f"--vocab-filter file {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    return {normalise(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")}


def _common_words() -> set[str]:
    text = (resources.files("schemas") / "token_sets" / "common_words.txt").read_text("utf-8")
    return {normalise(line) for line in text.splitlines() if line.strip() and not line.startswith("#")}


def check_filter(spec: str | None) -> None:
    """Refuse an unusable filter before the model is loaded (a file that is not there)."""
    if spec is not None and spec not in FILTERS:
        _file_words(Path(spec))


def filter_suffix(spec: str | None) -> str:
    """The default model name's suffix for a filter: a filtered build never takes the plain name."""
    return "" if spec is None else f"-{spec}" if spec in FILTERS else "-list"


def _kind(record: dict | None) -> str:
    return "unfiltered" if not record else f"--vocab-filter {record.get('file') or record.get('filter')}"


def check_filter_name(root: Path, slug: str, spec: str | None) -> None:
    """Refuse to store a build under the name of a model indexed with another filter (or none).

    Filtered and unfiltered lists of one checkpoint must never mix silently under one name: the
    reader would take a readable list for the raw top-k, or the other way round."""
    import pyarrow.parquet as pq

    from schemas.layout import read_manifest

    try:
        entry = ((read_manifest(root) or {}).get("models") or {}).get(slug)
        files = entry.get("files", {}).get("models", []) if isinstance(entry, dict) else []
        settings = model_settings(pq.read_table(root / files[0], columns=["settings"]).to_pylist()[0]) if files else None
    except (OSError, ValueError, IndexError, TypeError):
        return  # no readable earlier model of that name: nothing to mix with
    if settings is None:
        return
    old = settings.get("vocab_filter")
    new = None if spec is None else {"filter": spec, "file": None if spec in FILTERS else str(Path(spec).resolve())}
    same = (old is None and new is None) or (old is not None and new is not None and old.get("filter") == (
        new["filter"] if spec in FILTERS else "file") and old.get("file") == new["file"])
    if not same:
        raise BadVocabFilter(f"model {slug!r} in {root} was indexed {_kind(old)}; this build is {_kind(new)}: "
                             f"give it its own name with --name (e.g. {slug}{filter_suffix(spec) or '-raw'})")


def allowed_ids(spec: str, tokens: pa.Table) -> tuple[np.ndarray, dict]:
    """The sorted token ids ``spec`` allows in the vocabulary ``tokens``, and the settings record."""
    texts = tokens.column("token").to_pylist()
    special = tokens.column("special").to_pylist()
    ids = tokens.column("token_id").to_numpy()
    if spec == "alpha":
        keep = [not s and t.strip().isalpha() for t, s in zip(texts, special)]
        record = {"filter": "alpha"}
    else:
        words = _common_words() if spec == "words" else _file_words(Path(spec))
        keep = [not s and t.strip().isalpha() and normalise(t) in words for t, s in zip(texts, special)] if spec == "words" \
            else [not s and normalise(t) in words for t, s in zip(texts, special)]
        record = {"filter": spec if spec == "words" else "file", "words": len(words)}
        if spec != "words":
            record["file"] = str(Path(spec).resolve())
    allowed = np.sort(ids[np.asarray(keep, dtype=bool)]).astype(np.int64)
    if allowed.size == 0:
        raise BadVocabFilter(f"--vocab-filter {spec!r} allows no token of this vocabulary")
    record["allowed"] = int(allowed.size)
    record["allowed_sha256"] = hashlib.sha256(allowed.astype("<i8").tobytes()).hexdigest()
    return allowed, record


def restrict(model, allowed: np.ndarray):
    """``model`` with its vocabulary bases cut to the ``allowed`` rows (W_E) and columns (W_U, b_U).

    Scores of the restricted model at position p are the full model's scores of token
    ``allowed[p]``, bit for bit (the same dot products), so top-k over positions mapped back
    through ``allowed`` is the top-k over the allowed tokens."""
    import torch

    idx = torch.as_tensor(allowed, dtype=torch.long)
    emb = model.embeddings
    cut = dataclasses.replace(
        emb, W_E=emb.W_E.index_select(0, idx), W_U=emb.W_U.index_select(1, idx),
        b_U=None if emb.b_U is None else emb.b_U.index_select(0, idx))
    return dataclasses.replace(model, embeddings=cut, dims=dataclasses.replace(model.dims, d_vocab=int(idx.numel())))
