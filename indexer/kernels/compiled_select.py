"""The vector projections' top-k / bottom-k selection, compiled for the CPU with numba
(`vectors.select`'s method, both sides in one pass; docs/BENCHMARKS.md §11, seventh round).

Per score row: the maximum and the minimum of each of G groups (column c is member c // G of
group c % G, as in `vectors.select`, so that a group's extremes are elementwise maxima over 16
contiguous slices, which the compiler vectorises), then ``m_k``, the k-th largest group maximum.
The k groups with the largest maxima hold k distinct entries >= m_k, so the k-th largest entry is
>= m_k, and every entry of the top-k, ties at the k-th place included, is >= m_k. Only the groups
whose maximum reaches m_k are looked into; their entries >= m_k, put in column order and sorted
stably by value, give the top-k with ties broken by the lower column: exactly
``torch.sort(row, descending=True, stable=True)[:k]``, with no case left to a full sort. The
bottom-k mirrors it with the group minima. Columns past the last whole group (fewer than 16) are
candidates of both sides.

The scores must be finite (`Projector` proves it for a block before choosing this path: a NaN
would be skipped by the comparisons, not reported). Rows are split between two threads (the
function releases the interpreter lock), so the selection takes both cores, as the GEMM does.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .vectors import _GROUP  # members per group: `Projector` checks n_cols >= _GROUP * k with it


@njit(cache=True, nogil=True, boundscheck=False)
def _kth_largest(x, k, scratch):
    """The k-th largest of ``x`` (``k <= x.size``), through the maxima of runs of 16: the k-th
    largest run maximum L is at most the answer (k runs hold k values >= L), so only the values
    >= L of the runs reaching L are ranked (~16k of them instead of x.size; np.partition over all
    of GPT-2's 3,141 group maxima took 33 µs, three times the group pass)."""
    n = x.size
    runs = (n + _GROUP - 1) // _GROUP
    low = -np.inf
    if runs >= k:
        run_max = np.empty(runs, x.dtype)
        for s in range(runs):
            m = x[s * _GROUP]
            for i in range(s * _GROUP + 1, min(n, (s + 1) * _GROUP)):
                m = x[i] if x[i] > m else m
            run_max[s] = m
        low = np.partition(run_max, runs - k)[runs - k]
    c = 0
    for i in range(n):
        if x[i] >= low:
            scratch[c] = x[i]
            c += 1
    return np.partition(scratch[:c], c - k)[c - k]


@njit(cache=True, nogil=True, boundscheck=False)
def select_rows(scores, n_cols, k, r0, r1, top_val, top_idx, bot_val, bot_idx):
    """Top-k and bottom-k of the first ``n_cols`` columns of rows ``r0:r1`` of ``scores``
    (float32, finite; ``n_cols >= _GROUP * k``) into the same rows of the outputs."""
    G = n_cols // _GROUP
    whole = G * _GROUP
    gmax = np.empty(G, np.float32)
    gmin = np.empty(G, np.float32)
    neg = np.empty(G, np.float32)
    scratch = np.empty(G, np.float32)
    cand = np.empty(n_cols, np.int64)
    for r in range(r0, r1):
        row = scores[r]
        for g in range(G):
            gmax[g] = row[g]
            gmin[g] = row[g]
        for m in range(1, _GROUP):
            base = m * G
            for g in range(G):
                v = row[base + g]
                gmax[g] = v if v > gmax[g] else gmax[g]
                gmin[g] = v if v < gmin[g] else gmin[g]
        for top in (True, False):
            ext = gmax if top else gmin
            if top:
                m_k = _kth_largest(gmax, k, scratch)
            else:  # the k-th smallest minimum, as the k-th largest of the negated minima
                for g in range(G):
                    neg[g] = -gmin[g]
                m_k = -_kth_largest(neg, k, scratch)
            n = 0
            for g in range(G):
                if (ext[g] >= m_k) if top else (ext[g] <= m_k):
                    for j in range(g, whole, G):
                        if (row[j] >= m_k) if top else (row[j] <= m_k):
                            cand[n] = j
                            n += 1
            for j in range(whole, n_cols):
                cand[n] = j
                n += 1
            idx = np.sort(cand[:n])  # column order, so that the stable sort breaks ties by column
            vals = row[idx]
            order = np.argsort(-vals if top else vals, kind="mergesort")
            if top:
                top_val[r, :] = vals[order[:k]]
                top_idx[r, :] = idx[order[:k]]
            else:
                bot_val[r, :] = vals[order[:k]]
                bot_idx[r, :] = idx[order[:k]]
