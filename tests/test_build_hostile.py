"""The inputs of `zeropass index` / `zeropass diff` tried as a hostile user would: provenance
recorded right, damaged weights (NaN/Inf) refused by name, absurd options refused or clamped,
broken checkpoints and configs one typed error each, never a traceback."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from indexer.build import BadOption, check_slug, default_slug, index_diff, index_model, parse_layers
from indexer.errors import BadCheckpoint, ModelNotFound, NonFiniteWeights, UnsupportedArchitecture, ZeropassError
from indexer.load import Provenance, load_canonical
from cli import cli
from schemas.layout import read_manifest, table_files
from tests.tiny_models import D_VOCAB, save_tiny, tiny_model

REPO = Path(__file__).resolve().parent.parent
K, N_PAIRS = 4, 8


def models_rows(db: Path) -> dict[str, dict]:
    manifest = read_manifest(db)
    rows = [r for f in table_files(manifest, "models") for r in pq.read_table(db / f).to_pylist()]
    return {r["model"]: r for r in rows}


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def cli_error(*args) -> str:
    """Run the CLI in-process; it must fail with exactly one `Error:` line on stderr."""
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 1, (r.exit_code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def copy_model(src: Path, dst: Path, skip=()) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def edit_config(path: Path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    out = edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg if out is None else out))


def edit_weights(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def rewrite_header(path: Path, edit) -> None:
    """Change the JSON header of model.safetensors, keeping the data bytes as they are."""
    raw = (path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return save_tiny("gpt2", tmp_path_factory.mktemp("gpt2") / "tiny-gpt2")


# --- provenance ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def indexed(gpt2, tmp_path_factory):
    """One dataset with the tiny GPT-2 (from a hub-cache-like snapshot path) and a diff model."""
    root = tmp_path_factory.mktemp("prov")
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = copy_model(gpt2, root / "models--org--tiny" / "snapshots" / rev)
    tuned = save_tiny("gpt2", root / "tuned", seed=3)
    db = root / "db"
    index_model(str(snap), db, name="g", k=K, n_pairs=N_PAIRS, progress=None)
    index_diff(str(gpt2), str(tuned), db, name="d", k=K, n_pairs=N_PAIRS, progress=None)
    return db, snap, rev, gpt2, tuned


def test_models_row_records_provenance(indexed):
    """The bug: build.py read a key load.py never wrote, so hf_architecture was always NULL."""
    db, snap, rev, _, _ = indexed
    row = models_rows(db)["g"]
    assert row["hf_architecture"] == "GPT2LMHeadModel"
    assert row["architecture"] == "gpt2"
    assert row["source"] == str(snap) and row["revision"] == rev
    assert set(json.loads(row["weights_sha256"])) == {"model.safetensors"}


def test_diff_row_records_both_models(indexed):
    db, _, _, base, tuned = indexed
    row = models_rows(db)["d"]
    assert row["variant"] == "diff" and row["hf_architecture"] == "GPT2LMHeadModel"
    assert row["source"] == f"{tuned} - {base}" and row["revision"] is None
    settings = json.loads(row["settings"])
    assert settings["base"]["source"] == str(base)
    assert settings["base"]["hf_architecture"] == "GPT2LMHeadModel"
    assert len(settings["base"]["weights_sha256"]["model.safetensors"]) == 64


def test_provenance_is_typed_and_frozen(gpt2):
    p = load_canonical(str(gpt2)).provenance
    assert isinstance(p, Provenance)
    assert (p.source, p.format, p.family, p.hf_architecture, p.model_type, p.revision, p.base) == (
        str(gpt2), "safetensors", "gpt2", "GPT2LMHeadModel", "gpt2", None, None)
    with pytest.raises(AttributeError):
        p.architecture  # noqa: B018  (the old, misleading key: a typo is now an error, not a None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.source = "x"
    with pytest.raises(TypeError):
        p.weights_sha256["model.safetensors"] = "0"
    assert hash(p) == hash(dataclasses.replace(p)) and p == dataclasses.replace(p)
    d = p.as_dict()
    assert json.loads(json.dumps(d)) == d and d["hf_architecture"] == "GPT2LMHeadModel" and d["base"] is None


def test_diff_of_pickle_checkpoints_goes_through_the_diff_module(gpt2, tmp_path):
    """index_diff and diff_models are one path: both honour allow_pickle."""
    from indexer.diff import diff_models

    model, _ = tiny_model("gpt2", seed=5)
    pick = tmp_path / "pickled"
    model.config.save_pretrained(str(pick))
    torch.save(model.state_dict(), pick / "pytorch_model.bin")
    d = diff_models(str(gpt2), str(pick), allow_pickle=True)
    assert d.provenance.format == "pickle" and d.provenance.base.format == "safetensors"
    assert d.provenance.source == f"{pick} - {gpt2}"
    with pytest.raises(BadCheckpoint, match="allow-pickle"):
        index_diff(str(gpt2), str(pick), tmp_path / "db", progress=None)


def test_diff_of_a_model_with_itself_is_refused(gpt2, tmp_path):
    """Identical weight files: a zero delta would be stored as arbitrary tie-order rankings."""
    from indexer.errors import IncompatibleModels

    same = copy_model(gpt2, tmp_path / "same")
    with pytest.raises(IncompatibleModels, match="byte-identical"):
        index_diff(str(gpt2), str(same), tmp_path / "db", progress=None)
    assert "byte-identical" in cli_error("diff", gpt2, gpt2, "--db", tmp_path / "db")


# --- NaN / Inf weights ---------------------------------------------------------------------------

PLANTS = [
    pytest.param("transformer.h.1.mlp.c_proj.weight", "raw", id="ff-weight"),
    pytest.param("transformer.wte.weight", "raw", id="embedding"),
    pytest.param("transformer.h.0.ln_2.weight", "folded", id="norm-gain-folded"),
    pytest.param("transformer.h.1.attn.c_attn.weight", "raw", id="attention"),
]


@pytest.mark.parametrize("value,word", [(float("nan"), "NaN"), (float("inf"), "Inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("tensor,variant", PLANTS)
def test_non_finite_weights_are_refused_by_name(gpt2, tmp_path, tensor, variant, value, word):
    bad = copy_model(gpt2, tmp_path / "bad")

    def plant(state):
        flat = state[tensor].view(-1)
        flat[[1, 7, 9]] = value
        flat[4] = -value

    edit_weights(bad, plant)
    db = tmp_path / "db"
    with pytest.raises(NonFiniteWeights) as e:
        index_model(str(bad), db, name="bad", k=K, n_pairs=N_PAIRS, variant=variant, progress=None)
    msg = one_line(e)
    assert tensor in msg and f"4 {word} values" in msg, msg
    assert isinstance(e.value, BadCheckpoint)
    assert not (read_manifest(db) or {"models": {}})["models"]


def test_non_finite_pickle_weights_are_refused(tmp_path):
    model, _ = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, 3] = float("nan")
    model.config.save_pretrained(str(tmp_path))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(NonFiniteWeights, match=r"transformer\.h\.0\.mlp\.c_fc\.weight.* 1 NaN value"):
        index_model(str(tmp_path), tmp_path / "db", allow_pickle=True, progress=None)


def test_nan_weights_cli_quiet_prints_one_error_line_and_nothing_on_stdout(gpt2, tmp_path):
    """Before: exit 0, all scores NaN, and MKL's `Intel oneMKL ERROR ... DGEBAL` on stdout despite -q."""
    bad = copy_model(gpt2, tmp_path / "bad")
    edit_weights(bad, lambda s: s["transformer.h.1.attn.c_attn.weight"].view(-1)[:12].fill_(float("nan")))
    r = subprocess.run([sys.executable, "-m", "cli", "index", str(bad), "--db", str(tmp_path / "db"), "-q",
                        "--k", str(K), "--pairs", str(N_PAIRS)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: "), r.stderr
    assert "transformer.h.1.attn.c_attn.weight" in r.stderr and "12 NaN values" in r.stderr


def test_diff_that_overflows_is_refused(gpt2, tmp_path):
    """Two finite checkpoints whose difference is not finite in float32."""
    a = copy_model(gpt2, tmp_path / "a")
    b = copy_model(gpt2, tmp_path / "b")
    edit_weights(a, lambda s: s["transformer.h.0.mlp.c_fc.weight"].view(-1)[:2].fill_(-3e38))
    edit_weights(b, lambda s: s["transformer.h.0.mlp.c_fc.weight"].view(-1)[:2].fill_(3e38))
    with pytest.raises(NonFiniteWeights, match="layer 0 W_in"):
        index_diff(str(a), str(b), tmp_path / "db", k=K, n_pairs=N_PAIRS, progress=None)


def test_scores_that_overflow_float32_are_refused(gpt2, tmp_path):
    """Finite weights so large that their projections are not finite in float32."""
    big = copy_model(gpt2, tmp_path / "big")
    edit_weights(big, lambda s: s["transformer.h.0.mlp.c_proj.weight"][:, :].fill_(3e38))
    with pytest.raises(NonFiniteWeights, match="float32"):
        index_model(str(big), tmp_path / "db", k=K, n_pairs=N_PAIRS, progress=None)


# --- options -------------------------------------------------------------------------------------

def test_k_and_pairs_above_the_vocabulary_are_clamped_and_recorded(gpt2, tmp_path):
    db = tmp_path / "db"
    said = []
    index_model(str(gpt2), db, name="g", k=1000, n_pairs=5000, layers="0", progress=said.append)
    row = models_rows(db)["g"]
    assert (row["k"], row["n_pairs"]) == (D_VOCAB, D_VOCAB * D_VOCAB)
    settings = json.loads(row["settings"])
    assert (settings["k"], settings["k_requested"]) == (D_VOCAB, 1000)
    assert (settings["n_pairs"], settings["n_pairs_requested"]) == (D_VOCAB * D_VOCAB, 5000)
    notices = [m for m in said if "clamped" in m]
    assert len(notices) == 1 and "--k 1000" in notices[0] and "--pairs 5000" in notices[0], said
    t = pq.read_table(db / table_files(read_manifest(db), "vectors", ["g"])[0]).to_pylist()
    unit = [r for r in t if r["unit"] == "L0.N0" and r["kind"] == "ff_key"]
    top = sorted(r["rank"] for r in unit if r["side"] == "top")
    assert top == list(range(1, D_VOCAB + 1))  # the whole vocabulary, once per side


def test_numpy_integers_are_whole_numbers(gpt2, tmp_path):
    import numpy as np

    index_model(str(gpt2), tmp_path / "db", name="g", k=np.int64(3), n_pairs=np.int32(2), layers="0", progress=None)
    assert (models_rows(tmp_path / "db")["g"]["k"], models_rows(tmp_path / "db")["g"]["n_pairs"]) == (3, 2)
    with pytest.raises(BadOption, match="--k 2.5"):
        index_model(str(gpt2), tmp_path / "db", k=2.5, progress=None)


@pytest.mark.parametrize("option,value,fragment", [
    ("k", 0, "--k 0"), ("k", -1, "--k -1"), ("k", 2**31, "--k 2147483648"), ("k", 10**12, "--k 1000000000000"),
    ("n_pairs", -1, "--pairs -1"), ("n_pairs", 2**31, "--pairs 2147483648"), ("n_pairs", 10**12, "--pairs 1000000000000"),
])
def test_out_of_range_k_and_pairs_are_refused_before_loading(tmp_path, option, value, fragment):
    with pytest.raises(BadOption) as e:  # the model does not exist: the option is checked first
        index_model(str(tmp_path / "nothing-here"), tmp_path / "db", **{option: value}, progress=None)
    assert fragment in one_line(e)


@pytest.mark.parametrize("args,fragment", [
    (["--k", "1000000000000"], "--k"), (["--k", "0"], "--k"), (["--pairs", "99999999999"], "--pairs"),
    (["--layers", "99999999999999999999"], "--layers"), (["--layers", "-1"], "--layers"),
    (["--layers", "3-1"], "reversed"), (["--layers", ""], "--layers"), (["--name", ".."], "--name"),
    (["--name", "a/b"], "--name"), (["--name", "modèle"], "--name"), (["--name", "x" * 65], "--name"), (["--name", ""], "--name"),
    (["--device", "tpu"], "--device"),
])
def test_bad_index_options_are_one_cli_line(gpt2, tmp_path, args, fragment):
    assert fragment in cli_error("index", gpt2, "--db", tmp_path / "db", "-q", *args)
    assert not (tmp_path / "db").exists() or read_manifest(tmp_path / "db") is None


def test_bad_diff_options_are_one_cli_line(gpt2, tmp_path):
    assert "--k" in cli_error("diff", gpt2, gpt2, "--db", tmp_path / "db", "-q", "--k", 2**40)
    assert "--layers" in cli_error("diff", gpt2, gpt2, "--db", tmp_path / "db", "-q", "--layers", "2-0")


@pytest.mark.parametrize("spec,fragment", [
    ("99999999999999999999", "outside 0-3"), ("-1", "not a layer list"), ("3-1", "reversed"), ("", "empty"),
    (" , ", "not a layer list"), ("0-", "not a layer list"), ("١", "not a layer list"),  # Arabic-Indic one
])
def test_parse_layers_edge_cases(spec, fragment):
    with pytest.raises(BadOption, match="--layers") as e:
        parse_layers(spec, 4)
    assert fragment in one_line(e)


def test_layers_syntax_is_checked_before_loading(tmp_path):
    with pytest.raises(BadOption, match="reversed"):
        index_model(str(tmp_path / "nothing-here"), tmp_path / "db", layers="5-2", progress=None)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", "modèle", "x" * 65, "", "-x", " x"])
def test_bad_names_are_refused(name):
    with pytest.raises(BadOption, match="--name"):
        check_slug(name)


def test_default_names_are_always_valid():
    assert check_slug(default_slug("/m/" + "Very-Long-Name" * 10)) == default_slug("/m/" + "Very-Long-Name" * 10)
    assert len(default_slug("/m/" + "x" * 200)) == 64
    assert default_slug("/m/_private.model") == "private-model"
    assert default_slug("/m/模型") == "model"
    assert check_slug(default_slug("/m/" + "y" * 80, "-diff")).endswith("y-diff")  # index_diff's default


# --- broken checkpoints --------------------------------------------------------------------------

def _config_not_an_object(p):
    edit_config(p, lambda c: [1, 2])


def _config_a_string(p):
    edit_config(p, lambda c: "gpt2")


def _no_model_type(p):
    edit_config(p, lambda c: c.pop("model_type") and None)


def _model_type_not_a_string(p):
    edit_config(p, lambda c: c.update(model_type=["gpt2"]))


def _shard_index_not_a_map(p):
    (p / "model.safetensors.index.json").write_text('{"weight_map": 3}')


def _shard_outside_the_directory(p):
    (p / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"wte.weight": "../tiny-gpt2/model.safetensors"}}))


def _header_lies_about_a_shape(p):
    # The same number of bytes, another shape: safetensors accepts it; the shape is wrong.
    rewrite_header(p, lambda h: h["transformer.h.0.mlp.c_fc.weight"].update(shape=[64, 32]))


def _header_shape_beyond_the_data(p):
    rewrite_header(p, lambda h: h["transformer.h.0.mlp.c_fc.weight"].update(shape=[32, 65]))


def _truncated(p):
    raw = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(raw[: len(raw) // 2])


def _config_dims_disagree(p):
    edit_config(p, lambda c: c.update(n_embd=64))


def _config_has_fewer_layers(p):
    edit_config(p, lambda c: c.update(n_layer=0))  # would index the embeddings only, silently


def _config_has_negative_layers(p):
    edit_config(p, lambda c: c.update(n_layer=-1))


def _config_has_absurd_layers(p):
    edit_config(p, lambda c: c.update(n_layer=10**12))  # was a MemoryError


def _empty_embedding(p):
    edit_weights(p, lambda s: s.update({"transformer.wte.weight": torch.zeros(0, 32)}))


def _empty_directory(p):
    for f in p.iterdir():
        f.unlink()


def _weights_without_config(p):
    (p / "config.json").unlink()


def _leftover_shard_with_the_same_tensors(p):
    edit_weights(p, lambda s: None)
    shutil.copy(p / "model.safetensors", p / "model-00001-of-00002.safetensors")


def _garbage_tokenizer(p):
    (p / "tokenizer.json").write_text("{not json")


def _weights_are_a_fifo(p):
    (p / "model.safetensors").unlink()
    os.mkfifo(p / "model.safetensors")  # opening it would block forever


def _tokenizer_is_a_fifo(p):
    (p / "tokenizer.json").unlink()
    os.mkfifo(p / "tokenizer.json")


def _config_is_a_directory(p):
    (p / "config.json").unlink()
    (p / "config.json").mkdir()


def _weights_are_a_dangling_link(p):
    (p / "model.safetensors").unlink()
    (p / "model.safetensors").symlink_to(p / "gone.safetensors")


BROKEN = [
    pytest.param(_config_not_an_object, BadCheckpoint, "not a JSON object", id="config-list"),
    pytest.param(_config_a_string, BadCheckpoint, "not a JSON object", id="config-string"),
    pytest.param(_no_model_type, BadCheckpoint, "no model_type", id="no-model-type"),
    pytest.param(_model_type_not_a_string, BadCheckpoint, "model_type", id="model-type-list"),
    pytest.param(_shard_index_not_a_map, BadCheckpoint, "shard index", id="shard-index-int"),
    pytest.param(_shard_outside_the_directory, BadCheckpoint, "outside", id="shard-path-escape"),
    pytest.param(_header_lies_about_a_shape, BadCheckpoint, "transformer.h.0.mlp.c_fc.weight", id="header-shape-lie"),
    pytest.param(_header_shape_beyond_the_data, BadCheckpoint, "model.safetensors", id="header-shape-too-big"),
    pytest.param(_truncated, BadCheckpoint, "model.safetensors", id="truncated"),
    pytest.param(_config_dims_disagree, BadCheckpoint, "config.json", id="config-dims-disagree"),
    pytest.param(_empty_embedding, BadCheckpoint, "d_vocab = 0", id="empty-embedding"),
    pytest.param(_config_has_fewer_layers, BadCheckpoint, "n_layers = 0", id="config-fewer-layers"),
    pytest.param(_config_has_negative_layers, BadCheckpoint, "n_layers = -1", id="config-negative-layers"),
    pytest.param(_config_has_absurd_layers, BadCheckpoint, "missing tensor 'transformer.h.2.", id="config-absurd-layers"),
    pytest.param(lambda p: edit_config(p, lambda c: c.update(n_head=0)), ZeropassError, "", id="config-zero-heads"),
    pytest.param(_empty_directory, BadCheckpoint, "config.json", id="empty-dir"),
    pytest.param(_weights_without_config, BadCheckpoint, "config.json", id="no-config"),
    pytest.param(_leftover_shard_with_the_same_tensors, BadCheckpoint, "is in both", id="duplicate-tensors"),
    pytest.param(_garbage_tokenizer, BadCheckpoint, "tokenizer", id="garbage-tokenizer"),
    pytest.param(_weights_are_a_fifo, BadCheckpoint, "not a regular file", id="weights-fifo"),
    pytest.param(_tokenizer_is_a_fifo, BadCheckpoint, "not a regular file", id="tokenizer-fifo"),
    pytest.param(_config_is_a_directory, BadCheckpoint, "a directory", id="config-dir"),
    pytest.param(_weights_are_a_dangling_link, BadCheckpoint, "dangling link", id="weights-dangling-link"),
]


@pytest.mark.parametrize("breakit,error,fragment", BROKEN)
def test_broken_checkpoint_is_one_typed_error(gpt2, tmp_path, breakit, error, fragment):
    bad = copy_model(gpt2, tmp_path / "bad")
    breakit(bad)
    db = tmp_path / "db"
    with pytest.raises(error) as e:
        index_model(str(bad), db, name="bad", k=K, n_pairs=N_PAIRS, progress=None)
    assert fragment in one_line(e)
    assert not (read_manifest(db) or {"models": {}})["models"]


def test_broken_checkpoint_through_the_cli(gpt2, tmp_path):
    bad = copy_model(gpt2, tmp_path / "bad")
    _header_lies_about_a_shape(bad)
    assert "c_fc" in cli_error("index", bad, "--db", tmp_path / "db", "-q")


def test_quiet_means_one_line_even_when_transformers_would_warn(gpt2, tmp_path):
    """A config with vocab_size 0 made transformers print three warnings before our error."""
    bad = copy_model(gpt2, tmp_path / "bad")
    _empty_embedding(bad)
    edit_config(bad, lambda c: c.update(vocab_size=0))
    r = subprocess.run([sys.executable, "-m", "cli", "index", str(bad), "--db", str(tmp_path / "db"), "-q"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: ") and "d_vocab = 0" in r.stderr, r.stderr


@pytest.mark.parametrize("content", [b"", b"GGUF", b"GGUF\x03\x00\x00\x00" + b"\xff" * 64, b"\x00" * 100],
                         ids=["empty", "magic-only", "bad-counts", "zeros"])
def test_garbage_gguf_is_one_typed_error(tmp_path, content):
    pytest.importorskip("gguf")
    f = tmp_path / "model.gguf"
    f.write_bytes(content)
    with pytest.raises(ZeropassError) as e:
        index_model(str(f), tmp_path / "db", progress=None)
    assert "model.gguf" in one_line(e)


@pytest.mark.parametrize("what", ["config.json", "tokenizer.json", "/dev/null"])
def test_model_that_is_a_plain_file(gpt2, what):
    with pytest.raises(BadCheckpoint) as e:
        index_model(what if what.startswith("/") else str(gpt2 / what), "unused-db", progress=None)
    assert "MODEL must be a model directory" in one_line(e)


def test_empty_model_argument_is_not_the_current_directory(tmp_path):
    with pytest.raises(ModelNotFound, match="MODEL is empty"):
        index_model("", tmp_path / "db", progress=None)
    assert "MODEL is empty" in cli_error("index", "", "--db", tmp_path / "db")


def test_unknown_model_type_still_names_the_supported_ones(gpt2, tmp_path):
    bad = copy_model(gpt2, tmp_path / "bad")
    edit_config(bad, lambda c: c.update(model_type="t5"))
    with pytest.raises(UnsupportedArchitecture, match="'t5'"):
        load_canonical(str(bad))


@pytest.mark.slow
def test_quiet_gguf_index_prints_nothing(tmp_path):
    """transformers draws its own tqdm bar while dequantizing a GGUF file; -q hides it too."""
    from indexer import packaged

    gguf = packaged.smollm2_gguf_path()
    r = subprocess.run([sys.executable, "-m", "cli", "index", str(gguf), "--db", str(tmp_path / "db"), "-q",
                        "--layers", "0", "--k", "1", "--pairs", "0"], capture_output=True, text=True, cwd=REPO)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    row = models_rows(tmp_path / "db")["smollm2-135m-instruct-q4_1"]
    assert (row["hf_architecture"], row["architecture"]) == ("LlamaForCausalLM", "llama")


def test_index_options_are_checked_once_when_made_and_frozen(tmp_path):
    import dataclasses

    from indexer.build import IndexOptions

    with pytest.raises(BadOption, match="--k 0"):
        IndexOptions(k=0)
    options = IndexOptions(k=3, layers="0-1", progress=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.k = 0
    with pytest.raises(BadOption, match="--pairs -1"):  # a keyword replaces the field, and is checked too
        index_model(str(tmp_path / "nothing-here"), tmp_path / "db", options, n_pairs=-1)
    with pytest.raises(TypeError, match="colour"):
        index_model(str(tmp_path / "nothing-here"), tmp_path / "db", options, colour="red")
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("field,value", [("variant", "folded"), ("vocab_filter", "alpha"), ("series", "s"), ("step", 1)])
def test_a_diff_refuses_options_it_does_not_apply_before_loading(tmp_path, field, value):
    with pytest.raises(BadOption, match=f"a diff takes no {field}="):
        index_diff(str(tmp_path / "a"), str(tmp_path / "b"), tmp_path / "db", progress=None, **{field: value})
    assert not (tmp_path / "db").exists()
