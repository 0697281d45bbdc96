"""EleutherAI sparsify dictionaries: ``cfg.json`` + ``sae.safetensors``.

Tensors: ``encoder.weight`` [d_sae, d_in] (rows are the encoder directions), ``encoder.bias``
[d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in]; a transcoder also has ``W_skip`` [d_in, d_in]
(its skip connection: stored in ``dictionaries.settings`` as present, not projected). The hook is
the folder name: ``layers.8`` (the residual stream after block 8: ``resid_post``), ``layers.8.mlp``
(the MLP output, or with ``transcode`` in cfg.json a transcoder), ``layers.8.self_attn``
(attention output).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from . import BadDictionary, Dictionary, SafetensorsTensors, UnknownHook, read_json

_FOLDER = re.compile(r"^(?:.*\.)?layers\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$")


def read(path: Path, *, layer: Optional[int] = None, site: Optional[str] = None) -> Dictionary:
    cfg = read_json(path / "cfg.json")
    t = SafetensorsTensors(path / "sae.safetensors")
    for name in ("encoder.weight", "W_dec"):
        if name not in t.names:
            raise BadDictionary(f"{t.path} has no tensor {name}: not a sparsify dictionary")
    d_sae, d_in = t.shapes["encoder.weight"]
    if t.shapes["W_dec"] != (d_sae, d_in):
        raise BadDictionary(f"{t.path}: W_dec is {list(t.shapes['W_dec'])}, must be [d_sae, d_in] = [{d_sae}, {d_in}]")
    transcoder = bool(cfg.get("transcode")) or "W_skip" in t.names
    m = _FOLDER.match(path.name)
    if m is None and (layer is None or site is None):
        raise UnknownHook(f"{path.name!r} is not a sparsify hook folder (layers.8, layers.8.mlp): "
                          f"rename it or give --layer and --site")
    if m is not None:
        part = m.group(2)
        found_site = "transcoder" if transcoder else {None: "resid_post", "mlp": "mlp_out"}.get(part, "attn_out")
        layer = int(m.group(1)) if layer is None else layer
        site = found_site if site is None else site
    bias = {"b_enc": "encoder.bias"}
    return Dictionary(
        path=path, format="sparsify", hook=path.name, layer=layer, site=site, d_in=d_in, d_sae=d_sae,
        architecture="topk" + ("-transcoder" if transcoder else ""), config=dict(cfg, skip_connection="W_skip" in t.names),
        files=[path / "cfg.json", t.path],
        decoder=lambda a, b: t.rows("W_dec", a, b),
        encoder=lambda a, b: t.rows("encoder.weight", a, b),
        vector=lambda name: t.whole(bias.get(name, name)) if bias.get(name, name) in t.names else None,
    )
