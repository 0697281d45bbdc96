"""Fine-tuning deltas (indexer/diff.py): a model trained to raise one token shows that token."""
from __future__ import annotations

import pytest
import torch

from indexer.diff import delta_top_tokens, diff_canonical, diff_models
from indexer.errors import IncompatibleModels
from tests.tiny_models import VOCAB, tiny_model

TARGET = "Paris"
TRAINED_LAYER = 1


@pytest.fixture(scope="module")
def base_and_tuned(tmp_path_factory):
    """A tiny 3-layer GPT-2 and a copy whose layer-1 MLP alone was trained to raise logit[Paris]."""
    root = tmp_path_factory.mktemp("diff")
    model, tok = tiny_model("gpt2", n_layer=3)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    target = VOCAB.index(TARGET)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(f"transformer.h.{TRAINED_LAYER}.mlp.")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randint(5, len(VOCAB), (8, 8), generator=g)
        loss = -model(x).logits[..., target].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(root / "tuned")
    tok.save_pretrained(root / "tuned")
    return root / "base", root / "tuned", target


def test_trained_layer_delta_promotes_the_target_token(base_and_tuned):
    base, tuned, target = base_and_tuned
    d = diff_models(str(base), str(tuned))
    assert d.provenance.base.path.endswith("base") and d.provenance.path.endswith("tuned")
    assert d.provenance.source == f"{tuned} - {base}"
    delta = d.canonical

    top = delta_top_tokens(delta, TRAINED_LAYER, "ff_value", k=5)
    assert top is not None and len(top.units) > 0
    hit = (top.top_ids == target).any(dim=1).float().mean().item()
    # The largest changes point at the target; most changed FF values have it in their top 5.
    assert (top.top_ids[:3, 0] == target).all(), top.top_ids[:3].tolist()
    assert hit >= 0.75, f"only {hit:.0%} of changed FF values have {TARGET!r} in their top 5"
    bias = delta_top_tokens(delta, TRAINED_LAYER, "bias_ff_out", k=1)
    assert bias.top_ids[0, 0] == target

    # Untouched layers (and the trained layer's attention) have exactly-zero deltas: "unchanged".
    for l in range(delta.dims.n_layers):
        if l != TRAINED_LAYER:
            assert delta_top_tokens(delta, l, "ff_value") is None
            assert delta.layer(l).W_out.abs().max() == 0
        assert delta.layer(l).W_Q.abs().max() == 0
    # Projection bases are the tuned model's; LayerNorm gains too.
    from indexer.load import load_canonical

    t = load_canonical(str(tuned)).canonical
    torch.testing.assert_close(delta.embeddings.W_U, t.embeddings.W_U)
    torch.testing.assert_close(delta.layer(0).ln_attn_w, t.layer(0).ln_attn_w)
    assert delta.embeddings.W_pos.abs().max() == 0


def test_diff_of_different_architectures_is_a_typed_error(tmp_path):
    from indexer.load import load_canonical
    from tests.tiny_models import save_tiny

    a = load_canonical(str(save_tiny("gpt2", tmp_path / "a", n_layer=2))).canonical
    b = load_canonical(str(save_tiny("gpt2", tmp_path / "b", n_layer=3))).canonical
    with pytest.raises(IncompatibleModels, match="n_layers 2 vs 3"):
        diff_canonical(a, b)
    c = load_canonical(str(save_tiny("bert", tmp_path / "c"))).canonical
    with pytest.raises(IncompatibleModels, match="architecture"):
        diff_canonical(a, c)
    # Same model: every delta is zero, every layer unchanged.
    same = diff_canonical(a, a)
    assert all(delta_top_tokens(same, l) is None for l in range(2))


def test_different_vocabularies_are_refused():
    from indexer.diff import check_same_vocabulary
    from tests.tiny_models import PieceTokenizer

    check_same_vocabulary(PieceTokenizer(["a", "b"]), PieceTokenizer(["a", "b"]))
    with pytest.raises(IncompatibleModels, match="different vocabularies"):
        check_same_vocabulary(PieceTokenizer(["a", "b"]), PieceTokenizer(["b", "a"]))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_delta_subtracts_every_expert_and_router(tmp_path, family):
    """Routed experts and routers are directions like the dense MLP: the delta model's are
    tuned - base (they had been the tuned model's own weights)."""
    from indexer.load import load_canonical
    from tests.tiny_models import save_tiny

    base = load_canonical(str(save_tiny(family, tmp_path / "base", seed=0))).canonical
    tuned = load_canonical(str(save_tiny(family, tmp_path / "tuned", seed=1))).canonical
    delta = diff_canonical(base, tuned)
    for l in range(delta.dims.n_layers):
        lb, lt, ld = base.layer(l), tuned.layer(l), delta.layer(l)
        assert len(ld.experts) == len(lt.experts) > 0
        torch.testing.assert_close(ld.W_router, lt.W_router - lb.W_router, rtol=0, atol=0)
        if lt.W_shared_gate is not None:
            torch.testing.assert_close(ld.W_shared_gate, lt.W_shared_gate - lb.W_shared_gate, rtol=0, atol=0)
        for e in range(len(lt.experts)):
            for f in ("W_in", "W_out", "W_gate"):
                want = getattr(lt.experts[e], f) - getattr(lb.experts[e], f)
                got = getattr(ld.experts[e], f)
                assert want.abs().max() > 0
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    same = diff_canonical(base, base).layer(0)
    assert same.W_router.abs().max() == 0 and same.experts[0].W_out.abs().max() == 0
