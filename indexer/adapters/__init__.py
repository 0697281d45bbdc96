"""Architecture adapters: one small module per family turns a checkpoint into ``Canonical``.

``adapter_for(model_type)`` picks the module; each module has ``FAMILY``, ``MODEL_TYPES`` and
``adapt(source, config, dtype) -> Canonical``. See docs/ADAPTERS.md for the mappings.
"""
from __future__ import annotations

from importlib import import_module

# model_type (config.json) -> adapter module; also the list the error message prints.
_MODULES = {"gpt2": "gpt2", "bert": "bert", "mpnet": "mpnet", "llama": "llama",
            "mistral": "llama", "qwen2": "llama", "gpt_neox": "neox"}
SUPPORTED_MODEL_TYPES = tuple(_MODULES)


def is_supported(model_type: str | None) -> bool:
    return model_type in _MODULES


def adapter_for(model_type: str | None, architectures=None):
    """The adapter module for a config's ``model_type``; UnsupportedArchitecture otherwise."""
    from ..errors import UnsupportedArchitecture

    if model_type not in _MODULES:
        arch = ", ".join(architectures or []) or "no architectures field"
        raise UnsupportedArchitecture(
            f"unsupported architecture: model_type {model_type!r} ({arch}); zeropass supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (GPT-2, BERT/MiniLM, MPNet, Llama/Mistral/Qwen2, "
            f"GPT-NeoX/Pythia)"
        )
    return import_module(f".{_MODULES[model_type]}", __name__)
