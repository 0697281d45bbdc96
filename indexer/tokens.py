"""The vocabulary of a model as the ``tokens`` table, identified by its content (``vocab_id``)."""
from __future__ import annotations

import hashlib

import pyarrow as pa

from schemas import TABLES
from schemas.tokens import normalise  # the one definition of tokens.norm, shared with the query layer

__all__ = ["normalise", "vocabulary", "numbered_vocabulary"]


def vocabulary(tokenizer, d_vocab: int) -> tuple[str, pa.Table]:
    """``(vocab_id, tokens table)`` for the first ``d_vocab`` ids of ``tokenizer``.

    Rows the model has beyond the tokenizer (embedding matrices padded to a multiple of 64 or
    128) get the piece ``<unused_ID>`` and are marked special, so every id has a name.
    """
    n_tok = len(tokenizer)
    ids = list(range(d_vocab))
    known = [i for i in ids if i < n_tok]
    pieces = tokenizer.convert_ids_to_tokens(known)
    # Decoding ids one at a time gives each token's own text (` Paris` for byte-level `ĠParis`).
    texts = tokenizer.batch_decode([[i] for i in known], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    pieces = [p if p is not None else "" for p in pieces] + [f"<unused_{i}>" for i in ids[n_tok:]]
    texts = list(texts) + [f"<unused_{i}>" for i in ids[n_tok:]]
    special = [i in special_ids or i >= n_tok for i in ids]
    digest = hashlib.sha256()
    for p in pieces:
        digest.update(p.encode("utf-8", "surrogatepass") + b"\x00")
    vocab_id = f"v{d_vocab}-{digest.hexdigest()[:12]}"
    table = pa.table(
        {
            "vocab_id": pa.array([vocab_id] * d_vocab),
            "token_id": pa.array(ids, pa.int32()),
            "piece": pa.array(pieces),
            "token": pa.array(texts),
            "norm": pa.array([normalise(t) for t in texts]),
            "special": pa.array(special),
        },
        schema=TABLES["tokens"].schema,
    )
    return vocab_id, table


def numbered_vocabulary(d_vocab: int) -> tuple[str, pa.Table]:
    """A stand-in vocabulary (``<123>``) for checkpoints that ship without a tokenizer."""
    texts = [f"<{i}>" for i in range(d_vocab)]
    vocab_id = f"v{d_vocab}-numbered"
    table = pa.table(
        {
            "vocab_id": pa.array([vocab_id] * d_vocab),
            "token_id": pa.array(range(d_vocab), pa.int32()),
            "piece": pa.array(texts),
            "token": pa.array(texts),
            "norm": pa.array(texts),
            "special": pa.array([False] * d_vocab),
        },
        schema=TABLES["tokens"].schema,
    )
    return vocab_id, table
