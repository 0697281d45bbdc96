"""BERT (covers MiniLM and other BertModel checkpoints): post-LN encoder, learned positions.

``nn.Linear`` stores (out, in), so every weight is transposed to the row-vector form.
There is usually no LM head: W_U = W_E.T. A ``BertForMaskedLM`` checkpoint's decoder
(``cls.predictions.decoder``, tied to W_E or not) becomes W_U; its transform (dense + GELU +
LayerNorm, applied before the decoder) is listed but not folded in.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..canonical import Canonical, Dims, Embeddings, LayerWeights
from .base import (
    HEAD_BIAS, LOGIT_BIAS, NORM, POSITION_IDS, Names, Reader, Rule, TensorSource, cfg, finish,
    head_dim, linear_in, linear_out, unembedding,
)


LN = r"LayerNorm\.(weight|bias|gamma|beta)"
POOLER = "pooler: a map applied to the [CLS] output only, outside the residual stream"
MLM_TRANSFORM = ("MLM-head transform (dense + GELU + LayerNorm) applied before W_U; "
                 "W_U is projected on directly, as in the paper")
TOKEN_TYPE = ("token-type (segment A/B) embeddings: a constant added per segment, not a "
              "vocabulary item or a unit; not projected")

L = r"encoder\.layer\.(?P<layer>\d+)\."


def mlp_rules(layer: str, ln: str) -> list[Rule]:
    """The MLP block of a BERT-like encoder layer (BERT and MPNet name it alike)."""
    return [
        Rule(layer + r"intermediate\.dense\.weight", "W_in", "vectors:ff_key"),
        Rule(layer + r"intermediate\.dense\.bias", "b_in", None, HEAD_BIAS),
        Rule(layer + r"output\.dense\.weight", "W_out", "vectors:ff_value"),
        Rule(layer + r"output\.dense\.bias", "b_out", "vectors:bias_ff_out"),
        Rule(layer + r"output\." + ln, "ln_mlp", None, NORM),
    ]


RULES = [
    Rule(r"embeddings\.word_embeddings\.weight", "W_E", "embedding"),
    Rule(r"embeddings\.position_embeddings\.weight", "W_pos", "vectors:pos"),
    Rule(r"embeddings\.token_type_embeddings\.weight", "token_type", None, TOKEN_TYPE),
    Rule(r"embeddings\.position_ids", "buffer", None, POSITION_IDS),
    Rule(r"embeddings\.token_type_ids", "buffer", None, "token-type-id buffer, not a weight"),
    Rule(r"embeddings\." + LN, "ln_embed", None, NORM),
    Rule(L + r"attention\.self\.query\.weight", "W_Q", "vectors:q", "also feeds pairs:qk"),
    Rule(L + r"attention\.self\.key\.weight", "W_K", "vectors:k", "also feeds pairs:qk"),
    Rule(L + r"attention\.self\.value\.weight", "W_V", "vectors:v", "also feeds pairs:ov"),
    Rule(L + r"attention\.self\.(query|key|value)\.bias", "b_QKV", None, HEAD_BIAS),
    Rule(L + r"attention\.output\.dense\.weight", "W_O", "vectors:o", "also feeds pairs:ov"),
    Rule(L + r"attention\.output\.dense\.bias", "b_O", "vectors:bias_attn_out"),
    Rule(L + r"attention\.output\." + LN, "ln_attn", None, NORM),
    *mlp_rules(L, LN),
    Rule(r"pooler\.dense\.(weight|bias)", "pooler", None, POOLER),
    Rule(r"cls\.predictions\.decoder\.weight", "W_U", "embedding"),
    Rule(r"cls\.predictions\.(decoder\.)?bias", "b_U", None, LOGIT_BIAS),
    Rule(r"cls\.predictions\.transform\..*", "mlm_transform", None, MLM_TRANSFORM),
    Rule(r"cls\.seq_relationship\.(weight|bias)", "nsp_head", None,
         "next-sentence classifier on the [CLS] output, not a vocabulary map"),
]


@dataclass(frozen=True)
class EncoderKeys:
    """Where a post-LN encoder keeps its tensors (suffixes after the checkpoint's prefix).

    BERT and MPNet differ only in these names; ``adapt_encoder`` does the rest for both.
    """

    decoder: str  # LM-head decoder weight, if the checkpoint has an MLM head
    logit_bias: tuple[str, ...]  # LM-head bias, first found wins
    attn: str  # prefix of q/k/v/o inside a layer, e.g. "attention.self."
    q: str
    k: str
    v: str
    o: str  # output projection, relative to the layer
    ln_attn: str  # LayerNorm after the attention residual add, relative to the layer


BERT_KEYS = EncoderKeys(
    decoder="cls.predictions.decoder.weight",
    logit_bias=("cls.predictions.bias", "cls.predictions.decoder.bias"),
    attn="attention.self.", q="query", k="key", v="value",
    o="attention.output.dense", ln_attn="attention.output.LayerNorm",
)


def adapt(source: TensorSource, config, dtype, family: str) -> Canonical:
    return adapt_encoder(source, config, dtype, family, RULES, BERT_KEYS)


def adapt_encoder(source: TensorSource, config, dtype, family: str, rules, keys: EncoderKeys) -> Canonical:
    """Canonical weights of a BERT-like post-LN encoder (BERT, MPNet)."""
    r = Reader(source, Names(source.keys(), ["embeddings.word_embeddings.weight"], family), dtype)
    d_model = cfg(config, "hidden_size")
    n_heads = cfg(config, "num_attention_heads")
    d_head = head_dim(config, d_model, n_heads)

    W_E = r.need("embeddings.word_embeddings.weight")
    W_U, tied = unembedding(r, W_E, keys.decoder, config, tied_default=True)
    bias = next((b for b in map(r.head, keys.logit_bias) if b is not None), None)
    W_pos = r.need("embeddings.position_embeddings.weight")
    dims = Dims(
        architecture=family, n_layers=cfg(config, "num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=n_heads, d_model=d_model, d_head=d_head, d_ff=cfg(config, "intermediate_size"),
        d_vocab=W_E.shape[0], n_ctx=W_pos.shape[0], tied=tied, gated=False, norm_position="post",
    )
    emb = Embeddings(
        W_E=W_E, W_U=W_U, W_pos=W_pos, b_U=bias,
        ln_embed_w=r.need("embeddings.LayerNorm.weight"), ln_embed_b=r.need("embeddings.LayerNorm.bias"),
    )
    act = cfg(config, "hidden_act", default="gelu")

    def layer(l: int) -> LayerWeights:
        p = f"encoder.layer.{l}."
        a = p + keys.attn
        o = p + keys.o
        return LayerWeights(
            W_Q=linear_in(r.need(a + keys.q + ".weight"), n_heads, d_head),
            W_K=linear_in(r.need(a + keys.k + ".weight"), n_heads, d_head),
            W_V=linear_in(r.need(a + keys.v + ".weight"), n_heads, d_head),
            b_Q=r.need(a + keys.q + ".bias").reshape(n_heads, d_head),
            b_K=r.need(a + keys.k + ".bias").reshape(n_heads, d_head),
            b_V=r.need(a + keys.v + ".bias").reshape(n_heads, d_head),
            W_O=linear_out(r.need(o + ".weight"), n_heads, d_head),
            b_O=r.need(o + ".bias"),
            ln_attn_w=r.need(p + keys.ln_attn + ".weight"),
            ln_attn_b=r.need(p + keys.ln_attn + ".bias"),
            W_in=r.need(p + "intermediate.dense.weight").T.contiguous(),
            b_in=r.need(p + "intermediate.dense.bias"),
            W_out=r.need(p + "output.dense.weight").T.contiguous(),
            b_out=r.need(p + "output.dense.bias"),
            ln_mlp_w=r.need(p + "output.LayerNorm.weight"), ln_mlp_b=r.need(p + "output.LayerNorm.bias"),
            act=act,
        )

    return finish(r, dims, emb, layer, rules)
