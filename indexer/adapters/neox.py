"""GPT-NeoX / Pythia: fused query_key_value, parallel attention + MLP, partial RoPE, untied.

``query_key_value.weight`` is an nn.Linear [3 d_model, d_model] whose output dim is laid out
per head as [n_heads, 3, d_head] (HF views it as (..., n_heads, 3 * d_head) and chunks), *not*
as [Q | K | V] like GPT-2. W_U is ``embed_out`` (outside the ``gpt_neox.`` prefix).
With ``use_parallel_residual`` both attention and MLP read the same x (Dims.parallel_attn_mlp).
"""
from __future__ import annotations

from ..canonical import Canonical, Dims, Embeddings, LayerWeights
from .base import (
    HEAD_BIAS, MASK, NORM, ROTARY, Names, Rule, TensorSource, account, cfg, checked_layer_fn,
)
from .bert import linear_out

FAMILY = "neox"
MODEL_TYPES = ("gpt_neox",)

L = r"layers\.(?P<layer>\d+)\."
RULES = [
    Rule(r"embed_in\.weight", "W_E", "embedding"),
    Rule(r"embed_out\.weight", "W_U", "embedding"),
    Rule(r"final_layer_norm\.(weight|bias)", "ln_final", None, NORM),
    Rule(L + r"(input_layernorm|post_attention_layernorm)\.(weight|bias)", "ln", None, NORM),
    Rule(L + r"attention\.query_key_value\.weight", "W_QKV", "vectors:q",
         "fused per head [n_heads, 3, d_head]: split into vectors:q / vectors:k / vectors:v; "
         "Q and K also feed pairs:qk"),
    Rule(L + r"attention\.query_key_value\.bias", "b_QKV", None, HEAD_BIAS),
    Rule(L + r"attention\.dense\.weight", "W_O", "vectors:o", "also feeds pairs:ov"),
    Rule(L + r"attention\.dense\.bias", "b_O", "vectors:bias_attn_out"),
    Rule(L + r"attention\.rotary_emb\.inv_freq", "rotary", None, ROTARY),
    Rule(r"rotary_emb\.inv_freq", "rotary", None, ROTARY),
    Rule(L + r"attention\.(bias|masked_bias)", "mask", None, MASK),
    Rule(L + r"mlp\.dense_h_to_4h\.weight", "W_in", "vectors:ff_key"),
    Rule(L + r"mlp\.dense_h_to_4h\.bias", "b_in", None, HEAD_BIAS),
    Rule(L + r"mlp\.dense_4h_to_h\.weight", "W_out", "vectors:ff_value"),
    Rule(L + r"mlp\.dense_4h_to_h\.bias", "b_out", "vectors:bias_ff_out"),
]


def adapt(source: TensorSource, config, dtype) -> Canonical:
    names = Names(source.keys(), ["embed_in.weight"], FAMILY)
    f32 = lambda name: source.get(name).to(dtype).contiguous()
    get = lambda suffix: f32(names.need(suffix))
    opt = lambda suffix: f32(names.base(suffix)) if names.base(suffix) else None

    d_model = cfg(config, "hidden_size")
    n_heads = cfg(config, "num_attention_heads")
    d_head = d_model // n_heads

    W_E = get("embed_in.weight")
    embed_out = names.head("embed_out.weight")
    tied = embed_out is None or bool(getattr(config, "tie_word_embeddings", False))
    W_U = W_E.T if tied else f32(embed_out).T.contiguous()
    dims = Dims(
        architecture=FAMILY, n_layers=cfg(config, "num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=n_heads, d_model=d_model, d_head=d_head, d_ff=cfg(config, "intermediate_size"),
        d_vocab=W_E.shape[0], n_ctx=None, tied=tied, gated=False, norm_position="pre",
        parallel_attn_mlp=bool(cfg(config, "use_parallel_residual", default=True)),
    )
    emb = Embeddings(W_E=W_E, W_U=W_U, ln_final_w=get("final_layer_norm.weight"),
                     ln_final_b=get("final_layer_norm.bias"))
    act = cfg(config, "hidden_act", default="gelu")

    def layer(l: int) -> LayerWeights:
        p = f"layers.{l}."
        a = p + "attention."
        # [3 d_model, d_model] -> [n_heads, 3, d_head, d_model] -> each [n_heads, d_model, d_head]
        w = get(a + "query_key_value.weight").reshape(n_heads, 3, d_head, d_model)
        W_Q, W_K, W_V = (w[:, i].transpose(1, 2).contiguous() for i in range(3))
        b = opt(a + "query_key_value.bias")
        b_Q = b_K = b_V = None
        if b is not None:
            b_Q, b_K, b_V = (b.reshape(n_heads, 3, d_head)[:, i].contiguous() for i in range(3))
        return LayerWeights(
            W_Q=W_Q, W_K=W_K, W_V=W_V, b_Q=b_Q, b_K=b_K, b_V=b_V,
            W_O=linear_out(get(a + "dense.weight"), n_heads, d_head), b_O=opt(a + "dense.bias"),
            W_in=get(p + "mlp.dense_h_to_4h.weight").T.contiguous(),
            b_in=opt(p + "mlp.dense_h_to_4h.bias"),
            W_out=get(p + "mlp.dense_4h_to_h.weight").T.contiguous(),
            b_out=opt(p + "mlp.dense_4h_to_h.bias"),
            ln_attn_w=get(p + "input_layernorm.weight"), ln_attn_b=get(p + "input_layernorm.bias"),
            ln_mlp_w=get(p + "post_attention_layernorm.weight"),
            ln_mlp_b=get(p + "post_attention_layernorm.bias"),
            act=act,
        )

    return Canonical(dims=dims, embeddings=emb, layer_fn=checked_layer_fn(layer, dims.n_layers),
                     parameters=account(source, names, RULES, FAMILY))
