"""Kernel-trick correlation (Gram matrices) vs the direct way (materialise V x n projections).

    .venv/bin/python -m benchmarks.bench_align                 # MiniLM layer 3 vs MPNet layer 6, FF keys
    .venv/bin/python -m benchmarks.bench_align --synthetic     # GPT-2-shaped random: V 50257, d 768, d_ff 3072

Both compute the same [n_a, n_b] Pearson matrix over the shared vocabulary (checked to agree).
The direct way runs in float32 (its fastest form here); the Gram path in float64 as the library
does. The Gram build is paid once per model pair and reused by every layer pair, so the ratio
is printed both per layer pair and with the Gram build included.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _real(layer_a: int, layer_b: int):
    from indexer.align import shared_vocabulary
    from indexer.load import load_canonical
    from indexer.packaged import minilm_path, mpnet_path

    a, b = load_canonical(str(minilm_path())), load_canonical(str(mpnet_path()))
    tm = shared_vocabulary(a.tokenizer, b.tokenizer, a.canonical.dims.d_vocab, b.canonical.dims.d_vocab)
    E_a = a.canonical.embeddings.W_E.numpy()[tm.ids_a]
    E_b = b.canonical.embeddings.W_E.numpy()[tm.ids_b]
    X_a = a.canonical.layer(layer_a).W_in.numpy()
    X_b = b.canonical.layer(layer_b).W_in.numpy()
    return f"MiniLM L{layer_a} vs MPNet L{layer_b} FF keys", E_a, X_a, E_b, X_b


def _synthetic(seed: int = 0):
    rng = np.random.default_rng(seed)
    V, d, d_ff = 50257, 768, 3072
    E_a = rng.standard_normal((V, d), dtype=np.float32)
    E_b = rng.standard_normal((V, d), dtype=np.float32)
    X_a = rng.standard_normal((d, d_ff), dtype=np.float32)
    X_b = rng.standard_normal((d, d_ff), dtype=np.float32)
    return "GPT-2-shaped random (V 50257, d 768, d_ff 3072) FF keys", E_a, X_a, E_b, X_b


def main(argv=None) -> None:
    from indexer.align import correlate, correlate_direct, grams

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--synthetic", action="store_true", help="GPT-2-shaped random matrices instead of MiniLM/MPNet")
    p.add_argument("--layers", default="3,6", help="layer of A, layer of B (real models)")
    args = p.parse_args(argv)
    if args.synthetic:
        what, E_a, X_a, E_b, X_b = _synthetic()
    else:
        la, lb = (int(x) for x in args.layers.split(","))
        what, E_a, X_a, E_b, X_b = _real(la, lb)
    V = E_a.shape[0]
    print(f"{what}: V={V}, d_a={E_a.shape[1]}, d_b={E_b.shape[1]}, n_a={X_a.shape[1]}, n_b={X_b.shape[1]}", file=sys.stderr)

    t0 = time.perf_counter()
    g = grams(E_a, E_b)
    t1 = time.perf_counter()
    C_gram = correlate(X_a, X_b, g)
    t2 = time.perf_counter()
    C_direct = correlate_direct(E_a.astype(np.float32), X_a.astype(np.float32), E_b.astype(np.float32), X_b.astype(np.float32))
    t3 = time.perf_counter()

    err = float(np.abs(C_gram - C_direct).max())
    t_gram, t_corr, t_direct = t1 - t0, t2 - t1, t3 - t2
    print(f"gram build (once per model pair): {t_gram:8.3f} s")
    print(f"gram correlate (per layer pair):  {t_corr:8.3f} s")
    print(f"direct (V x n projections):       {t_direct:8.3f} s")
    print(f"speed-up per layer pair: {t_direct / t_corr:.1f}x; including the gram build: {t_direct / (t_gram + t_corr):.1f}x; "
          f"max |difference| {err:.2e}")


if __name__ == "__main__":
    main()
