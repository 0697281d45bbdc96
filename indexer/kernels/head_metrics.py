"""Per-head scalar metrics for the ``heads`` table (definitions: docs/PAIRS.md).

All V × V and d_model × d_model circuits are reduced to d_head × d_head matrices with the
identity "XY and YX have the same non-zero eigenvalues" and ``‖XY‖_F² = tr((XᵀX)(YYᵀ))``, so
nothing large is ever built. Everything is computed in float64.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..profile import phase
from .pairs import PairResult

__all__ = ["head_metrics", "copying_score", "factored_fro_norm"]


def copying_score(M: Tensor) -> float:
    """Σλ / Σ|λ| over the (complex) eigenvalues of a square matrix (Elhage et al. 2021).

    1 when every eigenvalue is positive real (the map copies its input), -1 when all are negative
    real; NaN for the zero matrix. Σλ is real (complex eigenvalues come in conjugate pairs) and
    equals the trace.
    """
    lam = torch.linalg.eigvals(M.double())
    denom = float(lam.abs().sum())
    if denom == 0.0:
        return math.nan
    return float(lam.sum().real) / denom


def factored_fro_norm(X: Tensor, Y: Tensor) -> float:
    """‖X @ Y‖_F without forming X @ Y: sqrt(Σ (XᵀX) ∘ (YYᵀ))."""
    X, Y = X.double(), Y.double()
    return math.sqrt(max(0.0, float(((X.T @ X) * (Y @ Y.T)).sum())))


def head_metrics(
    W_E: Tensor,  # [d_vocab, d_model]
    W_U: Tensor,  # [d_model, d_vocab]
    W_Q_h: Tensor,  # [d_model, d_head]
    W_K_kv: Tensor,  # [d_model, d_head]
    W_V_kv: Tensor,  # [d_model, d_head]
    W_O_h: Tensor,  # [d_head, d_model]
    ov: Optional[PairResult],
    qk: Optional[PairResult],
    factors: Optional[dict] = None,
) -> dict:
    """Scalar metrics of one attention head (all floats; NaN where undefined).

    >>> d, dh, V = 8, 2, 11
    >>> m = head_metrics(torch.randn(V, d), torch.randn(d, V), *(torch.randn(d, dh) for _ in range(3)),
    ...                  torch.randn(dh, d), None, None)
    >>> sorted(m)[:3]
    ['ov_copying_score', 'ov_copying_score_full', 'ov_norm']
    """
    with phase("head metrics"):
        return _head_metrics(W_E, W_U, W_Q_h, W_K_kv, W_V_kv, W_O_h, ov, qk, factors)


def _head_metrics(W_E, W_U, W_Q_h, W_K_kv, W_V_kv, W_O_h, ov, qk, factors) -> dict:
    W_Q, W_K, W_V, W_O = (w.double() for w in (W_Q_h, W_K_kv, W_V_kv, W_O_h))
    # The indexer passes the float64 circuit factors it already built (E_Q = W_E W_Q, E_K, E_V
    # [d_vocab, d_head] and OU = (W_O W_U)^T [d_vocab, d_head]), which saves four V-sized
    # products per head; without them they are computed here.
    f = dict(factors or {})
    if not {"E_Q", "E_K", "E_V", "OU"} <= set(f):
        W_E, W_U = W_E.double(), W_U.double()
        f = {"E_Q": W_E @ W_Q, "E_K": W_E @ W_K, "E_V": W_E @ W_V, "OU": (W_O @ W_U).T}
    f = {key: v.to("cpu", torch.float64) for key, v in f.items()}
    return {
        # non-zero spectrum of W_V W_O (d_model²) = spectrum of W_O W_V (d_head²)
        "ov_copying_score": copying_score(W_O @ W_V),
        # W_E W_V W_O W_U (d_vocab²) ~ W_O W_U W_E W_V (d_head²)
        "ov_copying_score_full": copying_score(f["OU"].T @ f["E_V"]),
        # W_E W_Q W_Kᵀ W_Eᵀ (d_vocab²) ~ W_Kᵀ W_Eᵀ W_E W_Q (d_head²)
        "qk_copying_score_full": copying_score(f["E_K"].T @ f["E_Q"]),
        "ov_self_top1_frac": _self_frac(ov),
        "qk_self_top1_frac": _self_frac(qk),
        "ov_norm": factored_fro_norm(W_V, W_O),
        "qk_norm": factored_fro_norm(W_Q, W_K.T),
        "w_q_norm": float(torch.linalg.norm(W_Q)),
        "w_k_norm": float(torch.linalg.norm(W_K)),
        "w_v_norm": float(torch.linalg.norm(W_V)),
        "w_o_norm": float(torch.linalg.norm(W_O)),
    }


def _self_frac(r: Optional[PairResult]) -> float:
    if r is None or r.self_top1_frac is None:
        return math.nan
    return float(r.self_top1_frac)
