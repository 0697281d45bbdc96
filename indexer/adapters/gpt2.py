"""GPT-2: Conv1D weights stored (in, out), fused c_attn = [Q | K | V], learned positions, tied.

Checkpoint names (prefix ``transformer.`` or none in the original OpenAI upload):
``wte``, ``wpe``, ``h.{l}.ln_1``, ``h.{l}.attn.c_attn`` [d_model, 3 d_model],
``h.{l}.attn.c_proj`` [d_model, d_model], ``h.{l}.ln_2``, ``h.{l}.mlp.c_fc`` [d_model, d_ff],
``h.{l}.mlp.c_proj`` [d_ff, d_model], ``ln_f``, optional ``lm_head``.
"""
from __future__ import annotations

from ..canonical import Canonical, Dims, Embeddings, LayerWeights
from .base import (
    HEAD_BIAS, MASK, NORM, Names, Reader, Rule, TensorSource, cfg, finish, head_dim,
    split_heads_in, split_heads_out, unembedding,
)


L = r"h\.(?P<layer>\d+)\."
RULES = [
    Rule(r"wte\.weight", "W_E", "embedding"),
    Rule(r"wpe\.weight", "W_pos", "vectors:pos"),
    Rule(r"lm_head\.weight", "W_U", "embedding"),
    Rule(r"ln_f\.(weight|bias)", "ln_final", None, NORM),
    Rule(L + r"ln_[12]\.(weight|bias)", "ln", None, NORM),
    Rule(L + r"attn\.c_attn\.weight", "W_QKV", "vectors:q",
         "fused [Q|K|V]: columns split into vectors:q / vectors:k / vectors:v, Q and K also feed pairs:qk"),
    Rule(L + r"attn\.c_attn\.bias", "b_QKV", None, HEAD_BIAS),
    Rule(L + r"attn\.c_proj\.weight", "W_O", "vectors:o", "rows of W_O; also feeds pairs:ov"),
    Rule(L + r"attn\.c_proj\.bias", "b_O", "vectors:bias_attn_out"),
    Rule(L + r"mlp\.c_fc\.weight", "W_in", "vectors:ff_key"),
    Rule(L + r"mlp\.c_fc\.bias", "b_in", None, HEAD_BIAS),
    Rule(L + r"mlp\.c_proj\.weight", "W_out", "vectors:ff_value"),
    Rule(L + r"mlp\.c_proj\.bias", "b_out", "vectors:bias_ff_out"),
    Rule(L + r"attn\.(bias|masked_bias)", "mask", None, MASK),
]


def adapt(source: TensorSource, config, dtype, family: str) -> Canonical:
    r = Reader(source, Names(source.keys(), ["wte.weight"], family), dtype)
    d_model = cfg(config, "n_embd", "hidden_size")
    n_heads = cfg(config, "n_head", "num_attention_heads")
    d_head = head_dim(config, d_model, n_heads)
    d_ff = cfg(config, "n_inner") or 4 * d_model

    W_E = r.need("wte.weight")
    W_U, tied = unembedding(r, W_E, "lm_head.weight", config, tied_default=True)
    dims = Dims(
        architecture=family, n_layers=cfg(config, "n_layer", "num_hidden_layers"),
        n_heads=n_heads, n_kv_heads=n_heads, d_model=d_model, d_head=d_head, d_ff=d_ff,
        d_vocab=W_E.shape[0], n_ctx=cfg(config, "n_positions", "max_position_embeddings"),
        tied=tied, gated=False, norm_position="pre",
    )
    emb = Embeddings(W_E=W_E, W_U=W_U, W_pos=r.need("wpe.weight"),
                     ln_final_w=r.need("ln_f.weight"), ln_final_b=r.need("ln_f.bias"))
    act = cfg(config, "activation_function", default="gelu_new")

    def layer(l: int) -> LayerWeights:
        p = f"h.{l}."
        w_qkv = r.need(p + "attn.c_attn.weight")  # Conv1D: [d_model, 3 d_model], already x @ W
        b_qkv = r.need(p + "attn.c_attn.bias")
        W_Q, W_K, W_V = (split_heads_in(w, n_heads, d_head) for w in w_qkv.split(n_heads * d_head, dim=1))
        b_Q, b_K, b_V = (b.reshape(n_heads, d_head) for b in b_qkv.split(n_heads * d_head))
        return LayerWeights(
            W_Q=W_Q, W_K=W_K, W_V=W_V, b_Q=b_Q, b_K=b_K, b_V=b_V,
            W_O=split_heads_out(r.need(p + "attn.c_proj.weight"), n_heads, d_head),
            b_O=r.need(p + "attn.c_proj.bias"),
            W_in=r.need(p + "mlp.c_fc.weight"), b_in=r.need(p + "mlp.c_fc.bias"),
            W_out=r.need(p + "mlp.c_proj.weight"), b_out=r.need(p + "mlp.c_proj.bias"),
            ln_attn_w=r.need(p + "ln_1.weight"), ln_attn_b=r.need(p + "ln_1.bias"),
            ln_mlp_w=r.need(p + "ln_2.weight"), ln_mlp_b=r.need(p + "ln_2.bias"),
            act=act,
        )

    return finish(r, dims, emb, layer, RULES)
