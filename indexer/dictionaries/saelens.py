"""SAELens dictionaries: ``cfg.json`` + ``sae_weights.safetensors``.

Tensors: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc`` [d_sae], ``b_dec`` [d_in],
``threshold`` [d_sae] (JumpReLU). The hook is ``metadata.hook_name`` (SAELens 6) or the top-level
``hook_name`` (older files); ``architecture`` names the activation. A transcoder (``hook_name_out``
in its config, or an architecture naming it) reads the MLP input and writes the MLP output.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from schemas.format import first_line

from . import BadDictionary, Dictionary, SafetensorsTensors, parse_hook, read_json


def read(path: Path, *, layer: Optional[int] = None, site: Optional[str] = None, pickle_file: Path | None = None) -> Dictionary:
    cfg = read_json(path / "cfg.json")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook = meta.get("hook_name") or cfg.get("hook_name")
    architecture = str(cfg.get("architecture") or meta.get("architecture") or "standard")
    transcoder = "hook_name_out" in cfg or "hook_name_out" in meta or "transcoder" in architecture
    if hook is None and (layer is None or site is None):
        raise BadDictionary(f"{path / 'cfg.json'} names no hook (metadata.hook_name): give --layer and --site")
    hook_layer, hook_site = parse_hook(hook, transcoder=transcoder) if hook is not None else (layer, site)
    if pickle_file is not None:
        t = _PickleTensors(pickle_file)
        files = [path / "cfg.json", pickle_file]
    else:
        t = SafetensorsTensors(path / "sae_weights.safetensors")
        files = [path / "cfg.json", path / "sae_weights.safetensors"]
    for name in ("W_enc", "W_dec"):
        if name not in t.names:
            raise BadDictionary(f"{files[1]} has no tensor {name}: not a SAELens dictionary")
    d_in, d_sae = t.shapes["W_enc"]
    if t.shapes["W_dec"] != (d_sae, d_in):
        raise BadDictionary(f"{files[1]}: W_dec is {list(t.shapes['W_dec'])}, W_enc {[d_in, d_sae]}: "
                            f"W_dec must be [d_sae, d_in] = [{d_sae}, {d_in}]")
    for key, want in (("d_in", d_in), ("d_sae", d_sae)):
        if key in cfg and cfg[key] != want:
            raise BadDictionary(f"{path / 'cfg.json'} says {key} {cfg[key]} but the weights have {want}")
    return Dictionary(
        path=path, format="saelens", hook=str(hook if hook is not None else f"blocks.{layer}.hook_{site}"),
        layer=hook_layer if layer is None else layer, site=hook_site if site is None else site,
        d_in=d_in, d_sae=d_sae, architecture=architecture, config=cfg, files=files,
        decoder=lambda a, b: t.rows("W_dec", a, b),
        encoder=lambda a, b: t.cols("W_enc", a, b).T,
        vector=lambda name: t.whole(name) if name in t.names else None,
    )


class _PickleTensors:
    """A pickled state dict (``--allow-pickle`` only), read whole: pickles have no lazy access."""

    def __init__(self, path: Path):
        import torch

        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise BadDictionary(f"{path} cannot be read ({first_line(e)})") from None
        self.state = {k: v for k, v in state.items() if hasattr(v, "shape")}
        self.names = set(self.state)
        self.shapes = {k: tuple(v.shape) for k, v in self.state.items()}

    def rows(self, name, a, b):
        return self.state[name][a:b].float()

    def cols(self, name, a, b):
        return self.state[name][:, a:b].float()

    def whole(self, name):
        return self.state[name].float()
