"""`make bench`: run every side-by-side benchmark and write docs/BENCHMARKS.md from the results.

    .venv/bin/python -m benchmarks.run_all [--out bench-out] [--quick]

Each comparison runs in one process (or one parent with measured children) so both sides see the
same machine, interleaved where it matters; ratios are the headline, absolute times context.
Raw outputs are kept in --out (JSON and text) next to the generated page.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def run(cmd: list[str], log: Path) -> str:
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    with open(log, "w") as f:
        out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True, check=True)
    log.with_suffix(".stdout").write_text(out.stdout)
    return out.stdout


def last_json(text: str) -> dict:
    start = text.rfind("\n{")
    return json.loads(text[start + 1 if start >= 0 else text.index("{"):])


def machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return "lscpu unavailable"
    keep = ("Architecture", "Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache", "Flags")
    out = []
    for line in lines:
        key = line.split(":")[0].strip()
        if key in keep:
            if key == "Flags":
                flags = line.split(":", 1)[1].split()
                line = "Flags (selected): " + " ".join(f for f in flags if f.startswith(("avx512f", "avx512_bf16", "amx", "avx2", "fma")))
            out.append(line.strip())
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--quick", action="store_true", help="fewer heads and repeats (smoke run)")
    ap.add_argument("--render-only", action="store_true", help="rewrite docs/BENCHMARKS.md from the results in --out")
    args = ap.parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        return render_saved(out)
    repeats = "1" if args.quick else "3"
    heads = "2" if args.quick else "20"

    cmd_vec = [PY, "-m", "benchmarks.bench_vectors", "--repeats", repeats, "--json", str(out / "vectors.json")]
    run(cmd_vec, out / "vectors.log")
    vec = json.loads((out / "vectors.json").read_text())

    cmd_pairs = [PY, "-m", "benchmarks.bench_pairs", "--heads", heads, "--random-heads", "2" if args.quick else "4"]
    pairs = last_json(run(cmd_pairs, out / "pairs.log"))

    cmd_paper = [PY, "-m", "benchmarks.bench_paper", "--json", str(out / "paper.json")] + (["--heads", "rand0.qk"] if args.quick else [])
    run(cmd_paper, out / "paper.log")
    paper = json.loads((out / "paper.json").read_text())

    cmd_index = [PY, "-m", "benchmarks.bench_index", "--db", str(out / "db"), "--json", str(out / "index.json")]
    run(cmd_index, out / "index.log")
    index = json.loads((out / "index.json").read_text())

    cmd_query = [PY, "benchmarks/bench_query.py", "--db", str(out / "db"), "--no-index"]
    query_text = run(cmd_query, out / "query.log")

    cmd_align = [PY, "-m", "benchmarks.bench_align"]
    align_text = run(cmd_align, out / "align.log")

    cmd_7b = [PY, "-m", "benchmarks.bench_7b", "--cache", str(out / "7b"), "--json", str(out / "7b.json")] + (
        ["--pairs", "0"] if args.quick else [])
    run(cmd_7b, out / "7b.log")
    cmd_many = [PY, "-m", "benchmarks.bench_many", "--out", str(out / "many")] + (["--sizes", "1,20"] if args.quick else [])
    many = last_json(run(cmd_many, out / "many.log"))

    page = render(vec, pairs, paper, index, query_text, align_text,
                  {k: " ".join(c[1:]) for k, c in dict(vec=cmd_vec, pairs=cmd_pairs, paper=cmd_paper, index=cmd_index,
                                                        query=cmd_query, align=cmd_align, many=cmd_many).items()}, many)
    cmd_serve = [PY, "-m", "benchmarks.bench_serve", "--db", str(out / "db")]
    page += serve_section(run(cmd_serve, out / "serve.log"), " ".join(cmd_serve[1:]))
    page += render_7b(json.loads((out / "7b.json").read_text()), " ".join(cmd_7b[1:]))
    from benchmarks.bench_dictionaries import section as dictionaries_section  # issue 22

    cmd_dict = [PY, "-m", "benchmarks.bench_dictionaries", "--json", str(out / "dictionaries.json")] + (
        ["--d-sae", "2048"] if args.quick else [])
    run(cmd_dict, out / "dictionaries.log")
    page += dictionaries_section(json.loads((out / "dictionaries.json").read_text()), _rel(" ".join(cmd_dict[1:])))
    write_page(page)


HAND_WRITTEN = "written by hand"  # in a section's heading: kept from the current page, not regenerated


def write_page(page: str) -> None:
    """docs/BENCHMARKS.md from the generated ``page`` and the current page's hand-written sections."""
    path = ROOT / "docs" / "BENCHMARKS.md"
    page = with_hand_written(page, path.read_text() if path.exists() else "")
    path.write_text(page)
    print(page)


def with_hand_written(page: str, old: str) -> str:
    """``page`` with every section of ``old`` whose heading says it is written by hand (runs
    `make bench` does not repeat: a cluster, a remote server, issue 24's profiles) put back after
    the generated section numbered before it; the generated sections replace their old text."""
    import re

    def sections(text: str) -> list[str]:
        return re.split(r"(?m)^(?=## )", text)

    def number(section: str) -> tuple | None:
        m = re.match(r"## (\d+)([a-z]?)\.", section)
        return (int(m.group(1)), m.group(2)) if m else None

    out = sections(page)
    for hand in (s for s in sections(old) if s.startswith("## ") and HAND_WRITTEN in s.splitlines()[0]):
        key = number(hand)
        at = len(out)
        if key is not None:  # before the first generated section numbered after it
            at = next((i for i, s in enumerate(out) if number(s) is not None and number(s) > key), len(out))
        out.insert(at, hand if hand.endswith("\n\n") or at == len(out) else hand.rstrip("\n") + "\n\n")
    return "".join(out)


def serve_section(text: str, cmd: str) -> str:
    """Section 7: page render times of `zeropass serve` (benchmarks/bench_serve.py's table)."""
    return "\n".join(["", "## 8. Explorer pages (`zeropass serve`, same dataset; target: each under 300 ms)", "",
                      f"`{_rel(cmd)}`", "", "```", text.strip(), "```", ""])


def render_saved(out: Path) -> None:
    """Re-render the page from a finished run's saved outputs (commands as `make bench` runs them)."""
    cmds = {
        "vec": f"-m benchmarks.bench_vectors --repeats 3 --json {out}/vectors.json",
        "pairs": "-m benchmarks.bench_pairs --heads 20 --random-heads 4",
        "paper": f"-m benchmarks.bench_paper --json {out}/paper.json",
        "index": f"-m benchmarks.bench_index --db {out}/db --json {out}/index.json",
        "query": f"benchmarks/bench_query.py --db {out}/db --no-index",
        "align": "-m benchmarks.bench_align",
        "many": f"-m benchmarks.bench_many --out {out}/many",
    }
    many_out = out / "many.stdout"
    page = render(json.loads((out / "vectors.json").read_text()), last_json((out / "pairs.stdout").read_text()),
                  json.loads((out / "paper.json").read_text()), json.loads((out / "index.json").read_text()),
                  (out / "query.stdout").read_text(), (out / "align.stdout").read_text(), cmds,
                  last_json(many_out.read_text()) if many_out.exists() else None)
    if (out / "serve.stdout").exists():
        page += serve_section((out / "serve.stdout").read_text(), f"-m benchmarks.bench_serve --db {out}/db")
    if (out / "7b.json").exists():
        page += render_7b(json.loads((out / "7b.json").read_text()), f"-m benchmarks.bench_7b --cache {out}/7b --json {out}/7b.json")
    write_page(page)


def render_7b(rows: list, cmd: str) -> str:
    """Section 7 from bench_7b's JSON rows (one per shape and layer count)."""
    lines = ["", "## 9. 7B-class checkpoints in bounded memory", "", f"`{_rel(cmd)}`", "",
             "Synthetic bf16 Llama checkpoints with real shapes, sharded safetensors with an index file; each "
             "`index` in a fresh child process (peak RSS = its VmHWM). Projected whole model = load + 32 x the "
             "mean seconds per layer + the by-token sort scaled to 32 layers, on this CPU.", "",
             "| shape | layers | --pairs | peak RSS | target | vectors s/layer | circuits s/layer | load | projected 32 layers |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['layers']} | {r['pairs']} | {r['peak_rss_gb']:.2f} GB | <= {r['target_gb']} GB | "
                     f"{r['vectors_s_per_layer']} | {r['circuits_s_per_layer']} | {r['load_s']} s | "
                     f"{r['projected_full_model_s'] / 60:.0f} min |")
    for shape in sorted({r["shape"] for r in rows}):
        peaks = [r["peak_rss_gb"] for r in rows if r["shape"] == shape]
        if len(peaks) > 1:
            lines.append(f"\n{shape}: peak grows {100 * (max(peaks) / min(peaks) - 1):.1f}% from "
                         f"{min(r['layers'] for r in rows if r['shape'] == shape)} to "
                         f"{max(r['layers'] for r in rows if r['shape'] == shape)} layers (target: within 10%).")
    return "\n".join(lines) + "\n"


def _rel(cmd: str) -> str:
    return ".venv/bin/python " + cmd.replace(str(ROOT) + "/", "")


def render(vec, pairs, paper, index, query_text, align_text, cmds, many=None) -> str:
    o = vec["overhead"]
    lm = vec.get("lmdebugger")
    by_set = {r["set"]: r for r in pairs["results"]}
    sm, rnd = by_set.get("smollm2"), by_set.get("gpt2-random")
    ps = paper["summary"]
    import statistics

    for m in ("zeropass", "bisect", "sample"):
        ps[m]["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in paper["rows"] if r["method"] == m)
    for m in ("bisect", "sample"):
        ps[m]["memory_ratio"] = ps[m]["peak_rss_mb"] / ps["zeropass"]["peak_rss_mb"]
    models = {m["model"]: m for m in index["models"]}
    g = index["gemm_gflops"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` (`.venv/bin/python -m benchmarks.run_all`) on {dt.date.today().isoformat()}. "
        "Every row compares zeropass with a baseline doing the same work on the same machine in the same run; "
        "ratios are the headline, absolute times only context. Raw outputs: `bench-out/`. Sections whose heading says "
        "\"written by hand\" are runs `make bench` does not repeat: it keeps them from the page it replaces.",
        "",
        "Machine:",
        "",
        "```",
        machine(),
        "```",
        "",
        "## Headlines",
        "",
    ]
    if lm:
        lines.append(f"* **Vector projections: {lm['time_ratio']:.1f}× faster and {lm['rss_ratio']:.1f}× less memory** than the "
                     "LM-Debugger method (all FF values of GPT-2 small).")
    if sm:
        lines.append(f"* **Exact head circuits: {sm['median_ratio']:.1f}× faster than brute force** on real SmolLM2 heads "
                     f"(median of {sm['heads']} circuits, identical results on {sm['identical']}/{sm['heads']}).")
    lines.append(f"* **vs the paper's notebooks: {ps['bisect']['time_ratio']:.1f}× faster, "
                 f"{ps['bisect']['memory_ratio']:.0f}× less memory**, and exact where the notebook's bisection recalls "
                 f"{ps['bisect']['recall']:.1%} and its sampling {ps['sample']['recall']:.1%} of the true top-200.")
    lines += [
        "",
        "## 1. Vector projections (GPT-2-small shape, random weights, real GPT-2 vocabulary)",
        "",
        f"`{_rel(cmds['vec'])}`",
        "",
        "| measure | zeropass | baseline | ratio |",
        "|---|---|---|---|",
        f"| all vector projections incl. top-k/bottom-k and Arrow tables vs the bare GEMMs of the same shapes | "
        f"{o['zeropass_s']:.1f} s | {o['bare_gemm_s']:.1f} s | **{o['ratio']:.2f}** (target ≤ 1.3) |",
    ]
    if lm:
        lines += [
            f"| FF values of all 12 layers, wall time: zeropass vs LM-Debugger (project all, stack, top-k) | "
            f"{lm['zeropass']['seconds']:.1f} s | {lm['lmdebugger']['seconds']:.1f} s | **{lm['time_ratio']:.2f}×** |",
            f"| same, peak RSS | {lm['zeropass']['peak_rss_mb']:.0f} MB | {lm['lmdebugger']['peak_rss_mb']:.0f} MB | **{lm['rss_ratio']:.2f}×** |",
        ]
    lines += [
        "",
        "## 2. Head pairs vs the paper-notebook method (dense V × V, then bisect a threshold or sample 10,000 entries)",
        "",
        f"`{_rel(cmds['paper'])}`",
        "",
        "| head | method | time | peak RSS of the process | recall of exact top-200 |",
        "|---|---|---|---|---|",
    ]
    for r in paper["rows"]:
        lines.append(f"| {r['head']} | {r['method']} | {r['seconds']:.1f} s | {r['peak_rss_mb']:.0f} MB | {r['recall']:.3f} |")
    lines += [
        "",
        f"Medians: bisect takes {ps['bisect']['time_ratio']:.1f}× zeropass's time and {ps['bisect']['memory_ratio']:.0f}× its peak RSS; "
        f"sampling {ps['sample']['time_ratio']:.1f}× and {ps['sample']['memory_ratio']:.0f}×. (`rand*`: GPT-2-shaped random heads, "
        "V = 50257; `L*`: real SmolLM2 heads, V = 49152.)",
        "",
        "## 3. Head pairs vs brute-force exact (blockwise fp32 matmul with a running top-N, fp64 rescoring)",
        "",
        f"`{_rel(cmds['pairs'])}`",
        "",
        "| heads | circuits | median speed-up | total speed-up | median brute → zeropass | median fraction screened | identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in (("SmolLM2 (real, spread across layers)", sm), ("GPT-2-shaped random", rnd)):
        if r:
            lines.append(f"| {label} | {r['heads']} | **{r['median_ratio']:.2f}×** | {r['total_ratio']:.2f}× | "
                         f"{r['median_brute_s']:.2f} s → {r['median_zeropass_s']:.2f} s | {r['median_frac_screened']:.3f} | "
                         f"{r['identical']}/{r['heads']} |")
    lines += [
        "",
        f"Peak RSS of the whole benchmark process (SmolLM2 loaded, fp64 factors): {pairs['peak_rss_gb']:.2f} GB. "
        "Targets: ≥ 5× on SmolLM2, ≥ 1.5× on GPT-2-shaped heads.",
        "",
        "## 4. Whole-model index",
        "",
        f"`{_rel(cmds['index'])}`",
        "",
        f"Measured GEMM rates in this run: fp32 {g['fp32']:.0f} GFLOP/s (numpy), bf16 {g['bf16']:.0f} GFLOP/s (torch).",
        "",
        "| model | layers | wall time | in circuit top-N | peak RSS | dataset size | vector GFLOP | screened circuit GFLOP | arithmetic floor | floor / wall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in models.items():
        lines.append(f"| {name} | {m.get('layers', 'all')} | {m['wall_s']:.0f} s | {m['pair_seconds']:.0f} s ({m['pair_calls']} calls) | {m['peak_rss_mb']:.0f} MB | "
                     f"{m['dataset_mb']:.0f} MB | {m['vector_gflop']:.0f} | {m['pair_screen_gflop']:.0f} | "
                     f"{m['arithmetic_floor_s']:.0f} s | {m['floor_over_wall']:.0%} |")
    lines += [
        "",
        "gpt2-small: GPT-2-small shape with random weights and the real GPT-2 vocabulary, all 12 layers, "
        "in a dataset of its own (target peak RSS < 3 GB). Targets: MiniLM under 3 minutes, SmolLM2 under 10 minutes. "
        "Dataset size includes `vectors_by_token` (the vectors again, sorted by token for search). The arithmetic floor "
        "prices every screened circuit entry at the bf16 rate measured on one GEMM shape; the kernel's own GEMMs can run "
        "faster than that, so floor / wall can pass 100% on random heads, where almost everything is screened.",
        "",
        "Row counts: " + "; ".join(f"{n}: " + ", ".join(f"{t} {c:,}" for t, c in m["rows"].items()) for n, m in models.items()),
        "",
        "## 5. Query latency (one dataset holding MiniLM, SmolLM2 and MPNet)",
        "",
        f"`{_rel(cmds['query'])}`",
        "",
        "```",
        query_text.strip(),
        "```",
        "",
        "## 6. Alignment: Gram-matrix correlation vs materialising the projections",
        "",
        f"`{_rel(cmds['align'])}`",
        "",
        "```",
        align_text.strip(),
        "```",
        "",
    ]
    if many:
        from benchmarks.bench_many import render as render_many

        lines += [
            "## 7. Many models in one dataset (copies of a tiny 2-layer GPT-2 with the real GPT-2 vocabulary)",
            "",
            f"`{_rel(cmds['many'])}`",
            "",
            "The copied model: d_model 32, 4 heads, 2 layers, random weights, the real 50,257-token GPT-2 "
            "vocabulary (so a token is in about as few top-50 lists as in a real model). "
            "N-1 copies committed through the real writer, then model N indexed for real (its wall time: "
            "\"index the last model\"). Warm: median of 7 calls on one open `Dataset`, wall time and the "
            "process's CPU time; cold: first call in a new process, median of 3. Plain: the dataset as committed "
            "(per-model, per-layer files); compacted: after `zeropass compact`. Ratio: compacted warm median over "
            "the 1-model dataset's.",
            "",
            render_many(many["results"]),
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
