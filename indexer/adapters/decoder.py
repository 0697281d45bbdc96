"""Decoder-only transformers read through nn.Linear: one adapter, one ``Layout`` row per family.

``nn.Linear`` stores (out, in); every weight is transposed to the row-vector form
(``linear_in`` / ``linear_out``). ``q_proj`` [n_heads * d_head, d_model] splits into n_heads
query heads, ``k_proj`` / ``v_proj`` [n_kv_heads * d_head, d_model] into n_kv_heads heads; query
head h reads kv head ``h // (n_heads // n_kv_heads)`` (``Dims.kv_head``), HF's ``repeat_kv``.
Gated MLP: ``down(act(gate x) * up x)``, so W_gate = gate.T, W_in = up.T, W_out = down.T.
Q/K are canonicalised *before* rotary, which depends on position only.

A layout says where the norms sit: before a sublayer (``ln_attn`` / ``ln_mlp``), after it on
what it writes (``ln_attn_out`` / ``ln_mlp_out``: Gemma 2/3, OLMo-2), on the query / key states
(``qk_names``, with the gain stored as ``qk_gain`` says); whether gains are stored as ``w`` or as ``w - 1`` (Gemma: the module
multiplies by ``1 + w``; canonical gains are always the multiplier); whether Q/K/V or gate/up
are fused and how (``[Q | K | V]``; per head ``[n_heads, 3, d_head]`` as BLOOM; per kv group
``[n_kv, group + 2, d_head]`` as Falcon's new architecture); where the layers, embeddings and
learned positions live. A layout's ``configure(config)`` adjusts fields a config decides
(Falcon's three attention layouts, OPT's post-LN 350m). The coverage rules are generated from
the same names, so a family that reuses a layout is one row in ``adapters/__init__.py``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

from ..canonical import Canonical, Dims, Embeddings, ExpertFF, Experts, LayerWeights
from .base import (
    HEAD_BIAS, LOGIT_BIAS, MASK, NORM, ROTARY, Names, Reader, Rule, TensorSource, cfg, finish,
    head_dim, linear_in, linear_out, unembedding,
)

QK_NORM = ("a gain on the query/key states inside the head (after the projection), folded into "
           "W_Q/W_K columns in the `folded` variant")
QK_NORM_BIAS = ("a bias on the query/key states inside the head (added after the q/k norm's gain), not a "
                "residual direction; added to b_Q/b_K in the `folded` variant")


ROUTER_BIAS = "a per-expert offset of the routing logits (a scalar per expert), not a direction"


@dataclass(frozen=True)
class Moe:
    """Where a mixture-of-experts MLP keeps its tensors (suffixes after the layout's ``mlp_prefix``).

    Routed experts are read per expert (``experts.3.down_proj.weight``, the hub layout that
    ``save_pretrained`` writes) or, where a checkpoint ships them fused, from 3-D tensors
    ``experts.gate_up_proj`` [n_experts, 2 * d_ff, d_model] ([gate | up]) and
    ``experts.down_proj`` [n_experts, d_model, d_ff] (transformers 5's in-memory layout).
    """

    experts: str = "experts"
    mlp: tuple = ("gate_proj", "up_proj", "down_proj")  # (gate, in, out) of one expert
    router: str = "gate"
    shared: Optional[str] = None  # Qwen2-MoE: an always-on shared expert, a dense gated MLP ...
    shared_gate: Optional[str] = None  # ... scaled by sigmoid(x @ shared_expert_gate)


@dataclass(frozen=True)
class Layout:
    """Tensor names of one family (layer tensors are suffixes after ``{layers}.N.``)."""

    embed: str = "embed_tokens"
    pos: Optional[str] = None  # learned absolute positions ...
    pos_offset: int = 0  # ... where position p reads row p + pos_offset (OPT: 2); the rows before are dropped
    ln_embed: Optional[str] = None  # a norm on the embeddings before layer 0 (BLOOM)
    final: Optional[str] = "norm"  # the norm before the unembedding
    lm_head: str = "lm_head"
    layers: str = "layers"
    attn: str = "self_attn."
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    fused_qkv: Optional[str] = None  # one projection holding Q, K and V ...
    fused_order: str = "qkv"  # ... as [Q | K | V], "per_head" [h, 3, e] or "grouped" [kv, g + 2, e]
    mlp_prefix: str = "mlp."
    mlp: tuple = ("gate_proj", "up_proj", "down_proj")  # (gate or None, in, out)
    fused_gate_up: Optional[str] = None  # Phi-3: gate_up_proj = [gate | up]
    ln_attn: Optional[str] = "input_layernorm"  # norm before attention (None: none)
    ln_mlp: Optional[str] = "post_attention_layernorm"  # norm before the MLP
    ln_attn_out: Optional[str] = None  # norm on the attention output, before the residual add
    ln_mlp_out: Optional[str] = None  # norm on the MLP output
    qk_norm: Optional[str] = None  # "head" (over d_head) or "full" (over all heads)
    qk_names: tuple = ("q_norm", "k_norm")  # the q / k norm modules, after ``attn``
    # How a q/k norm's gain (and bias) is stored: "shared", one [d_head] for every head (Qwen3,
    # Gemma 3, Phi); "columns", one per q/k column, [heads * d_head] (OLMo-2) or [heads, d_head]
    # (Cohere); "modules", one norm module per head, ``norms.{h}`` (StableLM).
    qk_gain: str = "shared"
    gain_offset: float = 0.0  # Gemma stores w and multiplies by (1 + w)
    parallel: bool = False  # attention and MLP read the same x (through ln_attn when ln_mlp is None)
    norm_position: str = "pre"
    n_kv_heads: Optional[int] = None  # set by configure when no config key says it
    act: Optional[str] = None  # when the config names no activation (BLOOM's tanh GELU)
    tied_default: bool = False  # when config.json does not say
    embedding_multiplier: bool = False  # Gemma scales W_E by sqrt(d_model) at run time
    recorded: tuple = ()  # config fields that change the computation but are not parameters
    extra_rules: tuple = ()  # coverage of tensors outside the names above (buffers, ...)
    configure: Optional[Callable] = None  # config -> {field: value} for config-dependent layouts
    centred_norms: bool = False  # every norm is a LayerNorm, some without a bias (Dims.centred_norms)
    # OPT-350m embeds in a narrower space: project_in maps it to d_model, project_out back.
    project_in: Optional[str] = None
    project_out: Optional[str] = None
    text_config: bool = False  # a multimodal checkpoint: sizes in config.text_config, text tower read
    moe: Optional[Moe] = None  # a mixture-of-experts MLP (its expert / router names)


def _qk_layernorm(c) -> dict:
    """Phi, StableLM: ``qk_layernorm`` adds a LayerNorm over each head's d_head on q and k."""
    return dict(qk_norm="head") if getattr(c, "qk_layernorm", False) else {}


def _stablelm(c) -> dict:
    parallel = dict(parallel=True, ln_mlp=None) if getattr(c, "use_parallel_residual", False) else {}
    return dict(parallel, **_qk_layernorm(c))


def _falcon(c) -> dict:
    new = bool(getattr(c, "new_decoder_architecture", False))
    n_ln = getattr(c, "num_ln_in_parallel_attn", None) or (2 if new else 1)
    out = dict(fused_order="grouped" if new else "qkv" if c.multi_query else "per_head",
               parallel=bool(c.parallel_attn) or new)
    if not new:
        out["n_kv_heads"] = 1 if c.multi_query else c.num_attention_heads
    else:
        out["n_kv_heads"] = c.num_kv_heads
    if new and n_ln == 2:
        out.update(ln_attn="ln_attn", ln_mlp="ln_mlp")  # two norms, both reading the block's x
    elif not out["parallel"]:
        out.update(ln_mlp="post_attention_layernorm")
    return out


def _opt(c) -> dict:
    if getattr(c, "do_layer_norm_before", True):
        return {}
    # OPT-350m: each norm comes after its residual add, like BERT; no final norm.
    return dict(norm_position="post", final=None)


_GPT_BUFFERS = (Rule(r"h\.(?P<layer>\d+)\.attn\.(bias|masked_bias)", "mask", None, MASK),)
_BLOOM_FALCON = dict(embed="word_embeddings", final="ln_f", layers="h", attn="self_attention.",
                     fused_qkv="query_key_value", o="dense", mlp=(None, "dense_h_to_4h", "dense_4h_to_h"))

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
    "gemma3": Layout(
        ln_mlp="pre_feedforward_layernorm", ln_attn_out="post_attention_layernorm",
        ln_mlp_out="post_feedforward_layernorm", qk_norm="head", gain_offset=1.0,
        tied_default=True, embedding_multiplier=True, text_config=True,
        recorded=("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"),
        extra_rules=(Rule(r"(model\.)?(vision_tower|multi_modal_projector)\..*", "vision", None,
                          "the image encoder and its projector: not part of the text model's "
                          "residual stream or vocabulary; not projected"),),
    ),
    "olmo2": Layout(ln_attn=None, ln_mlp=None, ln_attn_out="post_attention_layernorm",
                    ln_mlp_out="post_feedforward_layernorm", qk_norm="full", qk_gain="columns"),
    "phi3": Layout(fused_qkv="qkv_proj", fused_gate_up="gate_up_proj", mlp=(None, None, "down_proj")),
    # Phi's q/k LayerNorm: one nn.LayerNorm(d_head) shared by every head, with a bias.
    "phi": Layout(o="dense", mlp=(None, "fc1", "fc2"), ln_mlp=None, parallel=True, final="final_layernorm",
                  qk_names=("q_layernorm", "k_layernorm"), centred_norms=True, configure=_qk_layernorm),
    # StableLM's: one bias-free nn.LayerNorm(d_head) per head (StableLmLayerNormPerHead).
    "stablelm": Layout(qk_names=("q_layernorm", "k_layernorm"), qk_gain="modules", centred_norms=True,
                       configure=_stablelm),
    "starcoder2": Layout(mlp=(None, "c_fc", "c_proj"), tied_default=True),
    "neox": Layout(embed="embed_in", lm_head="embed_out", final="final_layer_norm", attn="attention.",
                   fused_qkv="query_key_value", fused_order="per_head", o="dense",
                   mlp=(None, "dense_h_to_4h", "dense_4h_to_h"),
                   extra_rules=(Rule(r"layers\.(?P<layer>\d+)\.attention\.(bias|masked_bias)", "mask", None, MASK),),
                   configure=lambda c: dict(parallel=bool(getattr(c, "use_parallel_residual", True)))),
    "gptj": Layout(embed="wte", final="ln_f", layers="h", attn="attn.", o="out_proj",
                   mlp=(None, "fc_in", "fc_out"), ln_attn="ln_1", ln_mlp=None, parallel=True,
                   extra_rules=_GPT_BUFFERS),
    "gpt_bigcode": Layout(embed="wte", pos="wpe", final="ln_f", layers="h", attn="attn.",
                          fused_qkv="c_attn", o="c_proj", mlp=(None, "c_fc", "c_proj"),
                          ln_attn="ln_1", ln_mlp="ln_2", tied_default=True, extra_rules=_GPT_BUFFERS,
                          configure=lambda c: dict(n_kv_heads=1) if c.multi_query
                          else dict(n_kv_heads=c.num_attention_heads, fused_order="per_head")),
    "opt": Layout(pos="embed_positions", pos_offset=2, final="final_layer_norm", o="out_proj", mlp_prefix="",
                  mlp=(None, "fc1", "fc2"), ln_attn="self_attn_layer_norm", ln_mlp="final_layer_norm",
                  tied_default=True, project_in="project_in", project_out="project_out", configure=_opt),
    "bloom": Layout(**_BLOOM_FALCON, ln_embed="word_embeddings_layernorm", fused_order="per_head",
                    act="gelu_pytorch_tanh", tied_default=True),
    "falcon": Layout(**_BLOOM_FALCON, ln_mlp=None, tied_default=True, configure=_falcon),
    "mixtral": Layout(mlp_prefix="block_sparse_moe.", moe=Moe(mlp=("w1", "w3", "w2"))),
    "qwen2_moe": Layout(moe=Moe(shared="shared_expert", shared_gate="shared_expert_gate")),
    "olmoe": Layout(qk_norm="full", qk_gain="columns", moe=Moe()),
    "qwen3_moe": Layout(qk_norm="head", moe=Moe()),
    # Cohere's use_qk_norm: a bias-free LayerNorm over each head's d_head, gain [n_heads, d_head].
    "cohere": Layout(ln_mlp=None, parallel=True, tied_default=True, centred_norms=True, recorded=("logit_scale",),
                     qk_gain="columns", configure=lambda c: dict(qk_norm="head") if getattr(c, "use_qk_norm", False) else {}),
}


def rules(layout: Layout) -> list[Rule]:
    """Coverage rules for a layout, generated from the same names ``adapt`` reads."""
    esc = lambda s: s.replace(".", r"\.")  # noqa: E731
    L = esc(layout.layers) + r"\.(?P<layer>\d+)\."
    a, m = L + esc(layout.attn), L + esc(layout.mlp_prefix)
    gate, up, down = layout.mlp
    norms = [n for n in (layout.ln_attn, layout.ln_mlp, layout.ln_attn_out, layout.ln_mlp_out,
                         "ln_attn", "ln_mlp", "post_attention_layernorm") if n]
    out = [
        Rule(esc(layout.embed) + r"\.weight", "W_E", "embedding"),
        Rule(esc(layout.lm_head) + r"\.weight", "W_U", "embedding"),
        Rule(esc(layout.lm_head) + r"\.bias", "b_U", None, LOGIT_BIAS),
        Rule(L + "(" + "|".join(norms) + r")\.(weight|bias)", "ln", None, NORM),
        Rule(a + layout.o + r"\.weight", "W_O", "vectors:o", "also feeds pairs:ov"),
        Rule(a + layout.o + r"\.bias", "b_O", "vectors:bias_attn_out"),
        Rule(a + r"rotary_emb\.inv_freq", "rotary", None, ROTARY),
        Rule(r"rotary_emb\.inv_freq", "rotary", None, ROTARY),
        *layout.extra_rules,
    ]
    moe = layout.moe
    if moe is not None:
        x = m + esc(moe.experts) + r"\."
        eg, eu, ed = moe.mlp
        out += [
            Rule(x + r"\d+\." + eg + r"\.weight", "expert.W_gate", "vectors:ff_gate", "one per routed expert (vectors.expert)"),
            Rule(x + r"\d+\." + eu + r"\.weight", "expert.W_in", "vectors:ff_key", "one per routed expert (vectors.expert)"),
            Rule(x + r"\d+\." + ed + r"\.weight", "expert.W_out", "vectors:ff_value", "one per routed expert (vectors.expert)"),
            Rule(x + r"gate_up_proj", "expert.W_gate_in", "vectors:ff_gate",
                 "fused [gate | up] of every routed expert: split into vectors:ff_gate / vectors:ff_key per expert"),
            Rule(x + r"down_proj", "expert.W_out", "vectors:ff_value", "fused: every routed expert's W_out"),
            Rule(m + esc(moe.router) + r"\.weight", "W_router", "vectors:router", "one router unit per expert"),
            Rule(m + esc(moe.router) + r"\.(bias|e_score_correction_bias)", "b_router", None, ROUTER_BIAS),
        ]
        if moe.shared_gate:
            out.append(Rule(m + esc(moe.shared_gate) + r"\.weight", "W_shared_gate", "vectors:router",
                            "the shared expert's sigmoid gate: router unit L<layer>.shared_router (expert null)"))
        # Dense FF rules below name the shared expert (vectors.expert null), if there is one.
        m = m + esc(moe.shared) + r"\." if moe.shared else None
    if m is not None:
        out += [Rule(m + down + r"\.weight", "W_out", "vectors:ff_value"),
                Rule(m + down + r"\.bias", "b_out", "vectors:bias_ff_out")]
    if layout.final:
        out.append(Rule(esc(layout.final) + r"\.(weight|bias)", "ln_final", None, NORM))
    if layout.pos:
        out.append(Rule(esc(layout.pos) + r"\.weight", "W_pos", "vectors:pos"))
    for name, end in ((layout.project_in, "W_E"), (layout.project_out, "W_U")):
        if name:
            out.append(Rule(esc(name) + r"\.weight", name, "embedding",
                            f"maps between the embedding width and d_model; multiplied into {end}"))
    if layout.ln_embed:
        out.append(Rule(esc(layout.ln_embed) + r"\.(weight|bias)", "ln_embed", None, NORM))
    if layout.fused_qkv:
        out += [Rule(a + layout.fused_qkv + r"\.weight", "W_QKV", "vectors:q",
                     f"fused Q, K, V ({layout.fused_order} layout, see docs/ADAPTERS.md): split into "
                     f"vectors:q / vectors:k / vectors:v; Q and K also feed pairs:qk, V pairs:ov"),
                Rule(a + layout.fused_qkv + r"\.bias", "b_QKV", None, HEAD_BIAS)]
    else:
        out += [
            Rule(a + layout.q + r"\.weight", "W_Q", "vectors:q", "also feeds pairs:qk"),
            Rule(a + layout.k + r"\.weight", "W_K", "vectors:k",
                 "one per kv head (GQA: shared by n_heads / n_kv_heads query heads); also feeds pairs:qk"),
            Rule(a + layout.v + r"\.weight", "W_V", "vectors:v", "one per kv head (GQA); also feeds pairs:ov"),
            Rule(a + f"({layout.q}|{layout.k}|{layout.v})" + r"\.bias", "b_QKV", None, HEAD_BIAS),
        ]
    if layout.qk_norm:
        qk = a + "(" + "|".join(layout.qk_names) + ")" + (r"\.norms\.\d+" if layout.qk_gain == "modules" else "")
        out += [Rule(qk + r"\.weight", "qk_norm", None, QK_NORM),
                Rule(qk + r"\.bias", "qk_norm_b", None, QK_NORM_BIAS)]
    if m is None:
        pass
    elif layout.fused_gate_up:
        out += [Rule(m + layout.fused_gate_up + r"\.weight", "W_gate_in", "vectors:ff_gate",
                     "fused [gate | up] along the output: split into vectors:ff_gate / vectors:ff_key"),
                Rule(m + layout.fused_gate_up + r"\.bias", "b_in", None, HEAD_BIAS)]
    else:
        if gate:
            out.append(Rule(m + gate + r"\.weight", "W_gate", "vectors:ff_gate"))
        out += [Rule(m + up + r"\.weight", "W_in", "vectors:ff_key"),
                Rule(m + "(" + "|".join(n for n in (gate, up) if n) + r")\.bias", "b_in", None, HEAD_BIAS)]
    return out


def split_fused_qkv(w, order: str, n_heads: int, n_kv: int, d_head: int):
    """The rows (nn.Linear output dim) of a fused Q/K/V weight or bias -> (q, k, v) rows, each
    [heads * d_head, ...] in head order, ready for ``linear_in`` or a bias reshape."""
    rest = w.shape[1:]
    if order == "qkv":
        return w.split((n_heads * d_head, n_kv * d_head, n_kv * d_head), dim=0)
    if order == "per_head":  # [n_heads, 3, d_head]: NeoX, BLOOM, Falcon-rw, StarCoder (MHA)
        x = w.reshape(n_heads, 3, d_head, *rest)
        return tuple(x[:, i].reshape(n_heads * d_head, *rest) for i in range(3))
    # "grouped": [n_kv, group + 2, d_head]: each kv group's query heads, then its key and value
    g = n_heads // n_kv
    x = w.reshape(n_kv, g + 2, d_head, *rest)
    return (x[:, :g].reshape(n_heads * d_head, *rest), x[:, g].reshape(n_kv * d_head, *rest),
            x[:, g + 1].reshape(n_kv * d_head, *rest))


def adapt(source: TensorSource, config, dtype, family: str) -> Canonical:
    """The checkpoint in ``source`` as a Canonical model, read through ``LAYOUTS[family]``."""
    layout, config = _configured(LAYOUTS[family], config)
    r = Reader(source, Names(source.keys(), [layout.embed + ".weight"], family), dtype)
    sizes = _sizes(config, layout, family)
    blocks = _Blocks(r, layout, sizes, act=layout.act or cfg(config, "hidden_activation", "hidden_act",
                                                             "activation_function", "activation", default="silu"))
    emb, tied = _embeddings(blocks, config)
    dims = Dims(
        architecture=family, n_layers=cfg(config, "num_hidden_layers", "n_layer"), n_heads=sizes.n_heads,
        n_kv_heads=sizes.n_kv, d_model=sizes.d_model, d_head=sizes.d_head, d_ff=sizes.d_ff, d_vocab=emb.W_E.shape[0],
        n_ctx=None if emb.W_pos is None else emb.W_pos.shape[0], tied=tied,
        gated=bool(layout.mlp[0] or layout.fused_gate_up), norm_position=layout.norm_position,
        parallel_attn_mlp=layout.parallel, qk_norm=layout.qk_norm, centred_norms=layout.centred_norms,
        n_experts=sizes.n_experts, d_ff_shared=sizes.d_ff_shared,
    )
    conventions = _conventions(config, layout, family, sizes, has_positions=emb.W_pos is not None)
    return finish(r, dims, emb, blocks.layer, rules(layout), conventions)


def _configured(layout: Layout, config) -> tuple[Layout, object]:
    """The layout with the fields this config decides, and the config of the text model."""
    if layout.text_config:
        config = config.get_text_config()
    if layout.configure is not None:
        layout = dataclasses.replace(layout, **layout.configure(config))
    return layout, config


@dataclass(frozen=True)
class _Sizes:
    d_model: int
    n_heads: int
    n_kv: int  # key/value heads (GQA, MQA: fewer than n_heads)
    d_head: int
    d_ff: int  # of the dense MLP, or of one routed expert
    n_experts: int = 0
    d_ff_shared: int = 0  # Qwen2-MoE's shared expert


def _sizes(config, layout: Layout, family: str) -> _Sizes:
    d_model = cfg(config, "hidden_size", "n_embd")
    n_heads = cfg(config, "num_attention_heads", "n_head")
    d_ff = cfg(config, "intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size") or (
        4 * d_model if isinstance(d_model, int) else d_model)
    n_experts = d_ff_shared = 0
    if layout.moe is not None:
        n_experts, d_ff, d_ff_shared = _moe_sizes(config, family, layout.moe, d_ff)
    return _Sizes(d_model=d_model, n_heads=n_heads,
                  n_kv=layout.n_kv_heads or cfg(config, "num_key_value_heads", default=n_heads),
                  d_head=head_dim(config, d_model, n_heads), d_ff=d_ff, n_experts=n_experts, d_ff_shared=d_ff_shared)


def _embeddings(blocks: "_Blocks", config) -> tuple[Embeddings, bool]:
    """(Embeddings, tied): W_E and W_U (through OPT-350m's project_in / project_out), the learned
    positions, the final norm and BLOOM's norm on the embeddings."""
    from ..errors import BadCheckpoint

    r, layout = blocks.r, blocks.layout
    W_E = r.need(layout.embed + ".weight")
    W_U, tied = unembedding(r, W_E, layout.lm_head + ".weight", config, layout.tied_default)
    P_in = r.opt(layout.project_in + ".weight") if layout.project_in else None
    P_out = r.opt(layout.project_out + ".weight") if layout.project_out else None
    if P_in is not None or P_out is not None:
        # The residual stream is d_model wide: a token enters as project_in(W_E[t]) and leaves
        # through lm_head(project_out(x)); those products are the projection bases.
        try:
            W_E = W_E @ P_in.T if P_in is not None else W_E
            W_U = P_out.T @ W_U if P_out is not None else W_U
        except RuntimeError:
            raise BadCheckpoint(f"{layout.project_in} / {layout.project_out} do not fit the embeddings "
                                f"(shapes {tuple(W_E.shape)}, {None if P_in is None else tuple(P_in.shape)}, "
                                f"{None if P_out is None else tuple(P_out.shape)}); the checkpoint is "
                                f"inconsistent") from None
        tied = False
    W_pos = r.need(layout.pos + ".weight") if layout.pos else None
    if W_pos is not None and layout.pos_offset:
        # OPT's position p reads row p + 2 (OPTLearnedPositionalEmbedding.offset); rows 0 and 1
        # are read by no position. Units name the position they encode (P0 = row 2), so the
        # unused rows are dropped and the offset recorded in models.settings (conventions).
        W_pos = W_pos[layout.pos_offset:].contiguous()
    final_w, final_b = blocks.norm(layout.final)
    embed_w, embed_b = blocks.norm(layout.ln_embed)
    return Embeddings(W_E=W_E, W_U=W_U, W_pos=W_pos, b_U=r.head(layout.lm_head + ".bias"),
                      ln_final_w=final_w, ln_final_b=final_b, ln_embed_w=embed_w, ln_embed_b=embed_b), tied


def _conventions(config, layout: Layout, family: str, sizes: _Sizes, has_positions: bool) -> dict:
    """What the computation does beyond the parameters (recorded in models.settings, not projected)."""
    conventions = {k: getattr(config, k) for k in layout.recorded if getattr(config, k, None) is not None}
    if layout.embedding_multiplier:
        conventions["embedding_multiplier"] = math.sqrt(sizes.d_model)
    if has_positions and layout.pos_offset:
        conventions["position_offset"] = layout.pos_offset
    if layout.moe is not None:  # how the run-time routing combines experts: recorded, nothing to project
        conventions.update(n_experts=sizes.n_experts, d_ff_shared=sizes.d_ff_shared,
                           experts_per_token=cfg(config, "num_experts_per_tok"),
                           norm_topk_prob=bool(cfg(config, "norm_topk_prob", default=family == "mixtral")))
    return conventions


@dataclass(frozen=True)
class _Blocks:
    """Reads one transformer block at a time through a layout: attention, MLP (dense or mixture
    of experts) and the norms around them (``layer`` is what ``finish`` runs on every layer)."""

    r: Reader
    layout: Layout
    sizes: _Sizes
    act: str

    def layer(self, l: int) -> LayerWeights:
        p = f"{self.layout.layers}.{l}."
        attn = p + self.layout.attn
        return LayerWeights(**self.attention(attn), **self.qk_norms(attn), **self.mlp(p + self.layout.mlp_prefix),
                            **self.block_norms(p), act=self.act)

    # -- attention ----------------------------------------------------------------------------

    def attention(self, a: str) -> dict:
        """W_Q / W_K / W_V per head (split from a fused projection where there is one), their
        biases, W_O and b_O."""
        layout, r, s = self.layout, self.r, self.sizes
        if layout.fused_qkv:
            split = lambda t: split_fused_qkv(t, layout.fused_order, s.n_heads, s.n_kv, s.d_head)  # noqa: E731
            w_q, w_k, w_v = split(r.need(a + layout.fused_qkv + ".weight"))
            b = r.opt(a + layout.fused_qkv + ".bias")
            b_q, b_k, b_v = (None, None, None) if b is None else split(b)
        else:
            w_q, w_k, w_v = (r.need(a + x + ".weight") for x in (layout.q, layout.k, layout.v))
            b_q, b_k, b_v = (r.opt(a + x + ".bias") for x in (layout.q, layout.k, layout.v))
        heads = lambda b, n: None if b is None else b.reshape(n, s.d_head)  # noqa: E731
        return dict(W_Q=linear_in(w_q, s.n_heads, s.d_head), W_K=linear_in(w_k, s.n_kv, s.d_head),
                    W_V=linear_in(w_v, s.n_kv, s.d_head),
                    b_Q=heads(b_q, s.n_heads), b_K=heads(b_k, s.n_kv), b_V=heads(b_v, s.n_kv),
                    W_O=linear_out(r.need(a + layout.o + ".weight"), s.n_heads, s.d_head),
                    b_O=r.opt(a + layout.o + ".bias"))

    def qk_norms(self, a: str) -> dict:
        """The gains (and biases) of the norms on the query and key states, one row per head."""
        layout = self.layout
        if not layout.qk_norm:
            return {}
        q_norm_w, q_norm_b = self._qk_norm(a + layout.qk_names[0], self.sizes.n_heads)
        k_norm_w, k_norm_b = self._qk_norm(a + layout.qk_names[1], self.sizes.n_kv)
        return dict(q_norm_w=q_norm_w, q_norm_b=q_norm_b, k_norm_w=k_norm_w, k_norm_b=k_norm_b)

    def _qk_norm(self, name: str, n: int):
        """(gain, bias or None) of a q/k norm, each [n, d_head]: one row per head."""
        import torch

        r, d_head = self.r, self.sizes.d_head
        if self.layout.qk_gain == "modules":  # one norm module per head, in head order
            w = torch.stack([self._gain(r.need(f"{name}.norms.{h}.weight")) for h in range(n)])
            b = None if r.opt(f"{name}.norms.0.bias") is None else torch.stack(
                [r.need(f"{name}.norms.{h}.bias") for h in range(n)])
            return w, b
        w, b = self.norm(name)
        if self.layout.qk_gain == "shared":  # one [d_head] gain (and bias) for every head
            return w.expand(n, d_head).contiguous(), None if b is None else b.expand(n, d_head).contiguous()
        rows = lambda t: None if t is None else t.reshape(n, d_head)  # noqa: E731
        return rows(w), rows(b)  # one per column of q_proj / k_proj

    # -- MLP ----------------------------------------------------------------------------------

    def mlp(self, m: str) -> dict:
        """The MLP's weights: a dense one, or routed experts with their router (and a shared
        expert, read as the dense MLP, where the family has one)."""
        moe = self.layout.moe
        if moe is None:
            return self.dense_mlp(m)
        experts, W_router, W_shared_gate = _moe_layer(self.r, m, moe, self.sizes.n_experts, self.sizes.d_model)
        routed = dict(experts=experts, W_router=W_router, W_shared_gate=W_shared_gate)
        if moe.shared:
            return dict(self.dense_mlp(m + moe.shared + "."), **routed)
        d_model, empty = self.sizes.d_model, self.r.dtype_empty
        # no dense FF in this layer: empty, not absent
        return dict(W_gate=empty(0, d_model).T.contiguous(), b_gate=None, W_in=empty(0, d_model).T.contiguous(),
                    b_in=None, W_out=empty(d_model, 0).T.contiguous(), b_out=None, **routed)

    def dense_mlp(self, m: str) -> dict:
        """W_gate (gated MLPs; split from a fused [gate | up] where there is one), W_in, W_out and
        their biases, in row-vector form."""
        layout, r = self.layout, self.r
        gate, up, down = layout.mlp
        # Each matrix is transposed as soon as it is read, so its checkpoint-order copy is freed
        # before the next is read: holding them all to the end made loading a Llama-2-7B-shaped
        # layer peak 0.54 GB above the layer itself (docs/BENCHMARKS.md §11).
        rows = lambda w: w.T.contiguous()  # noqa: E731  [out, in] (checkpoint) -> [in, out]
        W_gate = b_gate = None
        if layout.fused_gate_up:
            W_gate, W_in = map(rows, r.need(m + layout.fused_gate_up + ".weight").chunk(2, dim=0))
            b = r.opt(m + layout.fused_gate_up + ".bias")
            b_gate, b_in = (None, None) if b is None else b.chunk(2)
        else:
            if gate:
                W_gate, b_gate = rows(r.need(m + gate + ".weight")), r.opt(m + gate + ".bias")
            W_in, b_in = rows(r.need(m + up + ".weight")), r.opt(m + up + ".bias")
        return dict(W_gate=W_gate, b_gate=b_gate, W_in=W_in, b_in=b_in,
                    W_out=rows(r.need(m + down + ".weight")), b_out=r.opt(m + down + ".bias"))

    # -- norms --------------------------------------------------------------------------------

    def block_norms(self, p: str) -> dict:
        """The norms before attention and MLP (a parallel block's MLP reads ln_attn's when it
        has none of its own) and after them (Gemma 2/3, OLMo-2)."""
        layout = self.layout
        at = lambda name: p + name if name else None  # noqa: E731
        ln_attn_w, ln_attn_b = self.norm(at(layout.ln_attn))
        ln_mlp_w, ln_mlp_b = self.norm(at(layout.ln_mlp or (layout.ln_attn if layout.parallel else None)))
        ln_attn_out_w, ln_attn_out_b = self.norm(at(layout.ln_attn_out))
        ln_mlp_out_w, ln_mlp_out_b = self.norm(at(layout.ln_mlp_out))
        return dict(ln_attn_w=ln_attn_w, ln_attn_b=ln_attn_b, ln_mlp_w=ln_mlp_w, ln_mlp_b=ln_mlp_b,
                    ln_attn_out_w=ln_attn_out_w, ln_attn_out_b=ln_attn_out_b,
                    ln_mlp_out_w=ln_mlp_out_w, ln_mlp_out_b=ln_mlp_out_b)

    def norm(self, name: Optional[str]):
        """(gain as the multiplier, bias or None) of the norm ``name``; (None, None) for none."""
        if name is None:
            return None, None
        return self._gain(self.r.need(name + ".weight")), self.r.opt(name + ".bias")

    def _gain(self, t):
        return None if t is None else t + self.layout.gain_offset  # Gemma stores w - 1


def _moe_sizes(config, family: str, moe: Moe, d_ff_dense) -> tuple:
    """(n_experts, d_ff of one routed expert, d_ff of the shared expert or 0) from the config."""
    from ..errors import UnsupportedArchitecture

    # Qwen2/3-MoE can make some layers dense; every published checkpoint has none, and a model
    # that mixes widths does not fit one d_ff per model: refused rather than misread.
    only = cfg(config, "mlp_only_layers") or []
    step = cfg(config, "decoder_sparse_step", default=1)
    if only or step != 1:
        raise UnsupportedArchitecture(
            f"{family} with dense layers among the expert layers (mlp_only_layers {list(only)}, "
            f"decoder_sparse_step {step}) is not supported yet: every layer must be a mixture of experts")
    n_experts = cfg(config, "num_local_experts", "num_experts", default=0)
    d_ff = cfg(config, "moe_intermediate_size", default=d_ff_dense)
    shared = cfg(config, "shared_expert_intermediate_size", default=0) if moe.shared else 0
    return n_experts, d_ff, shared


def _moe_layer(r: Reader, m: str, moe: Moe, n_experts: int, d_model: int):
    """(Experts read one at a time, W_router [d_model, n_experts], W_shared_gate [d_model, 1] or None)."""
    from ..errors import BadCheckpoint

    x = m + moe.experts + "."
    g, u, d = moe.mlp
    fused = r.names.base(x + "gate_up_proj")
    if fused is not None:
        # One 3-D tensor per layer for every expert: read once for the layer (bounded by a layer).
        gate_up, down = r.need(x + "gate_up_proj"), r.need(x + "down_proj")
        if gate_up.ndim != 3 or down.ndim != 3 or gate_up.shape[1] % 2:
            raise BadCheckpoint(f"fused experts {r.names.base(x + 'gate_up_proj')!r} / down_proj have shapes "
                                f"{tuple(gate_up.shape)} / {tuple(down.shape)}: expected [n_experts, 2 * d_ff, "
                                f"d_model] and [n_experts, d_model, d_ff]; the checkpoint is not a {moe.experts} layout")

        def read(e: int) -> ExpertFF:
            w_gate, w_in = gate_up[e].chunk(2, dim=0)
            return ExpertFF(W_gate=w_gate.T.contiguous(), W_in=w_in.T.contiguous(), W_out=down[e].T.contiguous())
        n = gate_up.shape[0]
    else:
        def read(e: int) -> ExpertFF:
            p = f"{x}{e}."
            return ExpertFF(W_gate=r.need(p + g + ".weight").T.contiguous(), W_in=r.need(p + u + ".weight").T.contiguous(),
                            W_out=r.need(p + d + ".weight").T.contiguous())
        n = n_experts
    W_router = r.need(m + moe.router + ".weight").T.contiguous()  # [n_experts, d_model] -> columns
    W_shared_gate = r.need(m + moe.shared_gate + ".weight").T.contiguous() if moe.shared_gate else None
    return Experts(n, read), W_router, W_shared_gate


def adapt_assumed(source: TensorSource, config, dtype) -> Optional[Canonical]:
    """The first layout (in ``LAYOUTS`` order, Llama first) whose rules name every tensor and
    whose adapter accepts the checkpoint, or None. Run-time scalars of the config (Granite's
    ``*_multiplier``, ``logits_scaling``) are recorded with the layout, since raw ignores them."""
    from ..errors import BadCheckpoint, UnsupportedArchitecture
    from .base import account

    keys = source.keys()
    for family, layout in LAYOUTS.items():
        try:
            names = Names(keys, [layout.embed + ".weight"], family)
        except BadCheckpoint:
            continue
        if any(p.role == "unknown" for p in account(source, names, rules(layout), family)):
            continue
        try:
            canonical = adapt(source, config, dtype, family)
        except (BadCheckpoint, UnsupportedArchitecture, AttributeError, TypeError):
            continue  # the names fit but the shapes or the config do not: try the next layout
        scalars = {k: v for k, v in vars(config).items()
                   if (k.endswith("_multiplier") or k in ("logits_scaling", "logit_scale"))
                   and isinstance(v, (int, float))}
        canonical.conventions.update(scalars, assumed_layout=family,
                                     model_type=getattr(config, "model_type", None))
        return canonical
    return None
