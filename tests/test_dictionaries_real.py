"""Dictionaries on a real model (MiniLM, shipped in a PyPI package) written by sae-lens itself: the
format oracle agrees with what zeropass reads, and planted features land where they must.

Marked integration and slow: importing sae-lens (transformer-lens, wandb, plotly...) alone takes seconds,
and indexing a MiniLM layer more; run with `pytest -m slow tests/test_dictionaries_real.py`.
"""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # sae-lens alone imports for seconds


@pytest.fixture(scope="module")
def minilm_db(tmp_path_factory):
    from indexer.build import index_model
    from indexer.load import load_canonical
    from indexer.packaged import minilm_path

    path = minilm_path()
    db = tmp_path_factory.mktemp("minilm") / "db"
    index_model(str(path), db, name="minilm", k=10, n_pairs=0, layers="1", progress=None)
    return db, load_canonical(str(path), quiet=True)


def _sae(kind: str, d_in: int, d_sae: int, hook: str, seed: int):
    """A sae-lens SAE with random weights (its own classes, so its own save format)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cls, cfg_cls = (JumpReLUSAE, JumpReLUSAEConfig) if kind == "jumprelu" else (StandardSAE, StandardSAEConfig)
    sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return sae


def test_sae_lens_files_read_as_sae_lens_loads_them_and_planted_features_rank_first(minilm_db, tmp_path):
    from sae_lens import SAE

    from indexer.dictionaries import open_dictionary
    from indexer.dictionaries.index import index_dictionaries
    from query import Dataset

    db, loaded = minilm_db
    W_E = loaded.canonical.embeddings.W_E
    tok = loaded.tokenizer
    paris, herself = (tok.convert_tokens_to_ids(t) for t in ("paris", "herself"))
    sae = _sae("jumprelu", W_E.shape[1], 16, "blocks.1.hook_resid_post", seed=0)
    with torch.no_grad():
        # planted: feature 3 writes paris's unembedding (MiniLM is tied: W_U = W_E^T), feature 9 reads herself's embedding
        sae.W_dec[3] = W_E[paris]
        sae.W_enc[:, 9] = W_E[herself]
    sae.save_model(tmp_path / "sae")

    # the oracle: what sae-lens loads from the folder is what zeropass reads from it
    back = SAE.load_from_disk(str(tmp_path / "sae"))
    d = open_dictionary(tmp_path / "sae")
    assert (d.layer, d.site, d.d_in, d.d_sae, d.architecture) == (1, "resid_post", back.cfg.d_in, back.cfg.d_sae, "jumprelu")
    assert d.hook == back.cfg.metadata.hook_name
    assert torch.equal(d.decoder(0, 16), back.W_dec.detach()) and torch.equal(d.encoder(0, 16), back.W_enc.detach().T)
    assert torch.equal(d.vector("threshold"), back.threshold.detach()) and torch.equal(d.vector("b_enc"), back.b_enc.detach())

    index_dictionaries(str(tmp_path / "sae"), db, model="minilm", name="res-L1", progress=None)
    ds = Dataset(db)
    top = lambda f, kind: ds.rows(  # noqa: E731
        "SELECT token_id, token FROM features WHERE dictionary = 'res-L1' AND feature = $f AND kind = $k "
        "AND side = 'top' ORDER BY rank", {"f": f, "k": kind})
    assert top(3, "decoder")[0]["token_id"] == paris and top(3, "decoder")[0]["token"] == "paris"
    assert top(9, "encoder")[0]["token_id"] == herself
    # every decoder list equals the dense float64 reference computed from sae-lens's own tensors
    U = W_E.double().T
    for f in range(16):
        want = torch.argsort(back.W_dec.detach()[f].double() @ U, descending=True, stable=True)[:10].tolist()
        assert [r["token_id"] for r in top(f, "decoder")] == want, f
    # the helpers: `features paris` finds the planted feature first
    hits = ds.features("paris", kind=["decoder"], dictionary=["res-L1"], max_rank=1).to_pylist()
    assert [(h["dictionary"], h["feature"]) for h in hits][:1] == [("res-L1", 3)]
    rows = pq.read_table(db / ds.manifest["dictionaries"]["res-L1"]["files"]["dictionaries"][0]).to_pylist()
    assert rows[0]["architecture"] == "jumprelu" and rows[0]["format"] == "saelens"
