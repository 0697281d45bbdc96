"""head_metrics against dense computations on small vocabularies."""
import math

import pytest
import torch

from indexer.kernels.head_metrics import copying_score, factored_fro_norm, head_metrics
from indexer.kernels.pairs import top_pairs

KEYS = {"ov_copying_score", "ov_copying_score_full", "qk_copying_score_full", "ov_self_top1_frac",
        "qk_self_top1_frac", "ov_norm", "qk_norm", "w_q_norm", "w_k_norm", "w_v_norm", "w_o_norm"}


def dense_copying(M: torch.Tensor) -> float:
    lam = torch.linalg.eigvals(M.double())
    return float(lam.sum().real / lam.abs().sum())


def weights(V=60, d=16, dh=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(V, d), r(d, V), r(d, dh), r(d, dh), r(d, dh), r(dh, d)


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed{s}") for s in range(3)])
def test_eigen_identities_match_dense(seed):
    W_E, W_U, W_Q, W_K, W_V, W_O = weights(seed=seed)
    m = head_metrics(W_E, W_U, W_Q, W_K, W_V, W_O, None, None)
    assert set(m) == KEYS and all(isinstance(v, float) for v in m.values())
    assert m["ov_copying_score"] == pytest.approx(dense_copying(W_V @ W_O), abs=1e-9)
    assert m["ov_copying_score_full"] == pytest.approx(dense_copying(W_E @ W_V @ W_O @ W_U), abs=1e-9)
    assert m["qk_copying_score_full"] == pytest.approx(dense_copying(W_E @ W_Q @ W_K.T @ W_E.T), abs=1e-9)
    assert m["ov_norm"] == pytest.approx(float(torch.linalg.norm(W_V @ W_O)), rel=1e-12)
    assert m["qk_norm"] == pytest.approx(float(torch.linalg.norm(W_Q @ W_K.T)), rel=1e-12)
    assert m["w_o_norm"] == pytest.approx(float(torch.linalg.norm(W_O)))
    assert math.isnan(m["ov_self_top1_frac"]) and math.isnan(m["qk_self_top1_frac"])


def test_copying_score_extremes():
    assert copying_score(torch.eye(3)) == pytest.approx(1.0)
    assert copying_score(-torch.eye(3)) == pytest.approx(-1.0)
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # eigenvalues ±i
    assert copying_score(rot) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(copying_score(torch.zeros(2, 2)))
    assert factored_fro_norm(torch.zeros(3, 2), torch.ones(2, 3)) == 0.0


def test_self_fracs_come_from_pair_results():
    W_E, W_U, W_Q, W_K, W_V, W_O = weights(V=80)
    ov = top_pairs(W_E @ W_V, (W_O @ W_U).T, n=5, k=3)
    qk = top_pairs(W_E @ W_Q, W_E @ W_K, n=5, k=3)
    m = head_metrics(W_E, W_U, W_Q, W_K, W_V, W_O, ov, qk)
    M = (W_E @ W_V) @ (W_O @ W_U)
    assert m["ov_self_top1_frac"] == float((M.diagonal() >= M.amax(1)).double().mean())
    assert m["qk_self_top1_frac"] == qk.self_top1_frac
