"""Llama-style decoders (Llama, Mistral, Qwen2; SmolLM2 is a Llama): RMSNorm, RoPE, GQA, SwiGLU.

``nn.Linear`` stores (out, in); every weight is transposed to the row-vector form.
``q_proj`` [n_heads * d_head, d_model] splits into n_heads query heads, ``k_proj`` / ``v_proj``
[n_kv_heads * d_head, d_model] into n_kv_heads heads; query head h reads kv head
``h // (n_heads // n_kv_heads)`` (``Dims.kv_head``), the same grouping as HF's ``repeat_kv``.
MLP: ``down_proj(act(gate_proj x) * up_proj x)``, so W_gate = gate_proj.T, W_in = up_proj.T,
W_out = down_proj.T. Q/K are canonicalised *before* rotary, which depends on position only.
Qwen2 has q/k/v biases; ``attention_bias`` / ``mlp_bias`` configs add o / MLP biases.
"""
from __future__ import annotations

from ..canonical import Canonical, Dims, Embeddings, LayerWeights
from .base import (
    HEAD_BIAS, NORM, ROTARY, Names, Rule, TensorSource, account, cfg, checked_layer_fn,
)
from .bert import linear_in, linear_out

FAMILY = "llama"
MODEL_TYPES = ("llama", "mistral", "qwen2")

L = r"layers\.(?P<layer>\d+)\."
RULES = [
    Rule(r"embed_tokens\.weight", "W_E", "embedding"),
    Rule(r"lm_head\.weight", "W_U", "embedding"),
    Rule(r"norm\.weight", "ln_final", None, NORM),
    Rule(L + r"(input_layernorm|post_attention_layernorm)\.weight", "ln", None, NORM),
    Rule(L + r"self_attn\.q_proj\.weight", "W_Q", "vectors:q", "also feeds pairs:qk"),
    Rule(L + r"self_attn\.k_proj\.weight", "W_K", "vectors:k",
         "one per kv head (GQA: shared by n_heads / n_kv_heads query heads); also feeds pairs:qk"),
    Rule(L + r"self_attn\.v_proj\.weight", "W_V", "vectors:v",
         "one per kv head (GQA); also feeds pairs:ov"),
    Rule(L + r"self_attn\.[qkv]_proj\.bias", "b_QKV", None, HEAD_BIAS),
    Rule(L + r"self_attn\.o_proj\.weight", "W_O", "vectors:o", "also feeds pairs:ov"),
    Rule(L + r"self_attn\.o_proj\.bias", "b_O", "vectors:bias_attn_out"),
    Rule(L + r"self_attn\.rotary_emb\.inv_freq", "rotary", None, ROTARY),
    Rule(r"rotary_emb\.inv_freq", "rotary", None, ROTARY),
    Rule(L + r"mlp\.gate_proj\.weight", "W_gate", "vectors:ff_gate"),
    Rule(L + r"mlp\.up_proj\.weight", "W_in", "vectors:ff_key"),
    Rule(L + r"mlp\.(gate|up)_proj\.bias", "b_in", None, HEAD_BIAS),
    Rule(L + r"mlp\.down_proj\.weight", "W_out", "vectors:ff_value"),
    Rule(L + r"mlp\.down_proj\.bias", "b_out", "vectors:bias_ff_out"),
]


def adapt(source: TensorSource, config, dtype) -> Canonical:
    names = Names(source.keys(), ["embed_tokens.weight"], FAMILY)
    f32 = lambda name: source.get(name).to(dtype).contiguous()
    get = lambda suffix: f32(names.need(suffix))
    opt = lambda suffix: f32(names.base(suffix)) if names.base(suffix) else None

    d_model = cfg(config, "hidden_size")
    n_heads = cfg(config, "num_attention_heads")
    n_kv = cfg(config, "num_key_value_heads", default=n_heads)
    d_head = cfg(config, "head_dim") or d_model // n_heads

    W_E = get("embed_tokens.weight")
    lm_head = names.head("lm_head.weight")
    tied = lm_head is None or bool(getattr(config, "tie_word_embeddings", False))
    W_U = W_E.T if tied else f32(lm_head).T.contiguous()
    dims = Dims(
        architecture=FAMILY, n_layers=cfg(config, "num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=n_kv, d_model=d_model, d_head=d_head, d_ff=cfg(config, "intermediate_size"),
        d_vocab=W_E.shape[0], n_ctx=None, tied=tied, gated=True, norm_position="pre",
    )
    emb = Embeddings(W_E=W_E, W_U=W_U, ln_final_w=get("norm.weight"))
    act = cfg(config, "hidden_act", default="silu")

    def layer(l: int) -> LayerWeights:
        p = f"layers.{l}."
        a, m = p + "self_attn.", p + "mlp."
        bias = lambda s, n: None if (b := opt(a + s)) is None else b.reshape(n, d_head)
        return LayerWeights(
            W_Q=linear_in(get(a + "q_proj.weight"), n_heads, d_head),
            W_K=linear_in(get(a + "k_proj.weight"), n_kv, d_head),
            W_V=linear_in(get(a + "v_proj.weight"), n_kv, d_head),
            b_Q=bias("q_proj.bias", n_heads), b_K=bias("k_proj.bias", n_kv),
            b_V=bias("v_proj.bias", n_kv),
            W_O=linear_out(get(a + "o_proj.weight"), n_heads, d_head), b_O=opt(a + "o_proj.bias"),
            W_gate=get(m + "gate_proj.weight").T.contiguous(), b_gate=opt(m + "gate_proj.bias"),
            W_in=get(m + "up_proj.weight").T.contiguous(), b_in=opt(m + "up_proj.bias"),
            W_out=get(m + "down_proj.weight").T.contiguous(), b_out=opt(m + "down_proj.bias"),
            ln_attn_w=get(p + "input_layernorm.weight"),
            ln_mlp_w=get(p + "post_attention_layernorm.weight"),
            act=act,
        )

    return Canonical(dims=dims, embeddings=emb, layer_fn=checked_layer_fn(layer, dims.n_layers),
                     parameters=account(source, names, RULES, FAMILY))
