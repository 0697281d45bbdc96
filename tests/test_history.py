"""`zeropass history` on a training series we make: a tiny GPT-2 trained 150 steps on a
synthetic corpus in which one token ("Paris") is the next token half of the time, so training
pushes its unembedding; checkpoints saved at several steps, indexed with `index-many`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.dataset_helpers import invoke_cli as zp  # noqa: E402  (in this process: a subprocess costs seconds)

STEPS = (0, 50, 100, 150)
PUSHED = "Paris"


def train_series(out: Path) -> None:
    from tests.tiny_models import VOCAB, tiny_model

    model, tok = tiny_model("gpt2", seed=0, randomize=False)  # HF's small init: nothing stands out at step 0
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend (seconds instead of a minute)
    target = VOCAB.index(PUSHED)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(STEPS[-1] + 1):
        if step in STEPS:
            model.save_pretrained(str(out / f"step{step}"))
            tok.save_pretrained(str(out / f"step{step}"))
        ids = torch.randint(5, len(VOCAB), (16, 9), generator=g)
        push = torch.rand(16, 9, generator=g) < 0.5
        ids = torch.where(push, torch.full_like(ids, target), ids)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)


def build_series(tmp: Path) -> None:
    """The trained checkpoints under ``tmp/ckpts`` and the series indexed into ``tmp/db``."""
    tmp.mkdir(parents=True, exist_ok=True)
    train_series(tmp / "ckpts")
    spec = tmp / "spec.toml"
    spec.write_text('[defaults]\nk = 5\npairs = 6\n[[series]]\nname = "tiny"\ndirectory = "ckpts"\n')
    r = zp("index-many", spec, "--db", tmp / "db", "-q")
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def series_db(tmp_path_factory, prebuilt):
    # trained and indexed once per run (xdist workers share it), copied here
    return prebuilt(build_series, tmp_path_factory.mktemp("history") / "series") / "db"


def rows(r) -> list[dict]:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_models_carry_series_and_step(series_db):
    got = rows(zp("sql", "SELECT model, series, step FROM models ORDER BY step", "--db", series_db, "--format", "json"))
    assert got == [{"model": f"tiny-step{s}", "series": "tiny", "step": s} for s in STEPS]


def test_token_history_shows_the_pushed_token_entering(series_db):
    got = rows(zp("history", "tiny", "--token", PUSHED, "--limit", 0, "--db", series_db, "--format", "json"))
    first = {s: sum(1 for r in got if r[f"step {s}"] is not None) for s in STEPS}
    # training pushes Paris into the top lists: many more units hold it at the end than at the start
    assert first[STEPS[-1]] >= 3 * max(first[0], 1), first
    entering = [r for r in got if r["change"].startswith("enters at")]
    assert entering and all(r["step 0"] is None for r in entering)
    # the units that start promoting it later are listed after the ones that always did
    firsts = [min(s for s in STEPS if r[f"step {s}"] is not None) for r in got]
    assert firsts == sorted(firsts)


def test_unit_history_ranks_per_step(series_db):
    got = rows(zp("history", "tiny", "--token", PUSHED, "--limit", 0, "--db", series_db, "--format", "json"))
    unit = next(r for r in got if r["kind"] == "ff_value" and r["change"].startswith("enters at"))
    hist = rows(zp("history", "tiny", unit["unit"], "--max-rank", 5, "--db", series_db, "--format", "json"))
    paris = next(r for r in hist if r["token"] == PUSHED)
    assert paris["step 0"] is None and paris[f"step {STEPS[-1]}"] is not None
    assert paris["change"].startswith("enters at")
    # every step has its full top 5, and a token that entered pushed some other one out
    for s in STEPS:
        assert sorted(r[f"step {s}"] for r in hist if r[f"step {s}"] is not None) == [1, 2, 3, 4, 5]
    assert any("leaves at" in r["change"] for r in hist)
    # a head is read through its OV output tokens
    head = rows(zp("history", "tiny", "L1.H0", "--db", series_db, "--format", "json"))
    assert head and set(head[0]) == {"token_id", "token", *(f"step {s}" for s in STEPS), "change"}


@pytest.mark.parametrize("args,needle", [
    (["nope", "L0.N1"], "no series 'nope'; series in the dataset: tiny"),
    (["tiny", "L9.N1"], "layer 9 is out of range"),
    (["tiny", "X1"], "malformed unit"),
    (["tiny"], "give either UNIT or --token"),
    (["tiny", "L0.N1", "--token", "x"], "give either UNIT or --token"),
    (["tiny", "L0.N1", "--kind", "q"], "--kind q does not apply to L0.N1"),
    (["tiny", "L0.H1", "--kind", "ff_value"], "does not apply to a head"),
    (["tiny", "--token", "zzzz-not-a-token"], "zzzz"),
    (["tiny", "--token", PUSHED, "--kind", "bogus"], "--kind bogus is unknown"),
    (["tiny", "L0.N1", "--max-rank", "0"], "--max-rank 0 is out of range"),
])
def test_history_errors_one_line(series_db, args, needle):
    r = zp("history", *args, "--db", series_db)
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr
    assert needle in r.stderr, r.stderr
