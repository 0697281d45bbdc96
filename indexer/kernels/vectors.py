"""Top-k / bottom-k vocabulary projection of many vectors at once (DESIGN §3).

Every vector projection is ``X @ basis`` followed by a top-k along the vocabulary:

* read side (FF keys/gates, columns of W_Q/W_K/W_V): ``scores = W_E @ r``, i.e. X = R.T and
  basis = W_E.T ([d_model, d_vocab]);
* write side (FF values, rows of W_O, output biases, positions): ``scores = w @ W_U``.

Rows of X are processed in blocks so that memory is bounded by one ``[block, d_vocab]`` score
buffer, reused across blocks (``out=``), instead of the peers' way of holding every score.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# ~128 MB of fp32 scores per block at V = 50k: large enough for GEMM efficiency, small enough
# that top-k over the block stays in cache-friendly passes.
_BLOCK_BYTES = 128 * 2**20


@dataclass
class TopK:
    """Per vector: the k highest and k lowest scores and their token ids."""

    top_idx: Tensor  # [n, k] int64, descending score
    top_val: Tensor  # [n, k] float32
    bot_idx: Tensor  # [n, k] int64, ascending score (most negative first)
    bot_val: Tensor  # [n, k] float32


class Projector:
    """Projects blocks of vectors onto one basis, reusing its score buffer between calls.

    >>> p = Projector(torch.randn(8, 100), k=5)
    >>> p(torch.randn(3, 8)).top_idx.shape
    torch.Size([3, 5])
    """

    def __init__(self, basis: Tensor, k: int, device: str = "cpu"):
        self.basis = basis.to(device=device, dtype=torch.float32).contiguous()  # [d_model, d_vocab]
        self.k = min(k, self.basis.shape[1])
        self.device = device
        d_vocab = self.basis.shape[1]
        self.block = max(1, _BLOCK_BYTES // (4 * d_vocab))
        self._buf: Tensor | None = None

    def __call__(self, X: Tensor) -> TopK:
        """Top/bottom-k of ``X @ basis`` for X of shape [n, d_model]."""
        X = X.to(device=self.device, dtype=torch.float32)
        n, k = X.shape[0], self.k
        out = TopK(
            top_idx=torch.empty(n, k, dtype=torch.int64, device=self.device),
            top_val=torch.empty(n, k, dtype=torch.float32, device=self.device),
            bot_idx=torch.empty(n, k, dtype=torch.int64, device=self.device),
            bot_val=torch.empty(n, k, dtype=torch.float32, device=self.device),
        )
        for start in range(0, n, self.block):
            stop = min(n, start + self.block)
            scores = self._scores(stop - start)
            _matmul_into(X[start:stop], self.basis, scores)
            torch.topk(scores, k, dim=1, largest=True, sorted=True, out=(out.top_val[start:stop], out.top_idx[start:stop]))
            torch.topk(scores, k, dim=1, largest=False, sorted=True, out=(out.bot_val[start:stop], out.bot_idx[start:stop]))
        return out

    def _scores(self, rows: int) -> Tensor:
        if self._buf is None or self._buf.shape[0] < rows:
            self._buf = torch.empty(max(rows, min(self.block, rows)), self.basis.shape[1], dtype=torch.float32, device=self.device)
        return self._buf[:rows]


def _matmul_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """``out = a @ b``. On the CPU through numpy: its OpenBLAS fp32 GEMM is ~1.5x faster than
    torch's here (shared/MODELS.md); ``out`` shares memory with the numpy view, so no copy."""
    if out.device.type == "cpu":
        import numpy as np

        np.matmul(a.contiguous().numpy(), b.numpy(), out=out.numpy())
    else:
        torch.matmul(a, b, out=out)
