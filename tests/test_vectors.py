"""The vector top-k kernel against a dense float64 reference."""
import pytest
import torch

from indexer.kernels import vectors
from indexer.kernels.vectors import Projector


@pytest.mark.parametrize(
    "n,d,V,k,block_bytes",
    [
        pytest.param(7, 16, 300, 5, None, id="one-block"),
        pytest.param(50, 16, 300, 5, 4 * 300 * 8, id="blocks-of-8-with-remainder"),
        pytest.param(3, 4, 10, 50, None, id="k-larger-than-vocab"),
    ],
)
def test_projector_matches_dense_reference(monkeypatch, n, d, V, k, block_bytes):
    if block_bytes:
        monkeypatch.setattr(vectors, "_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(d, V, generator=g)
    X = torch.randn(n, d, generator=g)
    out = Projector(basis, k)(X)
    ref = X.double() @ basis.double()
    kk = min(k, V)
    top = torch.argsort(ref, dim=1, descending=True)[:, :kk]
    bot = torch.argsort(ref, dim=1)[:, :kk]
    assert torch.equal(out.top_idx, top)
    assert torch.equal(out.bot_idx, bot)
    torch.testing.assert_close(out.top_val.double(), ref.gather(1, top), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.bot_val.double(), ref.gather(1, bot), rtol=1e-5, atol=1e-5)


def test_projector_reuses_its_buffer(monkeypatch):
    monkeypatch.setattr(vectors, "_BLOCK_BYTES", 4 * 100 * 4)
    p = Projector(torch.randn(8, 100), 3)
    p(torch.randn(10, 8))
    first = p._buf.data_ptr()
    p(torch.randn(10, 8))
    assert p._buf.data_ptr() == first


def test_a_transposed_basis_is_used_in_place_with_the_same_lists(monkeypatch):
    """W_E.T and the LM head's W_U are views of [V, d_model] matrices: the projector must not copy
    them (a second basis is 2 GB at V 128256) and must give the lists of a contiguous basis."""
    monkeypatch.setattr(vectors, "_BLOCK_BYTES", 4 * 304 * 8)
    g = torch.Generator().manual_seed(1)
    E = torch.randn(300, 16, generator=g)  # [V, d_model], as an embedding is stored
    X = torch.randn(50, 16, generator=g)
    view = Projector(E.T, 7)
    assert view.basis.data_ptr() == E.data_ptr()
    a, b = view(X), Projector(E.T.contiguous(), 7)(X)
    for field in ("top_idx", "top_val", "bot_idx", "bot_val"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def _stable(scores, k, largest):
    val, idx = torch.sort(scores, dim=1, descending=largest, stable=True)
    return val[:, :k], idx[:, :k]


def _padded(scores):
    """``scores`` copied into a buffer padded to whole groups, as `Projector` lays it out."""
    rows, n = scores.shape
    width = -(-n // vectors._GROUP) * vectors._GROUP
    buf = torch.full((rows, width), float("nan"))  # padding is scratch: select must overwrite it
    buf[:, :n] = scores
    return buf


@pytest.mark.parametrize("n_cols", [16 * 40, 16 * 40 - 7, 1001])
@pytest.mark.parametrize("largest", [True, False], ids=["top", "bottom"])
def test_select_equals_stable_sort(n_cols, largest):
    scores = torch.randn(64, n_cols, generator=torch.Generator().manual_seed(n_cols))
    got = vectors.select(_padded(scores), n_cols, 10, largest)
    want = _stable(scores, 10, largest)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.parametrize("largest", [True, False], ids=["top", "bottom"])
def test_select_breaks_ties_by_lower_token_id(largest):
    """Few distinct values: ties inside the k, ties at the k-th place, tied group extremes, and
    all-equal rows (an all-zero bias vector) all give the stable-sort order."""
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(-3, 4, (40, 700), generator=g).float()
    scores[0] = 0.0
    # ties inside the k only: a unique order except for two equal best entries far apart
    scores[1] = torch.randperm(700, generator=g).float()
    scores[1, [650, 9]] = 1000.0 if largest else -1000.0
    got = vectors.select(_padded(scores), 700, 8, largest)
    want = _stable(scores, 8, largest)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert got[1][1, :2].tolist() == [9, 650]


@pytest.mark.parametrize("n_cols, k", [(16**3 - 5, 5), (16**4 - 100, 3), (2 * 16**4, 2)],
                         ids=["two-levels", "three-levels", "four-levels"])
@pytest.mark.parametrize("largest", [True, False], ids=["top", "bottom"])
def test_select_ranks_groups_of_groups(n_cols, k, largest):
    """Buffers of `padded_width` columns: the group extremes are grouped again (as many levels
    as 16^level fits), and the padding (up to 255 columns) never wins. Rows of distinct values,
    rows of few distinct values (ties at every level), a row whose best k share one group of
    groups, and an all-equal row."""
    g = torch.Generator().manual_seed(n_cols)
    scores = torch.randn(12, n_cols, generator=g)
    scores[6:] = torch.randint(-2, 3, (6, n_cols), generator=g).float()
    scores[5] = 0.0
    G = vectors.padded_width(n_cols) // vectors._GROUP
    sign = 1.0 if largest else -1.0
    scores[4, [7, 7 + G, 7 + 2 * G]] = 100.0 * sign  # members of one group
    buf = torch.full((12, vectors.padded_width(n_cols)), float("nan"))
    buf[:, :n_cols] = scores
    got = vectors.select(buf, n_cols, k, largest)
    want = _stable(scores, k, largest)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_projector_with_exact_ties_matches_stable_sort():
    """Integer weights make the fp32 GEMM exact, so many scores tie exactly."""
    g = torch.Generator().manual_seed(2)
    basis = torch.randint(-1, 2, (4, 900), generator=g).float()
    X = torch.randint(-2, 3, (30, 4), generator=g).float()
    out = Projector(basis, 12)(X)
    scores = X @ basis
    assert torch.equal(out.top_idx, _stable(scores, 12, True)[1])
    assert torch.equal(out.bot_idx, _stable(scores, 12, False)[1])


@pytest.mark.parametrize("n_vocab", [1, 5, 17, 257, 4097])
def test_projector_on_tiny_and_ragged_vocabularies_matches_stable_sort(n_vocab):
    """Rows padded to 256 columns (`padded_width`): with one real column, with fewer real columns
    than groups (whole groups of padding), and just past a multiple of 256; integer weights, so
    most scores tie."""
    g = torch.Generator().manual_seed(n_vocab)
    basis = torch.randint(-2, 3, (6, n_vocab), generator=g).float()
    X = torch.randint(-2, 3, (40, 6), generator=g).float()
    scores = X @ basis
    for k in (1, 3, 50):
        out = Projector(basis, k)(X)
        kk = min(k, n_vocab)
        for largest, idx, val in ((True, out.top_idx, out.top_val), (False, out.bot_idx, out.bot_val)):
            want_val, want_idx = _stable(scores, kk, largest)
            assert torch.equal(idx, want_idx) and torch.equal(val, want_val), (k, largest)


# -- the compiled selection (indexer/kernels/compiled_select.py) ---------------------------------

@pytest.mark.parametrize("n_cols, k", [(16 * 40, 10), (16 * 40 - 7, 10), (1001, 10), (16 * 51, 50), (50257, 50),
                                       (16 * 3 + 15, 2)])
def test_compiled_selection_equals_stable_sort(n_cols, k):
    """Both sides at once, against the stable sort: distinct values, few distinct values (ties
    inside the k, at the k-th place, between groups), an all-equal row, ±0, a row whose best
    entries share one group, and columns past the last whole group (the ragged tail)."""
    from indexer.kernels.compiled_select import select_rows

    g = torch.Generator().manual_seed(n_cols)
    scores = torch.randn(16, n_cols, generator=g)
    scores[6:12] = torch.randint(-2, 3, (6, n_cols), generator=g).float()
    scores[12] = 0.0
    scores[13] = torch.where(torch.rand(n_cols, generator=g) < 0.5, 0.0, -0.0)
    G = n_cols // 16
    scores[14, [3, 3 + G, 3 + 2 * G]] = 100.0  # members of one group
    scores[15, n_cols - 1] = 1e6 if n_cols % 16 else scores[15, n_cols - 1]  # the tail wins
    scores[15, n_cols - 2] = -1e6 if n_cols % 16 else scores[15, n_cols - 2]
    buf = torch.full((16, n_cols + 9), float("nan"))  # columns past n_cols are never read
    buf[:, :n_cols] = scores
    out = [torch.empty(16, k), torch.empty(16, k, dtype=torch.int64), torch.empty(16, k),
           torch.empty(16, k, dtype=torch.int64)]
    select_rows(buf.numpy(), n_cols, k, 0, 16, *(t.numpy() for t in out))
    for (val, idx), largest in (((out[0], out[1]), True), ((out[2], out[3]), False)):
        want_val, want_idx = _stable(scores, k, largest)
        assert torch.equal(idx, want_idx), largest
        assert torch.equal(val, want_val), largest


@pytest.mark.parametrize("n, V, k", [(700, 5000, 50), (3, 5000, 5), (130, 1000, 7)])
def test_projector_compiled_and_torch_selection_agree(monkeypatch, n, V, k):
    """The projector's compiled path (finite scores, split between threads) and torch's `select`
    give the same lists, bit for bit, on a block of rows and a block too small to split."""
    monkeypatch.setattr(vectors, "_BLOCK_BYTES", 4 * 5120 * 256)
    g = torch.Generator().manual_seed(n)
    basis, X = torch.randn(24, V, generator=g), torch.randn(n, 24, generator=g)
    X[::7] = X[::7].round()  # some rows of a coarse grid: more ties
    compiled = Projector(basis, k)
    assert compiled._basis_max is not None
    plain = Projector(basis, k)
    plain._basis_max = None  # torch's select
    a, b = compiled(X), plain(X)
    for field in ("top_idx", "top_val", "bot_idx", "bot_val"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_scores_that_could_overflow_take_the_torch_selection_and_are_refused():
    """Weights large enough that a score may overflow float32 are not given to the compiled
    selection (it would skip a NaN); the torch path reports them as before."""
    from indexer.errors import NonFiniteWeights

    basis = torch.ones(4, 600)
    X = torch.full((2, 4), 3e38)
    with pytest.raises(NonFiniteWeights):
        Projector(basis, 5)(X)


def test_without_numba_the_torch_selection_runs(monkeypatch):
    g = torch.Generator().manual_seed(5)
    basis, X = torch.randn(12, 3000, generator=g), torch.randn(40, 12, generator=g)
    want = Projector(basis, 9)(X)
    monkeypatch.setattr(vectors, "compiled", lambda name: None)
    p = Projector(basis, 9)
    assert p._basis_max is None
    got = p(X)
    for field in ("top_idx", "top_val", "bot_idx", "bot_val"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
