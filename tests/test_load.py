"""Loading: local directories (plain, sharded, prefixed, pickle), laziness, provenance and the
typed one-line errors for every bad input."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from torch.testing import assert_close

from indexer.coverage import coverage, coverage_rows, format_coverage
from indexer.errors import BadCheckpoint, MissingDependency, ModelNotFound, UnsupportedArchitecture
from indexer.load import Loaded, SafetensorsSource, load_canonical
from tests.tiny_models import save_tiny, tiny_model


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny("gpt2", tmp_path_factory.mktemp("gpt2"))


def one_line_error(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


# --- what loads --------------------------------------------------------------------------------

def test_loaded_has_tokenizer_config_and_provenance(gpt2_dir):
    loaded = load_canonical(str(gpt2_dir))
    assert isinstance(loaded, Loaded)
    assert loaded.tokenizer("the cat")["input_ids"] == [5, 13]
    assert loaded.config.model_type == "gpt2"
    p = loaded.provenance
    assert p.source == str(gpt2_dir) and p.format == "safetensors" and p.path == str(gpt2_dir.resolve())
    assert p.hf_architecture == "GPT2LMHeadModel" and p.family == "gpt2" and p.model_type == "gpt2"
    assert p.revision is None and p.base is None
    assert set(p.weights_sha256) == {"model.safetensors"}
    assert len(p.weights_sha256["model.safetensors"]) == 64


def test_layers_are_read_lazily(gpt2_dir, monkeypatch):
    """Canonicalising layer l reads only layer l's tensors."""
    reads = []
    real_get = SafetensorsSource.get
    monkeypatch.setattr(SafetensorsSource, "get", lambda self, n: reads.append(n) or real_get(self, n))
    loaded = load_canonical(str(gpt2_dir))
    assert not any(".h." in n for n in reads)  # only embeddings and the final norm up front
    reads.clear()
    loaded.canonical.layer(1)
    assert reads and all(n.startswith("transformer.h.1.") for n in reads)
    with pytest.raises(IndexError, match="out of range"):
        loaded.canonical.layer(2)


def test_dtype_is_honoured(gpt2_dir):
    loaded = load_canonical(str(gpt2_dir), dtype=torch.float64)
    assert loaded.canonical.embeddings.W_E.dtype == torch.float64
    assert loaded.canonical.layer(0).W_Q.dtype == torch.float64


def test_sharded_checkpoint_equals_single_file(gpt2_dir, tmp_path):
    sharded = save_tiny("gpt2", tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = load_canonical(str(gpt2_dir)), load_canonical(str(sharded))
    assert len(b.provenance.weights_sha256) > 1
    assert_close(a.canonical.embeddings.W_E, b.canonical.embeddings.W_E)
    for l in range(2):
        la, lb = a.canonical.layer(l), b.canonical.layer(l)
        for name in ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "b_Q"):
            assert_close(getattr(la, name), getattr(lb, name))
    assert sorted(p.name for p in a.canonical.parameters) == sorted(p.name for p in b.canonical.parameters)


@pytest.mark.parametrize("family,attr", [pytest.param("gpt2", "transformer", id="gpt2-no-prefix"),
                                         pytest.param("llama", "model", id="llama-no-prefix")])
def test_base_model_without_prefix(family, attr, tmp_path):
    """A bare base model (GPT2Model, LlamaModel) saves names without ``transformer.``/``model.``."""
    model, _ = tiny_model(family)
    getattr(model, attr).save_pretrained(str(tmp_path))
    loaded = load_canonical(str(tmp_path))
    assert loaded.tokenizer is None
    assert_close(loaded.canonical.embeddings.W_E, model.get_input_embeddings().weight)
    lw = loaded.canonical.layer(1)
    ref = load_canonical(str(save_tiny(family, tmp_path / "full"))).canonical.layer(1)
    assert_close(lw.W_Q, ref.W_Q)
    assert all(p.role != "unknown" for p in loaded.canonical.parameters)


def test_pickle_only_is_refused_then_allowed(tmp_path):
    model, _ = tiny_model("gpt2")
    model.config.save_pretrained(str(tmp_path))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(BadCheckpoint) as e:
        load_canonical(str(tmp_path))
    msg = one_line_error(e)
    assert "arbitrary code" in msg and "--allow-pickle" in msg and "pytorch_model.bin" in msg
    loaded = load_canonical(str(tmp_path), allow_pickle=True)
    assert loaded.provenance.format == "pickle"
    assert_close(loaded.canonical.embeddings.W_E, model.transformer.wte.weight)
    assert_close(loaded.canonical.layer(0).W_out, model.transformer.h[0].mlp.c_proj.weight)


def test_coverage_rows_and_format(gpt2_dir):
    rows = coverage_rows(str(gpt2_dir))
    assert rows[0].keys() == {"name", "shape", "role", "covered_by", "reason", "layer"}
    by_name = {r["name"]: r for r in rows}
    assert by_name["transformer.h.0.mlp.c_proj.weight"]["covered_by"] == "vectors:ff_value"
    assert by_name["transformer.h.0.mlp.c_proj.weight"]["layer"] == 0
    assert by_name["transformer.ln_f.weight"]["covered_by"] is None
    assert "folded" in by_name["transformer.ln_f.weight"]["reason"]
    json.dumps(rows)  # plain data, printable as --format json
    text = format_coverage(rows)
    assert "transformer.wte.weight" in text and "tensors projected" in text.splitlines()[-1]
    assert [p.name for p in coverage(load_canonical(str(gpt2_dir)))] == [r["name"] for r in rows]


# --- bad input: one typed error, one line, naming the value and the fix ------------------------

def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFound) as e:
        load_canonical(str(tmp_path / "nope"))
    assert "nope" in one_line_error(e)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelNotFound):
        load_canonical(str(tmp_path / "model.gguf"))


def test_hub_id_unreachable(monkeypatch):
    import huggingface_hub

    def offline(**kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelNotFound) as e:
        load_canonical("some-org/some-model")
    msg = one_line_error(e)
    assert "some-org/some-model" in msg and "hub" in msg


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(BadCheckpoint) as e:
        load_canonical(str(tmp_path))
    assert "config.json" in one_line_error(e)


def test_config_without_weights(gpt2_dir, tmp_path):
    (tmp_path / "config.json").write_text((gpt2_dir / "config.json").read_text())
    with pytest.raises(BadCheckpoint) as e:
        load_canonical(str(tmp_path))
    assert "no weights" in one_line_error(e)


def test_corrupt_safetensors(gpt2_dir, tmp_path):
    (tmp_path / "config.json").write_text((gpt2_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x13\x37 not a safetensors file " * 50)
    with pytest.raises(BadCheckpoint) as e:
        load_canonical(str(tmp_path))
    msg = one_line_error(e)
    assert "model.safetensors" in msg and "re-download" in msg


def test_file_that_is_not_a_model(gpt2_dir):
    with pytest.raises(BadCheckpoint) as e:
        load_canonical(str(gpt2_dir / "config.json"))
    assert ".gguf" in one_line_error(e)


def test_unknown_architecture(gpt2_dir, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    (tmp_path / "model.safetensors").write_bytes((gpt2_dir / "model.safetensors").read_bytes())
    with pytest.raises(UnsupportedArchitecture) as e:
        load_canonical(str(tmp_path))
    msg = one_line_error(e)
    assert "'t5'" in msg and "T5ForConditionalGeneration" in msg
    for supported in ("gpt2", "bert", "mpnet", "llama", "mistral", "qwen2", "gpt_neox"):
        assert supported in msg


def test_gguf_without_gguf_package(tmp_path, monkeypatch):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(MissingDependency) as e:
        load_canonical(str(f))
    msg = one_line_error(e)
    assert "pip install gguf" in msg and "model.gguf" in msg


@pytest.mark.parametrize("module", ["torch", "transformers", "safetensors"])
def test_index_dependencies_missing(gpt2_dir, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependency) as e:
        load_canonical(str(gpt2_dir))
    msg = one_line_error(e)
    assert "pip install 'zeropass[index]'" in msg and module in msg


def test_errors_are_zeropass_errors():
    from indexer.errors import ZeropassError

    for cls in (BadCheckpoint, MissingDependency, ModelNotFound, UnsupportedArchitecture):
        assert issubclass(cls, ZeropassError)


def test_gguf_is_parsed_once_per_load_and_gguf_is_restored(tmp_path):
    # transformers parses a GGUF file in each from_pretrained (4 per load) and builds gguf's
    # tensor-name map per submodule: within a load, one of each serves every call.
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from indexer.load import _one_gguf_parse

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    import gguf.gguf_reader as gguf_reader
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    def header(reader):
        return {k: [hf_gguf._gguf_parse_value(f.parts[i], f.types) for i in f.data] for k, f in reader.fields.items()}

    real = (gguf.GGUFReader, gguf.get_tensor_name_map, gguf_reader.np, hf_gguf._gguf_parse_value)
    plain = gguf.GGUFReader(path)
    want, want_tensor = header(plain), np.array(plain.get_tensor(0).data)
    with _one_gguf_parse():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first
        assert first.get_tensor(0).name == "token_embd.weight"
        # Plain array views of the map and values converted once: the same header and tensor.
        assert header(first) == want == header(first)
        assert np.array_equal(first.get_tensor(0).data, want_tensor)
        assert type(first.data) is np.ndarray and gguf_reader.np is np
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
        assert gguf.get_tensor_name_map(arch, 3) is not gguf.get_tensor_name_map(arch, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map, gguf_reader.np, hf_gguf._gguf_parse_value) == real
    assert gguf.GGUFReader(path) is not first
