"""Exact top-N entries of a factored V × V matrix ``M = A @ B.T`` without materialising it.

Per attention head the indexer needs, for ``QK = (W_E W_Q)(W_E W_K)ᵀ`` and
``OV = (W_E W_V)(W_O W_U)``, the global top-N and bottom-N entries, the tokens with the largest
row / column maxima (and smallest minima), and how often a row's largest entry is on the
diagonal. ``M`` is never built: V = 50257 would be 10 GB.

Exactness contract (DESIGN §3): every result is identical to the dense float64 computation
``M = A.double() @ B.double().T`` -- same entries, same order, ties broken by lower row then lower
column index (lower index for the role lists). Reported values are float64 dot products of the
original factors.

Method (docs/PAIRS.md has the long version):

1. *Basis.* ``A B^T = (A T)(B S)^T`` for any ``T S^T = I``. We use the balanced SVD basis of the
   product (``T = R_a^{-1} U Σ^{1/2}``, ``S = R_b^{-1} W Σ^{1/2}`` from QR of the factors and the
   SVD of ``R_a R_b^T``), which makes the Cauchy–Schwarz bound below tighter on real heads. The
   fp64 transform error is measured and added to every margin.
2. *Layout.* Write a' = (a_1, a_rest). Then
   ``a'·b' ∈ [min(a_1 b_1) - ‖a_rest‖‖b_rest‖, max(a_1 b_1) + ‖a_rest‖‖b_rest‖]`` (and
   ``|a'·b'| <= ‖a'‖‖b'‖``); on real heads a_1 (largest singular direction) is nearly
   sign-constant, so this separates the top side from the bottom side. Columns are cut into
   bands of decreasing ``‖b_rest‖``, each band sorted by b_1 and cut into cells of 256; rows the
   same way (cells of 512). A cell has a narrow range of b_1 and of ‖b_rest‖, so the bound of a
   (row, cell) pair is close to the per-entry bound. "Seed" columns (largest ‖b‖, largest and
   smallest b_1) are screened against every row first: they give strong initial thresholds and
   prove most rows "not self" before any skip decision.
3. *Screen.* For every row cell, the (row, column cell) pairs whose bound reaches a threshold
   are screened as one block (needed rows × needed cells) in bfloat16 (fp32 accumulation);
   every screened value carries a proven error margin ``c · ‖a_i‖‖b_j‖ + eps_abs`` (proof at
   ``_screen_margin``). Undecided self rows additionally need the cells whose bound reaches their
   diagonal: the best cells first, then the rest for the rows still undecided (a row is decided
   when the fp64 value of its best screened off-diagonal entry beats the diagonal).
4. *Rescore.* Entries whose screened value could reach a threshold are recomputed in float64
   from the original factors. Rows / columns whose maximum could reach a role threshold, and
   rows whose self status is ambiguous, are recomputed in full in fp32 (proven fp32 margin), and
   in float64 on the few entries that fp32 cannot separate from the extreme / the diagonal.

Every threshold is a *lower bound* of the quantity it guards (the n-th largest entry, the k-th
largest row maximum, ...) built from exactly computed or provably bounded values, and thresholds
only rise, so anything skipped at any time is provably outside the result.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

__all__ = ["PairResult", "top_pairs"]

_NEG_INF = -math.inf
_POS_INF = math.inf


@dataclass
class PairResult:
    """Exact summary of one factored matrix ``M = A @ B.T`` (rows × cols)."""

    top_rows: Tensor  # [n] int64, entries in descending value order
    top_cols: Tensor  # [n] int64
    top_vals: Tensor  # [n] float64
    bot_rows: Tensor  # [n] int64, ascending value order (most negative first)
    bot_cols: Tensor  # [n] int64
    bot_vals: Tensor  # [n] float64
    row_top_idx: Tensor  # [k] rows with the largest row maximum, descending
    row_top_vals: Tensor  # [k] that row maximum
    row_bot_idx: Tensor  # [k] rows with the smallest row minimum, ascending
    row_bot_vals: Tensor
    col_top_idx: Tensor  # [k] columns with the largest column maximum, descending
    col_top_vals: Tensor
    col_bot_idx: Tensor  # [k] columns with the smallest column minimum, ascending
    col_bot_vals: Tensor
    self_top1_frac: Optional[float]  # square only: fraction of rows i with M[i,i] >= max_j M[i,j]
    stats: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# ordering helpers (ties: lower row, then lower column)


def _order_entries(vals: Tensor, rows: Tensor, cols: Tensor, n_cols: int, descending: bool) -> Tensor:
    """Permutation sorting entries by value (desc or asc), then row, then column."""
    key = rows * n_cols + cols
    perm = torch.argsort(key, stable=True)
    v = vals[perm]
    perm2 = torch.argsort(v, descending=descending, stable=True)
    return perm[perm2]


def _order_index(vals: Tensor, idx: Tensor, descending: bool) -> Tensor:
    perm = torch.argsort(idx, stable=True)
    perm2 = torch.argsort(vals[perm], descending=descending, stable=True)
    return perm[perm2]


class _EntryPool:
    """Running exact top-n (or bottom-n) entries; ``threshold`` is a lower (upper) bound of the
    true n-th value once n entries have been seen, else ±inf."""

    def __init__(self, n: int, n_cols: int, descending: bool, device):
        self.n, self.n_cols, self.desc = n, n_cols, descending
        e = torch.empty(0, dtype=torch.long, device=device)
        self.rows, self.cols = e, e
        self.vals = torch.empty(0, dtype=torch.float64, device=device)
        self.threshold = _NEG_INF if descending else _POS_INF

    def add(self, rows: Tensor, cols: Tensor, vals: Tensor) -> None:
        rows = torch.cat([self.rows, rows])
        cols = torch.cat([self.cols, cols])
        vals = torch.cat([self.vals, vals])
        # The same entry may be screened twice (blocks are products of needed rows and needed
        # cells, and those products can overlap): keep one copy of each (row, col).
        key = rows * self.n_cols + cols
        uniq, inv = torch.unique(key, return_inverse=True)
        if uniq.numel() < key.numel():
            first = torch.full((uniq.numel(),), key.numel(), dtype=torch.long, device=key.device)
            first.scatter_reduce_(0, inv, torch.arange(key.numel(), device=key.device), "amin")
            rows, cols, vals = rows[first], cols[first], vals[first]
        # Truncating to n in the total order is safe: a dropped entry has n entries before it.
        perm = _order_entries(vals, rows, cols, self.n_cols, self.desc)[: self.n]
        self.rows, self.cols, self.vals = rows[perm], cols[perm], vals[perm]
        if self.vals.numel() >= self.n:
            self.threshold = float(self.vals[-1])


# ----------------------------------------------------------------------------------------------
# basis and error margins


def _balanced_basis(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, float]:
    """Return ``A' = A T``, ``B' = B S`` with ``T S^T ≈ I`` and a bound ``c_T`` such that
    ``|a'_i·b'_j - a_i·b_j| <= c_T ‖a_i‖‖b_j‖`` (all in float64).

    Proof of the bound: with ``E = T S^T - I`` and ``δa = fl(aT) - aT``,
    ``a'·b' - a·b = a E b^T + δa (bS)^T + (aT) δb^T + δa δb^T``. The first term is at most
    ``‖a‖‖b‖‖E‖_F``. Each component of ``fl(aT)`` is a d-term dot product, so
    ``|δa| <= γ_d |a||T|`` and ``‖δa‖ <= γ_d ‖a‖‖T‖_F``; likewise ``‖δb‖ <= γ_d ‖b‖‖S‖_F``, and
    ``‖bS‖ <= ‖b‖‖S‖_F``. Summing: ``c_T = ‖E‖_F + (2γ_d + γ_d²)‖T‖_F‖S‖_F``; ``‖E‖_F`` itself is
    evaluated in fp64 with error below ``γ_{d+1}‖T‖_F‖S‖_F + u``, which we add.
    """
    d = A.shape[1]
    eye = torch.eye(d, dtype=torch.float64, device=A.device)
    if min(A.shape[0], B.shape[0]) <= d:
        return A, B, 0.0
    # Any invertible R_a, R_b give T S^T = I exactly in real arithmetic; Cholesky factors of the
    # Gram matrices (A = Q_a R_a with orthonormal Q_a) are cheap, and T S^T - I is measured below.
    La, info_a = torch.linalg.cholesky_ex(A.T @ A)
    Lb, info_b = torch.linalg.cholesky_ex(B.T @ B)
    if int(info_a) or int(info_b):
        return A, B, 0.0
    Ra, Rb = La.T, Lb.T
    diag = torch.cat([Ra.diagonal().abs(), Rb.diagonal().abs()])
    if bool(diag.min() <= 1e-6 * diag.max()):  # (near) rank-deficient: keep the given basis
        return A, B, 0.0
    U, sig, Wh = torch.linalg.svd(Ra @ Rb.T)
    root = sig.sqrt()
    T = torch.linalg.solve_triangular(Ra, U * root, upper=True)
    S = torch.linalg.solve_triangular(Rb, Wh.T * root, upper=True)
    E = torch.linalg.norm(T @ S.T - eye)
    u64 = 2.0**-53
    gam = lambda m: m * u64 / (1 - m * u64)  # noqa: E731
    tf, sf = float(torch.linalg.norm(T)), float(torch.linalg.norm(S))
    c_T = float(E) + (2 * gam(d) + gam(d) ** 2 + gam(d + 1)) * tf * sf + u64
    if c_T > 1e-6:  # ill-conditioned transform: not worth it
        return A, B, 0.0
    return A @ T, B @ S, c_T


def _screen_margin(d: int, dtype: torch.dtype) -> tuple[float, float]:
    """``(c, eps_abs)`` with ``|S_ij - a'_i·b'_j| <= c ‖a'_i‖‖b'_j‖ + eps_abs`` for a screened
    product ``S = fl(fl(A') fl(B')^T)`` in ``dtype`` with float32 accumulation.

    Proof (standard floating-point model, any summation order): rounding inputs to ``dtype``
    gives ``x̂ = x(1+δ)``, ``|δ| <= u_in`` (plus an absolute error below 2^-126 for subnormals that
    may be flushed). Products of two bf16 numbers are exact in fp32 (8+8 <= 24 significand bits);
    a d-term fp32 sum has error at most ``γ_d Σ|x̂_k ŷ_k|`` whatever the order or blocking
    (each term passes through at most d additions), ``γ_d = d u32 / (1 - d u32)``. The result is
    then rounded once to ``dtype`` (relative ``u_out``). With ``Σ|x_k y_k| <= ‖x‖‖y‖``:
    ``|S - x·y| <= [(1+u_in)^2 (1+γ_d)(1+u_out) - 1] ‖x‖‖y‖ + eps_abs``. We double the result for
    headroom against FTZ / fused-multiply-add variations.
    """
    u32 = 2.0**-24
    u_in = {torch.bfloat16: 2.0**-8, torch.float32: u32}[dtype]
    u_out = u_in
    gam = d * u32 / (1 - d * u32)
    c = (1 + u_in) ** 2 * (1 + gam) * (1 + u_out) - 1
    eps_abs = 4 * (d + 2) * 2.0**-126
    return 2 * c, 2 * eps_abs


@contextmanager
def _strict_matmul(device: torch.device):
    """fp32-accumulating GEMMs on CUDA (no TF32, no reduced-precision bf16 reductions)."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    saved = (m.allow_tf32, m.allow_bf16_reduced_precision_reduction)
    m.allow_tf32, m.allow_bf16_reduced_precision_reduction = False, False
    try:
        yield
    finally:
        m.allow_tf32, m.allow_bf16_reduced_precision_reduction = saved


# ----------------------------------------------------------------------------------------------


def _kth(x: Tensor, k: int, largest: bool) -> float:
    """k-th largest (smallest) finite bound in ``x``; -inf (+inf) if fewer than k are finite."""
    if x.numel() < k:
        return _NEG_INF if largest else _POS_INF
    v = float(torch.topk(x, k, largest=largest, sorted=False).values.min() if largest
              else torch.topk(x, k, largest=largest, sorted=False).values.max())
    return v


def top_pairs(
    A: Tensor,
    B: Tensor,
    n: int = 200,
    k: int = 50,
    *,
    square: bool = True,
    device: str = "cpu",
    block_rows: Optional[int] = None,
    block_cols: Optional[int] = None,
    screen_dtype: torch.dtype = torch.bfloat16,
    basis: str = "svd",
    first_block_cols: int = 256,
    cell_cols: int = 256,
) -> PairResult:
    """Exact top/bottom-``n`` entries, top-``k`` role rows/columns and the self-top-1 fraction of
    ``M = A @ B.T`` (``A``: [rows, d], ``B``: [cols, d]), computed without building ``M``.

    >>> A = torch.randn(1000, 16, dtype=torch.float64); B = torch.randn(1000, 16, dtype=torch.float64)
    >>> r = top_pairs(A, B, n=5, k=3)
    >>> M = A @ B.T; bool(r.top_vals[0] == M.max())
    True
    """
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[1]:
        raise ValueError(f"need A [rows, d] and B [cols, d], got {tuple(A.shape)} and {tuple(B.shape)}")
    if square and A.shape[0] != B.shape[0]:
        raise ValueError(f"square=True needs as many rows as columns, got {A.shape[0]} and {B.shape[0]}")
    if n < 1 or k < 1:
        raise ValueError(f"n and k must be positive, got n={n}, k={k}")
    dev = torch.device(device)
    # CPU: blocks that stay in cache; GPU: few, large blocks (per-block host syncs dominate).
    gpu = dev.type == "cuda"
    block_rows = block_rows or (8192 if gpu else 512)
    block_cols = block_cols or (65536 if gpu else 8192)
    t_start = time.perf_counter()
    with _strict_matmul(dev):
        return _top_pairs(A, B, n, k, square, dev, block_rows, block_cols, screen_dtype, basis,
                          first_block_cols, min(cell_cols, block_cols), t_start)


def _top_pairs(A, B, n, k, square, dev, block_rows, block_cols, screen_dtype, basis,
               first_block_cols, cell_cols, t_start):
    A64 = A.detach().to(dev, torch.float64)
    B64 = B.detach().to(dev, torch.float64)
    R, C = A64.shape[0], B64.shape[0]
    d = A64.shape[1]
    n = min(n, R * C)
    k_r, k_c = min(k, R), min(k, C)

    if basis == "svd":
        Ab, Bb, c_T = _balanced_basis(A64, B64)
    elif basis == "none":
        Ab, Bb, c_T = A64, B64, 0.0
    else:
        raise ValueError(f"basis must be 'svd' or 'none', got {basis!r}")
    alpha = torch.linalg.norm(Ab, dim=1)  # [R] ‖a'_i‖
    beta = torch.linalg.norm(Bb, dim=1)  # [C]
    # Screen margin: |S_ij - M_ij| <= c ‖a'_i‖‖b'_j‖ + eps_abs, where eps_abs also absorbs the
    # basis change (c_T ‖a_i‖‖b_j‖ <= c_T max‖a‖ max‖b‖).
    c_s, eps_abs = _screen_margin(d, screen_dtype)
    eps_abs += c_T * float(torch.linalg.norm(A64, dim=1).max()) * float(torch.linalg.norm(B64, dim=1).max())
    # |M_ij| <= ‖a'_i‖‖b'_j‖ + eps_T (Cauchy–Schwarz in the new basis plus the basis error).
    eps_T = c_T * float(torch.linalg.norm(A64, dim=1).max()) * float(torch.linalg.norm(B64, dim=1).max())

    # ------------------------------------------------------------------------------------------
    # Layout. Sign-aware bound: in the balanced basis the first coordinate (largest singular
    # value) is nearly sign-constant on real heads (the embeddings' common direction), so
    #     a·b = a_1 b_1 + a_rest·b_rest ∈ [min(a_1 b_1) - ‖a_rest‖‖b_rest‖, max(a_1 b_1) + ‖a_rest‖‖b_rest‖]
    # separates the top side from the bottom side, which Cauchy–Schwarz (|a·b| <= ‖a‖‖b‖) can't.
    # It is evaluated per (row, column cell), where a cell is a contiguous run of columns with a
    # narrow range of b_1 and of ‖b‖ (columns are cut into norm bands, each band sorted by b_1 and
    # cut into cells), so the block bound is close to the per-entry bound. Rows are laid out the
    # same way (row cells: narrow a_1 and ‖a‖), so the rows of a cell need nearly the same column
    # cells and the (needed rows) × (needed cells) product screened is close to what is needed.
    # The first columns of the layout are "seed" columns (largest ‖b‖, largest b_1, smallest
    # b_1), screened against every row first: they give strong thresholds and decide most
    # self rows before any pruning decision is taken. Every entry is covered exactly once:
    # seed columns × all rows, then (row cell) × (column cell) pairs, each screened or skipped.
    a1_all, b1_all = Ab[:, 0], Bb[:, 0]
    ar_all = torch.linalg.norm(Ab[:, 1:], dim=1)
    br_all = torch.linalg.norm(Bb[:, 1:], dim=1)

    def layout(norm, rest, first, band, cell, seed_n):
        """Permutation: seed (top ‖·‖, top first, bottom first coordinate), then bands by the rest
        norm (largest first; band sizes 4·cell, 8·cell, ... up to ``band``: the largest rest
        norms matter most), each band sorted by the first coordinate and cut into cells of
        ``cell``; and the cell edges of the non-seed part."""
        N = norm.numel()
        by_norm = torch.argsort(norm, descending=True, stable=True)
        if seed_n > 0 and N > 3 * seed_n:
            cand = torch.cat([by_norm[:seed_n], torch.topk(first, seed_n).indices,
                              torch.topk(-first, seed_n).indices])
            is_seed = torch.zeros(N, dtype=torch.bool, device=norm.device)
            is_seed[cand] = True
            seed = by_norm[is_seed[by_norm]]
        else:
            seed = by_norm[:0]
            is_seed = torch.zeros(N, dtype=torch.bool, device=norm.device)
        by_rest = torch.argsort(rest, descending=True, stable=True)
        rest_idx = by_rest[~is_seed[by_rest]]
        parts, edges = [seed], [seed.numel()]
        b0, size = 0, 4 * cell
        while b0 < rest_idx.numel():
            idx = rest_idx[b0 : b0 + size]
            b0 += size
            size = min(band, 2 * size)
            idx = idx[torch.argsort(first[idx], stable=True)]
            parts.append(idx)
            base = edges[-1]
            for c0 in range(cell, idx.numel(), cell):
                edges.append(base + c0)
            edges.append(base + idx.numel())
        return torch.cat(parts), seed.numel(), edges

    row_order, _, row_edges = layout(alpha, ar_all, a1_all, block_cols, block_rows, 0)
    col_order, n_seed, col_edges = layout(beta, br_all, b1_all, block_cols, cell_cols, first_block_cols)
    alpha_s, beta_s = alpha[row_order], beta[col_order]
    a1, ar, b1, br = a1_all[row_order], ar_all[row_order], b1_all[col_order], br_all[col_order]
    As = Ab[row_order].to(screen_dtype)
    Bs = Bb[col_order].to(screen_dtype)  # [C, d]; blocks use Bs[cols].T
    beta_max = float(beta.max()) if C else 0.0
    alpha_max = float(alpha.max()) if R else 0.0

    # Per laid-out row / column: extreme screened values over the computed entries.
    row_hi = torch.full((R,), _NEG_INF, dtype=torch.float64, device=dev)
    row_lo = torch.full((R,), _POS_INF, dtype=torch.float64, device=dev)
    col_hi = torch.full((C,), _NEG_INF, dtype=torch.float64, device=dev)
    col_lo = torch.full((C,), _POS_INF, dtype=torch.float64, device=dev)
    # Margin-adjusted bounds of the screened extremes (each block with its own margin, which is
    # tight since a block's rows / columns have similar norms): row_hi >= max of the screened
    # exact values (an upper bound), row_hl <= it (a lower bound); row_lo / row_lu mirror them.
    row_hl = torch.full((R,), _NEG_INF, dtype=torch.float64, device=dev)
    row_lu = torch.full((R,), _POS_INF, dtype=torch.float64, device=dev)
    col_hl = torch.full((C,), _NEG_INF, dtype=torch.float64, device=dev)
    col_lu = torch.full((C,), _POS_INF, dtype=torch.float64, device=dev)

    top = _EntryPool(n, C, True, dev)
    bot = _EntryPool(n, C, False, dev)

    if square:
        diag = (A64 * B64).sum(1)[row_order]  # exact M_ii, in laid-out row order
        col_pos = torch.empty(C, dtype=torch.long, device=dev)
        col_pos[col_order] = torch.arange(C, device=dev)
        diag_col = col_pos[row_order]  # laid-out column position of each laid-out row's diagonal
        off_hi = torch.full((R,), _NEG_INF, dtype=torch.float64, device=dev)  # max over j != i
        undecided = torch.ones(R, dtype=torch.bool, device=dev)  # not yet proven "not self"
        pos_buf = torch.full((C,), -1, dtype=torch.long, device=dev)  # column -> place in block
    thr = dict(rmax=_NEG_INF, rmin=_POS_INF, cmax=_NEG_INF, cmin=_POS_INF)

    stats = dict(rows=R, cols=C, d=d, entries_screened=0, blocks=0, blocks_computed=0,
                 rescored=0, seed_cols=n_seed, basis="svd" if c_T > 0 else "none")

    def rescore(r_pos: Tensor, c_pos: Tensor):
        ri, ci = row_order[r_pos], col_order[c_pos]
        stats["rescored"] += int(ri.numel())
        return ri, ci, (A64[ri] * B64[ci]).sum(1)

    ctx = _Ctx(top=top, bot=bot, rescore=rescore, row_hi=row_hi, row_lo=row_lo, col_hi=col_hi,
               col_lo=col_lo, c_s=c_s, eps_abs=eps_abs, alpha_s=alpha_s, beta_s=beta_s, thr=thr,
               square=square, row_hl=row_hl, row_lu=row_lu, col_hl=col_hl, col_lu=col_lu, **(dict(diag=diag, diag_col=diag_col,
               off_hi=off_hi, undecided=undecided, pos_buf=pos_buf) if square else {}))

    def update_role_thresholds():
        # k-th largest lower bound of the row/col maxima (and mirror images); only rise.
        thr["rmax"] = max(thr["rmax"], _kth(row_hl, k_r, True))
        thr["rmin"] = min(thr["rmin"], _kth(row_lu, k_r, False))
        thr["cmax"] = max(thr["cmax"], _kth(col_hl, k_c, True))
        thr["cmin"] = min(thr["cmin"], _kth(col_lu, k_c, False))

    def screen(r0, r1, ridx, cols):
        """Screen laid-out rows ``ridx`` (within r0:r1; None = all) × columns ``cols`` (a slice
        or an index tensor) and fold the block into the state."""
        if ridx is None:
            lhs, rows = As[r0:r1], torch.arange(r0, r1, device=dev)
            a_sel = float(alpha_s[r0:r1].max())
        else:
            rows = ridx + r0
            lhs = As[rows]
            a_sel = float(alpha_s[rows].max())
        if isinstance(cols, slice):
            cidx_all = torch.arange(cols.start, cols.stop, device=dev)
        else:
            cidx_all = cols
        # Cache-sized pieces: the bookkeeping passes over S are memory-bound.
        for p0 in range(0, cidx_all.numel(), block_cols):
            cidx = cidx_all[p0 : p0 + block_cols]
            if isinstance(cols, slice):
                rhs = Bs[cols.start + p0 : cols.start + p0 + cidx.numel()]
            else:
                rhs = Bs.index_select(0, cidx)
            _screen_piece(lhs, rows, a_sel, rhs, cidx)

    def _screen_piece(lhs, rows, a_sel, rhs, cidx):
        stats["blocks_computed"] += 1
        stats["entries_screened"] += int(rows.numel()) * int(cidx.numel())
        S = torch.mm(lhs, rhs.T)  # [rows, q] screened values
        # Every screened entry of the block is within this of its exact value.
        marg = c_s * a_sel * float(beta_s[cidx].max()) + eps_abs
        _process_block(S, rows, cidx, marg, ctx)

    # 1. Seed columns against every row (no pruning).
    seed_rows = max(block_rows, 2048)
    if n_seed:
        for r0 in range(0, R, seed_rows):
            screen(r0, min(R, r0 + seed_rows), None, slice(0, n_seed))
        update_role_thresholds()

    # 2. (row cell) × (column cell) pairs, pruned by the sign-aware bound.
    slack = eps_T + 1e-12 * alpha_max * beta_max  # basis error and fp64 rounding of the bounds
    ce = torch.tensor(col_edges, device=dev)
    n_cells = len(col_edges) - 1
    if n_cells:
        lens = ce[1:] - ce[:-1]
        seg = lambda x, red: torch.segment_reduce(x[n_seed:], red, lengths=lens)  # noqa: E731
        lo_c, hi_c = seg(b1, "min"), seg(b1, "max")
        rho_c, bmax_c = seg(br, "max"), seg(beta_s, "max")
        cell_of = torch.repeat_interleave(torch.arange(n_cells, device=dev), lens)
    stats["blocks"] = (len(row_edges) - 1) * n_cells + (n_seed > 0) * ((R + seed_rows - 1) // seed_rows)

    def cell_cols_of(sel):
        """Laid-out columns of the (sorted) cells ``sel``: a slice when they are one run."""
        c_lo, c_hi = int(sel[0]), int(sel[-1])
        if c_hi - c_lo + 1 == sel.numel():
            return slice(col_edges[c_lo], col_edges[c_hi + 1])
        mark = torch.zeros(n_cells, dtype=torch.bool, device=dev)
        mark[sel] = True
        return torch.nonzero(mark[cell_of]).squeeze(1) + n_seed

    def bounds(x1, xr, xn, lo, hi, rho, bm):
        """Upper / lower bounds of x·y for rows x = (x1, rest norm xr, norm xn) (column vectors)
        against cells with y_1 ∈ [lo, hi], ‖y_rest‖ <= rho, ‖y‖ <= bm (row vectors)."""
        p1, p2 = x1 * lo, x1 * hi
        cs = xn * bm
        xrr = xr * rho
        ub = torch.minimum(torch.maximum(p1, p2) + xrr, cs)
        lb = torch.maximum(torch.minimum(p1, p2) - xrr, -cs)
        return ub, lb

    for it, (r0, r1) in enumerate(zip(row_edges[:-1], row_edges[1:])):
        if n_cells == 0:
            break
        if it and it % 8 == 0:
            update_role_thresholds()
        th_hi = min(top.threshold, thr["rmax"], thr["cmax"]) - slack
        th_lo = max(bot.threshold, thr["rmin"], thr["cmin"]) + slack
        x1, xr, xn = a1[r0:r1], ar[r0:r1], alpha_s[r0:r1]
        # Box of the row cell first (cheap): cells no row of the cell can need.
        ubb, lbb = bounds(torch.stack([x1.min(), x1.max()])[:, None], xr.max(), xn.max(),
                          lo_c, hi_c, rho_c, bmax_c)
        ubb, lbb = ubb.amax(0), lbb.amin(0)
        cneed = (ubb >= th_hi) | (lbb <= th_lo)
        if square:
            und = undecided[r0:r1]
            if bool(und.any()):
                cneed |= ubb >= float(diag[r0:r1][und].min()) - slack
            else:
                und = None
        cells = torch.nonzero(cneed).squeeze(1)
        if cells.numel() == 0:
            continue
        # Per row and candidate cell.
        ub, lb = bounds(x1[:, None], xr[:, None], xn[:, None], lo_c[cells], hi_c[cells],
                        rho_c[cells], bmax_c[cells])
        need = (ub >= th_hi) | (lb <= th_lo)
        ridx = torch.nonzero(need.any(1)).squeeze(1)
        if ridx.numel():
            sel = cells[need[ridx].any(0)]
            screen(r0, r1, None if ridx.numel() == r1 - r0 else ridx, cell_cols_of(sel))
        if not square or und is None:
            continue
        # Self rows: an undecided row also needs every entry whose bound reaches its diagonal,
        # unless it gets proven "not self" first. Screen those (row, cell) pairs in decreasing
        # order of the bound: first the best few cells (which decide most rows), then all the
        # rest for the rows still undecided.
        need_s = undecided[r0:r1, None] & (ub >= diag[r0:r1, None] - slack) & ~need
        step = 8
        while True:
            rs = torch.nonzero(need_s.any(1)).squeeze(1)
            if rs.numel() == 0:
                break
            sub_need = need_s[rs]
            cs_ = torch.nonzero(sub_need.any(0)).squeeze(1)
            prio = torch.where(sub_need[:, cs_], ub[rs][:, cs_], _NEG_INF).amax(0)
            take = cs_[torch.topk(prio, min(step, cs_.numel())).indices]
            take = take.sort().values
            rows_t = rs[need_s[rs][:, take].any(1)]
            screen(r0, r1, rows_t, cell_cols_of(cells[take]))
            need_s[:, take] = False
            need_s &= undecided[r0:r1, None]
            step = n_cells  # rows still undecided after the best cells are mostly self: all the rest
    t_screen = time.perf_counter()
    stats["thresholds"] = dict(top=top.threshold, bot=bot.threshold, **thr)

    c32, eps32 = _screen_margin(d, torch.float32)
    fx = _Full(A64=A64, B64=B64, A32=Ab.float(), B32=Bb.float(), an=alpha, bn=beta, c32=c32,
               eps32=eps32 + eps_T)
    res = _finish(fx, R, C, n, k_r, k_c, top, bot, row_hi, row_lo, col_hi, col_lo,
                  row_hl, row_lu, col_hl, col_lu, thr, row_order, col_order, square,
                  (diag, off_hi, undecided) if square else None, dev)
    stats["frac_entries_screened"] = stats["entries_screened"] / max(1, R * C)
    stats["frac_blocks_computed"] = stats["blocks_computed"] / max(1, stats["blocks"])
    stats["t_screen_s"] = t_screen - t_start
    stats["t_total_s"] = time.perf_counter() - t_start
    res.stats.update(stats)
    return res


@dataclass
class _Ctx:
    top: _EntryPool
    bot: _EntryPool
    rescore: object
    row_hi: Tensor
    row_lo: Tensor
    col_hi: Tensor
    col_lo: Tensor
    c_s: float
    eps_abs: float
    alpha_s: Tensor
    beta_s: Tensor
    thr: dict
    square: bool
    row_hl: Tensor
    row_lu: Tensor
    col_hl: Tensor
    col_lu: Tensor
    diag: Optional[Tensor] = None  # square only: exact M_ii per sorted row
    diag_col: Optional[Tensor] = None  # sorted column position of each sorted row's diagonal
    off_hi: Optional[Tensor] = None  # upper bound of the screened off-diagonal exact values
    undecided: Optional[Tensor] = None  # rows not yet proven "not self"
    pos_buf: Optional[Tensor] = None  # [C] -1, scratch: column position -> place in the block


def _process_block(S: Tensor, ridx: Tensor, cidx: Tensor, marg: float, ctx: _Ctx) -> None:
    """Fold one screened block (laid-out rows ``ridx`` × laid-out columns ``cidx``) into the state."""
    dev = S.device
    q = int(cidx.numel())
    rmax = S.amax(1).double()
    rmin = S.amin(1).double()
    ctx.row_hi[ridx] = torch.maximum(ctx.row_hi[ridx], rmax + marg)
    ctx.row_hl[ridx] = torch.maximum(ctx.row_hl[ridx], rmax - marg)
    ctx.row_lo[ridx] = torch.minimum(ctx.row_lo[ridx], rmin - marg)
    ctx.row_lu[ridx] = torch.minimum(ctx.row_lu[ridx], rmin + marg)

    # Column extremes only matter for entries that could reach a column-role threshold: an
    # entry below it now stays below the final (higher) threshold.
    hi_need = rmax >= ctx.thr["cmax"] - marg
    lo_need = rmin <= ctx.thr["cmin"] + marg
    cm = None
    if bool(hi_need.all()):
        cm = S.amax(0).double()
    elif bool(hi_need.any()):
        cm = S[hi_need].amax(0).double()
    if cm is not None:
        ctx.col_hi[cidx] = torch.maximum(ctx.col_hi[cidx], cm + marg)
        ctx.col_hl[cidx] = torch.maximum(ctx.col_hl[cidx], cm - marg)
    cm = None
    if bool(lo_need.all()):
        cm = S.amin(0).double()
    elif bool(lo_need.any()):
        cm = S[lo_need].amin(0).double()
    if cm is not None:
        ctx.col_lo[cidx] = torch.minimum(ctx.col_lo[cidx], cm - marg)
        ctx.col_lu[cidx] = torch.minimum(ctx.col_lu[cidx], cm + marg)

    # Top / bottom entries.
    for pool, ext, sign in ((ctx.top, rmax, 1.0), (ctx.bot, rmin, -1.0)):
        t = pool.threshold
        if pool.vals.numel() < pool.n:
            # No threshold yet: the exact values of this block's best screened entries give one
            # (any n exact entries bound the n-th value). They are not added here: the filter
            # below catches every entry of the block that reaches the threshold, seeds included.
            m = min(pool.n, S.numel())
            flat = torch.topk(S.reshape(-1).float() * sign, m).indices
            _, _, seed = ctx.rescore(ridx[flat // q], cidx[flat % q])
            known = torch.cat([pool.vals, seed]) * sign
            if known.numel() >= pool.n:
                t = sign * float(torch.topk(known, pool.n).values[-1])
        rows = torch.nonzero(ext * sign >= t * sign - marg).squeeze(1)
        if rows.numel() == 0:
            continue
        sub = S[rows].float()
        hit = torch.nonzero(sub * sign >= t * sign - marg)
        if hit.numel():
            pool.add(*ctx.rescore(ridx[rows[hit[:, 0]]], cidx[hit[:, 1]]))

    if ctx.square:
        # Only rows not yet proven "not self" need their off-diagonal maximum (decided rows stay
        # decided; ``off_hi`` is read only for undecided rows).
        und = torch.nonzero(ctx.undecided[ridx]).squeeze(1)
        if und.numel():
            rows_u = ridx[und]
            ctx.pos_buf[cidx] = torch.arange(q, device=dev)
            dc = ctx.pos_buf[ctx.diag_col[rows_u]]
            ctx.pos_buf[cidx] = -1
            inb = torch.nonzero(dc >= 0).squeeze(1)
            if inb.numel():  # S is not read after this: mask the diagonal in place
                S[und[inb], dc[inb]] = _NEG_INF
            if 2 * und.numel() >= S.shape[0]:
                offv, offj = S.max(1)
                offv, offj = offv[und], offj[und]
            else:
                offv, offj = S[und].max(1)
            offv = offv.double()
            ctx.off_hi[rows_u] = torch.maximum(ctx.off_hi[rows_u], offv + marg)
            # Proven "not self": the exact value of the row's best screened off-diagonal entry
            # is above the (exact) diagonal. Only rows where the screen says it could be.
            dg = ctx.diag[rows_u]
            cand = torch.nonzero(offv + marg >= dg).squeeze(1)
            if cand.numel():
                _, _, ex = ctx.rescore(rows_u[cand], cidx[offj[cand]])
                beaten = cand[ex > dg[cand]]
                ctx.undecided[rows_u[beaten]] = False


@dataclass
class _Full:
    """What the full-row passes of ``_finish`` need: original fp64 factors (exact values), the
    balanced-basis factors in fp32 with their norms (fast full rows), and the fp32 margin
    ``|fl32(a'·b') - a·b| <= c32 ‖a'‖‖b'‖ + eps32`` (``_screen_margin`` for fp32 plus the basis
    error, which ``eps32`` includes)."""

    A64: Tensor
    B64: Tensor
    A32: Tensor
    B32: Tensor
    an: Tensor
    bn: Tensor
    c32: float
    eps32: float


def _row_extremes(X64, Y64, X32, Y32, xn, ymax, c32, eps32, rows, largest, chunk=256):
    """Exact max (largest) or min of the given rows of ``X64 @ Y64.T``: the rows in fp32, then
    fp64 dot products for the entries whose fp32 value is within twice the row's fp32 margin
    ``m_i = c32 ‖x_i‖ max‖y‖ + eps32`` of the fp32 extreme. The true extreme entry is among them:
    with T the fp32 row (sign-flipped for min), T_j* + m_i >= M_j* >= M_k >= T_k - m_i for the
    fp32 arg-extreme k, so T_j* >= max T - 2 m_i (cut rounded down in fp32)."""
    out = []
    sgn = 1.0 if largest else -1.0
    for s in range(0, rows.numel(), chunk):
        r = rows[s : s + chunk]
        T = torch.mm(X32[r], Y32.T)
        if not largest:
            T.neg_()
        m = c32 * xn[r] * ymax + eps32
        cut = (T.amax(1).double() - 2 * m - 1e-30).float()
        cut = torch.nextafter(cut, torch.full_like(cut, _NEG_INF))
        hit = torch.nonzero(T >= cut[:, None])
        ex = (X64[r[hit[:, 0]]] * Y64[hit[:, 1]]).sum(1) * sgn
        v = torch.full((r.numel(),), _NEG_INF, dtype=torch.float64, device=X64.device)
        v.scatter_reduce_(0, hit[:, 0], ex, "amax")
        out.append(v * sgn)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64, device=X64.device)


def _role_list(fx: _Full, cand_pos, bound, t_floor, order, k, largest, by_cols, chunk=256):
    """Exact top-k (by max) or bottom-k (by min) among candidate laid-out positions.

    ``bound[p]`` bounds the screened extreme of candidate p (upper for max) and ``t_floor`` bounds
    every skipped entry, so a candidate's true max is <= max(bound, t_floor). Candidates are
    done in decreasing bound order; once k exact maxima are known, the k-th of them, t_k, is a
    lower bound of the true k-th, and a candidate with max(bound, t_floor) < t_k can't be in the
    list (strictly below: not even a tie), nor can any later one."""
    sg = 1.0 if largest else -1.0
    ordp = torch.argsort(bound[cand_pos] * sg, descending=True, stable=True)
    cand_pos = cand_pos[ordp]
    bnd = (bound[cand_pos] * sg).tolist()
    done_i, done_v = [], []
    for s in range(0, cand_pos.numel(), chunk):
        if done_v:
            vv = torch.cat(done_v) * sg
            if vv.numel() >= k:
                t_k = float(torch.topk(vv, k).values[-1])
                if max(bnd[s], t_floor * sg) < t_k:
                    break
        idx = order[cand_pos[s : s + chunk]]
        if by_cols:
            v = _row_extremes(fx.B64, fx.A64, fx.B32, fx.A32, fx.bn, float(fx.an.max()), fx.c32,
                              fx.eps32, idx, largest)
        else:
            v = _row_extremes(fx.A64, fx.B64, fx.A32, fx.B32, fx.an, float(fx.bn.max()), fx.c32,
                              fx.eps32, idx, largest)
        done_i.append(idx)
        done_v.append(v)
    z = torch.empty(0, dtype=torch.long, device=cand_pos.device)
    idx = torch.cat(done_i) if done_i else z
    vals = torch.cat(done_v) if done_v else z.double()
    perm = _order_index(vals, idx, descending=largest)[:k]
    return idx[perm], vals[perm]


def _self_rows(fx: _Full, idx: Tensor, dg: Tensor, chunk=256) -> int:
    """How many of the rows ``idx`` (original indices, square) have ``M_ii >= max_j M_ij``
    (``dg`` = exact M_ii). Full rows in fp32; an off-diagonal entry can reach the diagonal only
    if its fp32 value is >= M_ii - m_i (margin as in ``_row_extremes``); those are recomputed in
    fp64 and the row is self iff none of them exceeds M_ii."""
    n_self = 0
    bmax = float(fx.bn.max())
    for s in range(0, idx.numel(), chunk):
        r = idx[s : s + chunk]
        T = torch.mm(fx.A32[r], fx.B32.T)
        ar = torch.arange(r.numel(), device=T.device)
        T[ar, r] = _NEG_INF
        m = fx.c32 * fx.an[r] * bmax + fx.eps32
        cut = (dg[s : s + chunk] - m - 1e-30).float()
        cut = torch.nextafter(cut, torch.full_like(cut, _NEG_INF))
        hit = torch.nonzero(T >= cut[:, None])
        ex = (fx.A64[r[hit[:, 0]]] * fx.B64[hit[:, 1]]).sum(1)
        beaten = torch.zeros(r.numel(), dtype=torch.bool, device=T.device)
        beaten[hit[:, 0][ex > dg[s : s + chunk][hit[:, 0]]]] = True
        n_self += int((~beaten).sum())
    return n_self


def _finish(fx, R, C, n, k_r, k_c, top, bot, row_hi, row_lo, col_hi, col_lo,
            row_hl, row_lu, col_hl, col_lu, thr, row_order, col_order, square, self_state, dev) -> PairResult:
    # Final role thresholds from the final bounds (all lower/upper bounds of the k-th value).
    t_rmax = max(thr["rmax"], _kth(row_hl, k_r, True))
    t_rmin = min(thr["rmin"], _kth(row_lu, k_r, False))
    t_cmax = max(thr["cmax"], _kth(col_hl, k_c, True))
    t_cmin = min(thr["cmin"], _kth(col_lu, k_c, False))
    # A true top-k row has max >= t_rmax; skipped entries are all below it, so its max was
    # screened and row_hi (screened value + its block's margin) >= t_rmax.
    cr_hi = torch.nonzero(row_hi >= t_rmax).squeeze(1)
    cr_lo = torch.nonzero(row_lo <= t_rmin).squeeze(1)
    cc_hi = torch.nonzero(col_hi >= t_cmax).squeeze(1)
    cc_lo = torch.nonzero(col_lo <= t_cmin).squeeze(1)
    rt_i, rt_v = _role_list(fx, cr_hi, row_hi, t_rmax, row_order, k_r, True, False)
    rb_i, rb_v = _role_list(fx, cr_lo, row_lo, t_rmin, row_order, k_r, False, False)
    ct_i, ct_v = _role_list(fx, cc_hi, col_hi, t_cmax, col_order, k_c, True, True)
    cb_i, cb_v = _role_list(fx, cc_lo, col_lo, t_cmin, col_order, k_c, False, True)

    self_frac = None
    stats = dict(role_candidates=int(cr_hi.numel() + cr_lo.numel() + cc_hi.numel() + cc_lo.numel()))
    if square:
        diag, off_hi, undecided = self_state
        # Undecided rows: self unless an off-diagonal screened value could reach the diagonal.
        ambiguous = undecided & (off_hi >= diag)
        amb = torch.nonzero(ambiguous).squeeze(1)
        n_self = int((undecided & ~ambiguous).sum())
        if amb.numel():
            n_self += _self_rows(fx, row_order[amb], diag[amb])
        self_frac = n_self / R if R else 0.0
        stats["self_ambiguous_rows"] = int(amb.numel())

    return PairResult(
        top_rows=top.rows, top_cols=top.cols, top_vals=top.vals,
        bot_rows=bot.rows, bot_cols=bot.cols, bot_vals=bot.vals,
        row_top_idx=rt_i, row_top_vals=rt_v, row_bot_idx=rb_i, row_bot_vals=rb_v,
        col_top_idx=ct_i, col_top_vals=ct_v, col_bot_idx=cb_i, col_bot_vals=cb_v,
        self_top1_frac=self_frac, stats=stats,
    )
