"""Tiny random Hugging Face models of every supported family, built offline from a config.

Shared by the adapter, indexer, query and CLI tests (the one home of test helpers that several
test modules use: no test module imports another)::

    from tests.tiny_models import FAMILIES, tiny_model, save_tiny
    model, tok = tiny_model("llama-gqa")          # eval-mode HF model + tokenizer
    path = save_tiny("gpt2", tmp_path / "gpt2")   # config.json + model.safetensors + tokenizer

Every parameter is random (seeded), including LayerNorm gains and biases, so a mapping that
drops or misplaces a bias or a gain shows up in the tests. All families share one 64-entry
word-level vocabulary (``VOCAB``) with a few words the query tests can look for (``Paris``...).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

D_MODEL, N_HEADS, D_FF, N_LAYERS, N_CTX = 32, 4, 64, 2, 32

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
WORDS = ("the a of and to in is was cat dog Paris France Berlin Germany Rome Italy king queen "
         "man woman red blue green one two three run ran walk big small city country capital "
         "river water fire sun moon star good bad he she it they we you not yes no car house "
         "tree book time day night").split()
VOCAB = SPECIALS + WORDS + [f"w{i}" for i in range(64 - len(SPECIALS) - len(WORDS))]
D_VOCAB = len(VOCAB)
_IDS = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)

_LLAMA = dict(hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_hidden_layers=N_LAYERS,
              intermediate_size=D_FF)
_BERT = dict(_LLAMA, max_position_embeddings=N_CTX)
_GQA = dict(_LLAMA, num_key_value_heads=2, head_dim=D_MODEL // N_HEADS)
# Mixtures of experts: 4 routed experts, 2 per token; widths differ from D_FF so a mix-up shows.
N_EXPERTS = 4
_MOE = dict(_GQA, num_experts_per_tok=2, tie_word_embeddings=False)

# tiny family -> (transformers model class, config class, config kwargs, HF accessors (the
# ``HF`` rows below)). A new family is one row here, one row in HF_ACCESS if its modules are
# laid out unlike any row there, and its adapter.
_FAMILIES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(
        n_embd=D_MODEL, n_head=N_HEADS, n_layer=N_LAYERS, n_positions=N_CTX, n_inner=D_FF), "gpt2"),
    "bert": ("BertModel", "BertConfig", _BERT, "bert"),
    "bert-mlm": ("BertForMaskedLM", "BertConfig", _BERT, "bert"),
    "bert-mlm-untied": ("BertForMaskedLM", "BertConfig", dict(_BERT, tie_word_embeddings=False), "bert"),
    "mpnet": ("MPNetModel", "MPNetConfig", dict(_BERT, pad_token_id=1), "mpnet"),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(
        _LLAMA, num_key_value_heads=N_HEADS, tie_word_embeddings=True), "llama"),
    "llama-gqa": ("LlamaForCausalLM", "LlamaConfig", dict(
        _LLAMA, num_key_value_heads=2, tie_word_embeddings=True), "llama"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        _LLAMA, num_key_value_heads=2, tie_word_embeddings=False), "llama"),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(
        _LLAMA, num_key_value_heads=1, tie_word_embeddings=False), "llama"),
    "neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(
        _LLAMA, max_position_embeddings=N_CTX, rotary_pct=0.5, tie_word_embeddings=False), "neox"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", _GQA, "llama"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", _GQA, "gemma2"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(_GQA, tie_word_embeddings=False), "llama"),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(_GQA, tie_word_embeddings=False), "llama"),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", dict(_GQA, tie_word_embeddings=False), "olmo2"),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextConfig", _GQA, "gemma2"),
    "gemma3": ("Gemma3ForConditionalGeneration", "Gemma3Config", dict(
        text_config=dict(_GQA, vocab_size=D_VOCAB, **_IDS),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=61, boi_token_index=62, eoi_token_index=63), "gemma3"),
    "phi": ("PhiForCausalLM", "PhiConfig", _LLAMA, "phi"),
    # q/k LayerNorm over d_head: one gain and bias shared by every head
    "phi-qk": ("PhiForCausalLM", "PhiConfig", dict(_LLAMA, qk_layernorm=True), "phi"),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_hidden_layers=N_LAYERS, ffn_dim=D_FF,
        max_position_embeddings=N_CTX, word_embed_proj_dim=D_MODEL), "opt"),
    "opt-350m": ("OPTForCausalLM", "OPTConfig", dict(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_hidden_layers=N_LAYERS, ffn_dim=D_FF,
        max_position_embeddings=N_CTX, word_embed_proj_dim=16, do_layer_norm_before=False), "opt"),
    "gptj": ("GPTJForCausalLM", "GPTJConfig", dict(
        n_embd=D_MODEL, n_head=N_HEADS, n_layer=N_LAYERS, n_inner=D_FF, n_positions=N_CTX, rotary_dim=4), "gptj"),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", "GPTBigCodeConfig", dict(
        n_embd=D_MODEL, n_head=N_HEADS, n_layer=N_LAYERS, n_inner=D_FF, n_positions=N_CTX), "gpt_bigcode"),
    "gpt_bigcode-mha": ("GPTBigCodeForCausalLM", "GPTBigCodeConfig", dict(
        n_embd=D_MODEL, n_head=N_HEADS, n_layer=N_LAYERS, n_inner=D_FF, n_positions=N_CTX,
        multi_query=False), "gpt_bigcode"),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(
        hidden_size=D_MODEL, n_head=N_HEADS, n_layer=N_LAYERS), "bloom"),
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_hidden_layers=N_LAYERS, bias=True), "falcon"),
    "falcon-new": ("FalconForCausalLM", "FalconConfig", dict(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_hidden_layers=N_LAYERS,
        new_decoder_architecture=True, num_kv_heads=2), "falcon"),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", dict(
        _LLAMA, num_key_value_heads=2, use_qkv_bias=True), "llama"),
    # q/k LayerNorm over d_head: one bias-free LayerNorm per head (q_layernorm.norms.{h})
    "stablelm-qk": ("StableLmForCausalLM", "StableLmConfig", dict(
        _LLAMA, num_key_value_heads=2, use_qkv_bias=True, qk_layernorm=True), "llama"),
    # no registry row: read with the layout its tensor names match (Llama)
    "granite": ("GraniteForCausalLM", "GraniteConfig", dict(
        _LLAMA, num_key_value_heads=2, embedding_multiplier=12.0, logits_scaling=4.0), "llama"),
    "cohere": ("CohereForCausalLM", "CohereConfig", dict(_LLAMA, num_key_value_heads=2, logit_scale=0.5), "cohere"),
    # q/k LayerNorm over d_head, bias-free, a gain per head and dimension ([n_heads, d_head])
    "cohere-qk": ("CohereForCausalLM", "CohereConfig", dict(
        _LLAMA, num_key_value_heads=2, logit_scale=0.5, use_qk_norm=True), "cohere"),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", dict(_LLAMA, num_key_value_heads=2), "llama"),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(_MOE, num_local_experts=N_EXPERTS), "moe"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(
        _MOE, num_experts=N_EXPERTS, moe_intermediate_size=24, shared_expert_intermediate_size=40), "moe"),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", dict(_MOE, num_experts=N_EXPERTS), "moe"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        _MOE, num_experts=N_EXPERTS, moe_intermediate_size=24, norm_topk_prob=True), "moe"),
}
FAMILIES = tuple(_FAMILIES)


def tiny_config(family: str, **overrides):
    """The transformers config of a tiny ``family`` model; ``overrides`` replace its fields."""
    import transformers

    if family not in _FAMILIES:
        raise KeyError(f"unknown tiny family {family!r}; one of {', '.join(FAMILIES)}")
    _, config_cls, kwargs, _ = _FAMILIES[family]
    kw = {"vocab_size": D_VOCAB, **_IDS, **kwargs, **overrides}
    return getattr(transformers, config_cls)(**kw)


def tiny_model(family: str, *, seed: int = 0, randomize: bool = True, **overrides):
    """(eval-mode HF model, tokenizer) for ``family`` (one of ``FAMILIES``), seeded.

    With ``randomize`` every parameter is redrawn: matrices ~ N(0, 0.3), biases ~ N(0, 0.3),
    norm gains ~ 1 + N(0, 0.2) (Cohere's q/k norm gains are [n_heads, d_head]), so biases and
    gains are not the trivial 0 / 1 of HF's init.
    """
    import torch
    import transformers

    model_cls = getattr(transformers, _FAMILIES[family][0])
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    # Eager attention keeps the reference computation plain (no fused SDPA kernels).
    config._attn_implementation = "eager"
    model = model_cls(config)
    if randomize:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():  # tied parameters appear once
                noise = torch.randn(p.shape, generator=g)
                if (p.ndim == 1 or name.endswith(("q_norm.weight", "k_norm.weight"))) and (
                        "norm" in name.lower() or "ln_" in name) and name.endswith(("weight", "gamma")):
                    p.copy_(1 + 0.2 * noise)
                else:
                    p.copy_(0.3 * noise)
    model.eval()
    return model, tiny_tokenizer()


def save_tiny(family: str, path, *, seed: int = 0, max_shard_size=None, **overrides) -> Path:
    """Save a tiny ``family`` model (config.json + safetensors + tokenizer) to ``path``."""
    path = Path(path)
    model, tok = tiny_model(family, seed=seed, **overrides)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kw)
    tok.save_pretrained(str(path))
    return path


def tiny_tokenizer():
    """A word-level fast tokenizer over ``VOCAB`` (built offline, saves as tokenizer.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>", mask_token="<mask>",
    )


# --- where each family keeps its Hugging Face modules (the reference side of the adapter tests) ---

def _split(t, n, e):
    """[B, S, n * e] -> [B, n, S, e]."""
    b, s = t.shape[:2]
    return t.view(b, s, n, e).transpose(1, 2)


def _gpt2_qkv(layer, x, dims):
    h, e = dims.n_heads, dims.d_head
    q, k, v = layer.attn.c_attn(x).split(dims.d_model, dim=2)
    return _split(q, h, e), _split(k, h, e), _split(v, h, e)


def _neox_qkv(layer, x, dims):
    # exactly HF's layout: (..., n_heads, 3 * d_head), then chunk
    b, s = x.shape[:2]
    qkv = layer.attention.query_key_value(x).view(b, s, -1, 3 * dims.d_head).transpose(1, 2)
    return qkv.chunk(3, dim=-1)


def _decoder_qkv(layer, x, dims):
    """As the Llama-style attention modules compute them, q/k norms included, before rotary."""
    a, h, kv, e = layer.self_attn, dims.n_heads, dims.n_kv_heads, dims.d_head
    if hasattr(a, "qkv_proj"):  # Phi-3
        q, k, v = a.qkv_proj(x).split((h * e, kv * e, kv * e), dim=-1)
    else:
        q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
    if hasattr(a, "q_norm") and a.q_norm.weight.shape == (h * e,):  # OLMo-2: over all heads
        q, k = a.q_norm(q), a.k_norm(k)
    b, s = x.shape[:2]
    q, k, v = q.view(b, s, h, e), k.view(b, s, kv, e), v.view(b, s, kv, e)
    # per head, on [B, S, heads, d_head]: Qwen3, Gemma 3 (gain [d_head]), Cohere ([heads, d_head])
    if hasattr(a, "q_norm") and a.q_norm.weight.shape[-1] == e:
        q, k = a.q_norm(q), a.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if getattr(a, "qk_layernorm", False):  # Phi, StableLM: on [B, heads, S, d_head] (StableLM splits dim 1)
        q, k = a.q_layernorm(q), a.k_layernorm(k)
    return q, k, v


def _gptj_qkv(layer, x, dims):
    a, h, e = layer.attn, dims.n_heads, dims.d_head
    return _split(a.q_proj(x), h, e), _split(a.k_proj(x), h, e), _split(a.v_proj(x), h, e)


def _bigcode_qkv(layer, x, dims):
    """GPTBigCodeAttention.forward's own split: [Q | K | V] with multi-query, else per head."""
    a, h, e = layer.attn, dims.n_heads, dims.d_head
    b, s = x.shape[:2]
    if a.multi_query:
        q, k, v = a.c_attn(x).split((a.embed_dim, a.kv_dim, a.kv_dim), dim=-1)
        return _split(q, h, e), _split(k, 1, e), _split(v, 1, e)
    return a.c_attn(x).view(b, s, h, 3 * e).transpose(1, 2).split(3 * [e], dim=3)


def _bloom_qkv(layer, x, dims):
    b, s = x.shape[:2]
    fused = layer.self_attention.query_key_value(x).view(b, s, dims.n_heads, 3, dims.d_head)
    return tuple(fused[..., i, :].transpose(1, 2) for i in range(3))


def _falcon_qkv(layer, x, dims):
    """FalconAttention's own split of its fused projection: ``_split_heads`` where transformers has
    it (its new architecture broadcasts each kv head over its group of query heads, so one head per
    group is kept); since transformers 5.25 the split is inline in ``forward``, so forward runs with
    its rotary embedding as the identity and its attention function replaced by one that captures
    the states it is given."""
    a = layer.self_attention
    if hasattr(a, "_split_heads"):
        q, k, v = a._split_heads(a.query_key_value(x))  # [B, S, heads, d_head]
        group = dims.n_heads // dims.n_kv_heads
        if k.shape[2] == dims.n_heads and group > 1:
            k, v = k[:, :, ::group], v[:, :, ::group]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return _states_given_to_attention(__import__(type(a).__module__, fromlist=["_"]), a, x)


class _Captured(Exception):
    pass


def _states_given_to_attention(modeling, attn, x):
    """(q, k, v) [B, heads, S, d_head] that ``attn.forward`` passes to its attention function, before
    any rotary embedding: ``modeling`` (the module's own file) is patched for the one call."""
    captured = []

    def capture(module, q, k, v, *args, **kwargs):
        captured.extend((q, k, v))
        raise _Captured

    saved = {name: getattr(modeling, name) for name in ("apply_rotary_pos_emb", "eager_attention_forward")}
    implementation = attn.config._attn_implementation
    modeling.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)
    modeling.eager_attention_forward = capture
    attn.config._attn_implementation = "eager"
    try:
        attn(x, attention_mask=None, position_embeddings=(None, None))
    except _Captured:
        pass
    finally:
        for name, value in saved.items():
            setattr(modeling, name, value)
        attn.config._attn_implementation = implementation
    if len(captured) != 3:
        raise AssertionError(f"{type(attn).__name__}.forward did not reach its attention function")
    return tuple(captured)


def _opt_mlp(layer, x):
    """As OPTDecoderLayer does: fc2(act(fc1 x)); OPT-350m adds the residual and norms after."""
    out = layer.fc2(layer.activation_fn(layer.fc1(x)))
    return out if layer.do_layer_norm_before else layer.final_layer_norm(x + out)


def _opt_W_E(model):
    d = model.model.decoder
    return d.embed_tokens.weight if d.project_in is None else d.project_in(d.embed_tokens.weight)


def _opt_W_U(model):
    """lm_head(project_out(x)) for x the unit vectors of the residual stream: [d_model, V]."""
    import torch

    d = model.model.decoder
    eye = torch.eye(model.config.hidden_size)
    return model.lm_head(eye if d.project_out is None else d.project_out(eye))


def _falcon_norms(layer):
    if hasattr(layer, "ln_attn"):  # new architecture with two norms
        return {"ln_attn": layer.ln_attn, "ln_mlp": layer.ln_mlp}
    if hasattr(layer, "post_attention_layernorm"):  # sequential
        return {"ln_attn": layer.input_layernorm, "ln_mlp": layer.post_attention_layernorm}
    return {"ln_attn": layer.input_layernorm, "ln_mlp": layer.input_layernorm}  # parallel, one norm


@dataclass(frozen=True)
class HF:
    """Accessors for one layout of Hugging Face modules.

    ``qkv(layer, x, dims)``: query/key/value states [B, heads, S, d_head] before rotary;
    ``o(layer)``: the attention output projection (input [B, S, n_heads * d_head]);
    ``mlp(layer, x)``: the MLP's output (post-LN encoders: including the residual add and norm);
    ``norms(layer)``: canonical norm slot -> module; ``final(model)``: the final norm or None;
    ``pos(model)``: the learned position embedding module or None.
    """

    layers: Callable
    qkv: Callable
    o: Callable
    mlp: Callable
    norms: Callable
    final: Callable = lambda model: None  # noqa: E731
    pos: Callable = lambda model: None  # noqa: E731
    embed_norm: Callable = lambda model: None  # noqa: E731
    # W_E / W_U as the residual stream sees them (OPT-350m projects in and out of d_model)
    W_E: Callable = lambda model: model.get_input_embeddings().weight  # noqa: E731
    W_U: Callable = lambda model: None if model.get_output_embeddings() is None else (  # noqa: E731
        model.get_output_embeddings().weight.T)


_ENCODER_MLP = lambda layer, x: layer.output(layer.intermediate(x), x)  # noqa: E731
_DECODER = dict(layers=lambda m: m.base_model.layers, qkv=_decoder_qkv, o=lambda layer: layer.self_attn.o_proj,
                mlp=lambda layer, x: layer.mlp(x), final=lambda m: m.base_model.norm)

HF_ACCESS = {
    "gpt2": HF(layers=lambda m: m.base_model.h, qkv=_gpt2_qkv, o=lambda layer: layer.attn.c_proj,
               mlp=lambda layer, x: layer.mlp(x), norms=lambda layer: {"ln_attn": layer.ln_1, "ln_mlp": layer.ln_2},
               final=lambda m: m.base_model.ln_f, pos=lambda m: m.base_model.wpe),
    "bert": HF(layers=lambda m: m.base_model.encoder.layer,
               qkv=lambda layer, x, d: tuple(_split(f(x), d.n_heads, d.d_head) for f in (
                   layer.attention.self.query, layer.attention.self.key, layer.attention.self.value)),
               o=lambda layer: layer.attention.output.dense, mlp=_ENCODER_MLP,
               norms=lambda layer: {"ln_attn": layer.attention.output.LayerNorm, "ln_mlp": layer.output.LayerNorm},
               pos=lambda m: m.base_model.embeddings.position_embeddings,
               embed_norm=lambda m: m.base_model.embeddings.LayerNorm),
    "mpnet": HF(layers=lambda m: m.base_model.encoder.layer,
                qkv=lambda layer, x, d: tuple(_split(f(x), d.n_heads, d.d_head) for f in (
                    layer.attention.attn.q, layer.attention.attn.k, layer.attention.attn.v)),
                o=lambda layer: layer.attention.attn.o, mlp=_ENCODER_MLP,
                norms=lambda layer: {"ln_attn": layer.attention.LayerNorm, "ln_mlp": layer.output.LayerNorm},
                pos=lambda m: m.base_model.embeddings.position_embeddings,
                embed_norm=lambda m: m.base_model.embeddings.LayerNorm),
    "neox": HF(layers=lambda m: m.base_model.layers, qkv=_neox_qkv, o=lambda layer: layer.attention.dense,
               mlp=lambda layer, x: layer.mlp(x),
               norms=lambda layer: {"ln_attn": layer.input_layernorm, "ln_mlp": layer.post_attention_layernorm},
               final=lambda m: m.base_model.final_layer_norm),
    "llama": HF(**_DECODER, norms=lambda layer: {
        "ln_attn": layer.input_layernorm, "ln_mlp": layer.post_attention_layernorm}),
    "gemma2": HF(**_DECODER, norms=lambda layer: {
        "ln_attn": layer.input_layernorm, "ln_attn_out": layer.post_attention_layernorm,
        "ln_mlp": layer.pre_feedforward_layernorm, "ln_mlp_out": layer.post_feedforward_layernorm}),
    "olmo2": HF(**_DECODER, norms=lambda layer: {
        "ln_attn_out": layer.post_attention_layernorm, "ln_mlp_out": layer.post_feedforward_layernorm}),
}
HF_ACCESS.update({
    "phi": HF(layers=lambda m: m.base_model.layers, qkv=_decoder_qkv, o=lambda layer: layer.self_attn.dense,
              mlp=lambda layer, x: layer.mlp(x), final=lambda m: m.base_model.final_layernorm,
              norms=lambda layer: {"ln_attn": layer.input_layernorm, "ln_mlp": layer.input_layernorm}),
    "gptj": HF(layers=lambda m: m.base_model.h, qkv=_gptj_qkv, o=lambda layer: layer.attn.out_proj,
               mlp=lambda layer, x: layer.mlp(x), final=lambda m: m.base_model.ln_f,
               norms=lambda layer: {"ln_attn": layer.ln_1, "ln_mlp": layer.ln_1}),
    "opt": HF(layers=lambda m: m.base_model.decoder.layers, qkv=_decoder_qkv, o=lambda layer: layer.self_attn.out_proj,
              mlp=_opt_mlp, final=lambda m: m.base_model.decoder.final_layer_norm,
              pos=lambda m: m.base_model.decoder.embed_positions, W_E=_opt_W_E, W_U=_opt_W_U,
              norms=lambda layer: {"ln_attn": layer.self_attn_layer_norm, "ln_mlp": layer.final_layer_norm}),
    "gpt_bigcode": HF(layers=lambda m: m.base_model.h, qkv=_bigcode_qkv, o=lambda layer: layer.attn.c_proj,
                      mlp=lambda layer, x: layer.mlp(x), final=lambda m: m.base_model.ln_f,
                      pos=lambda m: m.base_model.wpe, norms=lambda layer: {"ln_attn": layer.ln_1, "ln_mlp": layer.ln_2}),
    "bloom": HF(layers=lambda m: m.base_model.h, qkv=_bloom_qkv, o=lambda layer: layer.self_attention.dense,
                mlp=lambda layer, x: layer.mlp(x, 0 * x),  # BloomMLP adds its residual argument
                final=lambda m: m.base_model.ln_f, embed_norm=lambda m: m.base_model.word_embeddings_layernorm,
                norms=lambda layer: {"ln_attn": layer.input_layernorm, "ln_mlp": layer.post_attention_layernorm}),
    "gemma3": HF(**dict(_DECODER, layers=lambda m: m.model.language_model.layers,
                        final=lambda m: m.model.language_model.norm), norms=HF_ACCESS["gemma2"].norms),
    "cohere": HF(**_DECODER, norms=lambda layer: {"ln_attn": layer.input_layernorm, "ln_mlp": layer.input_layernorm}),
    "falcon": HF(layers=lambda m: m.base_model.h, qkv=_falcon_qkv, o=lambda layer: layer.self_attention.dense,
                 mlp=lambda layer, x: layer.mlp(x), final=lambda m: m.base_model.ln_f, norms=_falcon_norms),
})
HF_ACCESS["moe"] = HF(**dict(_DECODER, mlp=lambda layer, x: hf_moe(layer)(x)), norms=HF_ACCESS["llama"].norms)
NORM_SLOTS = ("ln_attn", "ln_mlp", "ln_attn_out", "ln_mlp_out")


def hf_moe(layer):
    """A MoE layer's sparse block (Mixtral: ``block_sparse_moe``; transformers 5 names it ``mlp``)."""
    return getattr(layer, "block_sparse_moe", None) or layer.mlp


def hf_router_logits(layer, x):
    """The HF gate's own routing logits for x [N, d_model]."""
    out = hf_moe(layer).gate(x)
    return out[0] if isinstance(out, tuple) else out


def hf_expert(layer, e: int, x):
    """Expert e's MLP output on x [N, d_model], through the HF experts module (every token sent to e, weight 1)."""
    import torch

    n = x.shape[0]
    index = torch.full((n, 1), e, dtype=torch.long)
    return hf_moe(layer).experts(x, index, torch.ones(n, 1, dtype=x.dtype))


def hf_access(family: str) -> HF:
    """The accessor row of a tiny family."""
    return HF_ACCESS[_FAMILIES[family][3]]


# --- the canonical side: the same computations from canonical tensors --------------------------

def eps_of(config):
    """The norms' epsilon; OPT names none and uses nn.LayerNorm's default."""
    config = config.get_text_config()
    return next((getattr(config, n) for n in ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps")
                 if getattr(config, n, None) is not None), 1e-5)


def _proj(x, W, b):
    import torch

    out = torch.einsum("bsd,hde->bhse", x, W)  # W: [heads, d_model, d_head]
    return out if b is None else out + b[None, :, None, :]


def c_qkv(lw, dims, x, eps=1e-6):
    """q, k, v states [B, heads, S, d_head] from canonical tensors, q/k norms included."""
    import torch

    q, k, v = _proj(x, lw.W_Q, lw.b_Q), _proj(x, lw.W_K, lw.b_K), _proj(x, lw.W_V, lw.b_V)
    for name, t in (("q", q), ("k", k)):
        w, b = getattr(lw, f"{name}_norm_w"), getattr(lw, f"{name}_norm_b")
        if w is not None:
            axes = (-1,) if dims.qk_norm == "head" else (1, 3)
            if b is not None or dims.centred_norms:  # a LayerNorm: RMS of the centred states
                t = t - t.mean(axes, keepdim=True)
            t = t * torch.rsqrt(t.pow(2).mean(axes, keepdim=True) + eps) * w[None, :, None, :]
            t = t if b is None else t + b[None, :, None, :]
            q, k = (t, k) if name == "q" else (q, t)
    return q, k, v


def c_o(lw, z):
    """z: [B, S, n_heads, d_head] -> [B, S, d_model]."""
    import torch

    out = torch.einsum("bshe,hed->bsd", z, lw.W_O)
    return out if lw.b_O is None else out + lw.b_O


def c_mlp(lw, x):
    from transformers.activations import ACT2FN

    act = ACT2FN[lw.act]
    pre = x @ lw.W_in + (0 if lw.b_in is None else lw.b_in)
    if lw.W_gate is not None:
        hidden = act(x @ lw.W_gate + (0 if lw.b_gate is None else lw.b_gate)) * pre
    else:
        hidden = act(pre)
    return hidden @ lw.W_out + (0 if lw.b_out is None else lw.b_out)


def c_moe(lw, x, conventions):
    """A mixture-of-experts MLP from canonical tensors: softmax over x @ W_router, the top
    ``experts_per_token`` experts' MLPs weighted by their probabilities (renormalised when
    ``norm_topk_prob``), plus the shared expert scaled by sigmoid(x @ W_shared_gate)."""
    import torch

    flat = x.reshape(-1, x.shape[-1])
    probs = (flat @ lw.W_router).softmax(-1)
    top, idx = probs.topk(conventions["experts_per_token"], dim=-1)
    if conventions["norm_topk_prob"]:
        top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(flat)
    for e in range(len(lw.experts)):
        w = (top * (idx == e)).sum(-1, keepdim=True)
        out += w * c_mlp(_as_layer(lw, lw.experts[e]), flat)
    if lw.W_in.shape[1]:
        shared = c_mlp(lw, flat)
        out += shared * torch.sigmoid(flat @ lw.W_shared_gate) if lw.W_shared_gate is not None else shared
    return out.reshape(x.shape)


def _as_layer(lw, ex):
    import dataclasses

    return dataclasses.replace(lw, W_in=ex.W_in, W_gate=ex.W_gate, W_out=ex.W_out, b_in=None, b_gate=None, b_out=None)


def c_mlp_block(lw, dims, x, eps, conventions=None):
    """What ``HF.mlp`` returns: the MLP, and for post-LN encoders the residual add and norm."""
    if lw.experts is not None:
        return c_moe(lw, x, conventions)
    if dims.norm_position == "post":
        return c_norm(c_mlp(lw, x) + x, lw.ln_mlp_w, lw.ln_mlp_b, eps, dims.centred_norms)
    return c_mlp(lw, x)


def c_norm(x, w, b, eps, centred=False):
    """A canonical norm: LayerNorm when it has a bias or ``centred`` (Dims.centred_norms),
    else RMSNorm."""
    import torch
    import torch.nn.functional as F

    if b is None and not centred:  # RMSNorm
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def c_attention(lw, dims, x, causal):
    import math

    import torch

    q, k, v = c_qkv(lw, dims, x)
    S = x.shape[1]
    kv = [dims.kv_head(h) for h in range(dims.n_heads)]
    scores = q @ k[:, kv].transpose(-1, -2) / math.sqrt(dims.d_head)
    if causal:
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    z = scores.softmax(-1) @ v[:, kv]  # [B, heads, S, d_head]
    return c_o(lw, z.transpose(1, 2))


class PieceTokenizer:
    """Just enough tokenizer over a list of pieces (for vocabulary alignment and diff checks)."""

    def __init__(self, pieces, special=()):
        self.pieces = pieces
        self.all_special_ids = list(special)

    def get_vocab(self):
        return {p: i for i, p in enumerate(self.pieces)}

    def __len__(self):
        return len(self.pieces)

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]

    def convert_tokens_to_string(self, toks):
        return "".join(toks).replace("Ġ", " ")
