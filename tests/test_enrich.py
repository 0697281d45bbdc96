"""Token-set enrichment (issue 23): the statistics against independent computations, and
``enrich`` ranking a planted unit first across two models with different tokenizers."""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pyarrow as pa
import pytest

from indexer.tokens import normalise
from query import Dataset
from query.enrich import (MAX_SET, benjamini_hochberg, hypergeom_sf, mhg, mhg_pvalue, named_set, read_tokens_file,
                          set_matches, set_names, token_set)
from query.errors import BadOption, BadToken, UnknownToken

# -- the statistics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("N,M,n", [(10, 4, 5), (30522, 20, 50), (49152, 60, 100), (100, 60, 50), (7, 7, 3), (50, 1, 50)])
def test_hypergeometric_tail_equals_scipy(N, M, n):
    stats = pytest.importorskip("scipy.stats")
    for k in range(0, min(n, M) + 2):
        want = float(stats.hypergeom.sf(k - 1, N, M, n))
        got = hypergeom_sf(k, N, M, n)
        assert got == pytest.approx(want, rel=1e-12, abs=0), (k, got, want)


def _brute_pvalue(N, M, K, s):
    """P(mHG <= s) by enumerating every placement of the M members among N ranks (exact, small N)."""
    hits = total = 0
    for members in itertools.combinations(range(1, N + 1), M):
        ranks = [r for r in members if r <= K]
        stat = mhg(ranks, N, M, K)[0] if ranks else 1.0
        hits += stat <= s * (1 + 1e-9)
        total += 1
    return hits / total


@pytest.mark.parametrize("N,M,K,ranks", [(12, 3, 5, [1]), (12, 3, 5, [2, 5]), (14, 4, 6, [1, 2, 3]),
                                          (10, 5, 10, [3, 4, 9]), (15, 2, 4, [4])])
def test_mhg_pvalue_equals_enumeration(N, M, K, ranks):
    s, _ = mhg(ranks, N, M, K)
    assert mhg_pvalue(s, N, M, K) == pytest.approx(_brute_pvalue(N, M, K, s), rel=1e-12, abs=0)


def test_mhg_prefers_members_at_the_top():
    N, M, K = 30000, 20, 50
    top, low = mhg(list(range(1, 21)), N, M, K), mhg(list(range(31, 51)), N, M, K)
    assert top[1] == 20 and low[1] == 50 and top[0] < low[0]
    assert mhg_pvalue(top[0], N, M, K) < mhg_pvalue(low[0], N, M, K)


def test_benjamini_hochberg_equals_statsmodels_formula():
    p = [0.01, 0.04, 0.03, 0.2]
    # by hand, m = 10: sorted 0.01, 0.03, 0.04, 0.2 -> 0.1, 0.15, 0.1333, 0.5; step-up min from the end
    assert benjamini_hochberg(p, 10) == pytest.approx([0.1, 0.13333333333333333, 0.13333333333333333, 0.5], rel=1e-12, abs=0)
    assert benjamini_hochberg([0.5], 0) == [0.5]  # m is never below the p-values given


# -- the set ---------------------------------------------------------------------------------------------

def test_duplicates_count_once_and_empty_is_refused():
    assert token_set(["Paris", " paris", "PARIS", "London"]) == ["Paris", "London"]
    for empty in ([], ["", "  "]):
        with pytest.raises(BadToken, match="empty"):
            token_set(empty)


def test_tokens_file_errors_are_one_line(tmp_path):
    with pytest.raises(BadToken, match="does not exist"):
        read_tokens_file(tmp_path / "nope.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(BadToken, match="not UTF-8"):
        read_tokens_file(bad)
    with pytest.raises(BadToken, match="directory"):
        read_tokens_file(tmp_path)
    big = tmp_path / "big.txt"
    big.write_text("\n".join(f"w{i}" for i in range(100_000)))
    with pytest.raises(BadToken, match=f"at most {MAX_SET:,}"):
        read_tokens_file(big)
    ok = tmp_path / "ok.txt"
    ok.write_text("# capitals\nParis\n\n  # indented comment\nLondon\nParis\n")
    assert token_set(read_tokens_file(ok)) == ["Paris", "London"]


def test_named_sets_ship_with_a_source():
    names = set_names()
    for want in ("months", "weekdays", "digits", "number_words", "pronouns", "countries", "capitals", "colours",
                 "common_words"):
        assert want in names
    assert named_set("months")[0] == "January" and len(named_set("months")) == 12
    assert len(token_set(named_set("weekdays"))) == 7
    with pytest.raises(BadOption, match="months"):
        named_set("planets")


# -- a dataset: two models, two tokenizers --------------------------------------------------------------

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
SET20 = MONTHS + ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "weekend"]
K, D_FF, N_HEADS = 30, 8, 2
PLANT = {"bpe": ("L0.N5", "ff_value"), "wp": ("L0.N2", "ff_value")}


def _vocab(style: str) -> list[tuple[str, str]]:
    """(piece, token): a byte-level vocabulary (`` January`` and ``January``) or a lower-cased WordPiece one."""
    if style == "bpe":
        words = [(f"Ġ{w}", f" {w}") for w in SET20] + [(w, w) for w in SET20[:5]]
        filler = [(f"Ġf{i}", f" f{i}") for i in range(400)]
    else:
        words = [(w.lower(), w.lower()) for w in SET20 if w != "weekend"]  # 'weekend' is missing here
        filler = [(f"##g{i}", f"##g{i}") for i in range(300)]
    return [("<s>", "<s>")] + words + filler


def _model(root: Path, slug: str, seed: int) -> None:
    from indexer.dataset import Build

    vocab = _vocab(slug)
    rng = random.Random(seed)
    members = [i for i, (_, t) in enumerate(vocab) if normalise(t) in {normalise(w) for w in SET20}]
    others = [i for i, (_, t) in enumerate(vocab) if i and i not in members]
    b = Build(root, slug, {"enrich": seed})
    vec, roles = [], []
    planted_unit, planted_kind = PLANT[slug]
    for kind in ("ff_key", "ff_value"):
        for n in range(D_FF):
            for side in ("top", "bottom"):
                ids = rng.sample(others, K)
                if (f"L0.N{n}", kind, side) == (planted_unit, planted_kind, "top"):
                    ids = rng.sample(members, min(20, len(members))) + ids
                elif (n, kind, side) == (1, "ff_key", "top"):  # a decoy: members lower in the list
                    ids = ids[:K // 2] + rng.sample(members, 8) + ids[K // 2:]
                elif rng.random() < 0.5:  # noise: one member somewhere
                    ids.insert(rng.randrange(K), rng.choice(members))
                for r, t in enumerate(ids[:K], start=1):
                    vec.append(dict(model=slug, layer=0, kind=kind, head=None, idx=n, unit=f"L0.N{n}", side=side, rank=r,
                                    token_id=t, token=vocab[t][1], score=float(K - r)))
    for h in range(N_HEADS):
        for circuit, role in (("ov", "source"), ("ov", "output"), ("qk", "query"), ("qk", "key")):
            for side in ("top", "bottom"):
                ids = rng.sample(others, K)
                if slug == "wp" and (h, role, side) == (1, "output", "top"):
                    ids = rng.sample(members, 10) + ids
                for r, t in enumerate(ids[:K], start=1):
                    roles.append(dict(model=slug, layer=0, head=h, circuit=circuit, role=role, side=side, rank=r,
                                      token_id=t, token=vocab[t][1], score=float(K - r)))
    b.write("vectors", pa.Table.from_pylist(vec), layer=0)
    b.write("head_tokens", pa.Table.from_pylist(roles), layer=0)
    b.write("heads", pa.Table.from_pylist([dict(model=slug, layer=0, head=h, kv_head=h, unit=f"L0.H{h}") for h in range(N_HEADS)]),
            layer=0)
    tokens = pa.table({"vocab_id": [f"v{slug}"] * len(vocab), "token_id": pa.array(range(len(vocab)), pa.int32()),
                       "piece": [p for p, _ in vocab], "token": [t for _, t in vocab],
                       "norm": [normalise(t) for _, t in vocab], "special": [i == 0 for i in range(len(vocab))]})
    b.commit(dict(source=f"synthetic:{slug}", revision=None, architecture="gpt2", hf_architecture=None, n_layers=1,
                  n_heads=N_HEADS, n_kv_heads=N_HEADS, d_model=4, d_head=2, d_ff=D_FF, d_vocab=len(vocab), n_ctx=None,
                  tied=True, vocab_id=f"v{slug}", variant="raw", k=K, n_pairs=4, settings=json.dumps({"synthetic": True}),
                  weights_sha256="{}"), f"v{slug}", tokens)


@pytest.fixture(scope="module")
def eds(tmp_path_factory):
    root = tmp_path_factory.mktemp("enrich") / "db"
    _model(root, "bpe", 1)
    _model(root, "wp", 2)
    d = Dataset(root)
    yield d
    d.close()


def test_planted_units_rank_first_across_tokenizers(eds):
    out = eds.enrich(SET20, kind="ff_key,ff_value", limit=None).to_pylist()
    assert {(r["model"], r["unit"], r["list"]) for r in out[:2]} == {("bpe", "L0.N5", "ff_value"), ("wp", "L0.N2", "ff_value")}
    first = {r["model"]: r for r in out[:2]}
    # bpe: 20 words match 25 ids (five words twice: ' January' and 'January'); wp: 19 words, 'weekend' missing
    assert first["bpe"]["set_size"] == 25 and first["bpe"]["missing"] == []
    assert first["wp"]["set_size"] == 19 and first["wp"]["missing"] == ["weekend"]
    assert first["bpe"]["hits"] == 20 and first["bpe"]["cutoff"] == 20
    assert first["wp"]["hits"] == 19 and first["wp"]["cutoff"] == 19
    for r in out[:2]:
        assert r["p_value"] < 1e-25 and r["q_value"] < 1e-25 and r["list_size"] == K
        assert r["members"][0].endswith("#1")
    # the decoy (8 members at ranks 16-23) is next for each model, far weaker
    decoys = [r for r in out if (r["unit"], r["list"]) == ("L0.N1", "ff_key")]
    assert len(decoys) == 2 and all(d["p_value"] > first[d["model"]]["p_value"] * 1e6 for d in decoys)
    assert out.index(decoys[0]) in (2, 3) and out.index(decoys[1]) in (2, 3)
    # p-values are sorted and every q >= its p
    assert [r["p_value"] for r in out] == sorted(r["p_value"] for r in out)
    assert all(r["q_value"] >= r["p_value"] for r in out)


def test_head_role_lists_are_units(eds):
    out = eds.enrich(SET20, model="wp", kind="ov:output", limit=3).to_pylist()
    assert (out[0]["unit"], out[0]["list"], out[0]["hits"]) == ("L0.H1", "ov:output", 10)


def test_statistics_agree_with_a_recomputation(eds):
    """The row's numbers are the module's functions applied to the list read back with plain SQL."""
    r = eds.enrich(SET20, model="bpe", kind="ff_value", limit=1).to_pylist()[0]
    ids = {x["token_id"] for x in set_matches(eds, SET20, model="bpe").to_pylist()}
    ranks = [x["rank"] for x in eds.sql("SELECT rank, token_id FROM vectors WHERE model = 'bpe' AND unit = 'L0.N5' "
                                        "AND kind = 'ff_value' AND side = 'top'").to_pylist() if x["token_id"] in ids]
    N = len(_vocab("bpe"))
    stat, cut = mhg(ranks, N, len(ids), K)
    assert (r["statistic"], r["cutoff"], r["background"]) == (stat, cut, N)
    assert r["p_value"] == mhg_pvalue(stat, N, len(ids), K)
    tests = D_FF  # the ff_value lists of one model's one layer, side top: one test each
    assert r["q_value"] == pytest.approx(r["p_value"] * tests, rel=1e-12, abs=0)


def test_set_matches_show_ids_and_misses(eds):
    m = set_matches(eds, ["january", "weekend", "nothing-here"]).to_pylist()
    bpe = [(x["word"], x["token"]) for x in m if x["model"] == "bpe"]
    assert bpe == [("january", " January"), ("january", "January"), ("weekend", " weekend"), ("nothing-here", None)]
    wp = [(x["word"], x["token"]) for x in m if x["model"] == "wp"]
    assert wp == [("january", "january"), ("weekend", None), ("nothing-here", None)]


def test_no_match_is_one_line(eds):
    with pytest.raises(UnknownToken, match="no token of the set"):
        eds.enrich(["zzz", "qqq"])
    with pytest.raises(BadOption, match="unknown kind"):
        eds.enrich(SET20, kind="ff_nope")


def test_side_bottom_reads_bottom_lists(eds):
    out = eds.enrich(SET20, side="bottom", kind="ff_value", limit=None).to_pylist()
    assert all(r["side"] == "bottom" for r in out)
    assert not any(r["unit"] in ("L0.N5", "L0.N2") and r["hits"] > 1 for r in out)


# -- the command line ---------------------------------------------------------------------------------

def _cli(eds, *args):
    from click.testing import CliRunner

    from cli import cli

    return CliRunner().invoke(cli, [*args, "--db", str(eds.root)], catch_exceptions=False)


def _one_error_line(r, *fragments):
    assert r.exit_code == 1 and r.stdout == "", (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in r.stderr, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_cli_enrich_json_rows_carry_unit(eds, tmp_path):
    f = tmp_path / "set.txt"
    f.write_text("# months and days\n" + "\n".join(SET20 + SET20[:3]) + "\n")
    r = _cli(eds, "enrich", "--tokens-file", str(f), "--kind", "ff_value", "--format", "json", "-n", "2")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {(x["model"], x["unit"]) for x in rows} == {("bpe", "L0.N5"), ("wp", "L0.N2")}
    assert "wp: 19 of 20 words match 19 token ids; no match: 'weekend'" in r.stderr
    assert "bpe: 20 of 20 words match 25 token ids" in r.stderr


def test_cli_named_sets_and_matches(eds):
    r = _cli(eds, "enrich", "--list-sets", "--format", "csv")
    assert r.exit_code == 0 and "months,12," in r.stdout
    r = _cli(eds, "enrich", "--set", "months", "--kind", "ff_value", "--format", "json", "-n", "0")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["unit"] in ("L0.N5", "L0.N2")
    r = _cli(eds, "enrich", "january", "weekend", "--matches", "--model", "wp", "--format", "csv")
    assert r.stdout.splitlines() == ["model,word,token_id,token", "wp,january,1,january", "wp,weekend,,"]


@pytest.mark.parametrize("args,fragments", [
    ((), ("token set is empty",)),
    (("--tokens-file", "/nonexistent/set.txt"), ("does not exist",)),
    (("--set", "planets"), ("unknown token set", "months")),
    (("zzz", "qqq"), ("no token of the set",)),
    (("january", "--kind", "nope"), ("unknown kind",)),
], ids=["empty", "missing-file", "unknown-set", "no-match", "bad-kind"])
def test_cli_bad_input_is_one_line(eds, args, fragments):
    _one_error_line(_cli(eds, "enrich", *args), *fragments)


def test_cli_big_and_binary_files_are_one_line(eds, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("\n".join(f"w{i}" for i in range(100_000)))
    _one_error_line(_cli(eds, "enrich", "--tokens-file", str(big)), "at most 10,000")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00j\x00a\x00n")
    _one_error_line(_cli(eds, "enrich", "--tokens-file", str(binary)), "not UTF-8")


# -- --readable (query time) ----------------------------------------------------------------------------

def test_show_readable_hides_fragments_and_counts_them(ds, synthetic_db):
    """alpha's L1.N0 ff_key top list holds O'Brien, a\\b, 100%, snake_case, line\\nbreak at ranks 1-5."""
    full = ds.show("alpha", "L1.N0")["vectors"].to_pylist()
    got = ds.show("alpha", "L1.N0", readable=True)["vectors"]
    rows = got.to_pylist()
    assert not any(r["kind"] == "ff_key" and r["top"] is not None and r["rank"] <= 5 for r in rows)
    shown = [t for r in rows for t in (r["top"], r["bottom"]) if t is not None]
    assert shown and all(t.strip().isalpha() for t in shown)
    total = sum((r["top"] is not None) + (r["bottom"] is not None) for r in full)
    assert int(got.schema.metadata[b"hidden_rows"]) == total - len(shown) >= 5
    head = ds.show("alpha", "L1.H0", readable=True)
    assert all(r["src"].strip().isalpha() and r["dst"].strip().isalpha() for r in head["pairs"].to_pylist())
    from click.testing import CliRunner

    from cli import cli

    r = CliRunner().invoke(cli, ["show", "alpha", "L1.N0", "--readable", "--db", str(synthetic_db)])
    assert r.exit_code == 0 and f"--readable: {total - len(shown)} list entries hidden" in r.stderr


def test_a_set_at_the_bound_stays_fast(eds, tmp_path):
    """MAX_SET distinct words (most matching nothing) through the command: bounded and quick."""
    import time

    f = tmp_path / "big.txt"
    f.write_text("\n".join(SET20 + [f"zz{i}" for i in range(MAX_SET - len(SET20))]))
    t = time.perf_counter()
    r = _cli(eds, "enrich", "--tokens-file", str(f), "--kind", "ff_value", "-n", "1", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert time.perf_counter() - t < 3
    assert "and 9970 more" in r.stderr or "and 9971 more" in r.stderr
    f.write_text("\n".join(f"zz{i}" for i in range(MAX_SET + 1)))
    _one_error_line(_cli(eds, "enrich", "--tokens-file", str(f)), f"at most {MAX_SET:,}")


def test_lists_a_model_lacks_are_not_tests(eds):
    """ff_gate (not written by these ungated models) and role lists add no tests to the BH count."""
    q = lambda kind: eds.enrich(SET20, model="bpe", kind=kind, limit=1).column("q_value")[0].as_py()  # noqa: E731
    assert q("ff_value") == q("ff_value,ff_gate")
    assert q("ff_value,qk:key") == pytest.approx(q("ff_value") * (D_FF + N_HEADS) / D_FF, rel=1e-12, abs=0)


@pytest.mark.parametrize("tokens,kw,error,fragment", [
    (["january", 5], {}, BadToken, "is not text"),
    (["jan\ud800"], {}, BadToken, "lone surrogate"),
    (["   "], {}, BadToken, "empty"),
    (SET20, {"limit": -1}, BadOption, "limit"),
    (SET20, {"limit": True}, BadOption, "whole number"),
    (SET20, {"side": "sideways"}, BadOption, "unknown side"),
    (SET20, {"kind": ","}, BadOption, "no kind"),
], ids=["not-text", "surrogate", "blank", "negative-limit", "bool-limit", "side", "empty-kind"])
def test_library_refuses_bad_arguments_with_typed_errors(eds, tokens, kw, error, fragment):
    with pytest.raises(error, match=fragment):
        eds.enrich(tokens, **kw)


def test_unknown_model_is_typed(eds):
    from query.errors import UnknownModel

    with pytest.raises(UnknownModel):
        eds.enrich(SET20, model="nope")


def test_heads_readable_drops_pairs_with_unreadable_partners(ds, synthetic_db):
    full = ds.heads("paris", limit=None)
    kept = ds.heads("paris", limit=None, readable=True)
    hidden = int(kept.schema.metadata[b"hidden_rows"])
    # independently: every pair row with a 'paris' token at one end and an unreadable token at the other
    ids = {r["token_id"] for r in ds.sql("SELECT token_id FROM tokens WHERE vocab_id = 'vshared' AND norm = 'paris'").to_pylist()}
    ids_odd = {r["token_id"] for r in ds.sql("SELECT token_id FROM tokens WHERE vocab_id = 'vodd' AND norm = 'paris'").to_pylist()}
    want = 0
    for r in ds.sql("SELECT model, src_id, dst_id, src, dst FROM pairs WHERE side = 'top'").to_pylist():
        mine = ids_odd if r["model"] == "gamma" else ids
        partner = r["dst"] if r["src_id"] in mine else r["src"] if r["dst_id"] in mine else None
        want += partner is not None and not partner.strip().isalpha()
    assert hidden == want > 0
    assert sum(full.column("hits").to_pylist()) - sum(kept.column("hits").to_pylist()) == hidden
    for ev in kept.column("evidence").to_pylist():
        for e in ev:
            if " pair #" in e:  # 'ov top pair #1 " Paris" -> " Paris" (99)'
                a, b = (json.loads(x) for x in e.split(" pair #", 1)[1].split(" ", 1)[1].rsplit(" (", 1)[0].split(" -> "))
                assert a.strip().isalpha() and b.strip().isalpha(), e
    from click.testing import CliRunner

    from cli import cli

    r = CliRunner().invoke(cli, ["heads", "paris", "--readable", "--db", str(synthetic_db)])
    assert r.exit_code == 0 and f"--readable: {hidden} pair" in r.stderr


def test_neurons_readable_rank_skips_unreadable_entries_above(ds, synthetic_db):
    """readable_rank = rank - the list's non-letter entries ranked above it, recomputed from the vectors table."""
    out = ds.neurons("paris", kind=list(("ff_key", "ff_gate", "ff_value", "q", "k", "v", "o")), side="both", limit=None,
                     readable=True).to_pylist()
    assert out
    total = 0
    for r in out:
        entries = ds.sql("SELECT rank, token FROM vectors WHERE model = $m AND unit = $u AND kind = $k AND side = $s",
                         {"m": r["model"], "u": r["unit"], "k": r["kind"], "s": r["side"]}).to_pylist()
        gap = sum(1 for e in entries if e["rank"] < r["rank"] and not e["token"].strip().isalpha())
        assert r["readable_rank"] == r["rank"] - gap, r
        total += gap
    got = ds.neurons("paris", kind="ff_key,ff_gate,ff_value,q,k,v,o", side="both", limit=None, readable=True)
    assert int(got.schema.metadata[b"hidden_rows"]) == total > 0
    from click.testing import CliRunner

    from cli import cli

    r = CliRunner().invoke(cli, ["neurons", "paris", "--readable", "--side", "both", "--kind", "ff_key,ff_gate,ff_value,q,k,v,o",
                                 "-n", "0", "--db", str(synthetic_db), "--format", "json"])
    assert r.exit_code == 0 and f"--readable: {total} unreadable entries" in r.stderr
    assert [x["readable_rank"] for x in json.loads(r.stdout)] == [x["readable_rank"] for x in out]


def test_a_list_whose_members_sit_only_where_they_must_has_a_cutoff():
    # k = the whole vocabulary and the one member last: no prefix is unlikely (every tail is 1);
    # the cutoff is the stretch holding the members, not 0 (fold divided by it: ZeroDivisionError)
    assert mhg([5], 5, 1, 5) == (1.0, 5)
    assert mhg([4, 5], 5, 2, 5) == (1.0, 5)
