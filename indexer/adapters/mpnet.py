"""MPNet (all-mpnet-base-v2): post-LN encoder like BERT, plus a relative-position attention bias.

The relative bias (``encoder.relative_attention_bias`` [n_buckets, n_heads]) is added to the
attention logits; it is not a direction in residual space, so it is listed and not projected.
Learned positions are indexed from ``padding_idx + 1`` (RoBERTa style): row ``p + pad + 1`` of
W_pos is position ``p``; we keep the table as stored.
"""
from __future__ import annotations

from ..canonical import Canonical
from .base import HEAD_BIAS, LOGIT_BIAS, NORM, POSITION_IDS, Rule, TensorSource
from .bert import MLM_TRANSFORM, POOLER, EncoderKeys, adapt_encoder, mlp_rules


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
    *mlp_rules(L, LN),
    Rule(r"pooler\.dense\.(weight|bias)", "pooler", None, POOLER),
    Rule(r"lm_head\.decoder\.weight", "W_U", "embedding"),
    Rule(r"lm_head\.(decoder\.)?bias", "b_U", None, LOGIT_BIAS),
    Rule(r"lm_head\.(dense|layer_norm)\.(weight|bias)", "mlm_transform", None, MLM_TRANSFORM),
]


MPNET_KEYS = EncoderKeys(
    decoder="lm_head.decoder.weight",
    logit_bias=("lm_head.bias", "lm_head.decoder.bias"),
    attn="attention.attn.", q="q", k="k", v="v", o="attention.attn.o", ln_attn="attention.LayerNorm",
)


def adapt(source: TensorSource, config, dtype, family: str) -> Canonical:
    return adapt_encoder(source, config, dtype, family, RULES, MPNET_KEYS)
