"""Adapters: canonical tensors reproduce the Hugging Face modules' own computation (DESIGN §2).

Each tiny random model is saved with ``save_pretrained`` (safetensors), read back through
``load_canonical``, and random inputs are fed through the HF modules themselves: the query /
key / value projections (before rotary), the attention output projection, the MLP, the norms,
and for the two families without rotary or relative bias a whole block via the model's own
forward pass. Every checkpoint tensor must be accounted for exactly once.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.testing import assert_close

from indexer.load import load_canonical
from tests.tiny_models import FAMILIES, save_tiny, tiny_model

B, S = 2, 7  # batch and sequence length of the random probes

CASES = [
    pytest.param("gpt2", id="gpt2"),
    pytest.param("bert", id="bert"),
    pytest.param("bert-mlm", id="bert-mlm-tied"),
    pytest.param("bert-mlm-untied", id="bert-mlm-untied"),
    pytest.param("mpnet", id="mpnet"),
    pytest.param("llama", id="llama-mha"),
    pytest.param("llama-gqa", id="gqa"),
    pytest.param("qwen2", id="qwen2-untied-bias"),
    pytest.param("mistral", id="mistral-mqa-untied"),
    pytest.param("neox", id="neox-untied"),
]

_CACHE: dict = {}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (hf_model, loaded, path); each tiny model is built and loaded once."""

    def get(family):
        if family not in _CACHE:
            path = save_tiny(family, tmp_path_factory.mktemp(family))
            model, _ = tiny_model(family)  # same seed: the same weights as saved
            _CACHE[family] = (model, load_canonical(str(path)), path)
        return _CACHE[family]

    return get


# --- the HF side: where each family keeps its modules ---------------------------------------

def hf_layers(model):
    base = model.base_model
    return base.h if hasattr(base, "h") else base.encoder.layer if hasattr(base, "encoder") else base.layers


def hf_qkv(family, layer, x, dims):
    """The module's own query/key/value states before rotary: [B, heads, S, d_head] each."""
    h, kv, e = dims.n_heads, dims.n_kv_heads, dims.d_head
    b, s = x.shape[:2]
    split = lambda t, n: t.view(b, s, n, e).transpose(1, 2)
    if family == "gpt2":
        q, k, v = layer.attn.c_attn(x).split(dims.d_model, dim=2)
        return split(q, h), split(k, h), split(v, h)
    if family.startswith("bert"):
        a = layer.attention.self
        return split(a.query(x), h), split(a.key(x), h), split(a.value(x), h)
    if family == "mpnet":
        a = layer.attention.attn
        return split(a.q(x), h), split(a.k(x), h), split(a.v(x), h)
    if family == "neox":
        # exactly HF's layout: (..., n_heads, 3 * d_head), then chunk
        qkv = layer.attention.query_key_value(x).view(b, s, -1, 3 * e).transpose(1, 2)
        return qkv.chunk(3, dim=-1)
    a = layer.self_attn
    return split(a.q_proj(x), h), split(a.k_proj(x), kv), split(a.v_proj(x), kv)


def hf_o(family, layer):
    """The attention output projection module (input [B, S, n_heads * d_head])."""
    return {"gpt2": lambda: layer.attn.c_proj, "mpnet": lambda: layer.attention.attn.o,
            "neox": lambda: layer.attention.dense}.get(
        family, lambda: layer.attention.output.dense if family.startswith("bert")
        else layer.self_attn.o_proj)()


def hf_norms(family, layer):
    """(norm before/after attention, norm before/after MLP) modules."""
    if family == "gpt2":
        return layer.ln_1, layer.ln_2
    if family.startswith("bert"):
        return layer.attention.output.LayerNorm, layer.output.LayerNorm
    if family == "mpnet":
        return layer.attention.LayerNorm, layer.output.LayerNorm
    return layer.input_layernorm, layer.post_attention_layernorm


# --- the canonical side ------------------------------------------------------------------------

def c_q(lw, x):
    return _proj(x, lw.W_Q, lw.b_Q)


def c_k(lw, x):
    return _proj(x, lw.W_K, lw.b_K)


def c_v(lw, x):
    return _proj(x, lw.W_V, lw.b_V)


def _proj(x, W, b):
    out = torch.einsum("bsd,hde->bhse", x, W)  # W: [heads, d_model, d_head]
    return out if b is None else out + b[None, :, None, :]


def c_o(lw, z):
    """z: [B, S, n_heads, d_head] -> [B, S, d_model]."""
    out = torch.einsum("bshe,hed->bsd", z, lw.W_O)
    return out if lw.b_O is None else out + lw.b_O


def c_mlp(lw, x):
    from transformers.activations import ACT2FN

    act = ACT2FN[lw.act]
    pre = x @ lw.W_in + (0 if lw.b_in is None else lw.b_in)
    if lw.W_gate is not None:
        hidden = act(x @ lw.W_gate + (0 if lw.b_gate is None else lw.b_gate)) * pre
    else:
        hidden = act(pre)
    return hidden @ lw.W_out + (0 if lw.b_out is None else lw.b_out)


def c_norm(x, w, b, eps):
    if b is None:  # RMSNorm
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def c_attention(lw, dims, x, causal):
    q, k, v = c_q(lw, x), c_k(lw, x), c_v(lw, x)
    S = x.shape[1]
    kv = [dims.kv_head(h) for h in range(dims.n_heads)]
    scores = q @ k[:, kv].transpose(-1, -2) / math.sqrt(dims.d_head)
    if causal:
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    z = scores.softmax(-1) @ v[:, kv]  # [B, heads, S, d_head]
    return c_o(lw, z.transpose(1, 2))


def eps_of(config):
    return next(getattr(config, n) for n in ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps")
                if getattr(config, n, None) is not None)


# --- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", CASES)
def test_qkv_states_match_module(built, family):
    model, loaded, _ = built(family)
    dims = loaded.canonical.dims
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for l, layer in enumerate(hf_layers(model)):
            lw = loaded.canonical.layer(l)
            x = torch.randn(B, S, dims.d_model, generator=g)
            q, k, v = hf_qkv(family, layer, x, dims)
            assert_close(c_q(lw, x), q)
            assert_close(c_k(lw, x), k)
            assert_close(c_v(lw, x), v)


@pytest.mark.parametrize("family", [pytest.param("llama-gqa", id="gqa"),
                                    pytest.param("qwen2", id="qwen2-gqa"),
                                    pytest.param("mistral", id="mqa")])
def test_gqa_kv_head_mapping(built, family):
    """Query head h uses kv head dims.kv_head(h), the same grouping as HF's repeat_kv."""
    from transformers.models.llama.modeling_llama import repeat_kv

    model, loaded, _ = built(family)
    dims = loaded.canonical.dims
    assert dims.n_kv_heads < dims.n_heads
    x = torch.randn(B, S, dims.d_model, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        layer = hf_layers(model)[0]
        _, k, v = hf_qkv(family, layer, x, dims)
        n_rep = dims.n_heads // dims.n_kv_heads
        k_rep, v_rep = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        lw = loaded.canonical.layer(0)
        ck, cv = c_k(lw, x), c_v(lw, x)
        for h in range(dims.n_heads):
            assert_close(ck[:, dims.kv_head(h)], k_rep[:, h])
            assert_close(cv[:, dims.kv_head(h)], v_rep[:, h])


@pytest.mark.parametrize("family", CASES)
def test_attention_output_projection_matches_module(built, family):
    model, loaded, _ = built(family)
    dims = loaded.canonical.dims
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for l, layer in enumerate(hf_layers(model)):
            lw = loaded.canonical.layer(l)
            z = torch.randn(B, S, dims.n_heads, dims.d_head, generator=g)
            assert_close(c_o(lw, z), hf_o(family, layer)(z.reshape(B, S, -1)))


@pytest.mark.parametrize("family", CASES)
def test_mlp_matches_module(built, family):
    model, loaded, _ = built(family)
    dims = loaded.canonical.dims
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for l, layer in enumerate(hf_layers(model)):
            lw = loaded.canonical.layer(l)
            x = torch.randn(B, S, dims.d_model, generator=g)
            if family.startswith("bert") or family == "mpnet":
                # post-LN: intermediate (W_in + act), then output = LN(dense(h) + x)
                expected = layer.output(layer.intermediate(x), x)
                got = c_norm(c_mlp(lw, x) + x, lw.ln_mlp_w, lw.ln_mlp_b, eps_of(model.config))
            else:
                expected, got = layer.mlp(x), c_mlp(lw, x)
            assert_close(got, expected)


@pytest.mark.parametrize("family", CASES)
def test_norms_match_module(built, family):
    model, loaded, _ = built(family)
    dims, eps = loaded.canonical.dims, eps_of(model.config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for l, layer in enumerate(hf_layers(model)):
            lw = loaded.canonical.layer(l)
            x = torch.randn(B, S, dims.d_model, generator=g)
            ln_attn, ln_mlp = hf_norms(family, layer)
            assert_close(c_norm(x, lw.ln_attn_w, lw.ln_attn_b, eps), ln_attn(x))
            assert_close(c_norm(x, lw.ln_mlp_w, lw.ln_mlp_b, eps), ln_mlp(x))


@pytest.mark.parametrize("family", CASES)
def test_embeddings_match_modules(built, family):
    model, loaded, _ = built(family)
    E, dims = loaded.canonical.embeddings, loaded.canonical.dims
    assert_close(E.W_E, model.get_input_embeddings().weight)
    out = model.get_output_embeddings()
    if out is None:  # encoders without an LM head project on W_E
        assert dims.tied
        assert_close(E.W_U, E.W_E.T)
    else:
        assert_close(E.W_U, out.weight.T)
        assert dims.tied == (out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())
    if family == "bert-mlm" or family == "bert-mlm-untied":
        assert_close(E.b_U, model.cls.predictions.bias)
    base = model.base_model
    pos = getattr(base, "wpe", None) or getattr(getattr(base, "embeddings", None), "position_embeddings", None)
    if pos is None:
        assert E.W_pos is None and dims.n_ctx is None
    else:
        assert_close(E.W_pos, pos.weight)
        assert dims.n_ctx == pos.weight.shape[0]
    final = getattr(base, "ln_f", None) or getattr(base, "norm", None) or getattr(base, "final_layer_norm", None)
    if final is not None:
        x = torch.randn(B, S, dims.d_model, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            assert_close(c_norm(x, E.ln_final_w, E.ln_final_b, eps_of(model.config)), final(x))


def test_untied_llama_unembedding_is_lm_head(built):
    model, loaded, _ = built("qwen2")
    E = loaded.canonical.embeddings
    assert not loaded.canonical.dims.tied
    assert_close(E.W_U, model.lm_head.weight.T)
    assert not torch.equal(E.W_U, E.W_E.T)
    lw = loaded.canonical.layer(0)
    assert lw.b_Q is not None and lw.b_K is not None and lw.b_V is not None and lw.b_O is None


def test_gpt2_block_forward_matches_model(built):
    """A whole GPT-2 block from canonical tensors equals the model's own hidden state."""
    model, loaded, _ = built("gpt2")
    c, eps = loaded.canonical, eps_of(model.config)
    ids = torch.randint(0, c.dims.d_vocab, (B, S), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        x = c.embeddings.W_E[ids] + c.embeddings.W_pos[:S]
        assert_close(x, hs[0])
        lw = c.layer(0)
        x = x + c_attention(lw, c.dims, c_norm(x, lw.ln_attn_w, lw.ln_attn_b, eps), causal=True)
        x = x + c_mlp(lw, c_norm(x, lw.ln_mlp_w, lw.ln_mlp_b, eps))
        assert_close(x, hs[1])


def test_bert_block_forward_matches_model(built):
    """A whole post-LN BERT block from canonical tensors equals the model's hidden state.

    The token-type row is taken from the model: it is deliberately not canonical (see
    docs/ADAPTERS.md), but every BERT input adds segment 0's row.
    """
    model, loaded, _ = built("bert")
    c, eps = loaded.canonical, eps_of(model.config)
    E = c.embeddings
    ids = torch.randint(0, c.dims.d_vocab, (B, S), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        tt = model.embeddings.token_type_embeddings.weight[0]
        x = c_norm(E.W_E[ids] + E.W_pos[:S] + tt, E.ln_embed_w, E.ln_embed_b, eps)
        assert_close(x, hs[0])
        lw = c.layer(0)
        x = c_norm(x + c_attention(lw, c.dims, x, causal=False), lw.ln_attn_w, lw.ln_attn_b, eps)
        x = c_norm(x + c_mlp(lw, x), lw.ln_mlp_w, lw.ln_mlp_b, eps)
        assert_close(x, hs[1])


def test_neox_is_parallel_and_fused_per_head(built):
    """The fused query_key_value is [n_heads, 3, d_head], not [Q|K|V]: check one raw row."""
    model, loaded, _ = built("neox")
    dims = loaded.canonical.dims
    assert dims.parallel_attn_mlp is True and not dims.tied
    w = hf_layers(model)[0].attention.query_key_value.weight  # [3 d_model, d_model]
    lw = loaded.canonical.layer(0)
    # head 1's key block starts at row 1 * 3 * d_head + d_head
    assert_close(lw.W_K[1][:, 0], w[3 * dims.d_head + dims.d_head])


# --- coverage: every checkpoint tensor exactly once ---------------------------------------------

ALLOWED = {"embedding", "vectors:ff_key", "vectors:ff_gate", "vectors:ff_value", "vectors:q",
           "vectors:k", "vectors:v", "vectors:o", "vectors:bias_attn_out", "vectors:bias_ff_out",
           "vectors:pos", "pairs:qk", "pairs:ov"}


@pytest.mark.parametrize("family", CASES)
def test_every_checkpoint_tensor_accounted_once(built, family):
    _, loaded, path = built(family)
    keys = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            keys += list(h.keys())
    params = loaded.canonical.parameters
    assert sorted(p.name for p in params) == sorted(keys)
    for p in params:
        assert p.role != "unknown", p
        assert (p.covered_by in ALLOWED) if p.covered_by else bool(p.reason), p
        with safe_open(str(next(path.glob("*.safetensors"))), "pt") as h:
            assert p.shape == tuple(h.get_slice(p.name).get_shape())
        if ".0." in p.name or ".1." in p.name:
            assert p.layer in (0, 1), p
    roles = {p.role for p in params}
    assert {"W_E", "W_O", "W_in", "W_out"} <= roles


def test_all_tiny_families_are_tested():
    assert {c.values[0] for c in CASES} == set(FAMILIES)
