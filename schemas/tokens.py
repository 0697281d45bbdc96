"""Token normalisation, declared once: the ``tokens.norm`` column and what a search matches.

The indexer fills ``tokens.norm`` with :func:`normalise`; the query layer applies it to what the
user types, so ``paris`` finds `` Paris``, ``Paris`` and ``paris``; the alignment intersects two
vocabularies on it. Imports the standard library only.

>>> normalise("  ＰＡＲＩＳ\\n")
'paris'
"""
from __future__ import annotations

import unicodedata


def normalise(text: str) -> str:
    """Search form of a token's text: NFKC, surrounding whitespace stripped, lower-cased."""
    return unicodedata.normalize("NFKC", text).strip().lower()
