"""Dictionary projections (`zeropass index-sae`) vs the bare matrix products, in one run.

    .venv/bin/python -m benchmarks.bench_dictionaries [--d-sae 16384] [--layers 12] [--repeats 1] [--json OUT]

GPT-2-small shapes (d_model 768, vocabulary 50,257, untied W_E / W_U, d_ff 3072), random weights; the
dictionary is a SAELens folder on disk (read block by block, as `index-sae` reads it):

1. projection ratio = (decoder rows through W_U and encoder directions through W_E with top-k and
   bottom-k selection, norms and the Arrow tables that are written: ``_Writer.project``) / (the two
   bare GEMMs of the same shapes into a reused buffer). Target <= 1.3.
2. neighbour ratio = (top-10 neighbours of every decoder direction among the FF values of
   ``--layers`` layers: float32 candidate GEMMs, top-k, float64 re-ranking, rows) / (the bare
   float32 GEMM of the normalised directions with every FF value).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

D_MODEL, D_VOCAB, D_FF = 768, 50257, 3072


def _model(n_layers: int):
    g = torch.Generator().manual_seed(0)
    emb = SimpleNamespace(W_E=torch.randn(D_VOCAB, D_MODEL, generator=g), W_U=torch.randn(D_MODEL, D_VOCAB, generator=g))
    layers = [SimpleNamespace(W_out=torch.randn(D_FF, D_MODEL, generator=g)) for _ in range(n_layers)]
    return SimpleNamespace(embeddings=emb, dims=SimpleNamespace(d_model=D_MODEL), layer=lambda l: layers[l])


def _dictionary(path: Path, d_sae: int, layer: int):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    path.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": torch.randn(D_MODEL, d_sae, generator=g), "W_dec": torch.randn(d_sae, D_MODEL, generator=g),
               "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(D_MODEL)}, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"d_in": D_MODEL, "d_sae": d_sae, "architecture": "standard",
                                               "metadata": {"hook_name": f"blocks.{layer}.hook_resid_pre"}}))
    return path


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> dict:
    from indexer.dictionaries import open_dictionary
    from indexer.dictionaries.index import BLOCK, _Job, _Writer
    from indexer.kernels.vectors import _matmul_into

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=12, help="FF layers searched for neighbours (the dictionary sits at the last)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    model = _model(args.layers)
    token_text = __import__("pyarrow").array([f"t{i}" for i in range(D_VOCAB)])
    with tempfile.TemporaryDirectory() as tmp:
        d = open_dictionary(_dictionary(Path(tmp) / "sae", args.d_sae, args.layers - 1))
        job = _Job("bench", d, "bench")
        writer = _Writer(Path(tmp), "bench", model, token_text, k=50, say=lambda _m: None)

        W_dec, W_enc_rows = d.decoder(0, d.d_sae), d.encoder(0, d.d_sae)
        read_basis, write_basis = writer.read.basis, writer.write_side.basis
        buf = torch.empty(min(BLOCK, d.d_sae), writer.read.width)

        def bare():
            for a in range(0, d.d_sae, BLOCK):
                b = min(d.d_sae, a + BLOCK)
                _matmul_into(W_dec[a:b], write_basis, buf[: b - a, :D_VOCAB])
                _matmul_into(W_enc_rows[a:b], read_basis, buf[: b - a, :D_VOCAB])

        bare()  # warm the GEMM threads and pages
        t_bare = _time(bare, args.repeats)
        t_proj = _time(lambda: writer.project(job), args.repeats)

        X = torch.nn.functional.normalize(d.decoder(0, d.d_sae), dim=1)
        W_all = torch.nn.functional.normalize(torch.cat([model.layer(l).W_out for l in range(args.layers)]), dim=1)
        out = torch.empty(min(BLOCK, d.d_sae), W_all.shape[0])

        def bare_nb():
            for a in range(0, d.d_sae, BLOCK):
                b = min(d.d_sae, a + BLOCK)
                _matmul_into(X[a:b], W_all.T, out[: b - a])

        t_nb_bare = _time(bare_nb, args.repeats)
        t_nb = _time(lambda: writer.neighbours(job, [job], 10, ("ff_value",)), args.repeats)
    result = {"d_sae": args.d_sae, "d_model": D_MODEL, "d_vocab": D_VOCAB, "ff_values": args.layers * D_FF,
              "bare_s": round(t_bare, 3), "project_s": round(t_proj, 3), "project_ratio": round(t_proj / t_bare, 3),
              "neighbours_bare_s": round(t_nb_bare, 3), "neighbours_s": round(t_nb, 3),
              "neighbours_ratio": round(t_nb / t_nb_bare, 3), "threads": torch.get_num_threads()}
    print(f"dictionary {args.d_sae} x {D_MODEL}, vocabulary {D_VOCAB}: projection {t_proj:.2f}s vs bare GEMMs {t_bare:.2f}s "
          f"-> ratio {t_proj / t_bare:.2f} (target <= 1.3)")
    print(f"neighbours among {args.layers * D_FF} FF values: {t_nb:.2f}s vs bare GEMM {t_nb_bare:.2f}s -> ratio {t_nb / t_nb_bare:.2f}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def section(r: dict, cmd: str) -> str:
    """The docs/BENCHMARKS.md section of one run's ``--json`` result (benchmarks/run_all.py)."""
    return "\n".join([
        "",
        f"## Dictionaries (`index-sae`): a {r['d_sae']:,} x {r['d_model']} dictionary, vocabulary {r['d_vocab']:,}",
        "",
        f"`.venv/bin/python {cmd}`",
        "",
        "| measure | zeropass | baseline | ratio |",
        "|---|---|---|---|",
        f"| decoder + encoder projections incl. top-k/bottom-k, norms and Arrow tables vs the two bare GEMMs | "
        f"{r['project_s']:.1f} s | {r['bare_s']:.1f} s | **{r['project_ratio']:.2f}** (target ≤ 1.3) |",
        f"| top-10 neighbours among {r['ff_values']:,} FF values (float32 candidates, float64 re-rank) vs the bare GEMM | "
        f"{r['neighbours_s']:.1f} s | {r['neighbours_bare_s']:.1f} s | **{r['neighbours_ratio']:.2f}** |",
        "",
    ])


if __name__ == "__main__":
    main()
