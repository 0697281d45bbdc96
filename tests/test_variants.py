"""The `folded` variant: folding norm gains and the value bias changes no computation.

Each check runs the Hugging Face norm module itself and compares it with the unit-gain, zero-bias
normalisation followed by the folded weights.
"""
import pytest
import torch

from indexer.load import load_canonical
from indexer.variants import fold
from tests.tiny_models import save_tiny


def _plain_norm(x, kind):
    if kind == "layernorm":
        return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-5)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("family,kind", [pytest.param("gpt2", "layernorm", id="gpt2-layernorm"),
                                         pytest.param("llama-gqa", "rmsnorm", id="llama-rmsnorm")])
def test_pre_ln_gains_fold_into_read_side_and_unembedding(tmp_path, family, kind):
    from transformers import AutoModelForCausalLM

    path = save_tiny(family, tmp_path / family)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    raw = load_canonical(str(path)).canonical
    folded = fold(raw)
    x = torch.randn(5, raw.dims.d_model)
    blocks = hf.transformer.h if family == "gpt2" else hf.model.layers
    final = hf.transformer.ln_f if family == "gpt2" else hf.model.norm
    with torch.no_grad():
        for l, block in enumerate(blocks):
            ln_attn, ln_mlp = (block.ln_1, block.ln_2) if family == "gpt2" else (block.input_layernorm, block.post_attention_layernorm)
            raw_l, fold_l = raw.layer(l), folded.layer(l)
            n_attn, n_mlp = _plain_norm(x, kind), _plain_norm(x, kind)
            for h in range(raw.dims.n_heads):
                kv = raw.dims.kv_head(h)
                want = ln_attn(x) @ raw_l.W_Q[h] + (raw_l.b_Q[h] if raw_l.b_Q is not None else 0)
                got = n_attn @ fold_l.W_Q[h] + (fold_l.b_Q[h] if fold_l.b_Q is not None else 0)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
                want = ln_attn(x) @ raw_l.W_V[kv] + (raw_l.b_V[kv] if raw_l.b_V is not None else 0)
                got = n_attn @ fold_l.W_V[kv] + (fold_l.b_V[kv] if fold_l.b_V is not None else 0)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            want = ln_mlp(x) @ raw_l.W_in + (raw_l.b_in if raw_l.b_in is not None else 0)
            got = n_mlp @ fold_l.W_in + (fold_l.b_in if fold_l.b_in is not None else 0)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        want = final(x) @ raw.embeddings.W_U
        got = _plain_norm(x, kind) @ folded.embeddings.W_U + (folded.embeddings.b_U if folded.embeddings.b_U is not None else 0)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


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
