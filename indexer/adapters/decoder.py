"""Llama-style decoders: one adapter, one ``Layout`` row per family that names its tensors.

``nn.Linear`` stores (out, in); every weight is transposed to the row-vector form
(``linear_in`` / ``linear_out``). ``q_proj`` [n_heads * d_head, d_model] splits into n_heads
query heads, ``k_proj`` / ``v_proj`` [n_kv_heads * d_head, d_model] into n_kv_heads heads; query
head h reads kv head ``h // (n_heads // n_kv_heads)`` (``Dims.kv_head``), HF's ``repeat_kv``.
Gated MLP: ``down(act(gate x) * up x)``, so W_gate = gate.T, W_in = up.T, W_out = down.T.
Q/K are canonicalised *before* rotary, which depends on position only.

A layout says where the norms sit: before a sublayer (``ln_attn`` / ``ln_mlp``), after it on
what it writes (``ln_attn_out`` / ``ln_mlp_out``: Gemma 2/3, OLMo-2), on the query / key states
(``q_norm`` / ``k_norm``); whether gains are stored as ``w`` or as ``w - 1`` (Gemma: the module
multiplies by ``1 + w``; canonical gains are always the multiplier); whether Q/K/V or gate/up
are fused. The coverage rules are generated from the same names, so a family that reuses a
layout is one row in ``adapters/__init__.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..canonical import Canonical, Dims, Embeddings, LayerWeights
from .base import (
    HEAD_BIAS, NORM, ROTARY, Names, Reader, Rule, TensorSource, cfg, finish, head_dim, linear_in,
    linear_out, unembedding,
)

QK_NORM = ("a gain on the query/key states inside the head (after the projection), folded into "
           "W_Q/W_K columns in the `folded` variant")


@dataclass(frozen=True)
class Layout:
    """Tensor names of one Llama-style family (suffixes after ``layers.N.``)."""

    ln_attn: Optional[str] = "input_layernorm"  # norm before attention (None: none)
    ln_mlp: Optional[str] = "post_attention_layernorm"  # norm before the MLP
    ln_attn_out: Optional[str] = None  # norm on the attention output, before the residual add
    ln_mlp_out: Optional[str] = None  # norm on the MLP output
    qk_norm: Optional[str] = None  # "head" (over d_head) or "full" (over all heads)
    gain_offset: float = 0.0  # Gemma stores w and multiplies by (1 + w)
    fused_qkv: Optional[str] = None  # Phi-3: one [Q | K | V] projection
    mlp: tuple = ("gate_proj", "up_proj", "down_proj")  # (gate, in, out); gate None: not gated
    fused_gate_up: Optional[str] = None  # Phi-3: gate_up_proj = [gate | up]
    attn: str = "self_attn."
    o: str = "o_proj"
    tied_default: bool = False  # when config.json does not say
    parallel: bool = False  # attention and MLP read the same x (both through ln_attn)
    embedding_multiplier: bool = False  # Gemma scales W_E by sqrt(d_model) at run time
    recorded: tuple = ()  # config fields that change the computation but are not parameters


LAYOUTS = {
    "llama": Layout(),
    "qwen3": Layout(qk_norm="head"),
    "gemma": Layout(gain_offset=1.0, tied_default=True, embedding_multiplier=True),
    "gemma2": Layout(
        ln_mlp="pre_feedforward_layernorm", ln_attn_out="post_attention_layernorm",
        ln_mlp_out="post_feedforward_layernorm", gain_offset=1.0, tied_default=True,
        embedding_multiplier=True,
        recorded=("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"),
    ),
    "gemma3_text": Layout(
        ln_mlp="pre_feedforward_layernorm", ln_attn_out="post_attention_layernorm",
        ln_mlp_out="post_feedforward_layernorm", qk_norm="head", gain_offset=1.0,
        tied_default=True, embedding_multiplier=True,
        recorded=("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"),
    ),
    "olmo2": Layout(ln_attn=None, ln_mlp=None, ln_attn_out="post_attention_layernorm",
                    ln_mlp_out="post_feedforward_layernorm", qk_norm="full"),
    "phi3": Layout(fused_qkv="qkv_proj", fused_gate_up="gate_up_proj",
                   mlp=(None, None, "down_proj")),
}

L = r"layers\.(?P<layer>\d+)\."


def rules(layout: Layout) -> list[Rule]:
    """Coverage rules for a layout, generated from the same names ``adapt`` reads."""
    a, m = L + layout.attn.replace(".", r"\."), L + r"mlp\."
    gate, up, down = layout.mlp
    norms = [n for n in (layout.ln_attn, layout.ln_mlp, layout.ln_attn_out, layout.ln_mlp_out) if n]
    out = [
        Rule(r"embed_tokens\.weight", "W_E", "embedding"),
        Rule(r"lm_head\.weight", "W_U", "embedding"),
        Rule(r"norm\.(weight|bias)", "ln_final", None, NORM),
        Rule(L + "(" + "|".join(norms) + r")\.(weight|bias)", "ln", None, NORM),
        Rule(a + layout.o + r"\.weight", "W_O", "vectors:o", "also feeds pairs:ov"),
        Rule(a + layout.o + r"\.bias", "b_O", "vectors:bias_attn_out"),
        Rule(a + r"rotary_emb\.inv_freq", "rotary", None, ROTARY),
        Rule(r"rotary_emb\.inv_freq", "rotary", None, ROTARY),
        Rule(m + down + r"\.weight", "W_out", "vectors:ff_value"),
        Rule(m + down + r"\.bias", "b_out", "vectors:bias_ff_out"),
    ]
    if layout.fused_qkv:
        out += [Rule(a + layout.fused_qkv + r"\.weight", "W_QKV", "vectors:q",
                     "fused [Q | K | V] along the output: split into vectors:q / vectors:k / "
                     "vectors:v; Q and K also feed pairs:qk, V pairs:ov"),
                Rule(a + layout.fused_qkv + r"\.bias", "b_QKV", None, HEAD_BIAS)]
    else:
        out += [
            Rule(a + r"q_proj\.weight", "W_Q", "vectors:q", "also feeds pairs:qk"),
            Rule(a + r"k_proj\.weight", "W_K", "vectors:k",
                 "one per kv head (GQA: shared by n_heads / n_kv_heads query heads); also feeds pairs:qk"),
            Rule(a + r"v_proj\.weight", "W_V", "vectors:v", "one per kv head (GQA); also feeds pairs:ov"),
            Rule(a + r"[qkv]_proj\.bias", "b_QKV", None, HEAD_BIAS),
        ]
    if layout.qk_norm:
        out.append(Rule(a + r"[qk]_norm\.weight", "qk_norm", None, QK_NORM))
    if layout.fused_gate_up:
        out += [Rule(m + layout.fused_gate_up + r"\.weight", "W_gate_in", "vectors:ff_gate",
                     "fused [gate | up] along the output: split into vectors:ff_gate / vectors:ff_key"),
                Rule(m + layout.fused_gate_up + r"\.bias", "b_in", None, HEAD_BIAS)]
    else:
        if gate:
            out.append(Rule(m + gate + r"\.weight", "W_gate", "vectors:ff_gate"))
        out += [Rule(m + up + r"\.weight", "W_in", "vectors:ff_key"),
                Rule(m + "(" + "|".join(n for n in (gate, up) if n) + r")\.bias", "b_in", None, HEAD_BIAS)]
    return out


def adapt(source: TensorSource, config, dtype, family: str) -> Canonical:
    layout = LAYOUTS[family]
    r = Reader(source, Names(source.keys(), ["embed_tokens.weight"], family), dtype)

    d_model = cfg(config, "hidden_size")
    n_heads = cfg(config, "num_attention_heads")
    n_kv = cfg(config, "num_key_value_heads", default=n_heads)
    d_head = head_dim(config, d_model, n_heads)
    d_ff = cfg(config, "intermediate_size")

    W_E = r.need("embed_tokens.weight")
    W_U, tied = unembedding(r, W_E, "lm_head.weight", config, layout.tied_default)
    dims = Dims(
        architecture=family, n_layers=cfg(config, "num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=n_kv, d_model=d_model, d_head=d_head, d_ff=d_ff, d_vocab=W_E.shape[0],
        n_ctx=None, tied=tied, gated=True, norm_position="pre", parallel_attn_mlp=layout.parallel,
        qk_norm=layout.qk_norm,
    )
    gain = lambda t: None if t is None else t + layout.gain_offset  # noqa: E731
    emb = Embeddings(W_E=W_E, W_U=W_U, ln_final_w=gain(r.need("norm.weight")), ln_final_b=r.opt("norm.bias"))
    act = cfg(config, "hidden_activation", "hidden_act", default="silu")
    conventions = {k: getattr(config, k) for k in layout.recorded if getattr(config, k, None) is not None}
    if layout.embedding_multiplier:
        conventions["embedding_multiplier"] = math.sqrt(d_model)

    def norm(p, name):
        return (None, None) if name is None else (gain(r.need(p + name + ".weight")), r.opt(p + name + ".bias"))

    def layer(l: int) -> LayerWeights:
        p = f"layers.{l}."
        a, m = p + layout.attn, p + "mlp."
        heads = lambda b, n: None if b is None else b.reshape(n, d_head)  # noqa: E731
        if layout.fused_qkv:
            sizes = (n_heads * d_head, n_kv * d_head, n_kv * d_head)
            w_q, w_k, w_v = r.need(a + layout.fused_qkv + ".weight").split(sizes, dim=0)
            b = r.opt(a + layout.fused_qkv + ".bias")
            b_q, b_k, b_v = (None, None, None) if b is None else b.split(sizes)
        else:
            w_q, w_k, w_v = (r.need(a + f"{x}_proj.weight") for x in "qkv")
            b_q, b_k, b_v = (r.opt(a + f"{x}_proj.bias") for x in "qkv")
        gate, up, down = layout.mlp
        if layout.fused_gate_up:
            w_gate, w_in = r.need(m + layout.fused_gate_up + ".weight").chunk(2, dim=0)
            b = r.opt(m + layout.fused_gate_up + ".bias")
            b_gate, b_in = (None, None) if b is None else b.chunk(2)
        else:
            w_gate, b_gate = r.need(m + gate + ".weight"), r.opt(m + gate + ".bias")
            w_in, b_in = r.need(m + up + ".weight"), r.opt(m + up + ".bias")
        ln_attn_w, ln_attn_b = norm(p, layout.ln_attn)
        ln_mlp_w, ln_mlp_b = norm(p, layout.ln_attn if layout.parallel else layout.ln_mlp)
        ln_attn_out_w, ln_attn_out_b = norm(p, layout.ln_attn_out)
        ln_mlp_out_w, ln_mlp_out_b = norm(p, layout.ln_mlp_out)
        q_norm = k_norm = None
        if layout.qk_norm == "head":  # one [d_head] gain shared by every head
            q_norm = gain(r.need(a + "q_norm.weight")).expand(n_heads, d_head).contiguous()
            k_norm = gain(r.need(a + "k_norm.weight")).expand(n_kv, d_head).contiguous()
        elif layout.qk_norm == "full":  # one gain per column of q_proj / k_proj
            q_norm = heads(gain(r.need(a + "q_norm.weight")), n_heads)
            k_norm = heads(gain(r.need(a + "k_norm.weight")), n_kv)
        return LayerWeights(
            W_Q=linear_in(w_q, n_heads, d_head), W_K=linear_in(w_k, n_kv, d_head),
            W_V=linear_in(w_v, n_kv, d_head),
            b_Q=heads(b_q, n_heads), b_K=heads(b_k, n_kv), b_V=heads(b_v, n_kv),
            W_O=linear_out(r.need(a + layout.o + ".weight"), n_heads, d_head),
            b_O=r.opt(a + layout.o + ".bias"),
            W_gate=w_gate.T.contiguous(), b_gate=b_gate,
            W_in=w_in.T.contiguous(), b_in=b_in,
            W_out=r.need(m + down + ".weight").T.contiguous(), b_out=r.opt(m + down + ".bias"),
            ln_attn_w=ln_attn_w, ln_attn_b=ln_attn_b, ln_mlp_w=ln_mlp_w, ln_mlp_b=ln_mlp_b,
            ln_attn_out_w=ln_attn_out_w, ln_attn_out_b=ln_attn_out_b,
            ln_mlp_out_w=ln_mlp_out_w, ln_mlp_out_b=ln_mlp_out_b,
            q_norm_w=q_norm, k_norm_w=k_norm, act=act,
        )

    return finish(r, dims, emb, layer, rules(layout), conventions)
