"""Dictionaries (SAEs, transcoders; issue 22): every stored list equals a dense float64 reference,
the three formats read the same, bad input is one typed error with nothing written, and the rows
reach SQL, `features`, `show`, `similar`, `check`, `compact`, `merge` and `publish` through the
paths models use.

Dictionaries are written by hand in each format's documented layout (docs/DICTIONARIES.md);
tests/test_real_models.py checks the SAELens layout against sae-lens itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from schemas.layout import dictionary_files, read_manifest

K = 6
D_SAE = 24


def saelens_dir(path: Path, W_enc, W_dec, *, hook: str, b_enc=None, threshold=None, architecture="standard") -> Path:
    """A SAELens dictionary folder (cfg.json + sae_weights.safetensors), as SAE.save_model writes it."""
    path.mkdir(parents=True, exist_ok=True)
    d_in, d_sae = W_enc.shape
    tensors = {"W_enc": W_enc.contiguous(), "W_dec": W_dec.contiguous(), "b_dec": torch.zeros(d_in),
               "b_enc": b_enc if b_enc is not None else torch.zeros(d_sae)}
    if threshold is not None:
        tensors["threshold"] = threshold
    save_file(tensors, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"d_in": d_in, "d_sae": d_sae, "architecture": architecture,
                                               "metadata": {"hook_name": hook}}))
    return path


def _weights(d_in: int, seed: int, d_sae: int = D_SAE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_in, d_sae, generator=g), torch.randn(d_sae, d_in, generator=g)


@pytest.fixture(scope="module")
def model_db(tmp_path_factory):
    """A tiny untied GQA llama (folded: W_U carries the final norm's gain) in a dataset."""
    from indexer.build import index_model
    from indexer.load import load_canonical
    from indexer.variants import fold
    from tests.tiny_models import save_tiny

    base = tmp_path_factory.mktemp("dict")
    src = save_tiny("llama-gqa", base / "llama")
    db = base / "db"
    index_model(str(src), db, name="tl", k=K, n_pairs=0, variant="folded", progress=None)
    return db, fold(load_canonical(str(src), quiet=True).canonical), src


@pytest.fixture(scope="module")
def indexed(model_db, tmp_path_factory):
    """Three dictionaries in three formats, indexed in one call (a folder of many) plus a hook_z one."""
    from indexer.dictionaries.index import index_dictionaries

    db, model, _ = model_db
    d, H, dh = model.dims.d_model, model.dims.n_heads, model.dims.d_head
    rel = tmp_path_factory.mktemp("release")
    W = {}
    W["res"] = _weights(d, 1)
    g = torch.Generator().manual_seed(5)
    b_enc, thr = torch.randn(D_SAE, generator=g), torch.rand(D_SAE, generator=g)
    saelens_dir(rel / "res", *W["res"], hook="blocks.1.hook_resid_pre", b_enc=b_enc, threshold=thr, architecture="jumprelu")
    W["mlp"] = _weights(d, 2)
    npz = rel / "gemma-scope-x-pt-mlp" / "layer_0" / "width_24" / "average_l0_3"
    npz.mkdir(parents=True)
    np.savez(npz / "params.npz", W_enc=W["mlp"][0].numpy(), W_dec=W["mlp"][1].numpy(), b_enc=np.zeros(D_SAE, np.float32),
             b_dec=np.zeros(d, np.float32), threshold=np.ones(D_SAE, np.float32))
    W["sp"] = _weights(d, 3)
    sp = rel / "sparsify" / "layers.1.mlp"
    sp.mkdir(parents=True)
    save_file({"encoder.weight": W["sp"][0].T.contiguous(), "encoder.bias": torch.zeros(D_SAE), "W_dec": W["sp"][1],
               "b_dec": torch.zeros(d)}, str(sp / "sae.safetensors"))
    (sp / "cfg.json").write_text(json.dumps({"expansion_factor": 1, "k": 4}))
    # a planted feature: feature 5 of `res` writes exactly the direction of FF value L0.N3
    W["res"][1][5] = 2.5 * model.layer(0).W_out[3]
    saelens_dir(rel / "res", *W["res"], hook="blocks.1.hook_resid_pre", b_enc=b_enc, threshold=thr, architecture="jumprelu")
    entries = index_dictionaries(str(rel), db, model="tl", k=K, n_neighbours=4, progress=None)
    W["z"] = _weights(H * dh, 4)
    z = saelens_dir(tmp_path_factory.mktemp("z") / "attn", *W["z"], hook="blocks.1.attn.hook_z")
    entries += index_dictionaries(str(z), db, model="tl", name="att-L1", k=K, n_neighbours=0, progress=None)
    names = {"res": "res", "mlp": "gemma-scope-x-pt-mlp-layer_0-width_24-average_l0_3", "sp": "sparsify-layers-1-mlp",
             "z": "att-L1"}
    return db, model, W, names, entries, {"b_enc": b_enc, "threshold": thr}


def _vectors(db: Path, dictionary: str) -> list[dict]:
    files = [f for f in dictionary_files(read_manifest(db), "vectors") if f"dictionary={dictionary}/" in f]
    assert files, dictionary
    return [r for f in files for r in pq.read_table(db / f).to_pylist()]


def _folder(db: Path, name: str) -> Path:
    """Where dictionary ``name`` was read from (its `dictionaries.settings`)."""
    rel = read_manifest(db)["dictionaries"][name]["files"]["dictionaries"][0]
    return Path(json.loads(pq.read_table(db / rel).to_pylist()[0]["settings"])["path"])


def _dense(model, W, which: str) -> dict:
    """(kind, feature) -> float64 scores over the vocabulary, straight from the definitions."""
    E, U = model.embeddings.W_E.double(), model.embeddings.W_U.double()
    W_enc, W_dec = (w.double() for w in W[which])
    if which == "z":
        dims = model.dims
        lw = model.layer(1)
        H, dh = dims.n_heads, dims.d_head
        dec = sum(W_dec[:, h * dh:(h + 1) * dh] @ lw.W_O[h].double() for h in range(H))
        enc = sum(W_enc[h * dh:(h + 1) * dh].T @ lw.W_V[dims.kv_head(h)].double().T for h in range(H))
        return {**{("decoder", i): dec[i] @ U for i in range(D_SAE)}, **{("encoder", i): E @ enc[i] for i in range(D_SAE)}}
    return {**{("decoder", i): W_dec[i] @ U for i in range(D_SAE)}, **{("encoder", i): E @ W_enc[:, i] for i in range(D_SAE)}}


@pytest.mark.parametrize("which", [pytest.param("res", id="saelens-resid-jumprelu"), pytest.param("mlp", id="gemma-scope-npz"),
                                   pytest.param("sp", id="sparsify-mlp"), pytest.param("z", id="saelens-hook_z-through-W_O")])
def test_every_feature_row_equals_dense_reference(indexed, which):
    db, model, W, names, _, _ = indexed
    ref = _dense(model, W, which)
    grouped: dict = {}
    for r in _vectors(db, names[which]):
        assert r["model"] == "tl" and r["dictionary"] == names[which] and r["unit"] == f"{names[which]}.F{r['idx']}"
        grouped.setdefault((r["kind"], r["idx"]), {"top": [], "bottom": []})[r["side"]].append(r)
    assert set(grouped) == set(ref)
    for key, sides in grouped.items():
        scores = ref[key]
        for side, order in (("top", torch.argsort(scores, descending=True, stable=True)),
                            ("bottom", torch.argsort(scores, stable=True))):
            got = sorted(sides[side], key=lambda r: r["rank"])
            assert [r["token_id"] for r in got] == order[:K].tolist(), (key, side)
            torch.testing.assert_close(torch.tensor([r["score"] for r in got], dtype=torch.float64),
                                       scores[order[:K]], rtol=1e-5, atol=1e-5)


def test_dictionaries_rows_stats_and_sites(indexed):
    from query import Dataset

    db, _, W, names, _, extra = indexed
    ds = Dataset(db)
    rows = {r["dictionary"]: r for r in ds.rows("SELECT * FROM dictionaries")}
    assert {n: (rows[n]["layer"], rows[n]["site"], rows[n]["format"], rows[n]["d_sae"]) for n in names.values()} == {
        names["res"]: (1, "resid_pre", "saelens", D_SAE), names["mlp"]: (0, "mlp_out", "gemma-scope", D_SAE),
        names["sp"]: (1, "mlp_out", "sparsify", D_SAE), names["z"]: (1, "z", "saelens", D_SAE)}
    assert rows[names["res"]]["architecture"] == "jumprelu"
    stats = ds.sql(f"SELECT * FROM feature_stats WHERE dictionary = '{names['res']}' ORDER BY feature").to_pylist()
    np.testing.assert_allclose([s["decoder_norm"] for s in stats], W["res"][1].double().norm(dim=1).numpy(), rtol=1e-12)
    np.testing.assert_allclose([s["encoder_norm"] for s in stats], W["res"][0].double().norm(dim=0).numpy(), rtol=1e-12)
    np.testing.assert_allclose([s["b_enc"] for s in stats], extra["b_enc"].double().numpy(), rtol=1e-7)
    np.testing.assert_allclose([s["threshold"] for s in stats], extra["threshold"].double().numpy(), rtol=1e-7)
    # the SQL views: features are the dictionaries' vectors rows, by token too
    n_vec = ds.rows("SELECT count(*) AS n FROM vectors WHERE dictionary IS NOT NULL")[0]["n"]
    assert n_vec == ds.rows("SELECT count(*) AS n FROM features")[0]["n"] == 4 * D_SAE * 2 * 2 * K
    assert ds.rows("SELECT count(*) AS n FROM features_by_token")[0]["n"] == n_vec
    assert ds.rows("SELECT count(*) AS n FROM features f JOIN vectors v ON v.dictionary = f.dictionary AND v.idx = f.feature "
                   "AND v.kind = f.kind AND v.side = f.side AND v.rank = f.rank AND v.token_id = f.token_id "
                   "AND v.score = f.score AND v.unit = f.unit")[0]["n"] == n_vec
    # the unit names the by-token rows compute in SQL are the stored ones
    from schemas.units import vector_unit_sql

    assert ds.rows(f"SELECT count(*) AS n FROM (SELECT DISTINCT {vector_unit_sql('v')} AS unit FROM vectors_by_token v "
                   f"WHERE v.dictionary IS NOT NULL EXCEPT SELECT DISTINCT unit FROM vectors WHERE dictionary IS NOT NULL)")[0]["n"] == 0
    # the model's own vectors are untouched by the dictionaries
    assert ds.rows("SELECT count(*) AS n FROM vectors WHERE model = 'tl' AND dictionary IS NULL AND kind IN ('decoder', 'encoder')")[0]["n"] == 0


def test_neighbours_equal_float64_reference_and_find_the_planted_neuron(indexed):
    from query import Dataset

    db, model, W, names, _, _ = indexed
    ds = Dataset(db)
    got = ds.sql(f"SELECT * FROM feature_neighbours WHERE dictionary = '{names['res']}' ORDER BY feature, rank").to_pylist()
    # candidates: FF values of layers 0 and 1, and the decoders of the other dictionaries at layer <= 1 indexed with it
    cands = [(f"L{l}.N{i}", model.layer(l).W_out[i].double()) for l in (0, 1) for i in range(model.dims.d_ff)]
    cands += [(f"{names[o]}.F{i}", W[o][1][i].double()) for o in ("mlp", "sp") for i in range(D_SAE)]
    C = torch.stack([c[1] for c in cands])
    C = C / C.norm(dim=1, keepdim=True)
    for f in range(D_SAE):
        x = W["res"][1][f].double()
        cos = C @ (x / x.norm())
        order = torch.argsort(cos, descending=True, stable=True)[:4].tolist()
        mine = [r for r in got if r["feature"] == f]
        assert [r["neighbour"] for r in mine] == [cands[j][0] for j in order], f
        np.testing.assert_allclose([r["cosine"] for r in mine], cos[order].numpy(), rtol=1e-9)
    # blocks and chunks of any size give the same rows: 5-feature blocks, 10-feature chunks
    import indexer.dictionaries.index as index

    mp = pytest.MonkeyPatch()
    mp.setattr(index, "BLOCK", 5)
    mp.setattr(index, "_CHUNK_BYTES", 10 * 4 * model.dims.d_model)
    try:
        writer = index._Writer(db, "tl", model, None, k=K, say=lambda _m: None)
        jobs = [index._Job(n, index.open_dictionary(_folder(db, n)), "") for n in (names["mlp"], names["sp"], names["res"])]
        small = writer.neighbours(jobs[2], jobs, 4, ("ff_value", "decoder")).to_pylist()
    finally:
        mp.undo()
    assert [(r["feature"], r["rank"], r["neighbour"]) for r in small] == [(r["feature"], r["rank"], r["neighbour"]) for r in got]
    np.testing.assert_allclose([r["cosine"] for r in small], [r["cosine"] for r in got], rtol=1e-12)
    planted = [r for r in got if r["feature"] == 5][0]
    assert (planted["neighbour"], planted["neighbour_kind"], planted["neighbour_layer"]) == ("L0.N3", "ff_value", 0)
    assert planted["cosine"] == pytest.approx(1.0, abs=1e-6)


# -- the query side: features, show, similar ------------------------------------------------------

def test_features_helper_finds_the_features_whose_lists_hold_a_token(indexed):
    from query import Dataset

    db, _, _, names, _, _ = indexed
    ds = Dataset(db)
    # the token at rank 1 of feature 7's decoder list of `res`, straight from SQL
    top = ds.rows(f"SELECT token_id, token FROM features WHERE dictionary = '{names['res']}' AND feature = 7 "
                  f"AND kind = 'decoder' AND side = 'top' AND rank = 1")[0]
    got = ds.features(token_id=top["token_id"], dictionary=[names["res"]], kind=["decoder"], max_rank=1, limit=None).to_pylist()
    want = ds.rows(f"SELECT feature FROM features WHERE dictionary = '{names['res']}' AND kind = 'decoder' AND side = 'top' "
                   f"AND rank = 1 AND token_id = {top['token_id']} ORDER BY feature")
    assert sorted(r["feature"] for r in got) == [r["feature"] for r in want] and 7 in {r["feature"] for r in got}
    assert all(r["dictionary"] == names["res"] and r["unit"] == f"{names['res']}.F{r['feature']}" and r["rank"] == 1 for r in got)
    # `neurons --kind decoder` finds the same features by their vectors rows, named by schemas.units
    via_neurons = ds.neurons(token_id=top["token_id"], kind=["decoder"], max_rank=1, limit=None).to_pylist()
    assert {r["unit"] for r in via_neurons if r["unit"].startswith(names["res"] + ".")} == {r["unit"] for r in got}
    # every dictionary, both kinds: the same as a plain scan of `features`
    all_rows = ds.features(token_id=top["token_id"], limit=None, max_rank=2).to_pylist()
    scan = ds.rows(f"SELECT DISTINCT dictionary, feature, kind FROM features WHERE token_id = {top['token_id']} "
                   f"AND side = 'top' AND rank <= 2")
    assert {(r["dictionary"], r["feature"], r["kind"]) for r in all_rows} == {(r["dictionary"], r["feature"], r["kind"]) for r in scan}


def test_show_and_similar_take_feature_units(indexed):
    from query import Dataset
    from query.errors import BadUnit

    db, _, _, names, _, _ = indexed
    ds = Dataset(db)
    unit = f"{names['res']}.F5"
    sections = ds.show("tl", unit, limit=3)
    assert list(sections) == ["vectors", "stats", "neighbours"]
    v = sections["vectors"].to_pylist()
    assert {r["kind"] for r in v} == {"decoder", "encoder"} and {r["unit"] for r in v} == {unit} and len(v) == 6
    assert sections["neighbours"].to_pylist()[0]["neighbour"] == "L0.N3"
    # the same feature searched among the model's features: itself first, similarity 1
    sim = ds.similar("tl", unit, "tl", limit=3).to_pylist()
    assert sim and all(r["unit"] != unit for r in sim)  # `similar` within one model leaves the unit itself out
    assert all("." in r["unit"] and ".F" in r["unit"] for r in sim)
    for bad, why in ((f"nope.F1", "no dictionary 'nope'"), (f"{names['res']}.F{D_SAE}", "out of range")):
        with pytest.raises(BadUnit, match=why):
            ds.show("tl", bad)
    # model units still parse as before: a feature spelling never shadows them
    from query.units import parse_unit

    assert parse_unit("L1.N3").kind == "neuron" and parse_unit("L1.H0.d2").kind == "head_dim"
    assert parse_unit("res-L8.F17").kind == "feature" and parse_unit("L5.F3").dictionary == "L5"


# -- bad input: one typed error, one line in the CLI, nothing written ------------------------------

def _snapshot(db: Path) -> dict:
    return {p.relative_to(db).as_posix(): p.read_bytes() for p in sorted(db.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture
def fresh_db(model_db, tmp_path):
    """A copy of the model's dataset that a test may damage."""
    import shutil

    db = tmp_path / "db"
    shutil.copytree(model_db[0], db)
    return db, model_db[1]


def _bad_cases(tmp: Path, model):
    d, H, dh = model.dims.d_model, model.dims.n_heads, model.dims.d_head
    W = _weights(d, 9)
    yield "d_in", saelens_dir(tmp / "wide", *_weights(d + 1, 9), hook="blocks.0.hook_resid_pre"), {}, "width 33, but the model's d_model is 32"
    yield "z-width", saelens_dir(tmp / "z", *_weights(H * dh + 4, 9), hook="blocks.0.attn.hook_z"), {}, "n_heads x d_head"
    yield "model", saelens_dir(tmp / "ok", *W, hook="blocks.0.hook_resid_pre"), {"model": "nope"}, "model 'nope' is not in"
    yield "hook", saelens_dir(tmp / "hook", *W, hook="blocks.0.hook_q"), {}, "hook 'blocks.0.hook_q' is not one"
    yield "layer", saelens_dir(tmp / "deep", *W, hook="blocks.7.hook_resid_pre"), {}, "at layer 7, but the model has layers 0-1"
    nan = W[1].clone()
    nan[3, 4] = float("nan")
    yield "nan", saelens_dir(tmp / "nan", W[0], nan, hook="blocks.0.hook_resid_pre"), {}, "NaN or Inf"
    inf = W[0].clone()
    inf[0, 0] = float("inf")
    yield "inf", saelens_dir(tmp / "inf", inf, W[1], hook="blocks.0.hook_resid_pre"), {}, "NaN or Inf"
    cut = saelens_dir(tmp / "cut", *W, hook="blocks.0.hook_resid_pre")
    f = cut / "sae_weights.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    yield "truncated-safetensors", cut, {}, "truncated or damaged"
    npz = tmp / "gemma-scope-x-pt-res" / "layer_0" / "width_24" / "l0_3"
    npz.mkdir(parents=True)
    np.savez(npz / "params.npz", W_enc=W[0].numpy(), W_dec=W[1].numpy())
    (npz / "params.npz").write_bytes((npz / "params.npz").read_bytes()[:-300])
    yield "truncated-npz", npz, {}, "truncated or damaged"
    pt = tmp / "pickled"
    pt.mkdir()
    torch.save({"W_enc": W[0], "W_dec": W[1]}, pt / "sae_weights.pt")
    (pt / "cfg.json").write_text(json.dumps({"metadata": {"hook_name": "blocks.0.hook_resid_pre"}}))
    yield "pickle", pt, {}, "--allow-pickle"
    yield "name", saelens_dir(tmp / "dotted", *W, hook="blocks.0.hook_resid_pre"), {"name": "a.b"}, "is not valid"
    yield "missing", tmp / "nowhere", {}, "does not exist"
    empty = tmp / "empty"
    empty.mkdir()
    yield "empty-folder", empty, {}, "holds no dictionary"
    yield "no-dataset", tmp / "ok", {"db": tmp / "not-a-db"}, "holds no dataset"


def test_bad_input_is_one_error_and_writes_nothing(fresh_db, tmp_path):
    from indexer.dictionaries.index import index_dictionaries
    from indexer.errors import ZeropassError

    db, model = fresh_db
    before = _snapshot(db)
    seen = []
    for what, path, kw, message in _bad_cases(tmp_path / "src", model):
        kw = {"model": "tl", "db": db, **kw}
        with pytest.raises(ZeropassError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            index_dictionaries(str(path), progress=None, **kw)
        assert _snapshot(db) == before, what
        seen.append(what)
    assert len(seen) == 14 and not (tmp_path / "src" / "not-a-db").exists()


def test_name_collision_with_another_source_is_refused_then_replaced(fresh_db, tmp_path):
    from indexer.dictionaries.index import index_dictionaries
    from indexer.errors import NameTaken

    db, model = fresh_db
    a = saelens_dir(tmp_path / "a", *_weights(model.dims.d_model, 11), hook="blocks.0.hook_resid_post")
    b = saelens_dir(tmp_path / "b", *_weights(model.dims.d_model, 12), hook="blocks.0.hook_resid_post")
    index_dictionaries(str(a), db, model="tl", name="x", n_neighbours=1, progress=None)
    index_dictionaries(str(a), db, model="tl", name="x", n_neighbours=1, progress=None)  # the same source again: fine
    before = _snapshot(db)
    with pytest.raises(NameTaken, match="already in the dataset"):
        index_dictionaries(str(b), db, model="tl", name="x", progress=None)
    assert _snapshot(db) == before
    index_dictionaries(str(b), db, model="tl", name="x", n_neighbours=1, replace=True, progress=None)
    m = read_manifest(db)
    assert m["dictionaries"]["x"]["origin"] == str(b.resolve())
    # the replaced files are gone, only the new ones are listed and on disk
    on_disk = {p.relative_to(db).as_posix() for p in db.rglob("*.parquet") if "dictionary=x" in p.as_posix()}
    assert on_disk == {f for fs in m["dictionaries"]["x"]["files"].values() for f in fs if "dictionary=x" in f}


def test_pickle_is_read_only_when_allowed(fresh_db, tmp_path):
    from indexer.dictionaries.index import index_dictionaries

    db, model = fresh_db
    W_enc, W_dec = _weights(model.dims.d_model, 13)
    pt = tmp_path / "pickled"
    pt.mkdir()
    torch.save({"W_enc": W_enc, "W_dec": W_dec, "b_enc": torch.ones(D_SAE)}, pt / "sae_weights.pt")
    (pt / "cfg.json").write_text(json.dumps({"metadata": {"hook_name": "blocks.0.hook_resid_post"}}))
    [entry] = index_dictionaries(str(pt), db, model="tl", name="pk", allow_pickle=True, n_neighbours=0, progress=None)
    got = {(r["kind"], r["idx"], r["side"], r["rank"]): r["token_id"] for r in _vectors(db, "pk")}
    U = model.embeddings.W_U.double()
    assert [got[("decoder", 2, "top", r)] for r in range(1, K + 1)] == \
        torch.argsort(W_dec[2].double() @ U, descending=True, stable=True)[:K].tolist()


def test_cli_index_sae_and_features_errors_are_one_line(fresh_db, tmp_path):
    from click.testing import CliRunner

    from cli import cli

    db, model = fresh_db
    src = saelens_dir(tmp_path / "w", *_weights(model.dims.d_model + 2, 9), hook="blocks.0.hook_resid_pre")
    r = CliRunner().invoke(cli, ["index-sae", str(src), "--model", "tl", "--db", str(db)])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("Error: dictionary resid_pre-L0"), r.output
    ok = saelens_dir(tmp_path / "ok", *_weights(model.dims.d_model, 9), hook="blocks.1.hook_resid_post")
    r = CliRunner().invoke(cli, ["index-sae", str(ok), "--model", "tl", "--db", str(db), "--name", "rp", "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["features", "--id", "7", "-d", "rp", "--db", str(db), "--format", "json", "--limit", "0", "-q"])
    rows = json.loads(r.output)
    assert r.exit_code == 0 and rows and all(row["dictionary"] == "rp" and "feature" in row for row in rows)
    r = CliRunner().invoke(cli, ["features", "paris", "--kind", "ff_key", "--db", str(db)])
    assert r.exit_code == 1 and r.output.startswith("Error: unknown kind") and r.output.count("\n") == 1
    r = CliRunner().invoke(cli, ["show", "tl", "rp.F3", "--db", str(db), "--format", "json"])
    assert r.exit_code == 0 and set(json.loads(r.output)) == {"vectors", "stats", "neighbours"}
    r = CliRunner().invoke(cli, ["dictionaries", "--model", "tl", "--db", str(db), "--format", "json"])
    assert r.exit_code == 0 and "rp" in [row["dictionary"] for row in json.loads(r.output)]
    r = CliRunner().invoke(cli, ["dictionaries", "--model", "nope", "--db", str(db)])
    assert r.exit_code == 1 and r.output.startswith("Error: unknown model 'nope'") and r.output.count("\n") == 1


# -- the dataset's life: check, compact, merge, publish, remote reading ---------------------------

def _feature_rows(db) -> list:
    from query import Dataset

    return Dataset(str(db)).sql("SELECT * FROM features ORDER BY dictionary, feature, kind, side, rank").to_pylist()


def test_check_verifies_dictionary_files(indexed, tmp_path):
    import shutil

    from indexer.check import check_dataset

    db = tmp_path / "db"
    shutil.copytree(indexed[0], db)
    report = check_dataset(db)
    assert not report.problems
    victim = next(f for f in dictionary_files(read_manifest(db), "feature_stats"))
    data = bytearray((db / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (db / victim).write_bytes(bytes(data))
    problems = check_dataset(db).problems
    assert len(problems) == 1 and problems[0].what.startswith("dictionary ") and "index-sae" in problems[0].repair


def test_recover_lists_the_dictionaries_again(indexed, tmp_path):
    import shutil

    from indexer.check import check_dataset, recover

    db = tmp_path / "db"
    shutil.copytree(indexed[0], db)
    want = _feature_rows(db)
    before = read_manifest(db)["dictionaries"]
    (db / "manifest.json").write_text("{ torn")
    recover(db)
    after = read_manifest(db)["dictionaries"]
    assert {n: (e["files"], e["build_id"]) for n, e in after.items()} == {n: (e["files"], e["build_id"]) for n, e in before.items()}
    assert _feature_rows(db) == want and not check_dataset(db).problems


def test_compact_merge_publish_and_remote_keep_every_feature(indexed, tmp_path):
    import shutil

    from indexer.build import index_model
    from indexer.compact import compact
    from indexer.merge import merge
    from indexer.publish import publish_dataset
    from query import Dataset
    from tests.rangeserver import RangeServer

    db = tmp_path / "db"
    shutil.copytree(indexed[0], db)
    want = _feature_rows(db)
    # compaction needs two models; dictionaries stay in their own files, read beside the compacted ones
    index_model(str(indexed[0].parent / "llama"), db, name="tl2", k=K, n_pairs=0, progress=None)
    compact(db)
    assert read_manifest(db)["compacted"]["vectors"]["models"] and _feature_rows(db) == want
    n = Dataset(str(db)).rows("SELECT count(*) AS n FROM vectors WHERE model = 'tl'")[0]["n"]
    assert n == Dataset(str(indexed[0])).rows("SELECT count(*) AS n FROM vectors WHERE model = 'tl'")[0]["n"]
    merged = tmp_path / "merged"
    merge([indexed[0]], merged)
    assert _feature_rows(merged) == want and read_manifest(merged)["dictionaries"].keys() == read_manifest(db)["dictionaries"].keys()
    pub = tmp_path / "pub"
    publish_dataset(db, str(pub))
    assert _feature_rows(pub) == want
    with RangeServer(tmp_path) as srv:
        remote = Dataset(srv.url + "/pub")
        assert remote.sql("SELECT * FROM features ORDER BY dictionary, feature, kind, side, rank").to_pylist() == want
        unit = f"{indexed[3]['res']}.F5"
        assert remote.show("tl", unit)["neighbours"].to_pylist() == Dataset(str(db)).show("tl", unit)["neighbours"].to_pylist()


def test_explorer_shows_a_feature_through_show(indexed):
    pytest.importorskip("starlette")
    import urllib.parse
    import urllib.request

    from click.testing import CliRunner

    from cli import cli
    from query.serve import running

    db, _, _, names, _, _ = indexed
    unit = f"{names['res']}.F5"
    want = json.loads(CliRunner().invoke(cli, ["show", "tl", unit, "--db", str(db), "--format", "json"]).stdout)
    with running(db) as url:
        q = urllib.parse.urlencode({"model": "tl", "unit": unit})
        with urllib.request.urlopen(f"{url}/api/show?{q}") as r:
            assert json.loads(r.read()) == want and want["neighbours"][0]["neighbour"] == "L0.N3"
        with urllib.request.urlopen(f"{url}/model/tl/unit/{urllib.parse.quote(unit)}") as r:
            page = r.read().decode()
        assert r.status == 200 and "decoder" in page and "encoder" in page


def test_hub_id_with_subfolder_reads_the_local_hub_cache(fresh_db, tmp_path, monkeypatch):
    """`org/repo/sub/folder` goes through huggingface_hub; offline, a hub-cache snapshot stands in for the hub."""
    from indexer.dictionaries.index import index_dictionaries
    from indexer.errors import ZeropassError

    db, model = fresh_db
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--some-org--some-saes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    saelens_dir(repo / "snapshots" / commit / "res" / "blocks.1.hook_resid_post", *_weights(model.dims.d_model, 21),
                hook="blocks.1.hook_resid_post")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    [entry] = index_dictionaries("some-org/some-saes/res/blocks.1.hook_resid_post", db, model="tl", name="hubbed",
                                 n_neighbours=0, progress=None)
    row = pq.read_table(db / entry["files"]["dictionaries"][0]).to_pylist()[0]
    assert (row["revision"], row["source"], row["layer"]) == (commit, "some-org/some-saes/res/blocks.1.hook_resid_post", 1)
    with pytest.raises(ZeropassError, match="could not be fetched from the hub"):
        index_dictionaries("some-org/absent/res/x", db, model="tl", progress=None)


# -- the readers alone -----------------------------------------------------------------------------

def test_readers_tell_layer_site_and_transcoders_and_read_blocks(tmp_path):
    from indexer.dictionaries import BadDictionary, UnknownHook, find_dictionaries, open_dictionary

    W_enc, W_dec = _weights(8, 30, d_sae=10)
    # Gemma Scope: compressed members are read whole, stored ones mapped; both give the same blocks
    for name, save in (("stored", np.savez), ("compressed", np.savez_compressed)):
        p = tmp_path / name / "gemma-scope-9b-pt-transcoders" / "layer_4" / "width_10" / "l0_2"
        p.mkdir(parents=True)
        save(p / "params.npz", W_enc=W_enc.numpy(), W_dec=W_dec.numpy(), threshold=np.ones(10, np.float32))
        d = open_dictionary(p)
        assert (d.layer, d.site, d.d_in, d.d_sae, d.architecture) == (4, "transcoder", 8, 10, "jumprelu")
        assert torch.equal(d.decoder(3, 7), W_dec[3:7]) and torch.equal(d.encoder(2, 9), W_enc[:, 2:9].T)
    # no layer in the path: flags give it
    bare = tmp_path / "bare"
    bare.mkdir()
    np.savez(bare / "params.npz", W_enc=W_enc.numpy(), W_dec=W_dec.numpy())
    with pytest.raises(UnknownHook, match="give --layer and --site"):
        open_dictionary(bare)
    assert (lambda d: (d.layer, d.site))(open_dictionary(bare, layer=2, site="resid_post")) == (2, "resid_post")
    # sparsify: the folder names the hook; W_skip or `transcode` makes a transcoder
    for folder, cfg, extra, site in (("layers.3", {}, {}, "resid_post"), ("layers.3.mlp", {}, {}, "mlp_out"),
                                     ("t/layers.3.mlp", {"transcode": True}, {}, "transcoder"),
                                     ("s/layers.3.mlp", {}, {"W_skip": torch.zeros(8, 8)}, "transcoder")):
        p = tmp_path / "sp" / folder
        p.mkdir(parents=True)
        save_file({"encoder.weight": W_enc.T.contiguous(), "encoder.bias": torch.arange(10.0), "W_dec": W_dec,
                   "b_dec": torch.zeros(8), **extra}, str(p / "sae.safetensors"))
        (p / "cfg.json").write_text(json.dumps(cfg))
        d = open_dictionary(p)
        assert (d.layer, d.site) == (3, site) and torch.equal(d.vector("b_enc"), torch.arange(10.0))
        assert torch.equal(d.encoder(0, 10), W_enc.T)
    assert len(find_dictionaries(tmp_path / "sp")) == 4
    # a SAELens transcoder, and a W_dec of the wrong shape
    t = saelens_dir(tmp_path / "tc", W_enc, W_dec, hook="blocks.5.hook_mlp_out")
    cfg = json.loads((t / "cfg.json").read_text())
    (t / "cfg.json").write_text(json.dumps(dict(cfg, metadata=dict(cfg["metadata"], hook_name_out="blocks.5.hook_mlp_out"))))
    assert (lambda d: (d.layer, d.site))(open_dictionary(t)) == (5, "transcoder")
    bad = saelens_dir(tmp_path / "badshape", W_enc, W_dec[:, :7], hook="blocks.5.hook_mlp_out")
    with pytest.raises(BadDictionary, match=r"W_dec must be \[d_sae, d_in\] = \[10, 8\]"):
        open_dictionary(bad)


def test_plain_duckdb_catalog_has_the_feature_views(indexed, monkeypatch):
    import duckdb

    db = indexed[0]
    monkeypatch.chdir(db)  # the catalog's views name files relative to the dataset, as the plain duckdb CLI reads them
    con = duckdb.connect("catalog.duckdb", read_only=True)
    try:
        n = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
             for t in ("features", "features_by_token", "dictionaries", "feature_stats", "feature_neighbours")}
    finally:
        con.close()
    assert n == {"features": 4 * D_SAE * 2 * 2 * K, "features_by_token": 4 * D_SAE * 2 * 2 * K, "dictionaries": 4,
                 "feature_stats": 4 * D_SAE, "feature_neighbours": 3 * D_SAE * 4}


def test_removing_a_model_removes_its_dictionaries(indexed, fresh_db):  # indexed first: the copy holds them
    from indexer.check import check_dataset
    from indexer.dataset import remove_model

    db, _ = fresh_db
    assert read_manifest(db)["dictionaries"]
    remove_model(db, "tl")
    m = read_manifest(db)
    assert not m["models"] and not m["dictionaries"]
    assert not [p for p in db.rglob("*.parquet") if "dictionary=" in p.as_posix()] and not check_dataset(db).problems


def test_enrich_ranks_the_feature_whose_decoder_list_holds_the_set_first(indexed):
    """Features are units of `enrich` (issue 23): a set made of one feature's top decoder tokens
    ranks that feature first; K is its dictionary's k and every feature of the model's
    dictionaries is one test of Benjamini-Hochberg, per side searched."""
    from query import Dataset
    from query.enrich import benjamini_hochberg, mhg, mhg_pvalue
    from schemas.tokens import normalise

    db, _, _, names, _, _ = indexed
    res = names["res"]
    with Dataset(db) as ds:
        top = ds.rows(f"SELECT token_id, token FROM features WHERE dictionary = '{res}' AND feature = 7 "
                      f"AND kind = 'decoder' AND side = 'top' ORDER BY rank LIMIT 6")
        got = ds.enrich([r["token"] for r in top], kind="decoder", limit=None).to_pylist()
        dicts = ds.rows("SELECT dictionary, d_sae, k FROM dictionaries WHERE model = 'tl'")
        vocab = ds.rows("SELECT d_vocab FROM models WHERE model = 'tl'")[0]["d_vocab"]
        ids = {r["token_id"] for r in ds.rows(
            "SELECT token_id FROM tokens t JOIN models m ON t.vocab_id = m.vocab_id WHERE m.model = 'tl' "
            "AND list_contains($n, t.norm)", {"n": sorted({normalise(r["token"]) for r in top})})}
    assert got[0]["unit"] == f"{res}.F7" and got[0]["list"] == "decoder" and got[0]["side"] == "top"
    assert all(r["unit"].split(".F")[0] in {d["dictionary"] for d in dicts} for r in got)  # features only
    k = {d["dictionary"]: d["k"] for d in dicts}
    assert all(r["list_size"] == min(k[r["unit"].split(".F")[0]], vocab) for r in got)
    # the statistic, p-value and q-value recomputed from the rows' own ranks
    first = got[0]
    ranks = sorted(int(m.rsplit("#", 1)[1]) for m in first["members"])
    assert first["set_size"] == len(ids)
    stat, cutoff = mhg(ranks, first["background"], first["set_size"], first["list_size"])
    assert (first["statistic"], first["cutoff"]) == (stat, cutoff)
    assert first["p_value"] == mhg_pvalue(stat, first["background"], first["set_size"], first["list_size"])
    tests = sum(d["d_sae"] for d in dicts)  # one decoder list per feature, side top
    assert [r["q_value"] for r in got] == benjamini_hochberg([r["p_value"] for r in got], tests)


def test_reindexing_from_another_checkpoint_removes_its_dictionaries(indexed, fresh_db, tmp_path):
    """`index --replace` with the same weights keeps the dictionaries; another checkpoint removes them in
    the same commit (they were projected through the old W_U / W_E), says so, and leaves a clean dataset."""
    from indexer.build import index_model
    from indexer.check import check_dataset
    from tests.dataset_helpers import invoke_cli
    from tests.tiny_models import save_tiny

    db, _ = fresh_db
    names = sorted(read_manifest(db)["dictionaries"])
    src = indexed[0].parent / "llama"
    entry = index_model(str(src), db, name="tl", k=K + 1, n_pairs=0, variant="folded", replace=True, progress=None)
    assert entry["removed_dictionaries"] == [] and sorted(read_manifest(db)["dictionaries"]) == names
    assert not check_dataset(db).problems
    other = save_tiny("llama-gqa", tmp_path / "other", seed=1)
    r = invoke_cli("index", other, "--name", "tl", "--variant", "folded", "--k", K, "--pairs", 0, "--db", db,
                   "--replace", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stderr == (f"removed the dictionaries of tl ({', '.join(names)}): they were projected through its previous "
                        f"weights; index them again with `zeropass index-sae`\n")
    m = read_manifest(db)
    assert not m["dictionaries"] and not [p for p in db.rglob("*.parquet") if "dictionary=" in p.as_posix()]
    assert not check_dataset(db).problems
    from query import Dataset

    with Dataset(db) as ds:
        assert ds.rows("SELECT count(*) AS n FROM features")[0]["n"] == 0
        assert ds.rows("SELECT count(*) AS n FROM vectors WHERE model = 'tl'")[0]["n"] > 0


def test_dataset_card_lists_the_dictionaries_and_their_files(indexed):
    from indexer.card import render_card

    db, _, _, names, _, _ = indexed
    manifest = read_manifest(db)
    card = render_card(db, manifest)
    assert "## Dictionaries" in card
    assert f"| {names['res']} | tl | 1 | resid_pre | {D_SAE} | jumprelu |" in card
    assert f"| {names['z']} | tl | 1 | z | {D_SAE} | standard |" in card
    header = card.split("\n---\n")[0]
    for table in ("dictionaries", "feature_stats", "feature_neighbours", "vectors"):
        assert f"- config_name: {table}" in header
        for f in dictionary_files(manifest, table):
            assert json.dumps(f) in header, (table, f)
    assert f"| `feature_stats` | {4 * D_SAE:,} |" in card


def test_enrich_searches_features_per_dictionary(indexed):
    """`enrich --kind decoder`: a feature's whole decoder list as the set ranks that feature first, units are
    named by their dictionary (feature i of two dictionaries is two lists), K is the dictionary's k."""
    from query import Dataset
    from query.enrich import set_matches

    db, _, _, names, _, _ = indexed
    with Dataset(db) as ds:
        want = ds.rows(f"SELECT token_id, token FROM features WHERE dictionary = '{names['res']}' AND feature = 7 "
                       f"AND kind = 'decoder' AND side = 'top' ORDER BY rank")
        words = [r["token"] for r in want]
        rows = ds.enrich(words, kind=["decoder", "encoder"], limit=None).to_pylist()
        n_features = ds.rows("SELECT sum(d_sae)::BIGINT AS n FROM dictionaries")[0]["n"]
        ids = [i for i in set_matches(ds, words).column("token_id").to_pylist() if i is not None]
        members = ds.rows("SELECT DISTINCT dictionary, feature, kind FROM features WHERE side = 'top' "
                          "AND list_contains($ids, token_id)", {"ids": ids})
    assert rows[0]["unit"] == f"{names['res']}.F7" and rows[0]["list"] == "decoder"
    assert rows[0]["list_size"] == K and rows[0]["hits"] >= len(words)
    # one row per (dictionary, feature, kind) holding a member, named by schemas.units
    assert sorted((r["unit"], r["list"]) for r in rows) == sorted((f"{m['dictionary']}.F{m['feature']}", m["kind"]) for m in members)
    assert len({r["unit"].split(".F")[0] for r in rows}) > 1  # several dictionaries, never 'None.F...'
    # Benjamini-Hochberg over every feature list searched: both kinds, one side
    first = rows[0]
    assert first["q_value"] == pytest.approx(min(1.0, min(r["p_value"] * 2 * n_features / (i + 1)
                                                          for i, r in enumerate(sorted(rows, key=lambda r: r["p_value"]))
                                                          if r["p_value"] >= first["p_value"])))
