"""Top-k / bottom-k vocabulary projection of many vectors at once (docs/DESIGN.md §3).

Every vector projection is ``X @ basis`` followed by a top-k along the vocabulary:

* read side (FF keys/gates, columns of W_Q/W_K/W_V): ``scores = W_E @ r``, i.e. X = R.T and
  basis = W_E.T ([d_model, d_vocab]);
* write side (FF values, rows of W_O, output biases, positions): ``scores = w @ W_U``.

Rows of X are processed in blocks so that memory is bounded by one ``[block, d_vocab]`` score
buffer, reused across blocks (``out=``), instead of the peers' way of holding every score.

Selection is exact, with ties broken by the lower token id, and costs little next to the GEMM
(`select`): a vectorised max/min over groups of the vocabulary finds the k groups that can hold
the top-k, and only those groups' scores are ranked.

The CPU GEMM runs in numpy's OpenBLAS, the selection in torch's own thread pool. OpenBLAS's idle
threads busy-wait ~0.1 s after each call by default, taking the cores from the selection that
follows (2x slower on 2 cores); ``indexer/__init__.py`` and the CLI shorten that wait through
OPENBLAS_THREAD_TIMEOUT, which OpenBLAS reads once, when numpy is first imported.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..profile import phase
from . import compiled

# ~128 MB of fp32 scores per block at V = 50k: large enough for GEMM efficiency, small enough
# that top-k over the block stays in cache-friendly passes.
_BLOCK_BYTES = 128 * 2**20

# Vocabulary entries per group in `select`. Larger groups mean fewer group maxima to rank but more
# candidates; 16 measured fastest at GPT-2 size (select 0.56 s per layer against 0.69 s for 32).
_GROUP = 16


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
        basis = basis.to(device=device, dtype=torch.float32)  # [d_model, d_vocab]
        # A transposed view of a contiguous [d_vocab, d_model] matrix (W_E.T, the LM head's W_U)
        # is used as it is: the GEMM reads either layout at the same speed, and a contiguous copy
        # would hold a second V x d_model basis (2 GB at V 128256) while the original lives.
        self.basis = basis if basis.is_contiguous() or basis.T.is_contiguous() else basis.contiguous()
        self.d_vocab = self.basis.shape[1]
        self.k = min(k, self.d_vocab)
        self.device = device
        # Score rows are padded for `select`; the GEMM writes the first d_vocab columns.
        self.width = padded_width(self.d_vocab)
        self.block = max(1, _BLOCK_BYTES // (4 * self.width))
        self._buf: Tensor | None = None
        # The compiled selection (`compiled_select`) needs finite scores; |x·b| <= ‖x‖₁ max|b|
        # bounds every score and every partial sum of the GEMM, so a block whose bound stays far
        # below float32's largest value (3.4e38) can't overflow. None: torch's `select`.
        use = device == "cpu" and self.d_vocab // _GROUP > self.k and compiled("compiled_select") is not None
        self._basis_max = _largest_magnitude(self.basis) if use else None

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
            padded = self._scores(stop - start)
            with phase("vector GEMMs", flops=2 * (stop - start) * X.shape[1] * self.d_vocab):
                _matmul_into(X[start:stop], self.basis, padded[:, : self.d_vocab])
            with phase("top-k selection"):
                if self._basis_max is not None and float(X[start:stop].abs().sum(1).max()) * self._basis_max < 1e37:
                    _select_compiled(padded, self.d_vocab, k, [t[start:stop] for t in
                                                               (out.top_val, out.top_idx, out.bot_val, out.bot_idx)])
                    continue
                for largest, val, idx in ((True, out.top_val, out.top_idx), (False, out.bot_val, out.bot_idx)):
                    val[start:stop], idx[start:stop] = select(padded, self.d_vocab, k, largest)
        _check_scores(out, X, self.basis)
        return out

    def release_buffer(self) -> None:
        """Free the score buffer until the next call (which allocates it again)."""
        self._buf = None

    def _scores(self, rows: int) -> Tensor:
        if self._buf is None or self._buf.shape[0] < rows:
            self._buf = torch.empty(rows, self.width, dtype=torch.float32, device=self.device)
        return self._buf[:rows]


_SELECT_THREADS: Optional[ThreadPoolExecutor] = None


def _select_compiled(scores: Tensor, n_cols: int, k: int, outs: list) -> None:
    """`select`'s lists for both sides of every row of ``scores`` (finite), compiled
    (`compiled_select`), the rows split between torch's thread count of threads."""
    global _SELECT_THREADS
    select_rows = compiled("compiled_select").select_rows

    rows = scores.shape[0]
    parts = max(1, min(torch.get_num_threads(), rows // 64))
    S, outs = scores.numpy(), [t.numpy() for t in outs]
    edges = [rows * i // parts for i in range(parts + 1)]
    if parts == 1:
        select_rows(S, n_cols, k, 0, rows, *outs)
        return
    if _SELECT_THREADS is None:
        _SELECT_THREADS = ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="zeropass-select")
    others = [_SELECT_THREADS.submit(select_rows, S, n_cols, k, a, b, *outs) for a, b in zip(edges[1:-1], edges[2:])]
    select_rows(S, n_cols, k, 0, edges[1], *outs)
    for f in others:
        f.result()


def _largest_magnitude(t: Tensor) -> float:
    """max |t| without an |t| copy (a V x d_model float32 one: 0.52 GB at Llama-2-7B shapes)."""
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi))


def _check_scores(out: TopK, X: Tensor, basis: Tensor) -> None:
    """NonFiniteWeights when a score is NaN or infinite, from finite weights (the loader refused
    non-finite ones) whose products overflow float32.

    The selected lists are enough to look at: a row holding +inf (or NaN, which sorts above
    everything) has it first in its top list, a row holding -inf has it first in its bottom list.
    """
    if bool(torch.isfinite(out.top_val).all()) and bool(torch.isfinite(out.bot_val).all()):
        return
    from ..errors import NonFiniteWeights

    largest = max(_largest_magnitude(X), _largest_magnitude(basis))
    raise NonFiniteWeights(f"projecting {X.shape[0]} vectors gave scores too large for float32 (weights reach "
                           f"{largest:.3g}); such weights are not a trained model's: the checkpoint is damaged")


def select(padded: Tensor, n_cols: int, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """The k largest (or smallest) of the first ``n_cols`` entries of each row and their columns,
    best first, ties by the lower column: exactly
    ``torch.sort(padded[:, :n_cols], descending=largest, stable=True)[:, :k]``.

    ``padded`` is [rows, G * _GROUP] (`padded_width` columns, or any whole number of groups); its
    columns from ``n_cols`` on are scratch, overwritten here with -inf / +inf so that they never
    win (fewer than _GROUP² of them: every group has a real member when G >= 16).

    Why it is exact: split the columns into G groups and take each group's max. The k groups with
    the highest maxima hold k distinct entries >= m_k (the k-th highest group max), so the k-th best
    entry is >= m_k; when m_k > m_{k+1}, every other group lies wholly below m_k and cannot hold a
    top-k entry, not even a tied one. The k best groups are found the same way, among the group
    maxima grouped again (`_ranked`), so each ranking runs over about 16k values rather than the
    G maxima. Rows where some level ties at the k-th place, or where the candidates do, are
    ranked by a full stable sort instead (rare: e.g. an all-zero bias vector).
    """
    rows, width = padded.shape
    if width // _GROUP <= k:  # small vocabularies: the full sort is cheap
        return _sorted(padded[:, :n_cols], k, largest)
    padded[:, n_cols:] = -math.inf if largest else math.inf
    vals, idx, unsure = _ranked(padded, k, largest)
    val, idx = vals[:, :k], idx[:, :k]
    unsure |= val[:, k - 1] == vals[:, k]
    tied = (val[:, 1:] == val[:, :-1]).any(dim=1) & ~unsure
    if bool(tied.any()):
        # torch.topk orders equal values arbitrarily: sort these rows' k by column, then stably by value.
        r = tied.nonzero().squeeze(1)
        by_col = idx[r].argsort(dim=1)
        v, i = val[r].gather(1, by_col), idx[r].gather(1, by_col)
        by_val = torch.sort(v, dim=1, descending=largest, stable=True).indices
        val[r], idx[r] = v.gather(1, by_val), i.gather(1, by_val)
    if bool(unsure.any()):
        r = unsure.nonzero().squeeze(1)
        val[r], idx[r] = _sorted(padded[r, :n_cols], k, largest)
    return val, idx


def _ranked(x: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The k + 1 best values of each row of ``x`` [rows, n > k], best first, their columns, and
    the rows where the grouping is unproven (a tie at the k-th place among group extremes); the
    tie between the k-th and (k+1)-th values returned is the caller's to check.

    Column c is member c // G of group c % G, so a group's extreme is an elementwise max over
    _GROUP contiguous slices, and the k best groups are ranked by this same function over the G
    extremes: grouped again when G is whole groups (`padded_width` makes it so at the vocabulary
    sizes that gain), else all G at once. A ranking then runs over about 16k values instead of G
    (GPT-2's vocabulary: 800 instead of 3142, and top-k's cost grows with its input)."""
    rows, n = x.shape
    G = n // _GROUP
    if G <= k or n % _GROUP:
        best = torch.topk(x, k + 1, dim=1, largest=largest, sorted=True)
        return best.values, best.indices, torch.zeros(rows, dtype=torch.bool, device=x.device)
    grouped = x.view(rows, _GROUP, G)
    extreme = grouped.amax(dim=1) if largest else grouped.amin(dim=1)
    g_vals, g_idx, unsure = _ranked(extreme, k, largest)
    unsure |= g_vals[:, k - 1] == g_vals[:, k]
    members = torch.arange(_GROUP, device=x.device) * G
    cand = (members[None, :, None] + g_idx[:, None, :k]).reshape(rows, _GROUP * k)
    best = torch.topk(x.gather(1, cand), k + 1, dim=1, largest=largest, sorted=True)
    return best.values, cand.gather(1, best.indices), unsure


def padded_width(n_cols: int) -> int:
    """Columns of a score buffer for `select`: ``n_cols`` rounded up to whole groups of groups
    (_GROUP² = 256), so that the group extremes can be grouped again (`_ranked`)."""
    return -(-n_cols // _GROUP**2) * _GROUP**2


def _sorted(scores: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    val, idx = torch.sort(scores, dim=1, descending=largest, stable=True)
    return val[:, :k], idx[:, :k]


def _matmul_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """``out = a @ b``. On the CPU through numpy: its OpenBLAS fp32 GEMM is ~1.5x faster than
    torch's on this machine class (docs/BENCHMARKS.md); ``out`` shares memory with the numpy view, so no copy."""
    if out.device.type == "cpu":
        import numpy as np

        # Overflow is reported once, as a typed error, by _check_scores: no numpy warning line.
        with np.errstate(over="ignore", invalid="ignore"):
            np.matmul(a.contiguous().numpy(), b.numpy(), out=out.numpy())
    else:
        torch.matmul(a, b, out=out)
