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
2. *Order.* Rows and columns are sorted by norm (largest first) and cut into blocks, so the bound
   ``|M_ij| <= ‖a_i‖‖b_j‖`` falls monotonically along each block row and whole blocks -- and the
   tail of a block's rows and columns -- can be skipped once the running thresholds pass it.
3. *Screen.* Blocks that survive are multiplied in bfloat16 (fp32 accumulation); every screened
   value carries a proven error margin ``c · ‖a_i‖‖b_j‖ + eps_abs`` (proof at ``_screen_margin``).
4. *Rescore.* Entries whose screened value could reach a threshold are recomputed in float64
   from the original factors; rows / columns whose maximum could reach a role threshold, and rows
   whose self status is ambiguous, are recomputed in float64 in full.

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
                          first_block_cols, t_start)


def _top_pairs(A, B, n, k, square, dev, block_rows, block_cols, screen_dtype, basis,
               first_block_cols, t_start):
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

    row_order = torch.argsort(alpha, descending=True, stable=True)
    col_order = torch.argsort(beta, descending=True, stable=True)
    alpha_s, beta_s = alpha[row_order], beta[col_order]
    As = Ab[row_order].to(screen_dtype)
    Bs_T = Bb[col_order].to(screen_dtype).T.contiguous()  # [d, C]
    alpha_h, beta_h = alpha_s.tolist(), beta_s.tolist()  # host copies for block bookkeeping
    beta_max = max(beta_h) if C else 0.0
    alpha_max = max(alpha_h) if R else 0.0

    # Per sorted row / column: extreme screened values over the computed entries.
    row_hi = torch.full((R,), _NEG_INF, dtype=torch.float64, device=dev)
    row_lo = torch.full((R,), _POS_INF, dtype=torch.float64, device=dev)
    col_hi = torch.full((C,), _NEG_INF, dtype=torch.float64, device=dev)
    col_lo = torch.full((C,), _POS_INF, dtype=torch.float64, device=dev)
    row_marg = c_s * alpha_s * beta_max + eps_abs  # margin of any screened entry in the row
    col_marg = c_s * alpha_max * beta_s + eps_abs

    top = _EntryPool(n, C, True, dev)
    bot = _EntryPool(n, C, False, dev)

    if square:
        diag = (A64 * B64).sum(1)[row_order]  # exact M_ii, in sorted row order
        col_pos = torch.empty(C, dtype=torch.long, device=dev)
        col_pos[col_order] = torch.arange(C, device=dev)
        diag_col = col_pos[row_order]  # sorted column position of each sorted row's diagonal
        off_hi = torch.full((R,), _NEG_INF, dtype=torch.float64, device=dev)  # max over j != i
        undecided = torch.ones(R, dtype=torch.bool, device=dev)  # not yet proven "not self"
    thr = dict(rmax=_NEG_INF, rmin=_POS_INF, cmax=_NEG_INF, cmin=_POS_INF)

    stats = dict(rows=R, cols=C, d=d, entries_screened=0, blocks=0, blocks_computed=0,
                 rescored=0, basis="svd" if c_T > 0 else "none")

    def rescore(r_pos: Tensor, c_pos: Tensor):
        ri, ci = row_order[r_pos], col_order[c_pos]
        stats["rescored"] += int(ri.numel())
        return ri, ci, (A64[ri] * B64[ci]).sum(1)

    ctx = _Ctx(top=top, bot=bot, rescore=rescore, row_hi=row_hi, row_lo=row_lo, col_hi=col_hi,
               col_lo=col_lo, c_s=c_s, eps_abs=eps_abs, alpha_s=alpha_s, beta_s=beta_s, thr=thr,
               square=square, row_marg=row_marg, **(dict(diag=diag, diag_col=diag_col,
               off_hi=off_hi, undecided=undecided) if square else {}))
    n_rb = (R + block_rows - 1) // block_rows
    # Column blocks grow geometrically (256, 512, ... block_cols): most rows are proven
    # "not self" and most role/top bounds settle within the first few hundred largest columns,
    # so later, larger blocks only see the rows that still need them.
    col_edges = [0]
    while col_edges[-1] < C:
        step = min(block_cols, max(first_block_cols, col_edges[-1]))
        col_edges.append(min(C, col_edges[-1] + step))
    stats["blocks"] = n_rb * (len(col_edges) - 1)
    # Sign-aware bound. In the balanced basis the first coordinate (largest singular value) is
    # nearly sign-constant on real heads (the embeddings' common direction), so
    #     a·b = a_1 b_1 + a_rest·b_rest ∈ [min(a_1 b_1) - ‖a_rest‖‖b_rest‖, max(a_1 b_1) + ‖a_rest‖‖b_rest‖]
    # separates the top side from the bottom side, which Cauchy–Schwarz (|a·b| <= ‖a‖‖b‖) can't.
    # Both bounds are used; ``slack`` covers the basis error and fp64 rounding of the bounds.
    a1, ar = Ab[row_order, 0], torch.linalg.norm(Ab[row_order, 1:], dim=1)
    b1, br = Bb[col_order, 0], torch.linalg.norm(Bb[col_order, 1:], dim=1)
    slack = eps_T + 1e-12 * alpha_max * beta_max
    cblk = [(float(b1[c0:c1].min()), float(b1[c0:c1].max()), float(br[c0:c1].max()),
             float(beta_s[c0:c1].max())) for c0, c1 in zip(col_edges[:-1], col_edges[1:])]

    def bounds(x1, xr, lo, hi, rho, cs):
        """Upper / lower bounds of x·y for x = (x1, rest ‖xr‖) against y_1 ∈ [lo, hi], ‖y_rest‖ <= rho."""
        p1, p2 = x1 * lo, x1 * hi
        ub = torch.minimum(torch.maximum(p1, p2) + xr * rho, cs)
        lb = torch.maximum(torch.minimum(p1, p2) - xr * rho, -cs)
        return ub, lb

    for rb in range(n_rb):
        r0 = rb * block_rows
        r1 = min(R, r0 + block_rows)
        for (c0, c1), (lo_b, hi_b, rho_b, beta_blk) in zip(zip(col_edges[:-1], col_edges[1:]), cblk):
            # An entry matters if it could reach an upper threshold (top-n, row/col maxima), a
            # lower one (bottom-n, row/col minima), or -- for an undecided self row -- its diagonal.
            th_hi = min(top.threshold, thr["rmax"], thr["cmax"]) - slack
            th_lo = max(bot.threshold, thr["rmin"], thr["cmin"]) + slack
            ub, lb = bounds(a1[r0:r1], ar[r0:r1], lo_b, hi_b, rho_b, alpha_s[r0:r1] * beta_blk)
            need = (ub >= th_hi) | (lb <= th_lo)
            if square:
                need |= undecided[r0:r1] & (ub >= diag[r0:r1] - slack)
            ridx = torch.nonzero(need).squeeze(1)
            rows_n = int(ridx.numel())
            if rows_n == 0:
                continue
            # Columns: bound each against the box of the selected rows; keep the prefix up to the
            # last column that may matter (columns are in norm order, so that prefix is short).
            x1, xr = a1[r0:r1][ridx], ar[r0:r1][ridx]
            alpha_sel = float(alpha_s[r0:r1][ridx].max())
            ubj, lbj = bounds(b1[c0:c1], br[c0:c1], float(x1.min()), float(x1.max()),
                              float(xr.max()), alpha_sel * beta_s[c0:c1])
            needc = (ubj >= th_hi) | (lbj <= th_lo)
            if square:
                und = undecided[r0:r1][ridx]
                if bool(und.any()):
                    needc |= ubj >= float(diag[r0:r1][ridx][und].min()) - slack
            nzc = torch.nonzero(needc)
            q = int(nzc[-1]) + 1 if nzc.numel() else 0
            if q == 0:
                continue
            ridx = ridx + r0
            if int(ridx[-1]) - r0 == rows_n - 1:  # a prefix: no gather needed
                lhs = As[r0 : r0 + rows_n]
            else:
                lhs = As[ridx]
            stats["blocks_computed"] += 1
            stats["entries_screened"] += rows_n * q
            S = torch.mm(lhs, Bs_T[:, c0 : c0 + q])  # [rows_n, q] screened values
            # Every screened entry of the block is within this of its exact value.
            marg = c_s * alpha_sel * float(beta_s[c0 : c0 + q].max()) + eps_abs
            _process_block(S, ridx, c0, q, marg, ctx)
        # Role thresholds: k-th largest lower bound of the row/col maxima (and mirror images).
        thr["rmax"] = max(thr["rmax"], _kth(row_hi - row_marg, k_r, True))
        thr["rmin"] = min(thr["rmin"], _kth(row_lo + row_marg, k_r, False))
        thr["cmax"] = max(thr["cmax"], _kth(col_hi - col_marg, k_c, True))
        thr["cmin"] = min(thr["cmin"], _kth(col_lo + col_marg, k_c, False))
    t_screen = time.perf_counter()
    stats["thresholds"] = dict(top=top.threshold, bot=bot.threshold, **thr)

    res = _finish(A64, B64, R, C, n, k_r, k_c, top, bot, row_hi, row_lo, col_hi, col_lo,
                  row_marg, col_marg, thr, row_order, col_order, square,
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
    row_marg: Tensor
    diag: Optional[Tensor] = None  # square only: exact M_ii per sorted row
    diag_col: Optional[Tensor] = None  # sorted column position of each sorted row's diagonal
    off_hi: Optional[Tensor] = None  # max screened off-diagonal value per sorted row
    undecided: Optional[Tensor] = None  # rows not yet proven "not self"


def _process_block(S: Tensor, ridx: Tensor, c0: int, q: int, marg: float, ctx: _Ctx) -> None:
    """Fold one screened block (sorted rows ``ridx`` × sorted columns ``c0:c0+q``) into the state."""
    dev = S.device
    rmax = S.amax(1).double()
    rmin = S.amin(1).double()
    ctx.row_hi[ridx] = torch.maximum(ctx.row_hi[ridx], rmax)
    ctx.row_lo[ridx] = torch.minimum(ctx.row_lo[ridx], rmin)

    # Column extremes only matter for entries that could reach a column-role threshold: an
    # entry below it now stays below the final (higher) threshold.
    hi_need = rmax >= ctx.thr["cmax"] - marg
    lo_need = rmin <= ctx.thr["cmin"] + marg
    cs = slice(c0, c0 + q)
    if bool(hi_need.all()):
        torch.maximum(ctx.col_hi[cs], S.amax(0).double(), out=ctx.col_hi[cs])
    elif bool(hi_need.any()):
        torch.maximum(ctx.col_hi[cs], S[hi_need].amax(0).double(), out=ctx.col_hi[cs])
    if bool(lo_need.all()):
        torch.minimum(ctx.col_lo[cs], S.amin(0).double(), out=ctx.col_lo[cs])
    elif bool(lo_need.any()):
        torch.minimum(ctx.col_lo[cs], S[lo_need].amin(0).double(), out=ctx.col_lo[cs])

    # Top / bottom entries.
    for pool, ext, sign in ((ctx.top, rmax, 1.0), (ctx.bot, rmin, -1.0)):
        t = pool.threshold
        if pool.vals.numel() < pool.n:
            # No threshold yet: the exact values of this block's best screened entries give one
            # (any n exact entries bound the n-th value). They are not added here: the filter
            # below catches every entry of the block that reaches the threshold, seeds included.
            m = min(pool.n, S.numel())
            flat = torch.topk(S.reshape(-1).float() * sign, m).indices
            _, _, seed = ctx.rescore(ridx[flat // q], c0 + flat % q)
            known = torch.cat([pool.vals, seed]) * sign
            if known.numel() >= pool.n:
                t = sign * float(torch.topk(known, pool.n).values[-1])
        rows = torch.nonzero(ext * sign >= t * sign - marg).squeeze(1)
        if rows.numel() == 0:
            continue
        sub = S[rows].float()
        hit = torch.nonzero(sub * sign >= t * sign - marg)
        if hit.numel():
            pool.add(*ctx.rescore(ridx[rows[hit[:, 0]]], c0 + hit[:, 1]))

    if ctx.square:
        # Off-diagonal row maximum: rows whose diagonal falls in this block need it removed.
        dc = ctx.diag_col[ridx] - c0
        inb = torch.nonzero((dc >= 0) & (dc < q)).squeeze(1)
        off = rmax.clone()
        if inb.numel():
            sub = S[inb].float()
            sub[torch.arange(inb.numel(), device=dev), dc[inb]] = _NEG_INF
            off[inb] = sub.amax(1).double()
        off_hi = torch.maximum(ctx.off_hi[ridx], off)
        ctx.off_hi[ridx] = off_hi
        # Proven "not self": some off-diagonal entry is certainly above the diagonal.
        ctx.undecided[ridx] &= ~(off_hi - ctx.row_marg[ridx] > ctx.diag[ridx])


def _exact_rows(A64: Tensor, B64: Tensor, rows: Tensor, chunk: int = 256):
    """Exact (max, min) of the given rows of ``A B^T`` in float64."""
    mx, mn = [], []
    for s in range(0, rows.numel(), chunk):
        blk = A64[rows[s : s + chunk]] @ B64.T
        mx.append(blk.amax(1))
        mn.append(blk.amin(1))
    z = torch.empty(0, dtype=torch.float64, device=A64.device)
    return (torch.cat(mx) if mx else z), (torch.cat(mn) if mn else z)


def _role_list(A64, B64, cand_pos, order, k, largest):
    """Exact top-k (by max) or bottom-k (by min) among candidate sorted positions."""
    idx = order[cand_pos]
    mx, mn = _exact_rows(A64, B64, idx)
    vals = mx if largest else mn
    perm = _order_index(vals, idx, descending=largest)[:k]
    return idx[perm], vals[perm]


def _finish(A64, B64, R, C, n, k_r, k_c, top, bot, row_hi, row_lo, col_hi, col_lo,
            row_marg, col_marg, thr, row_order, col_order, square, self_state, dev) -> PairResult:
    # Final role thresholds from the final bounds (all lower/upper bounds of the k-th value).
    t_rmax = max(thr["rmax"], _kth(row_hi - row_marg, k_r, True))
    t_rmin = min(thr["rmin"], _kth(row_lo + row_marg, k_r, False))
    t_cmax = max(thr["cmax"], _kth(col_hi - col_marg, k_c, True))
    t_cmin = min(thr["cmin"], _kth(col_lo + col_marg, k_c, False))
    # A true top-k row has max >= t_rmax; skipped entries are all below it, so its max was
    # screened and row_hi + margin >= t_rmax.
    cr_hi = torch.nonzero(row_hi + row_marg >= t_rmax).squeeze(1)
    cr_lo = torch.nonzero(row_lo - row_marg <= t_rmin).squeeze(1)
    cc_hi = torch.nonzero(col_hi + col_marg >= t_cmax).squeeze(1)
    cc_lo = torch.nonzero(col_lo - col_marg <= t_cmin).squeeze(1)
    rt_i, rt_v = _role_list(A64, B64, cr_hi, row_order, k_r, True)
    rb_i, rb_v = _role_list(A64, B64, cr_lo, row_order, k_r, False)
    ct_i, ct_v = _role_list(B64, A64, cc_hi, col_order, k_c, True)
    cb_i, cb_v = _role_list(B64, A64, cc_lo, col_order, k_c, False)

    self_frac = None
    stats = dict(role_candidates=int(cr_hi.numel() + cr_lo.numel() + cc_hi.numel() + cc_lo.numel()))
    if square:
        diag, off_hi, undecided = self_state
        # Undecided rows: self unless an off-diagonal screened value could reach the diagonal.
        ambiguous = undecided & (off_hi + row_marg >= diag)
        amb = torch.nonzero(ambiguous).squeeze(1)
        n_self = int((undecided & ~ambiguous).sum())
        if amb.numel():
            idx = row_order[amb]
            for s in range(0, idx.numel(), 256):
                blk = A64[idx[s : s + 256]] @ B64.T
                dg = blk.gather(1, idx[s : s + 256, None]).squeeze(1)
                n_self += int((dg >= blk.amax(1)).sum())
        self_frac = n_self / R if R else 0.0
        stats["self_ambiguous_rows"] = int(amb.numel())

    return PairResult(
        top_rows=top.rows, top_cols=top.cols, top_vals=top.vals,
        bot_rows=bot.rows, bot_cols=bot.cols, bot_vals=bot.vals,
        row_top_idx=rt_i, row_top_vals=rt_v, row_bot_idx=rb_i, row_bot_vals=rb_v,
        col_top_idx=ct_i, col_top_vals=ct_v, col_bot_idx=cb_i, col_bot_vals=cb_v,
        self_top1_frac=self_frac, stats=stats,
    )
