"""Mixtures of experts end to end (issue 12): `zeropass coverage` / `index` on each tiny MoE
checkpoint, and the two questions the MoE tables answer — "which tokens does layer L send to
expert e" (`show MODEL L1.E3.router`, or SQL on kind 'router') and "which expert neurons promote
token X" (`neurons X --kind ff_value`) — on a real dataset, checked against the weights."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from indexer.load import load_canonical
from query import Dataset
from cli import cli
from query.errors import BadUnit
from tests.tiny_models import D_VOCAB, N_EXPERTS, save_tiny

MOE = ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe")


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def moe_db(tmp_path_factory):
    """One dataset with every tiny MoE family (k = the whole vocabulary) and one dense model, indexed
    through `zeropass index` (in this process); ``runs``: what each command returned, for the test
    of the CLI on each checkpoint (which used to index each one a second time, into a dataset of its own)."""
    root = tmp_path_factory.mktemp("moe")
    db = root / "db"
    paths, runs = {}, {}
    for family in MOE + ("llama-gqa",):
        paths[family] = save_tiny(family, root / family)
        runs[family] = invoke("index", str(paths[family]), "--db", str(db), "--name", family.replace("_", "-"),
                              "--k", str(D_VOCAB), "--pairs", "4", "--quiet")
    return db, paths, runs


def _router_scores(path, layer, expert):
    c = load_canonical(str(path)).canonical
    W = c.layer(layer).W_router if expert is not None else c.layer(layer).W_shared_gate
    return c.embeddings.W_E.double() @ W[:, 0 if expert is None else expert].double()


@pytest.mark.parametrize("family", MOE)
def test_coverage_and_index_cli_on_each_moe_checkpoint(moe_db, family):
    db, paths, runs = moe_db
    r = invoke("coverage", str(paths[family]), "--format", "json")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)
    assert not [x for x in rows if x["role"] == "unknown"]
    assert {"vectors:router", "vectors:ff_value"} <= {x["covered_by"] for x in rows}
    r = runs[family]  # `zeropass index CHECKPOINT ... --quiet`, run by the fixture
    assert r.exit_code == 0, r.stderr
    with Dataset(db) as ds:
        assert ds.sql("SELECT count(*) AS n FROM models WHERE model = $m", {"m": family.replace("_", "-")}).column("n").to_pylist() == [1]


def test_tokens_routed_to_an_expert_show_and_sql(moe_db):
    """show L1.E3.router lists the tokens whose embedding has the largest router logit for expert 3;
    the same list is one SQL query on kind 'router'."""
    db, paths, _ = moe_db
    want = torch.argsort(_router_scores(paths["mixtral"], 1, 3), descending=True, stable=True)[:5].tolist()
    with Dataset(db) as ds:
        shown = ds.show("mixtral", "L1.E3.router", limit=5)["vectors"].to_pylist()
        assert {r["unit"] for r in shown} == {"L1.E3.router"} and {r["kind"] for r in shown} == {"router"}
        sql = ds.sql("""SELECT token_id FROM vectors WHERE model = 'mixtral' AND layer = 1 AND kind = 'router'
                        AND expert = 3 AND side = 'top' AND rank <= 5 ORDER BY rank""").column("token_id").to_pylist()
        assert sql == want
        from tests.tiny_models import VOCAB

        assert [r["top"] for r in shown] == [VOCAB[i] for i in want]
        # Qwen2-MoE's shared-expert gate: a router row without an expert.
        shared = ds.show("qwen2-moe", "L0.shared_router", limit=3)["vectors"].to_pylist()
        assert [r["unit"] for r in shared] == ["L0.shared_router"] * 3
        best = int(torch.argmax(_router_scores(paths["qwen2_moe"], 0, None)))
        assert ds.sql("SELECT token_id FROM vectors WHERE model = 'qwen2-moe' AND layer = 0 AND kind = 'router' AND expert IS NULL "
                      "AND side = 'top' AND rank = 1").column("token_id").to_pylist() == [best]


def test_expert_neurons_promoting_a_token(moe_db):
    """neurons X --kind ff_value finds routed experts' neurons (units L.E.N) with their expert, and
    each hit is the token's real rank in that expert neuron's W_out row @ W_U."""
    db, paths, _ = moe_db
    c = load_canonical(str(paths["olmoe"])).canonical
    with Dataset(db) as ds:
        hits = ds.neurons("Paris", model="olmoe", kind="ff_value", max_rank=3, limit=None).to_pylist()
        assert hits and all(".E" in h["unit"] for h in hits)
        paris = ds.sql("SELECT token_id FROM tokens t JOIN models m USING (vocab_id) WHERE m.model = 'olmoe' "
                       "AND t.token = 'Paris'").column("token_id")[0].as_py()
    for h in hits:
        layer, expert, neuron = (int(p[1:]) for p in h["unit"].split("."))
        scores = c.layer(layer).experts[expert].W_out[neuron].double() @ c.embeddings.W_U.double()
        rank = int((scores > scores[paris]).sum()) + 1
        assert rank == h["rank"] <= 3, h
    # and every expert neuron with Paris in its top 3 is found
    want = sum(int((c.layer(l).experts[e].W_out.double() @ c.embeddings.W_U.double()
                    > (c.layer(l).experts[e].W_out.double() @ c.embeddings.W_U.double())[:, paris:paris + 1]).sum(1)
                   .lt(3).sum()) for l in range(c.dims.n_layers) for e in range(N_EXPERTS))
    assert len(hits) == want


def test_show_an_expert_neuron_and_the_cli(moe_db):
    db, _, _ = moe_db
    with Dataset(db) as ds:
        rows = ds.show("qwen3-moe", "l1.e2.n5", limit=2)["vectors"].to_pylist()
    assert {r["unit"] for r in rows} == {"L1.E2.N5"} and {r["kind"] for r in rows} == {"ff_key", "ff_gate", "ff_value"}
    r = invoke("show", "qwen3-moe", "L1.E2.router", "--db", str(db), "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert {row["unit"] for row in json.loads(r.stdout)["vectors"]} == {"L1.E2.router"}
    r = invoke("neurons", "Paris", "--kind", "router", "--db", str(db), "--format", "json", "--max-rank", str(D_VOCAB))
    assert r.exit_code == 0 and {row["unit"].split(".")[-1] for row in json.loads(r.stdout)} <= {"router", "shared_router"}


@pytest.mark.parametrize("model,unit,match", [
    ("mixtral", f"L0.E{N_EXPERTS}.router", "expert 4 is out of range"),
    ("mixtral", "L0.E1.N999", "neuron 999 is out of range"),
    ("mixtral", "L0.N3", "no dense or shared-expert FF neurons"),
    ("qwen2-moe", "L0.N39", None),  # the shared expert is 40 wide, wider than a routed expert (24)
    ("qwen2-moe", "L0.N40", "neuron 40 is out of range"),
    ("llama-gqa", "L0.E0.N1", "not a mixture of experts"),
    ("llama-gqa", "L0.shared_router", "not a mixture of experts"),
    ("mixtral", "L0.E99999999999.router", "larger than any model has"),
    ("mixtral", "L0.E1.routers", "malformed unit"),
])
def test_bad_expert_units_are_one_line(moe_db, model, unit, match):
    db, _, _ = moe_db
    with Dataset(db) as ds:
        if match is None:
            assert ds.show(model, unit)["vectors"].num_rows > 0
            return
        with pytest.raises(BadUnit, match=match):
            ds.show(model, unit)
    r = invoke("show", model, unit, "--db", str(db))
    assert r.exit_code == 1 and r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("Error:")


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_enrich_counts_every_expert_list_as_a_test(moe_db, family):
    """Benjamini-Hochberg's m for an MoE model counts every stored list: n_experts x d_ff expert
    neurons plus the shared expert's per layer, and one router list per expert (plus the shared
    gate). Before, m was n_layers x d_ff and routers counted nothing (q-values too small)."""
    from query.enrich import _vector_lists

    db, paths, _ = moe_db
    c = load_canonical(str(paths[family])).canonical
    d = c.dims
    ff = d.n_layers * (d.n_experts * d.d_ff + d.d_ff_shared)
    routers = sum(d.n_experts + (c.layer(l).W_shared_gate is not None) for l in range(d.n_layers))
    slug = family.replace("_", "-")
    with Dataset(db) as ds:
        info = ds.rows("SELECT * FROM models WHERE model = $m", {"m": slug})[0]
        counted = _vector_lists(ds, info)
        # k is the whole vocabulary here, so every list holds the set: one row per list and side
        got = ds.enrich(["Paris"], model=slug, kind="ff_value,router", side="both", limit=None).to_pylist()
    assert (counted["ff_value"], counted["router"]) == (ff, routers)
    assert len(got) == 2 * (ff + routers)
