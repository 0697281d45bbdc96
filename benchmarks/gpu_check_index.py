"""GPU check of the whole indexer: `index --device cuda` gives the same dataset as `--device cpu`.

    python3 -m benchmarks.gpu_check_index      # on a CUDA machine; prints one JSON object
    python -m benchmarks.gpu_check_index --devices cpu,cpu --layers 1   # dry run without a GPU

Builds a GPT-2-shaped random model (4 layers x 12 heads, d_model 768, V 8000) offline, indexes
it on both devices and compares every table: circuits (pairs, head_tokens) must be identical
entries in identical order; vector top-k lists are compared by token ids (fp32 GEMMs on two
devices may order near-ties differently) and by score.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


def compare_datasets(root_a: Path, root_b: Path, layers=None) -> dict:
    """Table by table, model ``m`` of two datasets (only ``layers`` when given): circuits must be
    identical entries, vectors the same token at the same rank (fp32 near-ties may differ)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from schemas.layout import read_manifest, table_files

    def table(root, name, order):
        t = pa.concat_tables([pq.read_table(root / f) for f in table_files(read_manifest(root), name)])
        t = pa.table({c: t.column(c).cast(pa.string()) if pa.types.is_dictionary(t.column(c).type) else t.column(c)
                      for c in t.column_names})  # dictionary-encoded strings cannot be sorted
        if layers is not None:
            t = t.filter(pc.is_in(t.column("layer"), pa.array(layers, pa.int16())))
        return t.sort_by(order).to_pydict()

    result = {}
    for name, order in (("pairs", [("layer", "ascending"), ("head", "ascending"), ("circuit", "ascending"),
                                   ("side", "ascending"), ("rank", "ascending")]),
                        ("head_tokens", [("layer", "ascending"), ("head", "ascending"), ("circuit", "ascending"),
                                         ("role", "ascending"), ("side", "ascending"), ("rank", "ascending")])):
        a, b = table(root_a, name, order), table(root_b, name, order)
        ids = ("src_id", "dst_id") if name == "pairs" else ("token_id",)
        result[name] = {
            "rows": len(a["score"]), "same_rows": len(a["score"]) == len(b["score"]),
            "identical_entries": all(a[c] == b[c] for c in ids),
            "max_score_diff": max((abs(x - y) for x, y in zip(a["score"], b["score"])), default=0.0),
        }
    order = [("layer", "ascending"), ("kind", "ascending"), ("head", "ascending"), ("expert", "ascending"),
             ("idx", "ascending"), ("side", "ascending"), ("rank", "ascending")]
    a, b = table(root_a, "vectors", order), table(root_b, "vectors", order)
    same = sum(x == y for x, y in zip(a["token_id"], b["token_id"]))
    result["vectors"] = {
        "rows": len(a["token_id"]), "same_rows": len(a["token_id"]) == len(b["token_id"]),
        "same_token_at_same_rank": same / max(len(a["token_id"]), 1),
        "max_score_diff": max((abs(x - y) for x, y in zip(a["score"], b["score"])), default=0.0),
    }
    return result


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    dev_a, dev_b = args.devices.split(",")
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from indexer.build import index_model

    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    V = 8000
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=768, n_head=12, n_layer=args.layers, n_positions=64))
    model.save_pretrained(tmp / "m")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(tmp / "m")

    times = {}
    for label, device in (("a", dev_a), ("b", dev_b)):
        t = time.perf_counter()
        index_model(str(tmp / "m"), tmp / label, name="m", device=device, progress=lambda m: print(m, file=sys.stderr))
        times[f"{label}:{device}"] = time.perf_counter() - t

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result = {"seconds": times, "torch": torch.__version__, "gpu": gpu, **compare_datasets(tmp / "a", tmp / "b")}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
