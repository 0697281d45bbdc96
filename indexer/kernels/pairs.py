"""Exact top-N entries of a factored V × V matrix ``M = A @ B.T`` without materialising it.

Per attention head the indexer needs, for ``QK = (W_E W_Q)(W_E W_K)ᵀ`` and
``OV = (W_E W_V)(W_O W_U)``, the global top-N and bottom-N entries, the tokens with the largest
row / column maxima (and smallest minima), and how often a row's largest entry is on the
diagonal. ``M`` is never built: V = 50257 would be 10 GB.

Exactness contract (docs/DESIGN.md §3): every result is identical to the dense float64 computation
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
   are screened in bfloat16 (fp32 accumulation), the needed cells in groups of 8, each against
   the rows that need one of its cells; every screened value of a block is within a proven
   margin of its exact value (``_ScreenMargin``: the inputs' actual rounding residuals and the
   block's largest value). Undecided self rows additionally need the cells whose bound reaches
   their diagonal: the best cells first, then the rest for the rows still undecided (a row is
   decided when its best screened off-diagonal value, less the margin, or else that entry's
   fp64 value, beats the diagonal).
4. *Rescore.* Entries whose screened value could reach a threshold are recomputed in float64
   from the original factors. Rows / columns whose maximum could reach a role threshold are
   recomputed in full as the screen computes its blocks (bfloat16, each row's own proven
   margin), rows whose self status is ambiguous in full in fp32 (proven fp32 margin), and both
   in float64 on the few entries that cannot be separated from the extreme / the diagonal.

Every threshold is a *lower bound* of the quantity it guards (the n-th largest entry, the k-th
largest row maximum, ...) built from exactly computed or provably bounded values, and thresholds
only rise, so anything skipped at any time is provably outside the result.
"""
from __future__ import annotations

import math
import multiprocessing.context
import os
import sys
import threading
import time
import types
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..profile import add_flops, phase
from . import compiled

__all__ = ["CircuitProcesses", "PairResult", "submit_top_pairs", "top_pairs"]

_NEG_INF = -math.inf
_POS_INF = math.inf

# Row gathers (of a screened block, of the factors) and the vocabulary-sized gathers of the
# layout are written ``x.index_select(0, idx)`` rather than ``x[idx]``: the same values, and on
# the CPU several times faster (rows of a screened block: 9x; the factors' rows: 6x), in loops
# that run thousands of times per circuit (docs/PAIRS.md "Speed"). The small 1-D bookkeeping
# gathers stay ``x[idx]`` (~2 µs a call more, next to a block's ~1 ms).


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


_U32, _U64 = 2.0**-24, 2.0**-53


def _gamma(m: int, u: float) -> float:
    return m * u / (1 - m * u)


def _norms(X: Tensor) -> Tensor:
    """Upper bounds of the row norms of X [n, d], as float64. Float64 rows: their norms (within
    2^-40, relative, of exact; the margins round up by that much). Float32 rows: the float32
    norm rounded up by ``(d + 2) u`` (u = 2^-24), which covers the rounding of d squares, their sum
    in any order (positive terms: relative error <= γ_d) and the square root, plus 2^-60 for
    squares below float32's range: 9x faster than converting the rows to float64 first."""
    if X.dtype == torch.float64:
        return torch.linalg.vector_norm(X, dim=1)
    return torch.linalg.vector_norm(X, dim=1).double() * (1 + (X.shape[1] + 2) * _U32) + 2.0**-60


def _plain_basis(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, float, bool]:
    """The given factors rounded to float32 (``c_T = 0``: only ``_ROUND32`` applies)."""
    return A.float(), B.float(), 0.0, False


# |a'·b' - p·q| <= _ROUND32 ‖a'‖‖b'‖ when a' = fl32(p), b' = fl32(q) (p, q float64 vectors):
# with a' = p + ρ, ‖ρ‖ <= u‖p‖ <= u'‖a'‖ (u' = u/(1-u), u = 2^-24) and b' = q + σ alike,
# |ρ·q + p·σ + ρ·σ| <= (2u'/(1-u) + u'²)‖a'‖‖b'‖. Rounded up a little for its own evaluation.
_ROUND32 = (2 * (_U32 / (1 - _U32)) / (1 - _U32) + (_U32 / (1 - _U32)) ** 2) * (1 + 2.0**-20)


def _balanced_basis(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, float, bool]:
    """Return float32 ``A' = fl32(A T)``, ``B' = fl32(B S)`` (products in float64) with
    ``T S^T ≈ I``, a bound ``c_T`` such that ``|p_i·q_j - a_i·b_j| <= c_T ‖a_i‖‖b_j‖`` for the
    float64 products ``p = fl(aT)``, ``q = fl(bS)``, and whether the SVD basis was used (else
    the plain factors). Rounding p and q to float32 adds at most ``_ROUND32 ‖a'_i‖‖b'_j‖``.

    Proof of the bound: with ``E = T S^T - I`` and ``δa = fl(aT) - aT``,
    ``p·q - a·b = a E b^T + δa (bS)^T + (aT) δb^T + δa δb^T``. The first term is at most
    ``‖a‖‖b‖‖E‖_F``. Each component of ``fl(aT)`` is a d-term dot product, so
    ``|δa| <= γ_d |a||T|`` and ``‖δa‖ <= γ_d ‖a‖‖T‖_F``; likewise ``‖δb‖ <= γ_d ‖b‖‖S‖_F``, and
    ``‖bS‖ <= ‖b‖‖S‖_F``. Summing: ``c_T = ‖E‖_F + (2γ_d + γ_d²)‖T‖_F‖S‖_F``; ``‖E‖_F`` itself is
    evaluated in fp64 with error below ``γ_{d+1}‖T‖_F‖S‖_F + u``, which we add.

    Why float32 afterwards: every use of ``A'`` and ``B'`` is a bound with a margin (the bfloat16
    screen, the float32 full rows, the cell bounds), reported values come from the float64
    originals, and float32 halves the memory every pass over them reads (docs/PAIRS.md "Speed").
    """
    d = A.shape[1]
    eye = torch.eye(d, dtype=torch.float64, device=A.device)
    if min(A.shape[0], B.shape[0]) <= d:
        return _plain_basis(A, B)
    # Any invertible R_a, R_b give T S^T = I exactly in real arithmetic; Cholesky factors of the
    # Gram matrices (A = Q_a R_a with orthonormal Q_a) are cheap, and T S^T - I is measured below,
    # so the Gram matrices only choose the basis: float32 ones serve.
    La, info_a = torch.linalg.cholesky_ex(_gram32(A))
    Lb, info_b = torch.linalg.cholesky_ex(_gram32(B))
    if int(info_a) or int(info_b):
        return _plain_basis(A, B)
    Ra, Rb = La.T, Lb.T
    diag = torch.cat([Ra.diagonal().abs(), Rb.diagonal().abs()])
    if bool(diag.min() <= 1e-6 * diag.max()):  # (near) rank-deficient: keep the given basis
        return _plain_basis(A, B)
    U, sig, Wh = torch.linalg.svd(Ra @ Rb.T)
    root = sig.sqrt()
    T = torch.linalg.solve_triangular(Ra, U * root, upper=True)
    S = torch.linalg.solve_triangular(Rb, Wh.T * root, upper=True)
    E = torch.linalg.norm(T @ S.T - eye)
    tf, sf = float(torch.linalg.norm(T)), float(torch.linalg.norm(S))
    c_T = float(E) + (2 * _gamma(d, _U64) + _gamma(d, _U64) ** 2 + _gamma(d + 1, _U64)) * tf * sf + _U64
    if c_T > 1e-6:  # ill-conditioned transform: not worth it
        return _plain_basis(A, B)
    return _times32(A, T), _times32(B, S), c_T, True


def _gram32(X: Tensor) -> Tensor:
    """``XᵀX`` from a float32 copy, as float64 (it only has to be symmetric positive definite)."""
    X32 = X.float()
    return (X32.T @ X32).double()


def _times32(X: Tensor, T: Tensor) -> Tensor:
    """``fl32(X @ T)`` for a tall X [n, d] and a small T [d, d], the product in float64, the result
    row-major float32. Computed as ``(Tᵀ Xᵀ)ᵀ``: the same float64 dot products (d terms each, so
    ``_balanced_basis``'s bound holds whatever the order), and the BLAS runs the wide shape about
    twice as fast."""
    return (T.T @ X.T).float().T.contiguous()


def _screen_margin(d: int, dtype: torch.dtype) -> tuple[float, float]:
    """``(c, eps_abs)`` with ``|S_ij - a'_i·b'_j| <= c ‖a'_i‖‖b'_j‖ + eps_abs`` for a product
    ``S = fl(fl(A') fl(B')^T)`` in ``dtype`` with float32 accumulation, from the norms alone.
    The fp32 full rows of phase 3 use it; the screened blocks use the tighter ``_ScreenMargin``.

    Proof (standard floating-point model, any summation order): rounding inputs to ``dtype``
    gives ``x̂ = x(1+δ)``, ``|δ| <= u_in`` (plus an absolute error below 2^-126 for subnormals that
    may be flushed). Products of two bf16 numbers are exact in fp32 (8+8 <= 24 significand bits);
    a d-term fp32 sum has error at most ``γ_d Σ|x̂_k ŷ_k|`` whatever the order or blocking
    (each term passes through at most d additions), ``γ_d = d u32 / (1 - d u32)``. The result is
    then rounded once to ``dtype`` (relative ``u_out``). With ``Σ|x_k y_k| <= ‖x‖‖y‖``:
    ``|S - x·y| <= [(1+u_in)^2 (1+γ_d)(1+u_out) - 1] ‖x‖‖y‖ + eps_abs``. We double the result for
    headroom against FTZ / fused-multiply-add variations.
    """
    u_in = {torch.bfloat16: 2.0**-8, torch.float32: _U32}[dtype]
    u_out = u_in
    gam = _gamma(d, _U32)
    c = (1 + u_in) ** 2 * (1 + gam) * (1 + u_out) - 1
    eps_abs = 4 * (d + 2) * 2.0**-126
    return 2 * c, 2 * eps_abs


class _ScreenMargin:
    """Proven error of a screened block, from the inputs' actual rounding residuals and the
    block's own largest value: ``|S_ij - a'_i·b'_j| <= margin`` for every entry of the block.

    Write ``â = fl(a')``, ``r_a = a' - â`` (computed exactly: ``â`` is ``a'`` rounded, so the
    float32 difference is exact by Sterbenz's lemma), likewise ``b̂``, ``r_b``. Then
    ``a'·b' - â·b̂ = â·r_b + r_a·b̂ + r_a·r_b``, at most ``‖â‖‖r_b‖ + ‖r_a‖‖b̂‖ + ‖r_a‖‖r_b‖``
    (Cauchy–Schwarz). The GEMM sums the d exact products ``â_k b̂_k`` in float32 in any order,
    error at most ``γ_d ‖â‖‖b̂‖`` (``γ_d = d u32 / (1 - d u32)``), giving ``s``; the output is
    rounded to the screen dtype once: ``|S - s| <= ε |s| <= ε/(1-ε) |S|`` with ``ε`` the dtype's
    machine epsilon (twice its unit roundoff, so truncation is covered too). Subnormal inputs or
    outputs a GEMM may flush add at most ``2^-120 d (1 + ‖â‖)(1 + ‖b̂‖)``. With each norm the
    block's largest, the sum bounds every entry; it is rounded up by a relative 2^-40 for the
    fp64 evaluation of the norms and of the sum.

    Why: the norm-only bound (``_screen_margin``: ``(1+u)^3 - 1`` for both input roundings
    and the output rounding at the full ``‖a'‖‖b'‖``, doubled) is about 5x this one on real
    heads, whose entries are far below ``‖a'‖‖b'‖``; a wider margin lowers every threshold,
    so more cells are screened and more rows reach the exact phase (docs/PAIRS.md "Speed").
    """

    def __init__(self, X: Tensor, Xs: Tensor):
        """``X`` [n, d] float32 vectors, ``Xs`` their screen-dtype copy: per-vector norms (in
        float64). ``X - Xs`` is exact in float32 too (Sterbenz: ``Xs`` is ``X`` rounded)."""
        Xh = Xs.to(X.dtype)
        self.norm_hat = _norms(Xh)
        self.norm_res = _norms(X - Xh)

    @staticmethod
    def bound(d: int, dtype: torch.dtype, a_hat, a_res, b_hat: float, b_res: float, s_max):
        """The margin from the norms and the largest |value|: floats, or float64 tensors of
        per-row values (``a_hat``, ``a_res``, ``s_max``) for many rows at once."""
        gam = _gamma(d, _U32)
        eps = torch.finfo(dtype).eps
        inputs = a_hat * b_res + a_res * b_hat + a_res * b_res
        tiny = 2.0**-120 * d * (1 + a_hat) * (1 + b_hat)
        return (inputs + gam * a_hat * b_hat + eps / (1 - eps) * s_max + tiny) * (1 + 2.0**-40)


_strict_lock = threading.Lock()
_strict_users = 0
_strict_saved: Optional[tuple[bool, bool]] = None


@contextmanager
def _strict_matmul(device: torch.device):
    """fp32-accumulating GEMMs on CUDA (no TF32, no reduced-precision bf16 reductions).

    The switches are process-wide and two circuits can run at once (``submit_top_pairs``): they
    are turned off when the first circuit enters and restored when the last one leaves, so that
    one circuit's exit never turns TF32 back on under another's GEMMs."""
    global _strict_users, _strict_saved
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    with _strict_lock:
        if _strict_users == 0:
            _strict_saved = (m.allow_tf32, m.allow_bf16_reduced_precision_reduction)
            m.allow_tf32, m.allow_bf16_reduced_precision_reduction = False, False
        _strict_users += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_users -= 1
            if _strict_users == 0:
                m.allow_tf32, m.allow_bf16_reduced_precision_reduction = _strict_saved


# ----------------------------------------------------------------------------------------------
# entry point


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
    compiled_folds: Optional[bool] = None,
) -> PairResult:
    """Exact top/bottom-``n`` entries, top-``k`` role rows/columns and the self-top-1 fraction of
    ``M = A @ B.T`` (``A``: [rows, d], ``B``: [cols, d]), computed without building ``M``.

    ``block_rows`` is the row cell size, ``block_cols`` the widest block screened at once (and
    the largest column band), ``first_block_cols`` the number of seed columns of each kind and
    ``cell_cols`` the column cell size (capped at ``block_cols``). ``compiled_folds``: fold the
    screened blocks with the compiled kernels (``compiled_folds.py``; CPU, bfloat16 screen) or
    with torch operations; None: compiled where they apply and numba imports. Same results.

    >>> g = torch.Generator().manual_seed(0)
    >>> A, B = torch.randn(2, 1000, 16, dtype=torch.float64, generator=g)
    >>> r = top_pairs(A, B, n=5, k=3)
    >>> M = A @ B.T  # the dense matrix, for comparison (its BLAS sums round differently)
    >>> divmod(int(M.argmax()), 1000) == (int(r.top_rows[0]), int(r.top_cols[0]))
    True
    >>> bool(torch.isclose(r.top_vals[0], M.max(), rtol=1e-12, atol=0.0))
    True
    """
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[1]:
        raise ValueError(f"need A [rows, d] and B [cols, d], got {tuple(A.shape)} and {tuple(B.shape)}")
    if square and A.shape[0] != B.shape[0]:
        raise ValueError(f"square=True needs as many rows as columns, got {A.shape[0]} and {B.shape[0]}")
    if 0 in A.shape or 0 in B.shape:
        raise ValueError(f"need at least one row, one column and d >= 1, "
                         f"got {tuple(A.shape)} and {tuple(B.shape)}")
    if n < 1 or k < 1:
        raise ValueError(f"n and k must be positive, got n={n}, k={k}")
    if basis not in ("svd", "none"):
        raise ValueError(f"basis must be 'svd' or 'none', got {basis!r}")
    dev = torch.device(device)
    # CPU: blocks that stay in cache; GPU: few, large blocks (per-block host syncs dominate).
    gpu = dev.type == "cuda"
    block_rows = block_rows or (8192 if gpu else 512)
    block_cols = block_cols or (65536 if gpu else 8192)
    t_start = time.perf_counter()
    with _strict_matmul(dev):
        with phase("circuit basis and layout"):
            scan = _Screening(A, B, n, k, square=square, device=dev, screen_dtype=screen_dtype,
                              basis=basis, row_cell=block_rows, max_block_cols=block_cols,
                              seed_cols=first_block_cols, cell_cols=min(cell_cols, block_cols),
                              compiled_folds=compiled_folds)
        with phase("screening"):
            scan.screen_seed_columns()
            scan.screen_cells()
        t_screen = time.perf_counter()
        with phase("exact rescoring"):
            res = scan.result()
    res.stats["t_screen_s"] = t_screen - t_start
    res.stats["t_total_s"] = time.perf_counter() - t_start
    return res


CIRCUIT_WORKERS = 2
_BACKGROUND: Optional[ThreadPoolExecutor] = None
_BACKGROUND_LOCK = threading.Lock()


def submit_top_pairs(A: Tensor, B: Tensor, n: int = 200, k: int = 50, **options) -> Future:
    """``top_pairs(A, B, n, k, **options)`` on one of ``CIRCUIT_WORKERS`` threads; ``.result()``
    gives its PairResult (or raises its error). Circuits start in the order submitted.

    Why: one circuit's screening is thousands of small tensor operations between short GEMMs,
    and on a 2-core CPU it keeps the second core mostly idle; two circuits at once take about
    1.5x less wall time, and the indexer builds the next head's float64 factors on its own
    thread meanwhile (docs/PAIRS.md "Speed"). The results are the same: a circuit's state is
    its own, and every value it reports is either an exact fp64 dot product or a decision proven
    for any summation order a GEMM may use. Two workers: at most two circuits' working sets are
    alive at once (docs/PAIRS.md "Two circuits at once").
    """
    global _BACKGROUND
    with _BACKGROUND_LOCK:
        if _BACKGROUND is None:
            _BACKGROUND = ThreadPoolExecutor(max_workers=CIRCUIT_WORKERS, thread_name_prefix="zeropass-circuit")
    return _BACKGROUND.submit(top_pairs, A, B, n, k, **options)


class CircuitProcesses:
    """``CIRCUIT_WORKERS`` worker processes for one build's circuits; ``submit`` is
    ``submit_top_pairs``'s (docs/PAIRS.md "Circuits in worker processes").

    Why processes: between its short GEMMs a circuit is ~300 small tensor operations per screened
    block, each of which holds the interpreter lock while torch dispatches it, so two circuit
    threads and the main thread queue for the lock. Two SmolLM2 layer-5 circuit workers as
    processes did the layer's 18 circuits in 15 % less CPU and 1.3x less wall time than as
    threads (docs/BENCHMARKS.md §11, fifth round). The results are the same: ``top_pairs`` runs
    on the same float64 factors, which travel through shared memory (torch's tensor pickling),
    and its profile phases come back with its result.

    The workers are spawned (a fork would copy the parent's OpenMP and BLAS thread pools, which
    do not survive it), run one torch thread each, ignore Ctrl-C (the build's process handles it
    and ``close`` stops them), and die with the process that started them (Linux
    ``PR_SET_PDEATHSIG``): a SIGKILLed build leaves no worker behind.
    """

    def __init__(self, workers: int = CIRCUIT_WORKERS):
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(workers, mp_context=_SpawnWithoutMain(), initializer=_circuit_worker_start,
                                         initargs=(os.getpid(),))

    def submit(self, A: Tensor, B: Tensor, n: int = 200, k: int = 50, **options) -> Future:
        from concurrent.futures.process import BrokenProcessPool

        from ..profile import add_background, profile_running

        done: Future = Future()

        def finish(job: Future) -> None:
            if not done.set_running_or_notify_cancel():  # cancelled by the build (_heads): nobody waits
                return
            try:
                res, phases = job.result()
            except BrokenProcessPool:
                done.set_exception(_worker_lost())
                return
            except BaseException as exc:  # the circuit's own error, raised again where it is waited for
                done.set_exception(exc)
                return
            add_background(phases)
            done.set_result(res)

        try:
            job = self._pool.submit(_circuit_in_worker, A, B, n, k, profile_running(), options)
        except BrokenProcessPool:
            raise _worker_lost() from None
        job.add_done_callback(finish)
        return done

    def close(self, cancel: bool = False) -> None:
        """Stop the workers: after their circuits, or at once with ``cancel`` (an error or Ctrl-C
        in the build: nothing waits for what they would compute)."""
        # ProcessPoolExecutor has no public way to stop a running task before Python 3.14's
        # terminate_workers(); its worker table is read before shutdown empties it.
        workers = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
        if cancel:
            for proc in workers:
                if proc.is_alive():
                    proc.kill()


def _worker_lost() -> Exception:
    from ..errors import ZeropassError

    return ZeropassError("a circuit worker process ended before its circuit did (killed, or out of memory?); "
                         "the layers written so far are kept: run the same command again to resume")


class _WorkerProcess(multiprocessing.context.SpawnProcess):
    """A spawned process that does not import the caller's ``__main__``: spawn runs the main
    script again in every child (under ``__mp_main__``), so a plain script that calls
    ``index_model`` at its top level, without ``if __name__ == "__main__":``, would build the
    model again in each worker. The workers need nothing of it (their code is this module)."""

    def start(self) -> None:
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")  # what spawn's preparation data reads
        try:
            super().start()
        finally:
            sys.modules["__main__"] = main


class _SpawnWithoutMain(multiprocessing.context.SpawnContext):
    Process = _WorkerProcess


def _circuit_worker_start(parent: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        # Keep freed blocks for the next ones instead of returning them to the OS and faulting
        # them in again: a screened block is 8-24 MB, above glibc's mmap threshold, so each one
        # was a fresh mapping (memory: a worker keeps its largest working set, not more).
        libc.mallopt(-3, 256 * 2**20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1024 * 2**20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not Linux / glibc: Ctrl-C and close() still stop the workers
        pass
    if os.getppid() != parent:  # the build died while this worker was starting: the signal came too early
        os._exit(0)
    torch.set_num_threads(1)


def _circuit_in_worker(A: Tensor, B: Tensor, n: int, k: int, profiled: bool, options: dict):
    """In a worker process: ``top_pairs``, and its profile phases when the build is profiled."""
    from ..profile import phases_of, profiling

    if not profiled:
        return top_pairs(A, B, n, k, **options), {}
    with profiling(True) as prof:
        res = top_pairs(A, B, n, k, **options)
    return res, phases_of(prof)


# ----------------------------------------------------------------------------------------------
# layout and bounds


def _layout(norm: Tensor, rest: Tensor, first: Tensor, band: int, cell: int,
            seed_n: int) -> tuple[Tensor, int, list[int]]:
    """Order of the rows (or columns) for screening: ``(order, n_seed, edges)``.

    ``order`` starts with the seed vectors (the ``seed_n`` largest ``norm``, largest and smallest
    ``first`` coordinate, without repeats; none unless there are more than ``3 seed_n``), then
    the rest in bands by decreasing ``rest`` norm (band sizes 4·cell, 8·cell, ... up to ``band``:
    the largest rest norms matter most), each band sorted by ``first`` and cut into cells of
    ``cell``. ``edges`` are the cell boundaries in the order, the first being ``n_seed``.

    Why: in the balanced basis the first coordinate (largest singular value) is nearly
    sign-constant on real heads (the embeddings' common direction), so the bound of
    ``_dot_bounds`` separates the top side from the bottom side, which Cauchy–Schwarz can't. It is
    evaluated per (row, column cell); a cell has a narrow range of the first coordinate and of
    the rest norm, so the cell bound is close to the per-entry bound. Rows are laid out the same
    way (narrow a_1 and ‖a‖ per row cell), so the rows of a cell need nearly the same column
    cells and the (needed rows) × (needed cells) product screened is close to what is needed.
    """
    N = norm.numel()
    is_seed = torch.zeros(N, dtype=torch.bool, device=norm.device)
    if seed_n > 0 and N > 3 * seed_n:
        cand = torch.cat([torch.topk(norm, seed_n).indices, torch.topk(first, seed_n).indices,
                          torch.topk(-first, seed_n).indices])
        is_seed[cand] = True
        seed = torch.nonzero(is_seed).squeeze(1)
        seed = seed.index_select(0, torch.argsort(norm.index_select(0, seed), descending=True, stable=True))
    else:
        seed = torch.zeros(0, dtype=torch.long, device=norm.device)
    by_rest = torch.argsort(rest, descending=True, stable=True)
    rest_idx = by_rest.index_select(0, torch.nonzero(~is_seed.index_select(0, by_rest)).squeeze(1))
    parts, edges = [seed], [seed.numel()]
    b0, size = 0, 4 * cell
    while b0 < rest_idx.numel():
        idx = rest_idx[b0 : b0 + size]
        b0 += size
        size = min(band, 2 * size)
        idx = idx.index_select(0, torch.argsort(first.index_select(0, idx), stable=True))
        parts.append(idx)
        base = edges[-1]
        for c0 in range(cell, idx.numel(), cell):
            edges.append(base + c0)
        edges.append(base + idx.numel())
    return torch.cat(parts), seed.numel(), edges


def _dot_bounds(x1, xr, xn, lo, hi, rho, bm) -> tuple[Tensor, Tensor]:
    """Upper / lower bounds of x·y for rows x = (x1, rest norm xr, norm xn) (column vectors)
    against cells with y_1 ∈ [lo, hi], ‖y_rest‖ <= rho, ‖y‖ <= bm (row vectors).

    With x = (x_1, x_rest): ``x·y = x_1 y_1 + x_rest·y_rest``, and ``x_1 y_1`` is between the
    products at the ends of [lo, hi] (linear in y_1), ``|x_rest·y_rest| <= ‖x_rest‖ rho``; also
    ``|x·y| <= ‖x‖ bm`` (Cauchy–Schwarz). Both bounds hold, so their intersection does.
    """
    p1, p2 = x1 * lo, x1 * hi
    cs = xn * bm
    xrr = xr * rho
    ub = torch.minimum(torch.maximum(p1, p2) + xrr, cs)
    lb = torch.maximum(torch.minimum(p1, p2) - xrr, -cs)
    return ub, lb


def _kth(x: Tensor, k: int, largest: bool) -> float:
    """k-th largest (smallest) value of ``x`` (``k <= x.numel()``)."""
    vals = torch.topk(x, k, largest=largest, sorted=False).values
    return float(vals.min() if largest else vals.max())


class _Extremes:
    """Bounds of each laid-out row's (or column's) maximum and minimum over its screened
    entries, and the role thresholds derived from them.

    Folding a block with margin ``marg`` (every screened value within ``marg`` of its exact
    value) keeps ``max_upper`` above and ``max_lower`` below the largest exact value among the
    row's screened entries; ``min_lower`` / ``min_upper`` mirror them. Each block uses its own margin,
    which is tight because a block's rows / columns have similar norms.
    """

    def __init__(self, size: int, k: int, device):
        full = lambda v: torch.full((size,), v, dtype=torch.float64, device=device)  # noqa: E731
        self.k = k  # length of the role lists (at most ``size``)
        self.max_upper, self.max_lower = full(_NEG_INF), full(_NEG_INF)
        self.min_lower, self.min_upper = full(_POS_INF), full(_POS_INF)
        self.t_max, self.t_min = _NEG_INF, _POS_INF  # role thresholds

    def fold_max(self, idx: Tensor, v: Tensor, marg: float) -> None:
        self.max_upper[idx] = torch.maximum(self.max_upper[idx], v + marg)
        self.max_lower[idx] = torch.maximum(self.max_lower[idx], v - marg)

    def fold_min(self, idx: Tensor, v: Tensor, marg: float) -> None:
        self.min_lower[idx] = torch.minimum(self.min_lower[idx], v - marg)
        self.min_upper[idx] = torch.minimum(self.min_upper[idx], v + marg)

    def raise_thresholds(self) -> None:
        """``t_max`` becomes the k-th largest ``max_lower`` if that is higher (``t_min`` mirrors it).

        Each ``max_lower`` is at most an exact entry of its row, hence at most the row's true
        maximum; k rows whose true maxima are all >= the k-th largest ``max_lower`` exist, so it
        is a lower bound of the true k-th largest maximum. Taking the max with the previous value
        keeps it one and makes the thresholds only rise."""
        self.t_max = max(self.t_max, _kth(self.max_lower, self.k, True))
        self.t_min = min(self.t_min, _kth(self.min_upper, self.k, False))

    def role_bound(self, largest: bool) -> tuple[Tensor, float, Tensor]:
        """``(bound, threshold, candidates)`` of the top-k by maximum (``largest``) or bottom-k by
        minimum. A true top-k row has max >= ``t_max``; every skipped entry is below the
        threshold, so the row's maximum was screened and ``max_upper >= t_max``: the positions
        with ``max_upper >= t_max`` include every row of the list."""
        if largest:
            return self.max_upper, self.t_max, torch.nonzero(self.max_upper >= self.t_max).squeeze(1)
        return self.min_lower, self.t_min, torch.nonzero(self.min_lower <= self.t_min).squeeze(1)


def _reduce_selected_rows(S: Tensor, keep: Tensor, op) -> Optional[Tensor]:
    """``op(S[keep], 0)`` as float64, without the copy when every row is kept; None if none."""
    if bool(keep.all()):
        return op(S, 0).double()
    if bool(keep.any()):
        return op(S.index_select(0, torch.nonzero(keep).squeeze(1)), 0).double()
    return None


# ----------------------------------------------------------------------------------------------
# screening


class _Screening:
    """The screening of one matrix ``M = A Bᵀ``: its layout, margins and running state, with one
    method per phase (``screen_seed_columns``, ``screen_cells``, ``result``).

    Positions ("laid-out" rows / columns) index the orders of ``_layout``: ``row_order[p]`` is the
    original row at row position p. Every entry is covered: the seed columns against every row
    (phase 1), then each (row cell, column cell) pair, screened or skipped (phase 2). Product
    blocks (needed rows × needed cells) can overlap, so an entry may be screened twice; the
    pools keep one copy.

    Every threshold (the pools' n-th values, the role thresholds of ``rows`` / ``cols``) is a
    bound of the quantity it guards built from exact or provably bounded values, and thresholds
    only move inward, so anything skipped at any time is provably outside the result.
    """

    def __init__(self, A: Tensor, B: Tensor, n: int, k: int, *, square: bool, device: torch.device,
                 screen_dtype: torch.dtype, basis: str, row_cell: int, max_block_cols: int,
                 seed_cols: int, cell_cols: int, compiled_folds: Optional[bool] = None):
        dev = self.dev = device
        self.square = square
        self.max_block_cols = max_block_cols
        self.A64 = A64 = A.detach().to(dev, torch.float64)  # originals: exact values
        self.B64 = B64 = B.detach().to(dev, torch.float64)
        R, C, d = A64.shape[0], B64.shape[0], A64.shape[1]
        self.R, self.C = R, C

        # Basis (float32) and margins; norms are float64 upper bounds (_norms).
        Ab, Bb, c_T, balanced = (_balanced_basis if basis == "svd" else _plain_basis)(A64, B64)
        alpha = _norms(Ab)  # [R] ‖a'_i‖
        beta = _norms(Bb)  # [C]
        self.Ab, self.Bb, self.alpha, self.beta = Ab, Bb, alpha, beta
        # |a'_i·b'_j - a_i·b_j| <= c_T ‖a_i‖‖b_j‖ + _ROUND32 ‖a'_i‖‖b'_j‖ for every entry: the
        # first term is at most basis_err (with what float32 underflow may flush, entries below
        # 2^-126); the second is carried as a relative term by every margin (c_round).
        a_max, b_max = float(_norms(A64).max()), float(_norms(B64).max())
        self.basis_err = c_T * a_max * b_max + 2.0**-120 * d * (1 + a_max) * (1 + b_max)
        self.c_round = _ROUND32
        # Screen margin of a block: _ScreenMargin.bound of its rows' and columns' largest norms
        # and its largest |value|, plus the basis error (the screen computes a'·b', not a·b).
        self.screen_dtype = screen_dtype
        # Cell bounds are of a'·b' (so they miss M by up to basis_err) and rounded in fp64.
        self.slack = self.basis_err + (self.c_round + 1e-12) * float(alpha.max()) * float(beta.max())

        # Layout.
        a1, b1 = Ab[:, 0].double(), Bb[:, 0].double()
        a_rest, b_rest = _norms(Ab[:, 1:]), _norms(Bb[:, 1:])
        self.row_order, _, self.row_edges = _layout(alpha, a_rest, a1, max_block_cols, row_cell, 0)
        self.col_order, self.n_seed, self.col_edges = _layout(beta, b_rest, b1, max_block_cols,
                                                              cell_cols, seed_cols)
        self.alpha_s = alpha.index_select(0, self.row_order)
        self.a1_s, self.a_rest_s = a1.index_select(0, self.row_order), a_rest.index_select(0, self.row_order)
        Ab_s, Bb_s = Ab.index_select(0, self.row_order), Bb.index_select(0, self.col_order)
        self.As = Ab_s.to(screen_dtype)
        self.Bs = Bb_s.to(screen_dtype)  # [C, d]; blocks use Bs[cols].T
        self.row_marg = _ScreenMargin(Ab_s, self.As)
        self.col_marg = _ScreenMargin(Bb_s, self.Bs)
        del Ab_s, Bb_s
        # Per column cell: range of b_1, largest ‖b_rest‖, largest ‖b‖ (at least one cell: the
        # seeds are never all the columns).
        lens = torch.tensor(self.col_edges, device=dev).diff()
        n_cells = lens.numel()
        def per_cell(x, red):
            return torch.segment_reduce(x.index_select(0, self.col_order)[self.n_seed:], red, lengths=lens)

        self.cell_b1_lo, self.cell_b1_hi = per_cell(b1, "min"), per_cell(b1, "max")
        self.cell_rest_max, self.cell_norm_max = per_cell(b_rest, "max"), per_cell(beta, "max")
        self.cell_start, self.cell_len = torch.tensor(self.col_edges[:-1], device=dev), lens
        self.seed_rows = max(row_cell, 2048)
        self.cells_per_block = max(1, max_block_cols // (4 * cell_cols))

        # Running state.
        n = min(n, R * C)
        self.top = _EntryPool(n, C, True, dev)
        self.bottom = _EntryPool(n, C, False, dev)
        self.rows = _Extremes(R, min(k, R), dev)
        self.cols = _Extremes(C, min(k, C), dev)
        if square:
            # Row p is "self" iff M_ii >= max_j M_ij; it stays undecided until an off-diagonal
            # entry is proven to beat its diagonal.
            self.diag = (A64 * B64).sum(1).index_select(0, self.row_order)  # exact M_ii, per row position
            col_pos = torch.empty(C, dtype=torch.long, device=dev)
            col_pos[self.col_order] = torch.arange(C, device=dev)
            self.diag_col = col_pos.index_select(0, self.row_order)  # column position of each row's diagonal
            self.off_diag_upper = torch.full((R,), _NEG_INF, dtype=torch.float64, device=dev)
            self.undecided = torch.ones(R, dtype=torch.bool, device=dev)
            self.place_in_block = torch.full((C,), -1, dtype=torch.long, device=dev)  # scratch
        self.compiled = _CompiledFolds.choose(self, compiled_folds)
        n_seed_blocks = (R + self.seed_rows - 1) // self.seed_rows if self.n_seed else 0
        n_blocks = (len(self.row_edges) - 1) * n_cells + n_seed_blocks
        self.stats = dict(rows=R, cols=C, d=d, entries_screened=0, blocks=n_blocks, blocks_computed=0,
                          rescored=0, seed_cols=self.n_seed, basis="svd" if balanced else "none")

    # -- phases ----------------------------------------------------------------------------

    def screen_seed_columns(self) -> None:
        """Phase 1: the seed columns against every row, without pruning. They give strong
        thresholds and decide most self rows before any skip decision."""
        if not self.n_seed:
            return
        for r0 in range(0, self.R, self.seed_rows):
            self._screen(r0, min(self.R, r0 + self.seed_rows), None, slice(0, self.n_seed))
        self._raise_role_thresholds()

    def screen_cells(self) -> None:
        """Phase 2: every row cell against the column cells its bound can't rule out."""
        for i, (r0, r1) in enumerate(zip(self.row_edges[:-1], self.row_edges[1:])):
            if i and i % 8 == 0:  # the k-th of thousands of bounds moves slowly: not every cell
                self._raise_role_thresholds()
            self._screen_row_cell(r0, r1)

    def result(self) -> PairResult:
        """Phase 3: exact role lists from full rows / columns, and the self-top-1 fraction."""
        self.stats["thresholds"] = dict(top=self.top.threshold, bot=self.bottom.threshold,
                                        rmax=self.rows.t_max, rmin=self.rows.t_min,
                                        cmax=self.cols.t_max, cmin=self.cols.t_min)
        self._raise_role_thresholds()
        c32, eps32 = _screen_margin(self.A64.shape[1], torch.float32)
        full = _FullRows(self, c32 + self.c_round, eps32)
        lists, n_candidates = [], 0
        for ext, order, by_cols in ((self.rows, self.row_order, False), (self.cols, self.col_order, True)):
            for largest in (True, False):
                bound, t, cand = ext.role_bound(largest)
                n_candidates += int(cand.numel())
                lists.append(full.role_list(cand, bound, t, order, ext.k, largest, by_cols))
        (rt_i, rt_v), (rb_i, rb_v), (ct_i, ct_v), (cb_i, cb_v) = lists
        stats = dict(role_candidates=n_candidates)
        self_frac = None
        if self.square:
            # Undecided rows: self unless an off-diagonal screened value could reach the diagonal.
            ambiguous = self.undecided & (self.off_diag_upper >= self.diag)
            amb = torch.nonzero(ambiguous).squeeze(1)
            n_self = int((self.undecided & ~ambiguous).sum())
            if amb.numel():
                n_self += full.count_self(self.row_order[amb], self.diag[amb])
            self_frac = n_self / self.R
            stats["self_ambiguous_rows"] = int(amb.numel())
        stats.update(self.stats)
        stats["frac_entries_screened"] = stats["entries_screened"] / (self.R * self.C)
        stats["frac_blocks_computed"] = stats["blocks_computed"] / max(1, stats["blocks"])
        return PairResult(
            top_rows=self.top.rows, top_cols=self.top.cols, top_vals=self.top.vals,
            bot_rows=self.bottom.rows, bot_cols=self.bottom.cols, bot_vals=self.bottom.vals,
            row_top_idx=rt_i, row_top_vals=rt_v, row_bot_idx=rb_i, row_bot_vals=rb_v,
            col_top_idx=ct_i, col_top_vals=ct_v, col_bot_idx=cb_i, col_bot_vals=cb_v,
            self_top1_frac=self_frac, stats=stats,
        )

    # -- phase 2, per row cell -------------------------------------------------------------

    def _raise_role_thresholds(self) -> None:
        self.rows.raise_thresholds()
        self.cols.raise_thresholds()

    def _screen_row_cell(self, r0: int, r1: int) -> None:
        """Screen the row positions r0:r1 against the column cells that can matter.

        An entry matters if its upper bound reaches ``th_hi`` (the lowest of the top pool's n-th
        value and the row / column role thresholds: it could enter a top list) or its lower
        bound reaches ``th_lo`` (mirror image), or, for an undecided self row, if its upper bound
        reaches the row's diagonal. The cells are first filtered with the bound of the whole row
        cell's box (cheap), then per row; the block screened is (needed rows) × (needed cells).
        """
        th_hi = min(self.top.threshold, self.rows.t_max, self.cols.t_max) - self.slack
        th_lo = max(self.bottom.threshold, self.rows.t_min, self.cols.t_min) + self.slack
        x1, xr, xn = self.a1_s[r0:r1], self.a_rest_s[r0:r1], self.alpha_s[r0:r1]
        lo, hi, rho, bm = self.cell_b1_lo, self.cell_b1_hi, self.cell_rest_max, self.cell_norm_max
        ub_box, lb_box = _dot_bounds(torch.stack([x1.min(), x1.max()])[:, None], xr.max(), xn.max(),
                                     lo, hi, rho, bm)
        ub_box, lb_box = ub_box.amax(0), lb_box.amin(0)
        cell_needed = (ub_box >= th_hi) | (lb_box <= th_lo)
        self_pending = False
        if self.square:
            pending = self.undecided[r0:r1]
            if bool(pending.any()):
                self_pending = True
                cell_needed |= ub_box >= float(self.diag[r0:r1][pending].min()) - self.slack
        cells = torch.nonzero(cell_needed).squeeze(1)
        if cells.numel() == 0:
            return
        ub, lb = _dot_bounds(x1[:, None], xr[:, None], xn[:, None],
                             *(x.index_select(0, cells) for x in (lo, hi, rho, bm)))
        need = (ub >= th_hi) | (lb <= th_lo)
        self._screen_needed(r0, r1, cells, need)
        if self_pending:
            self._screen_self_cells(r0, r1, cells, ub, need)

    def _screen_needed(self, r0: int, r1: int, cells: Tensor, need: Tensor) -> None:
        """Screen the (row, cell) pairs ``need`` marks (rows r0:r1 × ``cells``).

        The needed cells in groups of ``cells_per_block``, each against the rows that need one of
        its cells, when that screens at most 3/4 of (rows needing any cell) × (every needed cell):
        the rows of a cell need different cells, and on real heads the groups screen about half of
        the whole product. Where nearly every pair is needed (random heads) the whole product is
        one pass of wide blocks instead: groups would only add blocks (3x slower measured)."""
        rows_any = need.any(1)
        if not bool(rows_any.any()):
            return
        sel = torch.nonzero(need.any(0)).squeeze(1)
        widths = self.cell_len[cells[sel]]
        parts = [(sel[g0 : g0 + self.cells_per_block], widths[g0 : g0 + self.cells_per_block])
                 for g0 in range(0, sel.numel(), self.cells_per_block)]
        part_rows = [need[:, part].any(1) for part, _ in parts]
        grouped = sum(int(r.sum()) * int(w.sum()) for r, (_, w) in zip(part_rows, parts))
        if len(parts) > 1 and grouped <= 0.75 * int(rows_any.sum()) * int(widths.sum()):
            for rows, (part, _) in zip(part_rows, parts):
                ridx = torch.nonzero(rows).squeeze(1)
                self._screen(r0, r1, None if ridx.numel() == r1 - r0 else ridx, self._cell_columns(cells[part]))
        else:
            ridx = torch.nonzero(rows_any).squeeze(1)
            self._screen(r0, r1, None if ridx.numel() == r1 - r0 else ridx, self._cell_columns(cells[sel]))

    def _screen_self_cells(self, r0: int, r1: int, cells: Tensor, ub: Tensor, screened: Tensor) -> None:
        """An undecided row also needs every entry whose bound reaches its diagonal, unless it is
        proven "not self" first. ``ub`` [rows, cells] bounds the row cell's entries per candidate
        cell; ``screened`` marks the (row, cell) pairs the threshold block already needed. Screen
        the best 8 cells (largest bound) first, which decide most rows, then all the rest for the
        rows still undecided (mostly true self rows)."""
        need = self.undecided[r0:r1, None] & (ub >= self.diag[r0:r1, None] - self.slack) & ~screened
        for best_only in (True, False):
            rs = torch.nonzero(need.any(1)).squeeze(1)
            if rs.numel() == 0:
                return
            sub = need.index_select(0, rs)
            take = torch.nonzero(sub.any(0)).squeeze(1)
            if best_only:
                prio = torch.where(sub[:, take], ub.index_select(0, rs)[:, take], _NEG_INF).amax(0)
                take = take[torch.topk(prio, min(8, take.numel())).indices].sort().values
            self._screen(r0, r1, rs[sub[:, take].any(1)], self._cell_columns(cells[take]))
            if best_only:
                need[:, take] = False
                need &= self.undecided[r0:r1, None]

    def _cell_columns(self, sel: Tensor):
        """Column positions of the (sorted) cells ``sel``: a slice when they are one run."""
        c_lo, c_hi = int(sel[0]), int(sel[-1])
        if c_hi - c_lo + 1 == sel.numel():
            return slice(self.col_edges[c_lo], self.col_edges[c_hi + 1])
        starts, lens = self.cell_start[sel], self.cell_len[sel]
        # Each column's position: its cell's start plus its offset within the cell.
        shift = torch.repeat_interleave(starts - (torch.cumsum(lens, 0) - lens), lens)
        return shift + torch.arange(shift.numel(), device=self.dev)

    # -- one block ---------------------------------------------------------------------------

    def _screen(self, r0: int, r1: int, ridx: Optional[Tensor], cols) -> None:
        """Screen row positions ``r0 + ridx`` (None: all of r0:r1) × column positions ``cols`` (a
        slice or an index tensor), in blocks of at most ``max_block_cols`` columns (cache-sized:
        the bookkeeping passes over a block are memory-bound)."""
        if ridx is None:
            lhs, rows = self.As[r0:r1], torch.arange(r0, r1, device=self.dev)
            pick = slice(r0, r1)
        else:
            rows = ridx + r0
            lhs = self.As.index_select(0, rows)
            pick = rows
        a_norms = (float(self.row_marg.norm_hat[pick].max()), float(self.row_marg.norm_res[pick].max()))
        if isinstance(cols, slice):
            cidx_all = torch.arange(cols.start, cols.stop, device=self.dev)
        else:
            cidx_all = cols
        for p0 in range(0, cidx_all.numel(), self.max_block_cols):
            cidx = cidx_all[p0 : p0 + self.max_block_cols]
            if isinstance(cols, slice):
                rhs = self.Bs[cols.start + p0 : cols.start + p0 + cidx.numel()]
            else:
                rhs = self.Bs.index_select(0, cidx)
            self._screen_block(lhs, rows, a_norms, rhs, cidx)

    def _screen_block(self, lhs: Tensor, rows: Tensor, a_norms: tuple[float, float], rhs: Tensor,
                      cidx: Tensor) -> None:
        """Multiply one block in the screen dtype and fold it into the state. ``a_norms``: the
        rows' largest ``‖â‖`` and ``‖r_a‖`` (``_ScreenMargin``)."""
        self.stats["blocks_computed"] += 1
        self.stats["entries_screened"] += int(rows.numel()) * int(cidx.numel())
        add_flops("screening", 2.0 * int(rows.numel()) * int(cidx.numel()) * lhs.shape[1], "bf16")
        S = torch.mm(lhs, rhs.T)  # [rows, q] screened values
        if self.compiled is not None:
            self.compiled.fold(self, S, rows, cidx, a_norms)
            return
        # Widened to float32 once (exact: every bfloat16 is a float32), because the passes below
        # (row / column extremes, comparisons) run several times faster on float32 than on
        # bfloat16 on a CPU; the values, hence every decision, are unchanged.
        S = S.float()
        rmax = S.amax(1).double()
        rmin = S.amin(1).double()
        b_norms = (float(self.col_marg.norm_hat.index_select(0, cidx).max()),
                   float(self.col_marg.norm_res.index_select(0, cidx).max()))
        marg = self._block_margin(a_norms, b_norms, max(float(rmax.max()), -float(rmin.min())))
        self._fold_extremes(S, rows, cidx, marg, rmax, rmin)
        self._fold_entries(S, rows, cidx, marg, rmax, rmin)
        if self.square:
            self._fold_self(S, rows, cidx, marg, rmax)  # last: masks S's diagonal in place

    def _block_margin(self, a_norms: tuple[float, float], b_norms: tuple[float, float], s_max: float) -> float:
        """Every screened entry of a block is within this of its exact value: ``_ScreenMargin``
        of its rows' and columns' largest norms and its largest |value| (``s_max``), the float32
        rounding of the basis, and the basis error."""
        return (_ScreenMargin.bound(self.As.shape[1], self.screen_dtype, *a_norms, *b_norms, s_max)
                + self.c_round * sum(a_norms) * sum(b_norms) + self.basis_err)

    def _exact(self, r_pos: Tensor, c_pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Original indices and exact fp64 values of the entries at the given positions."""
        ri, ci = self.row_order.index_select(0, r_pos), self.col_order.index_select(0, c_pos)
        self.stats["rescored"] += int(ri.numel())
        return ri, ci, (self.A64.index_select(0, ri) * self.B64.index_select(0, ci)).sum(1)

    def _fold_extremes(self, S, ridx, cidx, marg, rmax, rmin) -> None:
        self.rows.fold_max(ridx, rmax, marg)
        self.rows.fold_min(ridx, rmin, marg)
        # Column extremes only matter for entries that could reach a column-role threshold: an
        # entry below it now stays below the final (higher) threshold.
        cmax = _reduce_selected_rows(S, rmax >= self.cols.t_max - marg, torch.amax)
        cmin = _reduce_selected_rows(S, rmin <= self.cols.t_min + marg, torch.amin)
        if cmax is not None:
            self.cols.fold_max(cidx, cmax, marg)
        if cmin is not None:
            self.cols.fold_min(cidx, cmin, marg)

    def _fold_entries(self, S, ridx, cidx, marg, rmax, rmin) -> None:
        """Rescore in fp64 the entries whose screened value could reach a pool's threshold."""
        for pool, ext, sign in ((self.top, rmax, 1.0), (self.bottom, rmin, -1.0)):
            cut = self._pool_cut(pool, S, ridx, cidx, sign, marg)
            rows = torch.nonzero(ext * sign >= cut).squeeze(1)
            if rows.numel() == 0:
                continue
            sub = S.index_select(0, rows)
            hit = torch.nonzero(sub * sign >= cut)
            if hit.numel():
                pool.add(*self._exact(ridx[rows[hit[:, 0]]], cidx[hit[:, 1]]))

    def _pool_cut(self, pool: _EntryPool, S: Tensor, ridx: Tensor, cidx: Tensor, sign: float, marg: float) -> float:
        """The cut ``c`` of a block for one pool: an entry whose screened value ``s`` has
        ``s * sign < c`` is below the pool's threshold (top: ``sign`` 1) or above it (bottom: -1)."""
        t = pool.threshold
        if pool.vals.numel() < pool.n:
            # No threshold yet: the exact values of this block's best screened entries give one
            # (any n exact entries bound the n-th value). They are not added here: the filter
            # that follows catches every entry of the block that reaches the threshold, seeds included.
            q = int(cidx.numel())
            m = min(pool.n, S.numel())
            flat = torch.topk(S.float().reshape(-1) * sign, m).indices
            _, _, seed = self._exact(ridx[flat // q], cidx[flat % q])
            known = torch.cat([pool.vals, seed]) * sign
            if known.numel() >= pool.n:
                t = sign * float(torch.topk(known, pool.n).values[-1])
        return t * sign - marg

    def _fold_self(self, S, ridx, cidx, marg, rmax) -> None:
        """Off-diagonal maxima of the undecided rows (decided rows stay decided; ``off_diag_upper``
        is read only for undecided rows). A row is proven "not self" when its best screened
        off-diagonal value minus the margin is above the (exact) diagonal, or, where the margin
        can't tell, when the exact value of that entry is: only those rows are rescored (most rows
        are decided by the screen alone). Overwrites the diagonal entries of ``S``.

        ``rmax`` (the block's row maxima) is the off-diagonal maximum of every row whose diagonal
        is not in the block; only the rows whose diagonal is are reduced again after masking it,
        and the arg-max column is found only for the rows that get rescored (any column holding
        the maximum will do: the rescored entry is one exact off-diagonal entry of the row, which
        is all the proof needs), instead of a max-with-index pass over every undecided row."""
        und = torch.nonzero(self.undecided[ridx]).squeeze(1)
        if und.numel() == 0:
            return
        rows_u = ridx[und]
        self.place_in_block[cidx] = torch.arange(int(cidx.numel()), device=self.dev)
        dc = self.place_in_block[self.diag_col[rows_u]]
        self.place_in_block[cidx] = -1
        offv = rmax[und]
        inb = torch.nonzero(dc >= 0).squeeze(1)
        if inb.numel():
            S[und[inb], dc[inb]] = _NEG_INF
            offv[inb] = S.index_select(0, und[inb]).amax(1).double()
        self.off_diag_upper[rows_u] = torch.maximum(self.off_diag_upper[rows_u], offv + marg)
        dg = self.diag[rows_u]
        # Beaten by the screen alone: an off-diagonal entry is >= its screened value - marg > M_ii.
        self.undecided[rows_u[offv - marg > dg]] = False
        cand = torch.nonzero((offv + marg >= dg) & (offv - marg <= dg)).squeeze(1)
        if cand.numel():
            offj = S.index_select(0, und[cand]).argmax(1)
            _, _, ex = self._exact(rows_u[cand], cidx[offj])
            beaten = cand[ex > dg[cand]]
            self.undecided[rows_u[beaten]] = False


class _CompiledFolds:
    """``_Screening._screen_block``'s folds as two compiled calls a block (``compiled_folds.py``):
    the same decisions on the same values as ``_fold_extremes``, ``_fold_entries`` and
    ``_fold_self``, which stay the path for other devices and screen dtypes. The compiled code
    updates the screen's state tensors in place, through numpy views of them."""

    @staticmethod
    def choose(screen: "_Screening", wanted: Optional[bool]) -> Optional["_CompiledFolds"]:
        """The compiled folds where they apply (CPU, bfloat16 screen) and numba imports, unless
        ``wanted`` is False; ``wanted`` True where they can't apply is an error."""
        applies = screen.dev.type == "cpu" and screen.screen_dtype == torch.bfloat16
        module = compiled("compiled_folds") if applies and wanted is not False else None
        if wanted is False or (wanted is None and module is None):
            return None
        if not applies:
            raise ValueError("compiled_folds=True needs the CPU and a bfloat16 screen")
        if module is None:
            raise ValueError("compiled_folds=True needs numba (pip install 'zeropass[index]')")
        return _CompiledFolds(screen, module)

    def __init__(self, screen: "_Screening", compiled_folds):
        # No reference back to the screen (``fold`` is given it): a cycle would keep each
        # circuit's factors and bases alive until the cyclic garbage collector ran.
        self.values = compiled_folds._key_values()
        self.row_extremes, self.kernel = compiled_folds.row_extremes, compiled_folds.fold
        np_ = lambda t: t.numpy()  # noqa: E731  (views: the kernels write the state in place)
        rows, cols = screen.rows, screen.cols
        self.state = [np_(x) for x in (rows.max_upper, rows.max_lower, rows.min_lower, rows.min_upper,
                                       cols.max_upper, cols.max_lower, cols.min_lower, cols.min_upper)]
        self.col_hat, self.col_res = np_(screen.col_marg.norm_hat), np_(screen.col_marg.norm_res)
        if screen.square:
            self.self_state = [np_(x) for x in (screen.undecided, screen.off_diag_upper, screen.diag,
                                                 screen.diag_col, screen.place_in_block)]
        else:
            none = np.zeros(0, dtype=np.int64)
            self.self_state = [np.zeros(0, dtype=bool), np.zeros(0), np.zeros(0), none, none]

    def fold(self, sc: "_Screening", S: Tensor, rows: Tensor, cidx: Tensor, a_norms: tuple[float, float]) -> None:
        """Fold the bfloat16 block ``S`` of row positions ``rows`` × column positions ``cidx``
        into the state of ``sc``, the screen these folds were made for."""
        S16, row_pos, col_pos = S.view(torch.int16).numpy(), rows.numpy(), cidx.numpy()
        kmax, kmin, rmax, rmin, s_max, b_hat, b_res = self.row_extremes(S16, self.values, col_pos,
                                                                         self.col_hat, self.col_res)
        marg = sc._block_margin(a_norms, (b_hat, b_res), s_max)
        # The pools' cuts, seeded from the block while a pool has no threshold yet (rare).
        top_cut = sc._pool_cut(sc.top, S, rows, cidx, 1.0, marg)
        bot_cut = sc._pool_cut(sc.bottom, S, rows, cidx, -1.0, marg)
        top_i, top_j, bot_i, bot_j, self_i, self_j = self.kernel(
            S16, kmax, kmin, rmax, rmin, self.values, row_pos, col_pos, marg, *self.state,
            sc.cols.t_max, sc.cols.t_min, top_cut, bot_cut, sc.square, *self.self_state)
        for pool, i, j in ((sc.top, top_i, top_j), (sc.bottom, bot_i, bot_j)):
            if i.size:
                pool.add(*sc._exact(rows[torch.from_numpy(i)], cidx[torch.from_numpy(j)]))
        if self_i.size:  # rows the margin could not decide: the exact value of their best entry
            r = rows[torch.from_numpy(self_i)]
            _, _, ex = sc._exact(r, cidx[torch.from_numpy(self_j)])
            sc.undecided[r[ex > sc.diag[r]]] = False


# ----------------------------------------------------------------------------------------------
# full rows (phase 3)


_REACH_GROUP = 256  # columns per group in `_reaching`


def _reaching(T: Tensor, cut: Tensor, largest: bool) -> tuple[Tensor, Tensor]:
    """Rows and columns of the entries of ``T`` [n, C] at or above (``largest``; else at or
    below) their row's ``cut`` [n]: ``torch.nonzero(T >= cut[:, None]).T``, in another order.

    Why: a full row has tens of thousands of entries and a handful reach the cut; comparing all
    of them and listing the hits took longer than the row's GEMM (7.7 ms for 80 SmolLM2 rows
    against 5.0). The extremes of groups of ``_REACH_GROUP`` columns are compared instead, and
    only the groups whose extreme reaches the cut are looked at entry by entry; a group none
    of whose entries reach the cut has an extreme that does not either."""
    n, C = T.shape
    whole = C - C % _REACH_GROUP
    rows, cols = [], []
    if whole:
        g = T[:, :whole].view(n, whole // _REACH_GROUP, _REACH_GROUP)
        ext = g.amax(2) if largest else g.amin(2)
        rg = torch.nonzero(ext >= cut[:, None] if largest else ext <= cut[:, None])  # [m, 2]: row, group
        members = rg[:, 1:2] * _REACH_GROUP + torch.arange(_REACH_GROUP, device=T.device)  # [m, G] columns
        vals = T.reshape(-1).index_select(0, (rg[:, 0:1] * C + members).reshape(-1)).view(members.shape)
        c = cut.index_select(0, rg[:, 0])[:, None]
        hit = torch.nonzero(vals >= c if largest else vals <= c)
        rows.append(rg[hit[:, 0], 0])
        cols.append(members[hit[:, 0], hit[:, 1]])
    if whole < C:
        tail = T[:, whole:]
        hit = torch.nonzero(tail >= cut[:, None] if largest else tail <= cut[:, None])
        rows.append(hit[:, 0])
        cols.append(hit[:, 1] + whole)
    return torch.cat(rows), torch.cat(cols)


class _FullRows:
    """Full rows (or columns, ``by_cols``) of ``M`` for the few candidates the screen leaves,
    and float64 from the original factors on the entries they can't decide.

    The role lists' rows are computed as the screen computes its blocks (``extremes``: the screen
    dtype, each row's own ``_ScreenMargin``). The self counts' rows are fp32 in the balanced
    basis (``count_self``), whose margin ``|fl32(a'·b') - a·b| <= c32 ‖a'‖‖b'‖ + eps32`` is
    ``_screen_margin`` for fp32 plus ``_ROUND32`` (``c32``: the basis vectors are float32
    roundings) and the basis error (``eps32 = eps + basis_err``): a row's diagonal is compared
    with all its entries, and the tighter fp32 margin leaves fewer of them to rescore."""

    CHUNK = 256  # rows per pass

    def __init__(self, screen: "_Screening", c32: float, eps: float):
        self.screen = screen  # its factors, bases, norms, orders and margins
        self.c32, self.eps32 = c32, eps + screen.basis_err

    def extremes(self, pos: Tensor, largest: bool, by_cols: bool) -> Tensor:
        """Exact max (largest) or min of the rows (columns) at the laid-out positions ``pos``.

        The rows in the screen dtype (``_Screening.As`` / ``Bs``), then float64 dot products for
        the entries within twice the row's margin ``m_i`` of the row's screened extreme. ``m_i``
        is ``_ScreenMargin``'s bound with the row's own norms, the largest column norms and the
        row's largest |value|, plus the float32 rounding of the basis and the basis error, as
        for a screened block: every entry T_j of the row is within m_i of M_ij. The true max
        entry is among them: T_j* + m_i >= M_j* >= M_k >= T_k - m_i for the screened arg-max k,
        so T_j* >= max T - 2 m_i (the cut rounded down in float32; the min mirrors it). Against
        float32 rows (the first rounds' way) the GEMM is ~3x cheaper and a few more entries per
        row reach float64 (docs/PAIRS.md "Speed", sixth round)."""
        sc = self.screen
        X, Y = (sc.Bs, sc.As) if by_cols else (sc.As, sc.Bs)
        x_marg, y_marg = (sc.col_marg, sc.row_marg) if by_cols else (sc.row_marg, sc.col_marg)
        x_order, y_order = (sc.col_order, sc.row_order) if by_cols else (sc.row_order, sc.col_order)
        X64, Y64 = (sc.B64, sc.A64) if by_cols else (sc.A64, sc.B64)
        d = X.shape[1]
        b_hat, b_res = float(y_marg.norm_hat.max()), float(y_marg.norm_res.max())
        out = []
        for s in range(0, pos.numel(), self.CHUNK):
            p = pos[s : s + self.CHUNK]
            add_flops("exact rescoring", 2.0 * p.numel() * Y.shape[0] * d, "bf16" if X.dtype == torch.bfloat16 else "fp32")
            T = torch.mm(X.index_select(0, p), Y.T).float()  # widened: exact, and faster to pass over
            hi, lo = T.amax(1), T.amin(1)
            a_hat, a_res = x_marg.norm_hat[p], x_marg.norm_res[p]
            m = (_ScreenMargin.bound(d, sc.screen_dtype, a_hat, a_res, b_hat, b_res,
                                     torch.maximum(hi.abs(), lo.abs()).double())
                 + sc.c_round * (a_hat + a_res) * (b_hat + b_res) + sc.basis_err)
            # rounded outward in float32: the cut keeps every entry the proof needs
            cut = ((hi.double() - 2 * m - 1e-30) if largest else (lo.double() + 2 * m + 1e-30)).float()
            cut = torch.nextafter(cut, torch.full_like(cut, _NEG_INF if largest else _POS_INF))
            row, col = _reaching(T, cut, largest)
            ri, ci = x_order.index_select(0, p.index_select(0, row)), y_order.index_select(0, col)
            ex = (X64.index_select(0, ri) * Y64.index_select(0, ci)).sum(1)
            v = torch.full((p.numel(),), _NEG_INF if largest else _POS_INF, dtype=torch.float64, device=X64.device)
            v.scatter_reduce_(0, row, ex, "amax" if largest else "amin")
            out.append(v)
        return torch.cat(out) if out else torch.empty(0, dtype=torch.float64, device=X.device)

    def role_list(self, cand_pos: Tensor, bound: Tensor, t_floor: float, order: Tensor, k: int,
                  largest: bool, by_cols: bool) -> tuple[Tensor, Tensor]:
        """Exact top-k (by max) or bottom-k (by min) among candidate laid-out positions.

        ``bound[p]`` bounds the screened extreme of candidate p (upper for max) and ``t_floor``
        bounds every skipped entry, so a candidate's true max is <= max(bound, t_floor).
        Candidates are done in decreasing bound order; once k exact maxima are known, the k-th of
        them, t_k, is a lower bound of the true k-th, and a candidate with max(bound, t_floor) <
        t_k can't be in the list (strictly below: not even a tie), nor can any later one."""
        sg = 1.0 if largest else -1.0
        ordp = torch.argsort(bound[cand_pos] * sg, descending=True, stable=True)
        cand_pos = cand_pos[ordp]
        bnd = (bound[cand_pos] * sg).tolist()
        done_i, done_v = [], []
        for s in range(0, cand_pos.numel(), self.CHUNK):
            if done_v:
                vv = torch.cat(done_v) * sg
                if vv.numel() >= k:
                    t_k = float(torch.topk(vv, k).values[-1])
                    if max(bnd[s], t_floor * sg) < t_k:
                        break
            pos = cand_pos[s : s + self.CHUNK]
            done_i.append(order[pos])
            done_v.append(self.extremes(pos, largest, by_cols))
        z = torch.empty(0, dtype=torch.long, device=cand_pos.device)
        idx = torch.cat(done_i) if done_i else z
        vals = torch.cat(done_v) if done_v else z.double()
        perm = _order_index(vals, idx, descending=largest)[:k]
        return idx[perm], vals[perm]

    def count_self(self, idx: Tensor, dg: Tensor) -> int:
        """How many of the rows ``idx`` (original indices, square) have ``M_ii >= max_j M_ij``
        (``dg`` = exact M_ii). Full rows in fp32; an off-diagonal entry can reach the diagonal
        only if its fp32 value is >= M_ii - m_i (``m_i = c32 ‖a'_i‖ max‖b'‖ + eps32``); those
        are recomputed in fp64 and the row is self iff none of them exceeds M_ii."""
        sc = self.screen
        n_self = 0
        bmax = float(sc.beta.max())
        for s in range(0, idx.numel(), self.CHUNK):
            r = idx[s : s + self.CHUNK]
            add_flops("exact rescoring", 2.0 * r.numel() * sc.Bb.shape[0] * sc.Bb.shape[1], "fp32")
            T = torch.mm(sc.Ab.index_select(0, r), sc.Bb.T)
            ar = torch.arange(r.numel(), device=T.device)
            T[ar, r] = _NEG_INF
            m = self.c32 * sc.alpha[r] * bmax + self.eps32
            cut = (dg[s : s + self.CHUNK] - m - 1e-30).float()
            cut = torch.nextafter(cut, torch.full_like(cut, _NEG_INF))
            row, col = _reaching(T, cut, True)
            ex = (sc.A64.index_select(0, r[row]) * sc.B64.index_select(0, col)).sum(1)
            beaten = torch.zeros(r.numel(), dtype=torch.bool, device=T.device)
            beaten[row[ex > dg[s : s + self.CHUNK][row]]] = True
            n_self += int((~beaten).sum())
        return n_self
