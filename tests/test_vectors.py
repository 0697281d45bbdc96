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
