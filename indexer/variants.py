"""Projection variants (recorded per model in ``models.variant``).

``raw``: the weights as stored, as in the paper.

``folded``: the norm gains that scale a vector before it meets the residual stream are folded
into it, as OpenAI's neuron-viewer does, so the projection reflects what the layer really reads
or writes (RMSNorm/LayerNorm normalisation itself is a per-position scalar and is ignored):

* pre-LN (GPT-2, Llama, NeoX): the gain of the norm before attention multiplies the rows of
  W_Q, W_K, W_V; the gain before the MLP multiplies the rows of W_in and W_gate; the final
  norm's gain multiplies the rows of W_U. A LayerNorm bias beta becomes the bias
  ``beta @ W`` of the head / neuron (not a direction, so it only changes b_Q, b_in, ..., b_U).
* post-LN (BERT, MPNet): the norm after each residual add scales what the sublayer wrote, so
  its gain multiplies the columns of W_O / W_out and the output biases; read-side weights see
  the already-normalised stream and are unchanged.
* post-norms on a sublayer's output (Gemma 2/3, OLMo-2: ``ln_attn_out`` / ``ln_mlp_out``) scale
  what it writes, so their gains multiply the columns of W_O / W_out and the output biases,
  exactly like the post-LN case.
* query/key norms (Qwen3, Gemma 3, OLMo-2; the LayerNorms of Phi / StableLM ``qk_layernorm`` and
  Cohere ``use_qk_norm``): their gains multiply the columns of W_Q / W_K (and b_Q / b_K), so a
  stored q/k vector is the direction the head compares after the norm. A q/k LayerNorm's bias
  (Phi) comes after the gain, so it is added to b_Q / b_K after them, as a post-norm's bias is
  added to b_O; its mean-centring over d_head is normalisation, left out like the residual
  LayerNorms' (``Dims.centred_norms``).
* Gemma's norms multiply by ``1 + w``; the adapter already stores that multiplier as the gain.
* in every case the normalisation itself (a LayerNorm's mean-centring and the division by the RMS
  or standard deviation, per position and, for q/k norms, per head) is not a parameter and is
  left out.
* mixture of experts: every routed expert, the router and the shared expert's gate read the
  MLP's normed input, so the pre-MLP gain multiplies the rows of each expert's W_in / W_gate,
  of W_router and of W_shared_gate; a post-norm on the MLP output multiplies each expert's W_out
  columns (experts are folded lazily, one at a time, as they are read).
* in both: the value bias reaches the residual stream as the constant ``b_V @ W_O`` (attention
  weights sum to one), so it is added to the attention output bias.
"""
from __future__ import annotations

import dataclasses

from .canonical import Canonical, Embeddings, LayerWeights

VARIANTS = ("raw", "folded")


def fold(model: Canonical) -> Canonical:
    """The ``folded`` variant of ``model`` (lazy, like the original)."""
    dims = model.dims
    emb = model.embeddings
    W_U, b_U = emb.W_U, emb.b_U
    if dims.norm_position == "pre" and emb.ln_final_w is not None:
        W_U = emb.ln_final_w[:, None] * emb.W_U
        if emb.ln_final_b is not None:
            extra = emb.ln_final_b @ emb.W_U
            b_U = extra if b_U is None else b_U + extra
    embeddings = dataclasses.replace(emb, W_U=W_U, b_U=b_U)

    def layer_fn(l: int) -> LayerWeights:
        return fold_layer(model.layer(l), dims)

    return Canonical(dims=dims, embeddings=embeddings, layer_fn=layer_fn, parameters=model.parameters,
                     conventions=dict(model.conventions))


def fold_layer(lw: LayerWeights, dims) -> LayerWeights:
    """Fold one layer's norm gains and value bias (see the module docstring)."""
    out = dataclasses.replace(lw)
    if dims.norm_position == "pre":
        if lw.ln_attn_w is not None:
            g = lw.ln_attn_w[None, :, None]
            out.W_Q, out.W_K, out.W_V = lw.W_Q * g, lw.W_K * g, lw.W_V * g
            if lw.ln_attn_b is not None:
                beta = lw.ln_attn_b
                out.b_Q = _add(lw.b_Q, beta @ lw.W_Q)
                out.b_K = _add(lw.b_K, beta @ lw.W_K)
                out.b_V = _add(lw.b_V, beta @ lw.W_V)
        if lw.ln_mlp_w is not None:
            g = lw.ln_mlp_w[:, None]
            out.W_in = lw.W_in * g
            out.W_gate = lw.W_gate * g if lw.W_gate is not None else None
            if lw.W_router is not None:
                out.W_router = lw.W_router * g
                out.W_shared_gate = lw.W_shared_gate * g if lw.W_shared_gate is not None else None
            if lw.experts is not None:
                out.experts = lw.experts.map(lambda ex: dataclasses.replace(
                    ex, W_in=ex.W_in * g, W_gate=None if ex.W_gate is None else ex.W_gate * g))
            if lw.ln_mlp_b is not None:
                if lw.experts is not None:  # no MoE family has one; a bias would need per-expert b_in
                    raise NotImplementedError("folding a LayerNorm bias into mixture-of-experts weights")
                out.b_in = _add(lw.b_in, lw.ln_mlp_b @ lw.W_in)
                if lw.W_gate is not None:
                    out.b_gate = _add(lw.b_gate, lw.ln_mlp_b @ lw.W_gate)
    if out.b_V is not None:
        group = dims.n_heads // dims.n_kv_heads
        b_V_per_head = out.b_V.repeat_interleave(group, dim=0)  # [n_heads, d_head]
        v_bias = (b_V_per_head[:, None, :] @ out.W_O).sum(dim=0)[0]  # [d_model]
        out.b_O = _add(out.b_O, v_bias)
    # A q/k norm's bias, like a post-norm's, is added after the gain.
    if lw.q_norm_w is not None:
        out.W_Q = out.W_Q * lw.q_norm_w[:, None, :]
        out.b_Q = _add(out.b_Q * lw.q_norm_w if out.b_Q is not None else None, lw.q_norm_b)
    if lw.k_norm_w is not None:
        out.W_K = out.W_K * lw.k_norm_w[:, None, :]
        out.b_K = _add(out.b_K * lw.k_norm_w if out.b_K is not None else None, lw.k_norm_b)
    # A post-norm's bias is added after the gain: it is a constant write of its own.
    if lw.ln_attn_out_w is not None:
        out.W_O = out.W_O * lw.ln_attn_out_w
        out.b_O = _add(out.b_O * lw.ln_attn_out_w if out.b_O is not None else None, lw.ln_attn_out_b)
    if lw.ln_mlp_out_w is not None:
        out.W_out = out.W_out * lw.ln_mlp_out_w
        if out.experts is not None:
            out.experts = out.experts.map(lambda ex: dataclasses.replace(ex, W_out=ex.W_out * lw.ln_mlp_out_w))
        out.b_out = _add(out.b_out * lw.ln_mlp_out_w if out.b_out is not None else None, lw.ln_mlp_out_b)
    if dims.norm_position == "post":
        if lw.ln_attn_w is not None:
            out.W_O = out.W_O * lw.ln_attn_w
            out.b_O = out.b_O * lw.ln_attn_w if out.b_O is not None else None
        if lw.ln_mlp_w is not None:
            out.W_out = lw.W_out * lw.ln_mlp_w
            out.b_out = lw.b_out * lw.ln_mlp_w if lw.b_out is not None else None
    return out


def _add(a, b):
    """a + b, where either may be None (absent)."""
    return b if a is None else a if b is None else a + b


__all__ = ["VARIANTS", "fold", "fold_layer", "Embeddings"]
