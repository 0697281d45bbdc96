"""--vocab-filter (issue 23): the lists of a filtered build equal a dense float64 reference over the
allowed tokens only, and filtered and unfiltered builds never share a name."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from indexer.build import index_model  # noqa: E402
from indexer.load import load_canonical  # noqa: E402
from indexer.vocab_filter import BadVocabFilter  # noqa: E402
from query import Dataset  # noqa: E402
from tests.test_pairs import dense_reference  # noqa: E402
from tests.tiny_models import VOCAB, save_tiny  # noqa: E402

K, N_PAIRS = 5, 12
WORDS = ["Paris", "France", "Berlin", "Germany", "Rome", "Italy", "king", "queen", "man", "woman", "city", "tree", "book"]


@pytest.fixture(scope="module")
def filtered(tmp_path_factory):
    base = tmp_path_factory.mktemp("vfilter")
    src = save_tiny("gpt2", base / "gpt2", seed=3)
    wordfile = base / "words.txt"
    wordfile.write_text("# a word list\n" + "\n".join(WORDS) + "\n")
    db = base / "db"
    index_model(str(src), db, name="raw", k=K, n_pairs=N_PAIRS, progress=None, layers="1")
    index_model(str(src), db, name="alpha", k=K, n_pairs=N_PAIRS, progress=None, vocab_filter="alpha", layers="1")
    index_model(str(src), db, name="listed", k=K, n_pairs=N_PAIRS, progress=None, vocab_filter=str(wordfile), layers="1")
    return src, db, wordfile


def _allowed(name):
    if name == "alpha":  # letters only: the tiny vocabulary's words, not w12 nor the specials
        return [i for i, t in enumerate(VOCAB) if t.isalpha() and not t.startswith("<")]
    return sorted(VOCAB.index(w) for w in WORDS)


def _stored(ds, model, where):
    rows = ds.sql(f"SELECT * FROM vectors WHERE model = '{model}' AND {where} ORDER BY side, rank").to_pylist()
    return [r["token_id"] for r in rows if r["side"] == "top"], [r["token_id"] for r in rows if r["side"] == "bottom"]


@pytest.mark.parametrize("model", ["alpha", "listed"])
def test_filtered_lists_equal_dense_reference_over_allowed_ids(filtered, model):
    src, db, _ = filtered
    allowed = torch.tensor(_allowed(model))
    c = load_canonical(str(src), quiet=True).canonical
    W_E, W_U = c.embeddings.W_E.double(), c.embeddings.W_U.double()
    lw = c.layer(1)
    kk = min(K, allowed.numel())
    with Dataset(db) as ds:
        settings = json.loads(ds.model_info(model)["settings"])
        assert settings["vocab_filter"]["allowed"] == allowed.numel()
        for kind, X, basis in (("ff_value", lw.W_out.double(), W_U[:, allowed]),        # write side: w @ W_U
                               ("ff_key", lw.W_in.T.double(), W_E[allowed].T)):         # read side: W_E @ r
            scores = X @ basis
            for n in (0, 17):
                top, bot = _stored(ds, model, f"layer = 1 AND kind = '{kind}' AND idx = {n}")
                assert top == allowed[torch.argsort(scores[n], descending=True, stable=True)[:kk]].tolist(), (kind, n)
                assert bot == allowed[torch.argsort(scores[n], stable=True)[:kk]].tolist(), (kind, n)
        # the OV circuit of head 2: (W_E W_V)(W_O W_U) over allowed rows and columns
        h = 2
        A = W_E[allowed] @ lw.W_V[h].double()
        B = W_U[:, allowed].T @ lw.W_O[h].double().T
        ref = dense_reference(A, B, N_PAIRS, K, square=True)
        got = ds.sql(f"SELECT src_id, dst_id FROM pairs WHERE model = '{model}' AND layer = 1 AND head = {h} "
                     "AND circuit = 'ov' AND side = 'top' ORDER BY rank").to_pylist()
        assert [(r["src_id"], r["dst_id"]) for r in got] == list(zip(allowed[ref["top_rows"]].tolist(),
                                                                   allowed[ref["top_cols"]].tolist()))
        roles = ds.sql(f"SELECT token_id FROM head_tokens WHERE model = '{model}' AND layer = 1 AND head = {h} "
                       "AND circuit = 'ov' AND role = 'output' AND side = 'top' ORDER BY rank").column(0).to_pylist()
        assert roles == allowed[ref["col_top_idx"]].tolist()
        # every stored token of the model is allowed, and its text is the vocabulary's
        ids = ds.sql(f"SELECT DISTINCT token_id, token FROM vectors WHERE model = '{model}'").to_pylist()
        assert {r["token_id"] for r in ids} <= set(allowed.tolist())
        assert all(VOCAB[r["token_id"]] == r["token"].strip() for r in ids)


def test_unfiltered_is_untouched_and_names_never_mix(filtered, tmp_path):
    src, db, wordfile = filtered
    with Dataset(db) as ds:
        assert "vocab_filter" not in json.loads(ds.model_info("raw")["settings"])
    with pytest.raises(BadVocabFilter, match="indexed unfiltered.*--name"):
        index_model(str(src), db, name="raw", k=K, n_pairs=N_PAIRS, progress=None, vocab_filter="alpha", layers="1")
    with pytest.raises(BadVocabFilter, match="indexed --vocab-filter alpha"):
        index_model(str(src), db, name="alpha", k=K, n_pairs=N_PAIRS, progress=None, layers="1")
    with pytest.raises(BadVocabFilter, match="neither alpha nor words"):
        index_model(str(src), db, k=K, progress=None, vocab_filter=str(tmp_path / "nope.txt"))
    empty = tmp_path / "none.txt"
    empty.write_text("zzz\n")
    with pytest.raises(BadVocabFilter, match="allows no token"):
        index_model(str(src), tmp_path / "db2", k=K, progress=None, vocab_filter=str(empty))


def test_enrich_uses_the_filtered_background(filtered):
    _, db, _ = filtered
    with Dataset(db) as ds:
        rows = ds.enrich(["Paris", "France", "Berlin", "Germany", "Rome", "Italy"], limit=None).to_pylist()
    backgrounds = {r["model"]: r["background"] for r in rows}
    assert backgrounds.get("raw") == len(VOCAB)
    assert backgrounds.get("alpha") == len(_allowed("alpha"))


def test_which_tokens_each_filter_allows(tmp_path):
    """alpha: letters once whitespace is stripped; words: letter tokens of common_words; FILE: its lines."""
    import pyarrow as pa

    from indexer.vocab_filter import allowed_ids

    texts = ["<s>", " Paris", "Paris", "##is", "100%", " the", "thé", " ", "snake_case", " house", "中文"]
    tokens = pa.table({"token_id": pa.array(range(len(texts)), pa.int32()), "token": texts,
                       "special": [t == "<s>" for t in texts]})
    ids, record = allowed_ids("alpha", tokens)
    assert [texts[i] for i in ids] == [" Paris", "Paris", " the", "thé", " house", "中文"]
    assert record["filter"] == "alpha" and record["allowed"] == 6 and len(record["allowed_sha256"]) == 64
    ids, record = allowed_ids("words", tokens)
    assert [texts[i] for i in ids] == [" the", " house"]
    f = tmp_path / "list.txt"
    f.write_text("# mine\nparis\n100%\n")
    ids, record = allowed_ids(str(f), tokens)
    assert [texts[i] for i in ids] == [" Paris", "Paris", "100%"] and record["filter"] == "file"


def test_cli_bad_filter_is_one_line_before_loading(tmp_path):
    from click.testing import CliRunner

    from cli import cli

    r = CliRunner().invoke(cli, ["index", str(tmp_path / "no-model"), "--vocab-filter", str(tmp_path / "nope.txt"),
                                 "--db", str(tmp_path / "db")])
    assert r.exit_code == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --vocab-filter") and "neither alpha nor words" in lines[0]
    assert not (tmp_path / "db").exists()  # refused before anything was loaded or written
