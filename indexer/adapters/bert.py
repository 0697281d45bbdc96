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
    HEAD_BIAS, LOGIT_BIAS, NORM, POSITION_IDS, Names, Rule, TensorSource, account, cfg,
    checked_layer_fn, split_heads_in, split_heads_out,
)

FAMILY = "bert"
MODEL_TYPES = ("bert",)

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


def linear_in(w, n_heads, d_head):
    """nn.Linear weight [n_heads * d_head, d_model] -> [n_heads, d_model, d_head]."""
    return split_heads_in(w.T, n_heads, d_head)


def linear_out(w, n_heads, d_head):
    """nn.Linear weight [d_model, n_heads * d_head] -> [n_heads, d_head, d_model]."""
    return split_heads_out(w.T, n_heads, d_head)


def encoder_dims(config, family, W_E, tied, n_ctx):
    d_model = cfg(config, "hidden_size")
    n_heads = cfg(config, "num_attention_heads")
    return Dims(
        architecture=family, n_layers=cfg(config, "num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=n_heads, d_model=d_model, d_head=d_model // n_heads,
        d_ff=cfg(config, "intermediate_size"), d_vocab=W_E.shape[0], n_ctx=n_ctx,
        tied=tied, gated=False, norm_position="post",
    )


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


def adapt(source: TensorSource, config, dtype) -> Canonical:
    return adapt_encoder(source, config, dtype, FAMILY, RULES, BERT_KEYS)


def adapt_encoder(source: TensorSource, config, dtype, family: str, rules, keys: EncoderKeys) -> Canonical:
    """Canonical weights of a BERT-like post-LN encoder (BERT, MPNet)."""
    names = Names(source.keys(), ["embeddings.word_embeddings.weight"], family)
    get = lambda suffix: source.get(names.need(suffix)).to(dtype).contiguous()

    W_E = get("embeddings.word_embeddings.weight")
    decoder = names.head(keys.decoder)
    tied = decoder is None or bool(getattr(config, "tie_word_embeddings", True))
    W_U = W_E.T if tied else source.get(decoder).to(dtype).T.contiguous()
    bias = next((b for b in map(names.head, keys.logit_bias) if b), None)
    W_pos = get("embeddings.position_embeddings.weight")
    dims = encoder_dims(config, family, W_E, tied, W_pos.shape[0])
    emb = Embeddings(
        W_E=W_E, W_U=W_U, W_pos=W_pos,
        b_U=source.get(bias).to(dtype) if bias else None,
        ln_embed_w=get("embeddings.LayerNorm.weight"), ln_embed_b=get("embeddings.LayerNorm.bias"),
    )
    n_heads, d_head, act = dims.n_heads, dims.d_head, cfg(config, "hidden_act", default="gelu")

    def layer(l: int) -> LayerWeights:
        p = f"encoder.layer.{l}."
        a = p + keys.attn
        o = p + keys.o
        return LayerWeights(
            W_Q=linear_in(get(a + keys.q + ".weight"), n_heads, d_head),
            W_K=linear_in(get(a + keys.k + ".weight"), n_heads, d_head),
            W_V=linear_in(get(a + keys.v + ".weight"), n_heads, d_head),
            b_Q=get(a + keys.q + ".bias").reshape(n_heads, d_head),
            b_K=get(a + keys.k + ".bias").reshape(n_heads, d_head),
            b_V=get(a + keys.v + ".bias").reshape(n_heads, d_head),
            W_O=linear_out(get(o + ".weight"), n_heads, d_head),
            b_O=get(o + ".bias"),
            ln_attn_w=get(p + keys.ln_attn + ".weight"),
            ln_attn_b=get(p + keys.ln_attn + ".bias"),
            W_in=get(p + "intermediate.dense.weight").T.contiguous(),
            b_in=get(p + "intermediate.dense.bias"),
            W_out=get(p + "output.dense.weight").T.contiguous(),
            b_out=get(p + "output.dense.bias"),
            ln_mlp_w=get(p + "output.LayerNorm.weight"), ln_mlp_b=get(p + "output.LayerNorm.bias"),
            act=act,
        )

    return Canonical(dims=dims, embeddings=emb, layer_fn=checked_layer_fn(layer, dims.n_layers),
                     parameters=account(source, names, rules, family))
