"""The `folded` variant: folding norm gains and the value bias changes no computation.

Each check runs the Hugging Face modules themselves (norms, q/k norms, post-norms; found through
the accessor table of tests/tiny_models.py) and compares them with the gain-free normalisation
followed by the folded weights. Where a norm comes *after* a projection (q/k norms, post-norms),
the folded projection equals the module's output up to the normalisation of the raw projection
(its scalar and, for a LayerNorm on q/k, its mean), which is not a parameter.
"""
import pytest
import torch
from torch.testing import assert_close

from indexer.load import load_canonical
from indexer.variants import fold
from tests.tiny_models import _proj, eps_of, hf_access, save_tiny, tiny_model

PRE_NORM = [pytest.param(f, id=f) for f in
            ("gpt2", "llama-gqa", "neox", "gemma", "gemma2", "qwen3", "phi3", "olmo2", "gemma3_text", "gemma3",
             "phi", "phi-qk", "opt", "gptj", "gpt_bigcode", "bloom", "falcon", "falcon-new", "stablelm",
             "stablelm-qk", "starcoder2", "cohere", "cohere-qk")]


def _plain(x, w, b, eps, centred=False):
    """The norm of which w is the gain (LayerNorm when it has a bias or is centred, else
    RMSNorm), gain-free."""
    if b is not None or centred:
        return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _inv_rms(t, axes, eps):
    return torch.rsqrt(t.pow(2).mean(axes, keepdim=True) + eps)


def _qk_normalised(got, t, rl, name, dims, axes, eps):
    """The folded q/k projection ``got`` (gain g and bias beta folded: g * t + beta) with the
    normalisation of the raw projection ``t`` put back: a LayerNorm's (Phi, StableLM, Cohere)
    centring g * mean(t) and its scalar, an RMSNorm's scalar; neither is a parameter."""
    g, beta = getattr(rl, f"{name}_norm_w"), getattr(rl, f"{name}_norm_b")
    mean = t.mean(axes, keepdim=True) if beta is not None or dims.centred_norms else 0
    beta = 0 if beta is None else beta[None, :, None, :]
    return (got - beta - g[None, :, None, :] * mean) * _inv_rms(t - mean, axes, eps) + beta


def _close(got, want):
    assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", PRE_NORM)
def test_folded_weights_reproduce_the_norm_modules(tmp_path, family):
    path = save_tiny(family, tmp_path / family)
    hf_model, _ = tiny_model(family)
    hf = hf_access(family)
    raw = load_canonical(str(path)).canonical
    folded = fold(raw)
    dims, eps = raw.dims, eps_of(hf_model.config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, dims.d_model, generator=g)
    qk_axes = (-1,) if dims.qk_norm == "head" else (1, 3)
    with torch.no_grad():
        for l, layer in enumerate(hf.layers(hf_model)):
            rl, fl, norms = raw.layer(l), folded.layer(l), hf.norms(layer)
            # read side of attention: pre-norm gain (and bias) in W_Q/W_K/W_V, q/k-norm gains in W_Q/W_K
            x_hf = norms["ln_attn"](x) if "ln_attn" in norms else x
            x_fold = _plain(x, rl.ln_attn_w, rl.ln_attn_b, eps, dims.centred_norms) if "ln_attn" in norms else x
            for i, (want, W, b, fW, fb) in enumerate(zip(
                    hf.qkv(layer, x_hf, dims), (rl.W_Q, rl.W_K, rl.W_V), (rl.b_Q, rl.b_K, rl.b_V),
                    (fl.W_Q, fl.W_K, fl.W_V), (fl.b_Q, fl.b_K, fl.b_V))):
                got = _proj(x_fold, fW, fb)
                if i < 2 and dims.qk_norm:
                    got = _qk_normalised(got, _proj(x_hf, W, b), rl, "qk"[i], dims, qk_axes, eps)
                _close(got, want)
            # write side of attention: a post-norm's gain in the columns of W_O
            z = torch.randn(2, 5, dims.n_heads * dims.d_head, generator=g)
            y = hf.o(layer)(z)
            got = torch.einsum("bshe,hed->bsd", z.view(2, 5, dims.n_heads, dims.d_head), fl.W_O)
            if "ln_attn_out" in norms:
                _close(got * _inv_rms(y, (-1,), eps), norms["ln_attn_out"](y))
            elif rl.b_O is None:
                _close(got, y)
            # read side of the MLP
            ln_mlp = norms.get("ln_mlp") or (norms.get("ln_attn") if dims.parallel_attn_mlp else None)
            m_hf = ln_mlp(x) if ln_mlp is not None else x
            m_fold = _plain(x, rl.ln_mlp_w, rl.ln_mlp_b, eps, dims.centred_norms) if ln_mlp is not None else x
            for W, b, fW, fb in ((rl.W_in, rl.b_in, fl.W_in, fl.b_in), (rl.W_gate, rl.b_gate, fl.W_gate, fl.b_gate)):
                if W is not None:
                    _close(m_fold @ fW + (0 if fb is None else fb), m_hf @ W + (0 if b is None else b))
            # write side of the MLP: a post-norm's gain in the columns of W_out
            hidden = torch.randn(2, 5, dims.d_ff, generator=g)
            y = hidden @ rl.W_out + (0 if rl.b_out is None else rl.b_out)
            got = hidden @ fl.W_out + (0 if fl.b_out is None else fl.b_out)
            if "ln_mlp_out" in norms:
                _close(got * _inv_rms(y, (-1,), eps), norms["ln_mlp_out"](y))
            else:
                _close(got, y)
        final, E, R = hf.final(hf_model), folded.embeddings, raw.embeddings
        got = _plain(x, R.ln_final_w, R.ln_final_b, eps, dims.centred_norms) @ E.W_U + (0 if E.b_U is None else E.b_U)
        _close(got, final(x) @ R.W_U + (0 if R.b_U is None else R.b_U))


def test_value_bias_folds_into_the_attention_output_bias(tmp_path):
    """For any attention pattern whose rows sum to one, sum_h P_h (x W_V + b_V) W_O + b_O equals
    sum_h P_h x W_V W_O + folded b_O (the value bias is a constant write)."""
    path = save_tiny("qwen2", tmp_path / "q")  # GQA with q/k/v biases
    raw = load_canonical(str(path)).canonical
    lw, fl = raw.layer(0), fold(raw).layer(0)
    x = torch.randn(7, raw.dims.d_model)
    out_raw = lw.b_O.clone() if lw.b_O is not None else torch.zeros(raw.dims.d_model)
    out_raw = out_raw.expand(7, -1).clone()
    out_fold = fl.b_O.expand(7, -1).clone()
    for h in range(raw.dims.n_heads):
        kv = raw.dims.kv_head(h)
        P = torch.softmax(torch.randn(7, 7), dim=-1)
        out_raw += P @ (x @ lw.W_V[kv] + lw.b_V[kv]) @ lw.W_O[h]
        out_fold += P @ (x @ lw.W_V[kv]) @ fl.W_O[h]
    torch.testing.assert_close(out_fold, out_raw, rtol=1e-4, atol=1e-4)


def test_post_ln_gains_fold_into_write_side(tmp_path):
    """BERT: the gain g of the norm after a residual add scales everything written before it,
    so folded W_out rows are the raw rows times g (and the output bias likewise)."""
    path = save_tiny("bert", tmp_path / "b")
    raw = load_canonical(str(path)).canonical
    lw, fl = raw.layer(0), fold(raw).layer(0)
    hidden = torch.randn(4, raw.dims.d_ff)
    torch.testing.assert_close(hidden @ fl.W_out, (hidden @ lw.W_out) * lw.ln_mlp_w)
    torch.testing.assert_close(fl.b_out, lw.b_out * lw.ln_mlp_w)
    torch.testing.assert_close(fl.W_in, lw.W_in)  # read side unchanged


def test_bias_free_layernorm_adds_no_bias_rows(tmp_path):
    """Cohere's LayerNorm has no bias: folding must not invent zero biases (which would be
    stored as all-zero bias_attn_out vectors)."""
    raw = load_canonical(str(save_tiny("cohere", tmp_path / "c"))).canonical
    assert raw.dims.centred_norms
    for lw in (raw.layer(0), fold(raw).layer(0)):
        assert lw.ln_attn_b is None and lw.b_Q is None and lw.b_V is None and lw.b_O is None


def test_folding_keeps_the_recorded_conventions(tmp_path):
    raw = load_canonical(str(save_tiny("gemma2", tmp_path / "g"))).canonical
    assert fold(raw).conventions == raw.conventions and "embedding_multiplier" in raw.conventions
