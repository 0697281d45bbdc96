"""Tiny random Hugging Face models of every supported family, built offline from a config.

Shared by the adapter, indexer, query and CLI tests::

    from tests.tiny_models import FAMILIES, tiny_model, save_tiny
    model, tok = tiny_model("llama-gqa")          # eval-mode HF model + tokenizer
    path = save_tiny("gpt2", tmp_path / "gpt2")   # config.json + model.safetensors + tokenizer

Every parameter is random (seeded), including LayerNorm gains and biases, so a mapping that
drops or misplaces a bias or a gain shows up in the tests. All families share one 64-entry
word-level vocabulary (``VOCAB``) with a few words the query tests can look for (``Paris``...).
"""
from __future__ import annotations

from pathlib import Path

D_MODEL, N_HEADS, D_FF, N_LAYERS, N_CTX = 32, 4, 64, 2, 32

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
WORDS = ("the a of and to in is was cat dog Paris France Berlin Germany Rome Italy king queen "
         "man woman red blue green one two three run ran walk big small city country capital "
         "river water fire sun moon star good bad he she it they we you not yes no car house "
         "tree book time day night").split()
VOCAB = SPECIALS + WORDS + [f"w{i}" for i in range(64 - len(SPECIALS) - len(WORDS))]
D_VOCAB = len(VOCAB)
_IDS = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)

# family -> (transformers class name, config class name, config kwargs). Kept in one table so
# a new family is one line here plus one adapter.
_FAMILIES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(
        n_embd=D_MODEL, n_head=N_HEADS, n_layer=N_LAYERS, n_positions=N_CTX, n_inner=D_FF)),
    "bert": ("BertModel", "BertConfig", dict(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_hidden_layers=N_LAYERS,
        intermediate_size=D_FF, max_position_embeddings=N_CTX)),
    "bert-mlm": ("BertForMaskedLM", "BertConfig", dict(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_hidden_layers=N_LAYERS,
        intermediate_size=D_FF, max_position_embeddings=N_CTX)),
    "bert-mlm-untied": ("BertForMaskedLM", "BertConfig", dict(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_hidden_layers=N_LAYERS,
        intermediate_size=D_FF, max_position_embeddings=N_CTX, tie_word_embeddings=False)),
    "mpnet": ("MPNetModel", "MPNetConfig", dict(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_hidden_layers=N_LAYERS,
        intermediate_size=D_FF, max_position_embeddings=N_CTX, pad_token_id=1)),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS,
        num_hidden_layers=N_LAYERS, intermediate_size=D_FF, tie_word_embeddings=True)),
    "llama-gqa": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_key_value_heads=2,
        num_hidden_layers=N_LAYERS, intermediate_size=D_FF, tie_word_embeddings=True)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_key_value_heads=2,
        num_hidden_layers=N_LAYERS, intermediate_size=D_FF, tie_word_embeddings=False)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_key_value_heads=1,
        num_hidden_layers=N_LAYERS, intermediate_size=D_FF, tie_word_embeddings=False)),
    "neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_hidden_layers=N_LAYERS,
        intermediate_size=D_FF, max_position_embeddings=N_CTX, rotary_pct=0.5,
        tie_word_embeddings=False)),
}
FAMILIES = tuple(_FAMILIES)


def tiny_config(family: str, **overrides):
    """The transformers config of a tiny ``family`` model; ``overrides`` replace its fields."""
    import transformers

    if family not in _FAMILIES:
        raise KeyError(f"unknown tiny family {family!r}; one of {', '.join(FAMILIES)}")
    _, config_cls, kwargs = _FAMILIES[family]
    kw = {"vocab_size": D_VOCAB, **_IDS, **kwargs, **overrides}
    return getattr(transformers, config_cls)(**kw)


def tiny_model(family: str, *, seed: int = 0, randomize: bool = True, **overrides):
    """(eval-mode HF model, tokenizer) for ``family`` (one of ``FAMILIES``), seeded.

    With ``randomize`` every parameter is redrawn: matrices ~ N(0, 0.3), biases ~ N(0, 0.3),
    norm gains ~ 1 + N(0, 0.2), so biases and gains are not the trivial 0 / 1 of HF's init.
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
                if p.ndim == 1 and ("norm" in name.lower() or "ln_" in name) and name.endswith(
                        ("weight", "gamma")):
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
