"""Architecture adapters: one small module per checkpoint layout turns a checkpoint into ``Canonical``.

``FAMILIES`` below is the one declaration of what is supported: ``adapter_for(model_type)`` reads
it, the unsupported-architecture message lists it, and tests/test_adapters.py checks that
docs/ADAPTERS.md and the README name every row. Each adapter module has
``adapt(source, config, dtype, family) -> Canonical``; a module that serves several layouts (the
Llama-style ``decoder``) looks ``family`` up in its own ``LAYOUTS``. See docs/ADAPTERS.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Optional


@dataclass(frozen=True)
class Family:
    """One supported ``model_type`` (config.json) and the adapter that reads it."""

    model_type: str
    label: str  # how people name the models, for messages and docs
    module: str  # adapter module in this package
    layout: Optional[str] = None  # for modules serving several layouts; default: the module name

    @property
    def FAMILY(self) -> str:
        """The adapter family recorded as ``models.architecture`` (the layout's name)."""
        return self.layout or self.module

    def adapt(self, source, config, dtype):
        """Canonical weights of a checkpoint of this family."""
        return import_module(f".{self.module}", __name__).adapt(source, config, dtype, self.FAMILY)


FAMILIES = (
    Family("gpt2", "GPT-2", "gpt2"),
    Family("bert", "BERT/MiniLM", "bert"),
    Family("mpnet", "MPNet", "mpnet"),
    Family("llama", "Llama", "decoder", "llama"),
    Family("mistral", "Mistral", "decoder", "llama"),
    Family("qwen2", "Qwen2", "decoder", "llama"),
    Family("gpt_neox", "GPT-NeoX/Pythia", "decoder", "neox"),
    Family("gemma", "Gemma", "decoder", "gemma"),
    Family("gemma2", "Gemma 2", "decoder", "gemma2"),
    Family("gemma3_text", "Gemma 3 (text)", "decoder", "gemma3_text"),
    Family("gemma3", "Gemma 3 (multimodal, text tower)", "decoder", "gemma3"),
    Family("qwen3", "Qwen3", "decoder", "qwen3"),
    Family("phi3", "Phi-3", "decoder", "phi3"),
    Family("olmo2", "OLMo-2", "decoder", "olmo2"),
    Family("phi", "Phi-1/1.5/2", "decoder", "phi"),
    Family("opt", "OPT", "decoder", "opt"),
    Family("gptj", "GPT-J", "decoder", "gptj"),
    Family("gpt_bigcode", "StarCoder (GPTBigCode)", "decoder", "gpt_bigcode"),
    Family("bloom", "BLOOM", "decoder", "bloom"),
    Family("falcon", "Falcon", "decoder", "falcon"),
    Family("stablelm", "StableLM", "decoder", "stablelm"),
    Family("starcoder2", "StarCoder2", "decoder", "starcoder2"),
    Family("cohere", "Cohere Command-R", "decoder", "cohere"),
    Family("mixtral", "Mixtral (MoE)", "decoder", "mixtral"),
    Family("qwen2_moe", "Qwen2-MoE / Qwen1.5-MoE", "decoder", "qwen2_moe"),
    Family("olmoe", "OLMoE", "decoder", "olmoe"),
    Family("qwen3_moe", "Qwen3-MoE", "decoder", "qwen3_moe"),
)
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES}
SUPPORTED_MODEL_TYPES = tuple(_BY_MODEL_TYPE)


def supported_list() -> str:
    """``gpt2 (GPT-2), bert (BERT/MiniLM), ...``: the list every message prints."""
    return ", ".join(f"{f.model_type} ({f.label})" for f in FAMILIES)


def _unsupported(model_type, architectures, why: str = ""):
    from ..errors import UnsupportedArchitecture

    names = architectures if isinstance(architectures, list) else [architectures] if architectures else []
    arch = ", ".join(map(str, names)) or "no architectures field"
    return UnsupportedArchitecture(
        f"unsupported architecture: model_type {model_type!r} ({arch}){why}; zeropass supports "
        f"{supported_list()}"
    )


class AssumedLayout:
    """A ``model_type`` with no row, that transformers knows (Granite, say): read with the first
    decoder layout whose coverage rules name every tensor of the checkpoint and whose shapes fit
    the config. The layout is recorded (``FAMILY``, ``conventions['assumed_layout']``)."""

    def __init__(self, model_type: str, architectures):
        self.model_type, self.architectures = model_type, architectures
        self.FAMILY: Optional[str] = None  # set by adapt: the layout that matched

    def adapt(self, source, config, dtype):
        from .decoder import adapt_assumed

        canonical = adapt_assumed(source, config, dtype)
        if canonical is None:
            raise _unsupported(self.model_type, self.architectures,
                               "; its tensor names match none of the known layouts")
        self.FAMILY = canonical.dims.architecture
        return canonical


def adapter_for(model_type: str | None, architectures=None):
    """The registry row for a config's ``model_type``; for a type transformers knows but we have
    no row for, an ``AssumedLayout``; UnsupportedArchitecture otherwise (before any tensor or
    the config is parsed, so it fails fast)."""
    if not isinstance(model_type, str):  # a hostile config.json: a list or a dict is not a type
        raise _unsupported(model_type, architectures)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    if model_type in _known_to_transformers():
        return AssumedLayout(model_type, architectures)
    raise _unsupported(model_type, architectures)


def _known_to_transformers() -> set:
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:  # load.py reports the missing package in its own words
        return set()
    return set(CONFIG_MAPPING_NAMES)
