"""The circuit screen's per-block folds, compiled for the CPU with numba (docs/PAIRS.md "Speed",
seventh round).

A screened block ``S`` (bfloat16, [rows, q]) is folded into the screen's state by
``_Screening._screen_block``: its row extremes, the column extremes of the rows that can reach a
column role, the entries that can reach a pool's threshold, and the off-diagonal maxima of the
undecided self rows. In torch that is ~20 passes and ~90 small operations a block (a widening copy
to float32, maxima, minima, comparisons, gathers, scatters); here it is two compiled calls, one
pass over ``S`` for the row extremes and one over the rows that need anything more. The decisions
are the torch path's, made on the same values (``tests/test_pairs.py`` compares the two paths'
results and counters on every screened case); the torch path stays the one for other devices and
screen dtypes.

**Keys.** A bfloat16 bit pattern ``x`` read as int16 maps to ``key(x) = x ^ ((x >> 15) & 0x7FFF)``,
which orders like the values (negative patterns have their magnitude bits flipped; -0 sorts just
below +0, NaN patterns beyond ±inf). Maxima, minima and comparisons of a block run on the keys, in
integer SIMD lanes, without widening the block; ``_key_values()`` turns a key back into its value
(exactly: every bfloat16 is a float64), and a threshold ``c`` becomes the first key whose value
reaches it (``np.searchsorted`` on the table), so ``key >= K(c)`` is exactly ``value >= c``.
Thresholds are compared as the torch path compares them: row extremes in float64, block entries
against the float32 rounding of the cut (torch rounds a Python float to the tensor's dtype), which
keeps every entry the proof needs (rounding is monotone) and finds the same entries.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit

# int16 keys span [-32768, 32767]; table index = key + _KEY0.
_KEY0 = 32768


@functools.lru_cache(maxsize=1)
def _key_values() -> np.ndarray:
    """float64 value of every key, by key (NaN patterns as ±inf, so the table is sorted)."""
    bits = np.arange(-_KEY0, _KEY0, dtype=np.int32).astype(np.int16)
    keys = (bits ^ ((bits >> 15) & 0x7FFF)).astype(np.int32)
    with np.errstate(invalid="ignore"):  # NaN patterns, set to ±inf below
        values = (bits.astype(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    by_key = np.empty(2 * _KEY0)
    by_key[keys + _KEY0] = values
    nan = np.isnan(by_key)
    by_key[nan] = np.where(np.arange(2 * _KEY0)[nan] < _KEY0, -np.inf, np.inf)
    assert bool(np.all(by_key[1:] >= by_key[:-1]))
    return by_key


# The compiled functions are module-level (not closures): numba's disk cache keys a function by
# its closure variables too, and a closure over another compiled function got a key of its own in
# every process, so every circuit worker compiled ``fold`` again (seconds each).


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _key(x):
    """The key of a bfloat16 bit pattern read as int16 (module docstring)."""
    return x ^ ((x >> np.int16(15)) & np.int16(0x7FFF))


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _value(values, key):
    """The exact value of a key (``values``: ``_key_values()``)."""
    return values[np.int32(key) + _KEY0]


@njit(cache=True, nogil=True, boundscheck=False)
def key_at_least(values, c):
    """The smallest key whose value is >= c (one past the last key when none is)."""
    return np.searchsorted(values, c, side="left") - _KEY0


@njit(cache=True, nogil=True, boundscheck=False)
def key_at_most(values, c):
    """The largest key whose value is <= c (one below the first key when none is)."""
    return np.searchsorted(values, c, side="right") - 1 - _KEY0


@njit(cache=True, nogil=True, boundscheck=False)
def row_extremes(S, values, col_pos, col_hat, col_res):
    """Per row of S: max and min keys and values; the largest |value| of the block; the
    largest column norms (``col_hat``, ``col_res``) over the block's columns ``col_pos``."""
    nr, q = S.shape
    kmax = np.empty(nr, np.int16)
    kmin = np.empty(nr, np.int16)
    for i in range(nr):
        mx = np.int16(-32768)
        mn = np.int16(32767)
        for j in range(q):
            k = _key(S[i, j])
            mx = max(mx, k)
            mn = min(mn, k)
        kmax[i] = mx
        kmin[i] = mn
    rmax = np.empty(nr)
    rmin = np.empty(nr)
    s_max = 0.0
    for i in range(nr):
        rmax[i] = _value(values, kmax[i])
        rmin[i] = _value(values, kmin[i])
        s_max = max(s_max, rmax[i], -rmin[i])
    b_hat = -np.inf
    b_res = -np.inf
    for j in range(q):
        b_hat = max(b_hat, col_hat[col_pos[j]])
        b_res = max(b_res, col_res[col_pos[j]])
    return kmax, kmin, rmax, rmin, s_max, b_hat, b_res


@njit(cache=True, nogil=True, boundscheck=False)
def fold(S, kmax, kmin, rmax, rmin, values, row_pos, col_pos, marg,
         row_max_upper, row_max_lower, row_min_lower, row_min_upper,
         col_max_upper, col_max_lower, col_min_lower, col_min_upper,
         col_t_max, col_t_min, top_cut, bot_cut,
         square, undecided, off_diag_upper, diag, diag_col, place_in_block):
    """Fold a block into the state (see ``pairs._CompiledFolds.fold``); returns the entries to
    rescore for the top / bottom pools and the self rows' off-diagonal arg-max entries (local
    row and column indices)."""
    nr, q = S.shape
    for i in range(nr):  # _Extremes.fold_max / fold_min of the rows
        p = row_pos[i]
        row_max_upper[p] = max(row_max_upper[p], rmax[i] + marg)
        row_max_lower[p] = max(row_max_lower[p], rmax[i] - marg)
        row_min_lower[p] = min(row_min_lower[p], rmin[i] - marg)
        row_min_upper[p] = min(row_min_upper[p], rmin[i] + marg)
    # Row filters in float64, entry cuts as float32-rounded keys (module docstring).
    col_hi = col_t_max - marg
    col_lo = col_t_min + marg
    top_entry = key_at_least(values, np.float64(np.float32(top_cut)))
    bot_entry = key_at_most(values, -np.float64(np.float32(bot_cut)))
    cmax = np.full(q, np.int16(-32768), np.int16)
    cmin = np.full(q, np.int16(32767), np.int16)
    any_max = False
    any_min = False
    key = np.empty(q, np.int16)
    top_i = []
    top_j = []
    bot_i = []
    bot_j = []
    for i in range(nr):
        up = rmax[i] >= col_hi
        down = rmin[i] <= col_lo
        top = rmax[i] >= top_cut
        bot = -rmin[i] >= bot_cut
        if not (up or down or top or bot):
            continue
        for j in range(q):
            key[j] = _key(S[i, j])
        if up:
            any_max = True
            for j in range(q):
                cmax[j] = max(cmax[j], key[j])
        if down:
            any_min = True
            for j in range(q):
                cmin[j] = min(cmin[j], key[j])
        if top:
            for j in range(q):
                if key[j] >= top_entry:
                    top_i.append(i)
                    top_j.append(j)
        if bot:
            for j in range(q):
                if key[j] <= bot_entry:
                    bot_i.append(i)
                    bot_j.append(j)
    if any_max:  # _Extremes.fold_max / fold_min of the columns
        for j in range(q):
            c = col_pos[j]
            v = _value(values, cmax[j])
            col_max_upper[c] = max(col_max_upper[c], v + marg)
            col_max_lower[c] = max(col_max_lower[c], v - marg)
    if any_min:
        for j in range(q):
            c = col_pos[j]
            v = _value(values, cmin[j])
            col_min_lower[c] = min(col_min_lower[c], v - marg)
            col_min_upper[c] = min(col_min_upper[c], v + marg)
    self_i = np.empty(nr, np.int64)  # at most one entry a row
    self_j = np.empty(nr, np.int64)
    n_self = 0
    if square:  # _Screening._fold_self
        for j in range(q):
            place_in_block[col_pos[j]] = j
        for i in range(nr):
            p = row_pos[i]
            if not undecided[p]:
                continue
            dc = place_in_block[diag_col[p]]
            off_key = kmax[i]
            if dc >= 0:  # the diagonal is in the block: the off-diagonal maximum without it
                off_key = np.int16(-32768)
                for j in range(q):
                    if j != dc:
                        off_key = max(off_key, _key(S[i, j]))
            off = _value(values, off_key)
            off_diag_upper[p] = max(off_diag_upper[p], off + marg)
            dg = diag[p]
            if off - marg > dg:
                undecided[p] = False
            elif off + marg >= dg:  # the margin can't tell: the first column holding it
                for j in range(q):
                    if j != dc and _value(values, _key(S[i, j])) == off:
                        self_i[n_self] = i
                        self_j[n_self] = j
                        n_self += 1
                        break
        for j in range(q):
            place_in_block[col_pos[j]] = -1
    return (np.array(top_i, np.int64), np.array(top_j, np.int64), np.array(bot_i, np.int64),
            np.array(bot_j, np.int64), self_i[:n_self], self_j[:n_self])

