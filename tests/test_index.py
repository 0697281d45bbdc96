"""`zeropass index`: every stored projection equals an independent dense reference; the dataset
is deterministic, resumable after SIGKILL, shared by several models, and fails cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from indexer.build import index_model, parse_layers, BadOption
from indexer.errors import DatasetError
from indexer.kernels.head_metrics import head_metrics
from indexer.load import load_canonical
from indexer.variants import fold
from query import Dataset
from schemas.layout import read_manifest, table_files
from tests.disks import fill
from tests.tiny_models import save_tiny

K = 5
N_PAIRS = 12
REPO = Path(__file__).resolve().parent.parent


def read_table(db: Path, table: str, model: str | None = None) -> pa.Table:
    manifest = read_manifest(db)
    files = table_files(manifest, table, [model] if model else None)
    return pa.concat_tables([pq.read_table(db / f) for f in files]).combine_chunks() if files else None


def dense_vectors(model) -> dict[tuple, torch.Tensor]:
    """(kind, layer, head, idx, expert) -> float64 scores over the vocabulary, straight from the definitions."""
    emb = model.embeddings
    E = emb.W_E.double()  # [V, d]
    U = emb.W_U.double()  # [d, V]
    out = {}
    if emb.W_pos is not None:
        for p, w in enumerate(emb.W_pos.double()):
            out[("pos", None, None, p, None)] = w @ U
    for l in range(model.dims.n_layers):
        lw = model.layer(l)
        # dense FF (a MoE layer: its shared expert, maybe none), then every routed expert
        ffs = [(None, lw)] + list(enumerate(lw.experts or ()))
        for e, ff in ffs:
            for i in range(ff.W_in.shape[1]):
                out[("ff_key", l, None, i, e)] = E @ ff.W_in[:, i].double()
                out[("ff_value", l, None, i, e)] = ff.W_out[i].double() @ U
                if ff.W_gate is not None:
                    out[("ff_gate", l, None, i, e)] = E @ ff.W_gate[:, i].double()
        if lw.W_router is not None:
            for e in range(lw.W_router.shape[1]):
                out[("router", l, None, e, e)] = E @ lw.W_router[:, e].double()
            if lw.W_shared_gate is not None:
                out[("router", l, None, 0, None)] = E @ lw.W_shared_gate[:, 0].double()
        for kind, W in (("q", lw.W_Q), ("k", lw.W_K), ("v", lw.W_V)):
            for h in range(W.shape[0]):
                for j in range(W.shape[2]):
                    out[(kind, l, h, j, None)] = E @ W[h][:, j].double()
        for h in range(lw.W_O.shape[0]):
            for j in range(lw.W_O.shape[1]):
                out[("o", l, h, j, None)] = lw.W_O[h][j].double() @ U
        if lw.b_O is not None:
            out[("bias_attn_out", l, None, 0, None)] = lw.b_O.double() @ U
        if lw.b_out is not None:
            out[("bias_ff_out", l, None, 0, None)] = lw.b_out.double() @ U
    return out


def check_vectors_against_dense(db: Path, slug: str, model) -> int:
    """Every stored (unit, side) list is the first K of a stable sort of the reference's scores:
    ranks 1..K once each, the same token ids in that order, the same scores (within 1e-5).

    All units at once (one stable argsort of the stacked reference rows, one comparison of every
    stored row): a loop over units with a torch comparison each was most of a MoE model's test."""
    ref = dense_vectors(model)
    keys = list(ref)
    unit_of = {key: u for u, key in enumerate(keys)}
    t = read_table(db, "vectors", slug)
    col = {c: t.column(c).to_pylist() for c in ("kind", "layer", "head", "idx", "expert", "side", "rank", "token_id", "score")}
    stored = list(zip(col["kind"], col["layer"], col["head"], col["idx"], col["expert"]))
    assert set(stored) == set(ref), "stored vectors differ from the parameters that should be projected"
    sides = ("top", "bottom")
    assert set(col["side"]) <= set(sides), set(col["side"])
    assert all(1 <= r <= K for r in col["rank"]), sorted(set(col["rank"]))
    u = np.array([unit_of[key] for key in stored], dtype=np.int64)
    s = np.array([sides.index(side) for side in col["side"]], dtype=np.int64)
    r = np.array(col["rank"], dtype=np.int64) - 1
    # each (unit, side) holds ranks 1..K exactly once
    count = np.zeros((len(keys), 2, K), dtype=np.int64)
    np.add.at(count, (u, s, r), 1)
    if not (count == 1).all():
        bad_u, bad_s = np.argwhere((count != 1).any(axis=2))[0]
        raise AssertionError(f"{keys[bad_u]} {sides[bad_s]}: ranks are not 1..{K} once each")
    got_ids = np.zeros((len(keys), 2, K), dtype=np.int64)
    got_ids[u, s, r] = col["token_id"]
    got_scores = np.zeros((len(keys), 2, K), dtype=np.float64)
    got_scores[u, s, r] = col["score"]
    scores = torch.stack([ref[key] for key in keys])  # [units, V] float64
    want_ids = torch.stack([torch.argsort(scores, dim=1, descending=True, stable=True)[:, :K],
                            torch.argsort(scores, dim=1, stable=True)[:, :K]], dim=1)  # [units, 2, K]
    wrong = got_ids != want_ids.numpy()
    if wrong.any():
        bad_u, bad_s, _ = np.argwhere(wrong)[0]
        raise AssertionError(f"{keys[bad_u]} {sides[bad_s]}: token ids {got_ids[bad_u, bad_s].tolist()} "
                             f"!= {want_ids[bad_u, bad_s].tolist()}")
    want_scores = torch.gather(scores, 1, want_ids.reshape(len(keys), 2 * K)).reshape(len(keys), 2, K)
    got = torch.from_numpy(got_scores)
    far = ~torch.isclose(got, want_scores, rtol=1e-5, atol=1e-5).all(dim=2)
    where = "".join(f"{keys[a]} {sides[b]}: " for a, b in far.nonzero()[:1].tolist())
    torch.testing.assert_close(got, want_scores, rtol=1e-5, atol=1e-5, msg=lambda m: where + m)
    return len(keys)


FAMILIES = [
    pytest.param("gpt2", id="gpt2"),
    pytest.param("bert", id="bert"),
    pytest.param("mpnet", id="mpnet"),
    pytest.param("llama-gqa", id="llama-gqa"),
    pytest.param("qwen2", id="qwen2-untied-biases"),
    pytest.param("neox", id="neox"),
    pytest.param("gemma", id="gemma"),
    pytest.param("gemma2", id="gemma2"),
    pytest.param("qwen3", id="qwen3"),
    pytest.param("phi3", id="phi3"),
    pytest.param("olmo2", id="olmo2"),
    pytest.param("gemma3_text", id="gemma3_text"),
    pytest.param("gemma3", id="gemma3-multimodal-text-tower"),
    pytest.param("phi", id="phi"),
    pytest.param("phi-qk", id="phi-qk-layernorm"),
    pytest.param("opt", id="opt"),
    pytest.param("opt-350m", id="opt-350m-post-ln-projections"),
    pytest.param("gptj", id="gptj"),
    pytest.param("gpt_bigcode", id="gpt_bigcode"),
    pytest.param("bloom", id="bloom"),
    pytest.param("falcon-new", id="falcon-new"),
    pytest.param("falcon", id="falcon-mqa"),
    pytest.param("stablelm", id="stablelm"),
    pytest.param("stablelm-qk", id="stablelm-qk-layernorm"),
    pytest.param("starcoder2", id="starcoder2"),
    pytest.param("cohere", id="cohere"),
    pytest.param("cohere-qk", id="cohere-qk-norm"),
    pytest.param("granite", id="granite-assumed-llama-layout"),
    pytest.param("mixtral", id="mixtral-moe"),
    pytest.param("qwen2_moe", id="qwen2-moe-shared-expert"),
    pytest.param("olmoe", id="olmoe"),
    pytest.param("qwen3_moe", id="qwen3-moe"),
]


def build_family(out: Path, family: str) -> None:
    """The tiny ``family`` checkpoint at ``out/family``, indexed as ``family`` with K and N_PAIRS into ``out/db``."""
    path = save_tiny(family, out / family)
    index_model(str(path), out / "db", name=family, k=K, n_pairs=N_PAIRS, progress=None)


@pytest.fixture
def built(prebuilt, tmp_path):
    """``built(family)``: (checkpoint, dataset) of `build_family`, a copy of one build per test run
    (`prebuilt`): the dense-reference test checks it, the other tests read or damage their copy."""
    def get(family: str) -> tuple[Path, Path]:
        out = prebuilt(build_family, tmp_path / f"built-{family}", family)
        return out / family, out / "db"

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_every_vector_row_equals_dense_reference(built, family):
    path, db = built(family)
    canonical = load_canonical(str(path)).canonical
    n = check_vectors_against_dense(db, family, canonical)
    assert n > 0
    check_vectors_by_token(db, family)
    # What `raw` leaves unapplied (e.g. Gemma's embedding multiplier) is recorded in models.settings.
    with Dataset(db) as ds:
        settings = json.loads(ds.sql("SELECT settings FROM models").column("settings")[0].as_py())
    assert settings["conventions"] == canonical.conventions


def check_vectors_by_token(db: Path, slug: str) -> None:
    """vectors_by_token holds exactly the vectors rows, sorted by token; the query layer's unit
    expression gives back every stored unit name."""
    import duckdb

    from schemas.units import vector_unit_sql

    con = duckdb.connect()
    con.register("v", read_table(db, "vectors", slug))
    con.register("t", read_table(db, "vectors_by_token", slug))
    cols = "model, token_id, layer, kind, head, expert, idx, side, rank, score"
    for a, b in (("v", "t"), ("t", "v")):
        assert con.sql(f"SELECT {cols} FROM {a} EXCEPT ALL SELECT {cols} FROM {b}").fetchall() == []
    def key(r):  # indexer.dataset._BY_TOKEN_ORDER: nulls (pos rows, FF rows, dense FF) first
        token_id, layer, kind, head, expert, idx, side, rank = r
        return (token_id, layer is not None, layer or 0, kind, head is not None, head or 0,
                expert is not None, expert or 0, idx, side, rank)

    rows = con.sql("SELECT token_id, layer, kind, head, expert, idx, side, rank FROM t").fetchall()
    assert rows == sorted(rows, key=key)
    assert con.sql(f"SELECT count(*) FROM v WHERE unit IS DISTINCT FROM {vector_unit_sql('v')}").fetchall() == [(0,)]


@pytest.mark.parametrize("family", [pytest.param("gpt2", id="gpt2"),
                                    pytest.param("stablelm-qk", id="stablelm-per-head-qk-gains")])
def test_folded_variant_equals_dense_reference_on_folded_weights(tmp_path, family):
    path = save_tiny(family, tmp_path / "m")
    db = tmp_path / "db"
    index_model(str(path), db, name="g", k=K, n_pairs=N_PAIRS, variant="folded", progress=None)
    folded = fold(load_canonical(str(path)).canonical)
    check_vectors_against_dense(db, "g", folded)
    assert read_table(db, "models").column("variant").to_pylist() == ["folded"]


def test_folded_moe_equals_dense_reference_on_folded_weights(tmp_path):
    """folded: the MLP norm's gain reaches every expert's keys / gates, the router and the shared gate."""
    path = save_tiny("qwen2_moe", tmp_path / "m")
    db = tmp_path / "db"
    index_model(str(path), db, name="q", k=K, n_pairs=0, variant="folded", progress=None)
    raw, folded = load_canonical(str(path)).canonical, fold(load_canonical(str(path)).canonical)
    check_vectors_against_dense(db, "q", folded)
    g = raw.layer(0).ln_mlp_w
    torch.testing.assert_close(folded.layer(0).experts[1].W_gate, raw.layer(0).experts[1].W_gate * g[:, None])
    torch.testing.assert_close(folded.layer(0).W_router, raw.layer(0).W_router * g[:, None])


@pytest.mark.parametrize("family", [pytest.param("gpt2", id="mha"), pytest.param("llama-gqa", id="gqa"),
                                    pytest.param("gemma3_text", id="gemma3-qk-and-post-norms")])
def test_pairs_and_roles_equal_dense_circuits(built, family):
    path, db = built(family)  # the build test_every_vector_row_equals_dense_reference checked
    model = load_canonical(str(path)).canonical
    E, U = model.embeddings.W_E.double(), model.embeddings.W_U.double()
    pairs = read_table(db, "pairs").to_pylist()
    roles = read_table(db, "head_tokens").to_pylist()
    heads = read_table(db, "heads").to_pylist()
    assert len(heads) == model.dims.n_layers * model.dims.n_heads
    for l in range(model.dims.n_layers):
        lw = model.layer(l)
        for h in range(model.dims.n_heads):
            kv = model.dims.kv_head(h)
            circuits = {
                "qk": (E @ lw.W_Q[h].double()) @ (E @ lw.W_K[kv].double()).T,
                "ov": (E @ lw.W_V[kv].double()) @ (lw.W_O[h].double() @ U),
            }
            for circuit, M in circuits.items():
                V = M.shape[0]
                flat = M.reshape(-1)
                for side, desc in (("top", True), ("bottom", False)):
                    # stable sort of (value, row, col) order: ties by lower row then lower column
                    order = torch.argsort(flat, descending=desc, stable=True)[:N_PAIRS]
                    got = sorted((r for r in pairs if (r["layer"], r["head"], r["circuit"], r["side"]) == (l, h, circuit, side)),
                                 key=lambda r: r["rank"])
                    assert [(r["src_id"], r["dst_id"]) for r in got] == [(int(i) // V, int(i) % V) for i in order]
                    np.testing.assert_allclose([r["score"] for r in got], flat[order].numpy(), rtol=1e-12, atol=1e-12)
                row_role, col_role = ("query", "key") if circuit == "qk" else ("source", "output")
                for role, vals_top, vals_bot in ((row_role, M.max(1).values, M.min(1).values),
                                                 (col_role, M.max(0).values, M.min(0).values)):
                    for side, vals, desc in (("top", vals_top, True), ("bottom", vals_bot, False)):
                        want = torch.argsort(vals, descending=desc, stable=True)[:K].tolist()
                        got = sorted((r for r in roles if (r["layer"], r["head"], r["circuit"], r["role"], r["side"]) == (l, h, circuit, role, side)),
                                     key=lambda r: r["rank"])
                        assert [r["token_id"] for r in got] == want, (l, h, circuit, role, side)
            hrow = next(r for r in heads if (r["layer"], r["head"]) == (l, h))
            assert hrow["kv_head"] == kv and hrow["unit"] == f"L{l}.H{h}"
            # the indexer passes its own circuit factors to head_metrics; same numbers as without
            plain = head_metrics(model.embeddings.W_E, model.embeddings.W_U, lw.W_Q[h], lw.W_K[kv], lw.W_V[kv], lw.W_O[h], None, None)
            for key in ("ov_copying_score", "ov_copying_score_full", "qk_copying_score_full", "ov_norm", "qk_norm"):
                assert hrow[key] == pytest.approx(plain[key], rel=1e-9, abs=1e-12), key
            diag = lambda M: float((M.diagonal() >= M.max(1).values).double().mean())  # noqa: E731
            assert hrow["ov_self_top1_frac"] == pytest.approx(diag(circuits["ov"]))
            assert hrow["qk_self_top1_frac"] == pytest.approx(diag(circuits["qk"]))


def _contents(db: Path) -> dict[str, list]:
    out = {}
    for table in ("vectors", "vectors_by_token", "pairs", "head_tokens", "heads", "parameters", "tokens", "models"):
        t = read_table(db, table)
        if t is None:
            continue
        if table == "models":
            t = t.drop_columns(["created_at"])
        out[table] = t.to_pylist()
    return out


def test_indexing_twice_gives_identical_tables(tmp_path):
    path = save_tiny("llama-gqa", tmp_path / "m")
    for name in ("a", "b"):
        index_model(str(path), tmp_path / name, name="m", k=K, n_pairs=N_PAIRS, progress=None)
    assert _contents(tmp_path / "a") == _contents(tmp_path / "b")


_SLOW_BUILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from indexer.build import index_model
    seen = 0
    def slow(msg):  # a consumer of progress that stalls mid-build stands in for a slow model
        global seen
        if "layer" in msg:
            print(msg, flush=True)
            seen += 1
            if seen >= 3:  # the test kills us here (it used to sleep 0.4 s at every line)
                time.sleep(60)
    index_model({path!r}, {db!r}, name="m", k={k}, n_pairs={n}, progress=slow)
""")


def test_sigkill_halfway_then_rerun_equals_clean_build(tmp_path):
    path = save_tiny("gpt2", tmp_path / "m", n_layer=8)
    db = tmp_path / "db"
    script = _SLOW_BUILD.format(repo=str(REPO), path=str(path), db=str(db), k=K, n=N_PAIRS)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    seen = 0
    for line in proc.stdout:  # wait until a few layers are on disk, then kill mid-build
        seen += "layer" in line
        if seen >= 3:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    manifest = read_manifest(db)
    assert manifest is None or "m" not in manifest["models"], "a half-written model is visible"
    assert (db / ".builds" / "m.json").exists()
    index_model(str(path), db, name="m", k=K, n_pairs=N_PAIRS, progress=None)
    index_model(str(path), tmp_path / "clean", name="m", k=K, n_pairs=N_PAIRS, progress=None)
    assert _contents(db) == _contents(tmp_path / "clean")
    assert not (db / ".builds" / "m.json").exists()
    leftovers = [p for p in db.rglob("*.parquet") if str(p.relative_to(db)) not in
                 {f for fs in read_manifest(db)["models"]["m"]["files"].values() for f in fs}
                 and not p.name.startswith("v")]
    assert not [p for p in leftovers if "tokens" not in str(p)], leftovers
    assert not list(db.rglob("*.tmp"))


def test_two_models_and_reindexing_one_leaves_the_other_untouched(tmp_path):
    a = save_tiny("gpt2", tmp_path / "a")
    b = save_tiny("llama", tmp_path / "b")
    db = tmp_path / "db"
    index_model(str(a), db, name="a", k=K, n_pairs=N_PAIRS, progress=None)
    index_model(str(b), db, name="b", k=K, n_pairs=N_PAIRS, progress=None)
    b_files = {p: p.read_bytes() for p in (db / "vectors" / "model=b").rglob("*.parquet")}
    b_entry = read_manifest(db)["models"]["b"]
    index_model(str(a), db, name="a", k=3, n_pairs=N_PAIRS, progress=None)  # new settings: a rebuild
    assert read_manifest(db)["models"]["b"] == b_entry
    assert {p: p.read_bytes() for p in (db / "vectors" / "model=b").rglob("*.parquet")} == b_files
    assert set(read_manifest(db)["models"]) == {"a", "b"}
    a_files = {f for fs in read_manifest(db)["models"]["a"]["files"].values() for f in fs}
    on_disk = {str(p.relative_to(db)) for p in db.glob("*/model=a/**/*.parquet")}
    assert on_disk == a_files, "the previous build of a was not cleaned up"
    # both models share the tiny vocabulary: one tokens file
    assert len(read_manifest(db)["vocabularies"]) == 1
    import duckdb

    con = duckdb.connect(str(db / "catalog.duckdb"), read_only=True)
    cwd = os.getcwd()
    os.chdir(db)  # the catalog's paths are relative to the dataset directory
    try:
        counts = dict(con.execute("SELECT model, count(*) FROM vectors GROUP BY model").fetchall())
    finally:
        os.chdir(cwd)
    assert set(counts) == {"a", "b"}


def test_dataset_survives_being_moved(tmp_path, built):
    _, db = built("bert")
    before = _contents(db)
    moved = tmp_path / "elsewhere" / "copy"
    moved.parent.mkdir()
    db.rename(moved)
    assert _contents(moved) == before
    out = subprocess.run([sys.executable, "-c", "import duckdb; c = duckdb.connect('catalog.duckdb', read_only=True);"
                          "print(c.execute('select count(*) from vectors').fetchone()[0])"],
                         cwd=moved, capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(before["vectors"])


def test_unwritable_db_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = save_tiny("gpt2", tmp_path / "m")
    with pytest.raises(DatasetError, match="--db"):
        index_model(str(path), blocker, name="m", progress=None)
    with pytest.raises(DatasetError, match="cannot write"):
        index_model(str(path), blocker / "sub", name="m", progress=None)
    (tmp_path / "notadataset").mkdir()
    (tmp_path / "notadataset" / "precious.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not a zeropass dataset"):
        index_model(str(path), tmp_path / "notadataset", name="m", progress=None)
    assert (tmp_path / "notadataset" / "precious.txt").read_text() == "keep me"


def test_dataset_of_another_schema_version_is_refused_untouched(tmp_path, built):
    path, db = built("gpt2")
    manifest = json.loads((db / "manifest.json").read_text())
    manifest["schema_version"] = 1
    (db / "manifest.json").write_text(json.dumps(manifest))
    before = _contents(db)
    with pytest.raises(DatasetError, match="schema version 1 .* new directory"):
        index_model(str(path), db, name="new", k=K, n_pairs=N_PAIRS, progress=None)
    assert _contents(db) == before and json.loads((db / "manifest.json").read_text()) == manifest


def test_full_disk_is_one_clear_error_and_leaves_nothing_half_written(tmp_path, small_disk):
    db = small_disk / "db"
    index_model(str(save_tiny("gpt2", tmp_path / "m")), db, name="ok", k=K, n_pairs=N_PAIRS, progress=None)
    manifest = read_manifest(db)
    before = _contents(db)
    big = save_tiny("gpt2", tmp_path / "big", n_layer=8)
    with pytest.raises(DatasetError, match="no space left"):
        index_model(str(big), db, name="big", k=20, n_pairs=50, progress=None)
    assert read_manifest(db) == manifest, "a model that did not fit became visible"
    assert _contents(db) == before
    assert not list(db.rglob("*.tmp"))


def test_disk_full_while_sorting_by_token_is_one_clear_error(tmp_path, small_disk, monkeypatch):
    """The disk fills up exactly when DuckDB writes vectors_by_token (its own writer, not ours)."""
    from indexer.dataset import Build

    db = small_disk / "db"
    real = Build.write_by_token

    def fill_disk_first(self):
        fill(small_disk)
        real(self)

    monkeypatch.setattr(Build, "write_by_token", fill_disk_first)
    with pytest.raises(DatasetError, match="^no space left on the device holding"):
        index_model(str(save_tiny("gpt2", tmp_path / "m")), db, name="m", k=K, n_pairs=N_PAIRS, progress=None)
    assert "m" not in (read_manifest(db) or {"models": {}})["models"]
    assert not list(db.rglob("*.tmp")) and not (db / ".builds" / "m.spill").exists()


@pytest.mark.parametrize("spec,n,expected", [("0-2", 4, [0, 1, 2]), ("3,1", 4, [1, 3]), (None, 2, [0, 1]), ("2", 3, [2])])
def test_parse_layers(spec, n, expected):
    assert parse_layers(spec, n) == expected


@pytest.mark.parametrize("spec", ["x", "3-1", "0-9"])
def test_parse_layers_rejects(spec):
    with pytest.raises(BadOption, match="--layers"):
        parse_layers(spec, 4)


def test_layers_option_indexes_only_those_layers(tmp_path):
    path = save_tiny("gpt2", tmp_path / "m", n_layer=3)
    db = tmp_path / "db"
    index_model(str(path), db, name="m", k=K, n_pairs=N_PAIRS, layers="1", progress=None)
    layers = set(read_table(db, "vectors").column("layer").to_pylist())
    assert layers == {1, None}  # None: positional embeddings
    settings = json.loads(read_table(db, "models").column("settings")[0].as_py())
    assert settings["layers"] == [1]


def test_a_db_inside_another_dataset_is_refused(tmp_path, synthetic_db):
    """A neighbour of issue 20's nested merge/publish: `index --db DB/vectors/x` made a dataset
    whose files DB's `check --repair` deletes as leftovers."""
    import shutil

    from indexer.dataset import check_writable

    db = Path(shutil.copytree(synthetic_db, tmp_path / "db"))
    for inner in (db / "vectors" / "x", db / "sub"):
        with pytest.raises(DatasetError, match="is inside the dataset"):
            check_writable(inner)
        assert not inner.exists()
    check_writable(tmp_path / "beside")  # a sibling is fine


def test_the_writer_never_commits_a_manifest_its_readers_refuse(tmp_path, synthetic_db):
    """A neighbour of the glob rule: `align ./ckpt[1] ...` names the alignment after the path's
    last part; a `[` in a listed path would make every reader refuse the dataset afterwards."""
    import shutil

    from indexer.align import _slug
    from indexer.dataset import store_alignment
    from query import Dataset
    from schemas import TABLES

    assert _slug("/ckpts/run[1]") == "run-1-" and _slug("/ckpts/a*b?") == "a-b-"
    db = Path(shutil.copytree(synthetic_db, tmp_path / "db"))
    before = (db / "manifest.json").read_bytes()
    with pytest.raises(DatasetError, match="refusing to commit.*glob character"):
        store_alignment(db, "run[1]", "alpha", TABLES["alignments"].schema.empty_table())
    assert (db / "manifest.json").read_bytes() == before
    with Dataset(db) as ds:
        assert ds.sql("SELECT count(*) AS n FROM models").column("n").to_pylist() == [3]


def test_a_vocabulary_sized_dictionary_is_not_copied_into_every_row_group(tmp_path):
    """Parquet's writer copies an Arrow dictionary whole into each row group: the token texts
    (the whole vocabulary) in every 16K-row group of a layer's `vectors` file were most of it.
    `conform` decodes large dictionaries, so each row group gets a dictionary of its own texts:
    same values back, a fraction of the bytes; small dictionaries (side, kind) stay encoded."""
    from indexer.dataset import conform, write_parquet_atomic
    from schemas import TABLES

    n_vocab, n_rows = 50_000, 64 * 1024
    rng = np.random.default_rng(0)
    texts = pa.array([f"<b>{w}é" for w in rng.integers(0, 2**62, n_vocab).astype(str)])
    token_id = np.sort(rng.integers(0, n_vocab, n_rows)).astype(np.int32)
    cols = {}
    for field in TABLES["vectors"].schema:
        if field.name == "token":
            cols["token"] = pa.DictionaryArray.from_arrays(pa.array(token_id), texts)
        elif field.name == "side":
            cols["side"] = pa.DictionaryArray.from_arrays(pa.array(token_id % 2), pa.array(["top", "bottom"]))
        elif field.name == "token_id":
            cols["token_id"] = pa.array(token_id)
        elif not field.nullable:
            cols[field.name] = pa.array(np.zeros(n_rows), type=field.type) if not pa.types.is_string(field.type) else pa.array(["x"] * n_rows)
    data = pa.table(cols)
    write_parquet_atomic(tmp_path, "as_built.parquet", conform("vectors", data), row_group_size=16 * 1024)
    pq.write_table(data, tmp_path / "whole.parquet", compression="zstd", row_group_size=16 * 1024)
    back = pq.read_table(tmp_path / "as_built.parquet")
    assert back.column("token").to_pylist() == data.column("token").to_pylist()
    assert pa.types.is_dictionary(back.schema.field("side").type)

    def token_bytes(name):
        meta = pq.ParquetFile(tmp_path / name).metadata
        col = meta.schema.names.index("token")
        return sum(meta.row_group(g).column(col).total_compressed_size for g in range(meta.num_row_groups))

    assert token_bytes("as_built.parquet") < 0.4 * token_bytes("whole.parquet")
