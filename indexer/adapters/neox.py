"""GPT-NeoX / Pythia: fused query_key_value, parallel attention + MLP, partial RoPE, untied.

``query_key_value.weight`` is an nn.Linear [3 d_model, d_model] whose output dim is laid out
per head as [n_heads, 3, d_head] (HF views it as (..., n_heads, 3 * d_head) and chunks), *not*
as [Q | K | V] like GPT-2. W_U is ``embed_out`` (outside the ``gpt_neox.`` prefix).
With ``use_parallel_residual`` both attention and MLP read the same x (Dims.parallel_attn_mlp).
"""
from __future__ import annotations

from ..canonical import Canonical, Dims, Embeddings, LayerWeights
from .base import (
    HEAD_BIAS, MASK, NORM, ROTARY, Names, Reader, Rule, TensorSource, cfg, finish, head_dim,
    linear_out, unembedding,
)


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


def adapt(source: TensorSource, config, dtype, family: str) -> Canonical:
    r = Reader(source, Names(source.keys(), ["embed_in.weight"], family), dtype)
    d_model = cfg(config, "hidden_size")
    n_heads = cfg(config, "num_attention_heads")
    d_head = head_dim(config, d_model, n_heads)

    W_E = r.need("embed_in.weight")
    W_U, tied = unembedding(r, W_E, "embed_out.weight", config, tied_default=False)
    dims = Dims(
        architecture=family, n_layers=cfg(config, "num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=n_heads, d_model=d_model, d_head=d_head, d_ff=cfg(config, "intermediate_size"),
        d_vocab=W_E.shape[0], n_ctx=None, tied=tied, gated=False, norm_position="pre",
        parallel_attn_mlp=bool(cfg(config, "use_parallel_residual", default=True)),
    )
    emb = Embeddings(W_E=W_E, W_U=W_U, ln_final_w=r.need("final_layer_norm.weight"),
                     ln_final_b=r.need("final_layer_norm.bias"))
    act = cfg(config, "hidden_act", default="gelu")

    def layer(l: int) -> LayerWeights:
        p = f"layers.{l}."
        a = p + "attention."
        W_Q, W_K, W_V = per_head_qkv(r.need(a + "query_key_value.weight"), n_heads, d_head)
        b = r.opt(a + "query_key_value.bias")
        b_Q = b_K = b_V = None
        if b is not None:
            b_Q, b_K, b_V = (b.reshape(n_heads, 3, d_head)[:, i].contiguous() for i in range(3))
        return LayerWeights(
            W_Q=W_Q, W_K=W_K, W_V=W_V, b_Q=b_Q, b_K=b_K, b_V=b_V,
            W_O=linear_out(r.need(a + "dense.weight"), n_heads, d_head), b_O=r.opt(a + "dense.bias"),
            W_in=r.need(p + "mlp.dense_h_to_4h.weight").T.contiguous(),
            b_in=r.opt(p + "mlp.dense_h_to_4h.bias"),
            W_out=r.need(p + "mlp.dense_4h_to_h.weight").T.contiguous(),
            b_out=r.opt(p + "mlp.dense_4h_to_h.bias"),
            ln_attn_w=r.need(p + "input_layernorm.weight"), ln_attn_b=r.need(p + "input_layernorm.bias"),
            ln_mlp_w=r.need(p + "post_attention_layernorm.weight"),
            ln_mlp_b=r.need(p + "post_attention_layernorm.bias"),
            act=act,
        )

    return finish(r, dims, emb, layer, RULES)


def per_head_qkv(w, n_heads: int, d_head: int):
    """nn.Linear [n_heads * 3 * d_head, d_model] laid out [n_heads, 3, d_head] along the output
    (NeoX, BLOOM) -> W_Q, W_K, W_V, each [n_heads, d_model, d_head]."""
    w = w.reshape(n_heads, 3, d_head, w.shape[-1])
    return tuple(w[:, i].transpose(1, 2).contiguous() for i in range(3))
