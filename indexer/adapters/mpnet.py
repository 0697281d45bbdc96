"""MPNet (all-mpnet-base-v2): post-LN encoder like BERT, plus a relative-position attention bias.

The relative bias (``encoder.relative_attention_bias`` [n_buckets, n_heads]) is added to the
attention logits; it is not a direction in residual space, so it is listed and not projected.
Learned positions are indexed from ``padding_idx + 1`` (RoBERTa style): row ``p + pad + 1`` of
W_pos is position ``p``; we keep the table as stored.
"""
from __future__ import annotations

from ..canonical import Canonical, Embeddings, LayerWeights
from .base import (
    HEAD_BIAS, LOGIT_BIAS, NORM, POSITION_IDS, Names, Rule, TensorSource, account, cfg,
    checked_layer_fn,
)
from .bert import MLM_TRANSFORM, POOLER, encoder_dims, linear_in, linear_out

FAMILY = "mpnet"
MODEL_TYPES = ("mpnet",)

LN = r"LayerNorm\.(weight|bias)"
L = r"encoder\.layer\.(?P<layer>\d+)\."
RULES = [
    Rule(r"embeddings\.word_embeddings\.weight", "W_E", "embedding"),
    Rule(r"embeddings\.position_embeddings\.weight", "W_pos", "vectors:pos"),
    Rule(r"embeddings\.position_ids", "buffer", None, POSITION_IDS),
    Rule(r"embeddings\." + LN, "ln_embed", None, NORM),
    Rule(r"encoder\.relative_attention_bias\.weight", "relative_attention_bias", None,
         "relative-position bias added to attention logits [n_buckets, n_heads]; "
         "not a residual direction"),
    Rule(L + r"attention\.attn\.q\.weight", "W_Q", "vectors:q", "also feeds pairs:qk"),
    Rule(L + r"attention\.attn\.k\.weight", "W_K", "vectors:k", "also feeds pairs:qk"),
    Rule(L + r"attention\.attn\.v\.weight", "W_V", "vectors:v", "also feeds pairs:ov"),
    Rule(L + r"attention\.attn\.[qkv]\.bias", "b_QKV", None, HEAD_BIAS),
    Rule(L + r"attention\.attn\.o\.weight", "W_O", "vectors:o", "also feeds pairs:ov"),
    Rule(L + r"attention\.attn\.o\.bias", "b_O", "vectors:bias_attn_out"),
    Rule(L + r"attention\." + LN, "ln_attn", None, NORM),
    Rule(L + r"intermediate\.dense\.weight", "W_in", "vectors:ff_key"),
    Rule(L + r"intermediate\.dense\.bias", "b_in", None, HEAD_BIAS),
    Rule(L + r"output\.dense\.weight", "W_out", "vectors:ff_value"),
    Rule(L + r"output\.dense\.bias", "b_out", "vectors:bias_ff_out"),
    Rule(L + r"output\." + LN, "ln_mlp", None, NORM),
    Rule(r"pooler\.dense\.(weight|bias)", "pooler", None, POOLER),
    Rule(r"lm_head\.decoder\.weight", "W_U", "embedding"),
    Rule(r"lm_head\.(decoder\.)?bias", "b_U", None, LOGIT_BIAS),
    Rule(r"lm_head\.(dense|layer_norm)\.(weight|bias)", "mlm_transform", None, MLM_TRANSFORM),
]


def adapt(source: TensorSource, config, dtype) -> Canonical:
    names = Names(source.keys(), ["embeddings.word_embeddings.weight"], FAMILY)
    get = lambda suffix: source.get(names.need(suffix)).to(dtype).contiguous()

    W_E = get("embeddings.word_embeddings.weight")
    decoder = names.head("lm_head.decoder.weight")
    tied = decoder is None or bool(getattr(config, "tie_word_embeddings", True))
    W_U = W_E.T if tied else source.get(decoder).to(dtype).T.contiguous()
    bias = names.head("lm_head.bias") or names.head("lm_head.decoder.bias")
    W_pos = get("embeddings.position_embeddings.weight")
    dims = encoder_dims(config, FAMILY, W_E, tied, W_pos.shape[0])
    emb = Embeddings(
        W_E=W_E, W_U=W_U, W_pos=W_pos,
        b_U=source.get(bias).to(dtype) if bias else None,
        ln_embed_w=get("embeddings.LayerNorm.weight"), ln_embed_b=get("embeddings.LayerNorm.bias"),
    )
    n_heads, d_head, act = dims.n_heads, dims.d_head, cfg(config, "hidden_act", default="gelu")

    def layer(l: int) -> LayerWeights:
        p = f"encoder.layer.{l}."
        a = p + "attention.attn."
        return LayerWeights(
            W_Q=linear_in(get(a + "q.weight"), n_heads, d_head),
            W_K=linear_in(get(a + "k.weight"), n_heads, d_head),
            W_V=linear_in(get(a + "v.weight"), n_heads, d_head),
            b_Q=get(a + "q.bias").reshape(n_heads, d_head),
            b_K=get(a + "k.bias").reshape(n_heads, d_head),
            b_V=get(a + "v.bias").reshape(n_heads, d_head),
            W_O=linear_out(get(a + "o.weight"), n_heads, d_head),
            b_O=get(a + "o.bias"),
            ln_attn_w=get(p + "attention.LayerNorm.weight"),
            ln_attn_b=get(p + "attention.LayerNorm.bias"),
            W_in=get(p + "intermediate.dense.weight").T.contiguous(),
            b_in=get(p + "intermediate.dense.bias"),
            W_out=get(p + "output.dense.weight").T.contiguous(),
            b_out=get(p + "output.dense.bias"),
            ln_mlp_w=get(p + "output.LayerNorm.weight"), ln_mlp_b=get(p + "output.LayerNorm.bias"),
            act=act,
        )

    return Canonical(dims=dims, embeddings=emb, layer_fn=checked_layer_fn(layer, dims.n_layers),
                     parameters=account(source, names, RULES, FAMILY))
