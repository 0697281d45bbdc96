"""Adapters: canonical tensors reproduce the Hugging Face modules' own computation (docs/DESIGN.md §2).

Each tiny random model is saved with ``save_pretrained`` (safetensors), read back through
``load_canonical``, and random inputs are fed through the HF modules themselves: the query /
key / value projections (before rotary), the attention output projection, the MLP, the norms,
and for the two families without rotary or relative bias a whole block via the model's own
forward pass. Every checkpoint tensor must be accounted for exactly once.
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch.testing import assert_close

from indexer.load import load_canonical
from tests.tiny_models import (
    FAMILIES, NORM_SLOTS, c_attention, c_mlp, c_mlp_block, c_norm, c_o, c_qkv, eps_of, hf_access,
    save_tiny, tiny_model,
)

B, S = 2, 7  # batch and sequence length of the random probes

# One case per tiny family (tests/tiny_models.py); the id says what the case exercises.
CASES = [
    pytest.param("gpt2", id="gpt2"),
    pytest.param("bert", id="bert"),
    pytest.param("bert-mlm", id="bert-mlm-tied"),
    pytest.param("bert-mlm-untied", id="bert-mlm-untied"),
    pytest.param("mpnet", id="mpnet"),
    pytest.param("llama", id="llama-mha"),
    pytest.param("llama-gqa", id="gqa"),
    pytest.param("qwen2", id="qwen2-untied-bias"),
    pytest.param("mistral", id="mistral-mqa-untied"),
    pytest.param("neox", id="neox-untied"),
    pytest.param("gemma", id="gemma-1plusw"),
    pytest.param("gemma2", id="gemma2-post-norms"),
    pytest.param("qwen3", id="qwen3-head-qk-norm"),
    pytest.param("phi3", id="phi3-fused"),
    pytest.param("olmo2", id="olmo2-full-qk-norm"),
    pytest.param("gemma3_text", id="gemma3-post-and-qk-norms"),
    pytest.param("gemma3", id="gemma3-multimodal-text-tower"),
    pytest.param("phi", id="phi-parallel-lm-head-bias"),
    pytest.param("phi-qk", id="phi-qk-layernorm-shared-gain-and-bias"),
    pytest.param("opt", id="opt-positions-offset"),
    pytest.param("opt-350m", id="opt-350m-post-ln-projections"),
    pytest.param("gptj", id="gptj-parallel"),
    pytest.param("gpt_bigcode", id="bigcode-mqa"),
    pytest.param("gpt_bigcode-mha", id="bigcode-mha-per-head"),
    pytest.param("bloom", id="bloom-per-head-embed-norm"),
    pytest.param("falcon", id="falcon-mqa-parallel-bias"),
    pytest.param("falcon-new", id="falcon-new-grouped"),
    pytest.param("stablelm", id="stablelm-layernorm-bias"),
    pytest.param("stablelm-qk", id="stablelm-qk-layernorm-per-head-modules"),
    pytest.param("starcoder2", id="starcoder2-plain-mlp"),
    pytest.param("cohere", id="cohere-parallel-biasless-layernorm"),
    pytest.param("cohere-qk", id="cohere-qk-norm-gain-per-head-and-dim"),
    pytest.param("granite", id="granite-assumed-llama-layout"),
    pytest.param("mixtral", id="mixtral-moe"),
    pytest.param("qwen2_moe", id="qwen2-moe-shared-expert-gate"),
    pytest.param("olmoe", id="olmoe-full-qk-norm"),
    pytest.param("qwen3_moe", id="qwen3-moe-head-qk-norm-topk-renorm"),
]
MOE_CASES = [c for c in CASES if c.values[0] in ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe")]
GQA_CASES = [c for c in CASES if c.values[0] in (
    "llama-gqa", "qwen2", "mistral", "gemma", "gemma2", "qwen3", "phi3", "olmo2", "gemma3_text", "gemma3",
    "gpt_bigcode", "falcon", "falcon-new", "stablelm", "stablelm-qk", "starcoder2", "cohere", "cohere-qk", "granite",
    "mixtral", "qwen2_moe", "olmoe", "qwen3_moe")]

_CACHE: dict = {}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (hf_model, loaded, path, accessors); each tiny model is built and loaded once."""

    def get(family):
        if family not in _CACHE:
            path = save_tiny(family, tmp_path_factory.mktemp(family))
            model, _ = tiny_model(family)  # same seed: the same weights as saved
            _CACHE[family] = (model, load_canonical(str(path)), path, hf_access(family))
        return _CACHE[family]

    return get


def hf_positions(pos, n: int) -> torch.Tensor:
    """[n, d_model]: what the HF module ``pos`` adds to the residual stream at positions 0..n-1,
    through the module's own lookup (OPTLearnedPositionalEmbedding offsets the row itself)."""
    from transformers.models.opt.modeling_opt import OPTLearnedPositionalEmbedding

    with torch.no_grad():
        if isinstance(pos, OPTLearnedPositionalEmbedding):
            return pos(torch.ones(1, n, dtype=torch.long))[0]
        return pos(torch.arange(n))


# --- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", CASES)
def test_qkv_states_match_module(built, family):
    model, loaded, _, hf = built(family)
    dims, eps = loaded.canonical.dims, eps_of(model.config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for l, layer in enumerate(hf.layers(model)):
            lw = loaded.canonical.layer(l)
            x = torch.randn(B, S, dims.d_model, generator=g)
            for got, want in zip(c_qkv(lw, dims, x, eps), hf.qkv(layer, x, dims)):
                assert_close(got, want)


@pytest.mark.parametrize("family", GQA_CASES)
def test_gqa_kv_head_mapping(built, family):
    """Query head h uses kv head dims.kv_head(h), the same grouping as HF's repeat_kv."""
    from transformers.models.llama.modeling_llama import repeat_kv

    model, loaded, _, hf = built(family)
    dims = loaded.canonical.dims
    assert dims.n_kv_heads < dims.n_heads
    x = torch.randn(B, S, dims.d_model, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, k, v = hf.qkv(hf.layers(model)[0], x, dims)
        n_rep = dims.n_heads // dims.n_kv_heads
        k_rep, v_rep = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        _, ck, cv = c_qkv(loaded.canonical.layer(0), dims, x, eps_of(model.config))
        for h in range(dims.n_heads):
            assert_close(ck[:, dims.kv_head(h)], k_rep[:, h])
            assert_close(cv[:, dims.kv_head(h)], v_rep[:, h])


@pytest.mark.parametrize("family", CASES)
def test_attention_output_projection_matches_module(built, family):
    model, loaded, _, hf = built(family)
    dims = loaded.canonical.dims
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for l, layer in enumerate(hf.layers(model)):
            lw = loaded.canonical.layer(l)
            z = torch.randn(B, S, dims.n_heads, dims.d_head, generator=g)
            assert_close(c_o(lw, z), hf.o(layer)(z.reshape(B, S, -1)))


@pytest.mark.parametrize("family", CASES)
def test_mlp_matches_module(built, family):
    model, loaded, _, hf = built(family)
    dims, eps = loaded.canonical.dims, eps_of(model.config)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for l, layer in enumerate(hf.layers(model)):
            lw = loaded.canonical.layer(l)
            x = torch.randn(B, S, dims.d_model, generator=g)
            assert_close(c_mlp_block(lw, dims, x, eps, loaded.canonical.conventions), hf.mlp(layer, x))


@pytest.mark.parametrize("family", CASES)
def test_norms_match_module(built, family):
    """Every norm module sits in the canonical slot the accessor table says, and no other slot
    is filled."""
    model, loaded, _, hf = built(family)
    dims, eps = loaded.canonical.dims, eps_of(model.config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for l, layer in enumerate(hf.layers(model)):
            lw = loaded.canonical.layer(l)
            modules = hf.norms(layer)
            filled = {slot for slot in NORM_SLOTS if getattr(lw, slot + "_w") is not None}
            assert filled == set(modules)
            for slot, module in modules.items():
                x = torch.randn(B, S, dims.d_model, generator=g)
                got = c_norm(x, getattr(lw, slot + "_w"), getattr(lw, slot + "_b"), eps, dims.centred_norms)
                assert_close(got, module(x))


@pytest.mark.parametrize("family", CASES)
def test_embeddings_match_modules(built, family):
    model, loaded, _, hf = built(family)
    E, dims = loaded.canonical.embeddings, loaded.canonical.dims
    out = model.get_output_embeddings()
    with torch.no_grad():
        assert_close(E.W_E, hf.W_E(model))
        W_U = hf.W_U(model)
    if W_U is None:  # encoders without an LM head project on W_E
        assert dims.tied
        assert_close(E.W_U, E.W_E.T)
    else:
        assert_close(E.W_U, W_U)
        assert dims.tied == (out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
                             and E.W_U.shape == E.W_E.T.shape and torch.equal(E.W_U, E.W_E.T))
    if family in ("bert-mlm", "bert-mlm-untied"):
        assert_close(E.b_U, model.cls.predictions.bias)
    elif out is not None and getattr(out, "bias", None) is not None:  # Phi, GPT-J: lm_head bias
        assert_close(E.b_U, out.bias)
    else:
        assert E.b_U is None
    pos = hf.pos(model)
    if pos is None:
        assert E.W_pos is None and dims.n_ctx is None
    else:  # row p is what the module adds at position p (OPT's module reads row p + 2 itself)
        assert_close(E.W_pos, hf_positions(pos, dims.n_ctx))
    embed_norm = hf.embed_norm(model)
    assert (embed_norm is None) == (E.ln_embed_w is None)
    if embed_norm is not None:
        x = torch.randn(B, S, dims.d_model, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            assert_close(c_norm(x, E.ln_embed_w, E.ln_embed_b, eps_of(model.config)), embed_norm(x))
    final = hf.final(model)
    assert (final is None) == (E.ln_final_w is None)
    if final is not None:
        x = torch.randn(B, S, dims.d_model, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            assert_close(c_norm(x, E.ln_final_w, E.ln_final_b, eps_of(model.config), dims.centred_norms), final(x))


@pytest.mark.parametrize("family", [c for c in CASES if c.values[0].startswith("gemma")])
def test_gemma_embedding_multiplier_is_recorded_not_applied(built, family):
    """``raw`` keeps W_E as stored; the model's first hidden state is W_E[ids] * sqrt(d_model),
    and that multiplier is what the adapter records."""
    model, loaded, _, _ = built(family)
    c = loaded.canonical
    mult = c.conventions["embedding_multiplier"]
    assert mult == pytest.approx(c.dims.d_model ** 0.5)
    ids = torch.randint(0, c.dims.d_vocab, (B, S), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    assert_close(hs[0], c.embeddings.W_E[ids] * mult)
    if family != "gemma":
        for key in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
            assert c.conventions.get(key) == getattr(model.config.get_text_config(), key)


def test_unlisted_model_type_is_read_with_the_layout_its_names_match(built):
    model, loaded, _, _ = built("granite")
    c = loaded.canonical
    assert c.dims.architecture == loaded.provenance.family == "llama"
    assert c.conventions["assumed_layout"] == "llama" and c.conventions["model_type"] == "granite"
    assert c.conventions["embedding_multiplier"] == 12.0 and c.conventions["logits_scaling"] == 4.0


def test_unlisted_model_type_whose_names_match_no_layout_is_refused(tmp_path):
    """transformers knows the type, but its tensors (GPT-2's here) fit no decoder layout."""
    import json

    from indexer.errors import UnsupportedArchitecture

    path = save_tiny("gpt2", tmp_path / "g")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, model_type="biogpt")))
    with pytest.raises(UnsupportedArchitecture, match="'biogpt'.*match none of the known layouts"):
        load_canonical(str(path))
    (path / "config.json").write_text(json.dumps(dict(config, model_type="no-such-type")))
    with pytest.raises(UnsupportedArchitecture, match="'no-such-type'"):
        load_canonical(str(path))


def test_opt_position_units_name_the_position_they_encode(built, tmp_path):
    """OPT's P0 is what the model adds at position 0 (row 2 of embed_positions), in the
    canonical tensors and in the stored vectors; the two unused rows are gone and recorded."""
    import pyarrow.parquet as pq

    from indexer.build import index_model
    from schemas.format import model_settings, read_manifest
    from schemas.layout import table_files

    model, loaded, path, hf = built("opt")
    pos, E = hf.pos(model), loaded.canonical.embeddings
    want = hf_positions(pos, model.config.max_position_embeddings)
    assert E.W_pos.shape[0] == model.config.max_position_embeddings == pos.weight.shape[0] - 2
    assert torch.equal(E.W_pos[0], want[0]) and not torch.equal(E.W_pos[0], pos.weight[0])
    assert loaded.canonical.conventions["position_offset"] == 2
    index_model(str(path), tmp_path / "db", name="opt", k=3, n_pairs=4)
    manifest = read_manifest(tmp_path / "db")
    rows = [r for f in table_files(manifest, "vectors", ["opt"]) for r in pq.read_table(tmp_path / "db" / f).to_pylist()
            if r["kind"] == "pos" and r["idx"] == 0 and r["side"] == "top"]
    with torch.no_grad():
        scores = want[0].double() @ hf.W_U(model).double()
    top = torch.argsort(scores, descending=True, stable=True)[:3].tolist()
    assert [r["token_id"] for r in sorted(rows, key=lambda r: r["rank"])] == top
    assert_close(torch.tensor([r["score"] for r in sorted(rows, key=lambda r: r["rank"])], dtype=torch.float64),
                 scores[top], rtol=1e-5, atol=1e-5)
    (models_file,) = table_files(manifest, "models", ["opt"])
    row = pq.read_table(tmp_path / "db" / models_file).to_pylist()[0]
    assert model_settings(row)["conventions"]["position_offset"] == 2
    assert row["n_ctx"] == model.config.max_position_embeddings


def test_cohere_logit_scale_is_recorded(built):
    model, loaded, _, _ = built("cohere")
    assert loaded.canonical.conventions == {"logit_scale": model.config.logit_scale}


def test_untied_llama_unembedding_is_lm_head(built):
    model, loaded, _, _ = built("qwen2")
    E = loaded.canonical.embeddings
    assert not loaded.canonical.dims.tied
    assert_close(E.W_U, model.lm_head.weight.T)
    assert not torch.equal(E.W_U, E.W_E.T)
    lw = loaded.canonical.layer(0)
    assert lw.b_Q is not None and lw.b_K is not None and lw.b_V is not None and lw.b_O is None


def test_gpt2_block_forward_matches_model(built):
    """A whole GPT-2 block from canonical tensors equals the model's own hidden state."""
    model, loaded, _, _ = built("gpt2")
    c, eps = loaded.canonical, eps_of(model.config)
    ids = torch.randint(0, c.dims.d_vocab, (B, S), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        x = c.embeddings.W_E[ids] + c.embeddings.W_pos[:S]
        assert_close(x, hs[0])
        lw = c.layer(0)
        x = x + c_attention(lw, c.dims, c_norm(x, lw.ln_attn_w, lw.ln_attn_b, eps), causal=True)
        x = x + c_mlp(lw, c_norm(x, lw.ln_mlp_w, lw.ln_mlp_b, eps))
        assert_close(x, hs[1])


def test_bert_block_forward_matches_model(built):
    """A whole post-LN BERT block from canonical tensors equals the model's hidden state.

    The token-type row is taken from the model: it is deliberately not canonical (see
    docs/ADAPTERS.md), but every BERT input adds segment 0's row.
    """
    model, loaded, _, _ = built("bert")
    c, eps = loaded.canonical, eps_of(model.config)
    E = c.embeddings
    ids = torch.randint(0, c.dims.d_vocab, (B, S), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        tt = model.embeddings.token_type_embeddings.weight[0]
        x = c_norm(E.W_E[ids] + E.W_pos[:S] + tt, E.ln_embed_w, E.ln_embed_b, eps)
        assert_close(x, hs[0])
        lw = c.layer(0)
        x = c_norm(x + c_attention(lw, c.dims, x, causal=False), lw.ln_attn_w, lw.ln_attn_b, eps)
        x = c_norm(x + c_mlp(lw, x), lw.ln_mlp_w, lw.ln_mlp_b, eps)
        assert_close(x, hs[1])


def test_neox_is_parallel_and_fused_per_head(built):
    """The fused query_key_value is [n_heads, 3, d_head], not [Q|K|V]: check one raw row."""
    model, loaded, _, hf = built("neox")
    dims = loaded.canonical.dims
    assert dims.parallel_attn_mlp is True and not dims.tied
    w = hf.layers(model)[0].attention.query_key_value.weight  # [3 d_model, d_model]
    lw = loaded.canonical.layer(0)
    # head 1's key block starts at row 1 * 3 * d_head + d_head
    assert_close(lw.W_K[1][:, 0], w[3 * dims.d_head + dims.d_head])


# --- coverage: every checkpoint tensor exactly once ---------------------------------------------

ALLOWED = {"embedding", "vectors:ff_key", "vectors:ff_gate", "vectors:ff_value", "vectors:q",
           "vectors:k", "vectors:v", "vectors:o", "vectors:bias_attn_out", "vectors:bias_ff_out",
           "vectors:pos", "pairs:qk", "pairs:ov", "vectors:router"}


@pytest.mark.parametrize("family", CASES)
def test_every_checkpoint_tensor_accounted_once(built, family):
    _, loaded, path, _ = built(family)
    keys = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            keys += list(h.keys())
    params = loaded.canonical.parameters
    assert sorted(p.name for p in params) == sorted(keys)
    for p in params:
        assert p.role != "unknown", p
        assert (p.covered_by in ALLOWED) if p.covered_by else bool(p.reason), p
        with safe_open(str(next(path.glob("*.safetensors"))), "pt") as h:
            assert p.shape == tuple(h.get_slice(p.name).get_shape())
        if (".0." in p.name or ".1." in p.name) and p.role != "vision":  # image-encoder layers are not ours
            assert p.layer in (0, 1), p
    roles = {p.role for p in params}
    assert {"W_E", "W_O"} <= roles and ({"W_out"} & roles or {"expert.W_out", "W_router"} <= roles)


def test_all_tiny_families_are_tested():
    assert {c.values[0] for c in CASES} == set(FAMILIES)


# --- inconsistent configs: one BadCheckpoint line at load time, never a traceback -------------

def _with_config(tmp_path, family, **changes):
    """A tiny checkpoint whose config.json is then edited to contradict its tensors."""
    import json

    path = save_tiny(family, tmp_path / family)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("family,changes,match", [
    pytest.param("gpt2", {"n_head": 5}, "d_model 32 is not a multiple of n_heads 5", id="n_head-not-dividing-d_model"),
    pytest.param("neox", {"num_attention_heads": 3}, "multiple of n_heads 3|not divisible", id="neox-heads"),
    pytest.param("bert", {"num_attention_heads": 5}, "multiple of n_heads 5|not divisible", id="bert-heads"),
    pytest.param("llama-gqa", {"num_key_value_heads": 3}, "n_heads 4 is not a multiple of n_kv_heads 3", id="kv-heads-not-dividing"),
    pytest.param("llama-gqa", {"num_key_value_heads": 0}, "n_kv_heads", id="zero-kv-heads"),
    pytest.param("gpt2", {"n_layer": 0}, "n_layers", id="zero-layers"),
    pytest.param("llama", {"num_hidden_layers": -1}, "n_layers", id="negative-layers"),
    pytest.param("llama", {"head_dim": 16}, "not match config.json", id="head_dim-mismatch"),
    pytest.param("llama-gqa", {"num_key_value_heads": 4}, "not match config.json", id="kv-heads-mismatch"),
    pytest.param("gpt2", {"n_embd": 64, "n_head": 8}, "not match config.json", id="d_model-mismatch"),
    pytest.param("gpt2", {"n_inner": 80}, "not match config.json", id="d_ff-mismatch"),
    pytest.param("gpt2", {"n_layer": 3}, "missing tensor", id="more-layers-than-stored"),
])
def test_inconsistent_config_is_one_bad_checkpoint_line(tmp_path, family, changes, match):
    from indexer.errors import BadCheckpoint

    path = _with_config(tmp_path, family, **changes)
    with pytest.raises(BadCheckpoint, match=match) as e:
        load_canonical(str(path))
    assert "\n" not in str(e.value)


def test_inconsistent_config_is_one_error_line_in_the_cli(tmp_path):
    """The issue's case: `n_head` not dividing `d_model` printed a reshape traceback."""
    from click.testing import CliRunner

    from cli import cli

    path = _with_config(tmp_path, "gpt2", n_head=5)
    for command in (["coverage", str(path)], ["index", str(path), "--db", str(tmp_path / "db")]):
        r = CliRunner().invoke(cli, command)
        assert r.exit_code == 1 and "Traceback" not in r.output + r.stderr, r.output
        assert r.stderr.strip().splitlines()[-1].startswith("Error: config.json is inconsistent")
    assert not (tmp_path / "db" / "manifest.json").exists()


def test_docs_and_readme_list_every_supported_family():
    """The registry is the one declaration; the docs are checked against it, not copied from it."""
    from pathlib import Path

    from indexer.adapters import FAMILIES as REGISTRY, supported_list

    root = Path(__file__).resolve().parent.parent
    adapters_md = (root / "docs" / "ADAPTERS.md").read_text()
    readme = (root / "README.md").read_text()
    for f in REGISTRY:
        assert f"`{f.model_type}`" in adapters_md, f"docs/ADAPTERS.md does not list {f.model_type}"
        assert f.label in readme, f"README.md's supported families do not name {f.label}"
        assert f"{f.model_type} ({f.label})" in supported_list()


@pytest.mark.parametrize("family,norm_tensors", [
    pytest.param("phi-qk", {"q_layernorm.weight", "q_layernorm.bias", "k_layernorm.weight", "k_layernorm.bias"},
                 id="phi-qk-layernorm"),
    pytest.param("stablelm-qk", {f"{m}.norms.{h}.weight" for m, n in (("q_layernorm", 4), ("k_layernorm", 2))
                                 for h in range(n)}, id="stablelm-qk-layernorm"),
    pytest.param("cohere-qk", {"q_norm.weight", "k_norm.weight"}, id="cohere-use-qk-norm"),
])
def test_qk_layernorm_options_are_read(built, family, norm_tensors):
    """The q/k LayerNorm options (once refused) are read: a LayerNorm over each head's d_head,
    every gain (and Phi's bias) in the parameters table with its reason, no other slot filled."""
    model, loaded, _, _ = built(family)
    c = loaded.canonical
    assert c.dims.qk_norm == "head" and c.dims.centred_norms
    prefix = "model.layers.0.self_attn."
    listed = {p.name[len(prefix):]: p for p in c.parameters if p.name.startswith(prefix) and "norm" in p.name}
    assert set(listed) == norm_tensors
    assert {p.role for p in listed.values()} == ({"qk_norm", "qk_norm_b"} if family == "phi-qk" else {"qk_norm"})
    assert all(p.covered_by is None and "inside the head" in p.reason for p in listed.values())
    lw = c.layer(0)
    assert lw.q_norm_w.shape == (c.dims.n_heads, c.dims.d_head) and lw.k_norm_w.shape == (c.dims.n_kv_heads, c.dims.d_head)
    assert (lw.q_norm_b is None) == (family != "phi-qk")


@pytest.mark.parametrize("model_type,architectures", [
    pytest.param(["llama"], ["LlamaForCausalLM"], id="list-model-type"),
    pytest.param({"a": 1}, None, id="dict-model-type"),
    pytest.param(None, "LlamaForCausalLM", id="missing-model-type-string-architectures"),
    pytest.param("", [1, None], id="empty-model-type-odd-architectures"),
])
def test_malformed_model_type_is_one_unsupported_line(model_type, architectures):
    from indexer.adapters import adapter_for
    from indexer.errors import UnsupportedArchitecture

    with pytest.raises(UnsupportedArchitecture, match="unsupported architecture") as e:
        adapter_for(model_type, architectures)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ['[]', '"llama"', '3', 'null'])
def test_config_json_that_is_not_an_object_is_one_bad_checkpoint_line(tmp_path, text):
    from indexer.errors import BadCheckpoint

    path = save_tiny("llama", tmp_path / "m")
    (path / "config.json").write_text(text)
    with pytest.raises(BadCheckpoint, match="config.json is not a JSON object"):
        load_canonical(str(path))


def test_opt_projections_that_do_not_fit_are_one_line(tmp_path):
    """OPT-350m's project_in must map the embedding width to d_model; a wrong one is named."""
    from safetensors.torch import load_file, save_file

    from indexer.errors import BadCheckpoint

    path = save_tiny("opt-350m", tmp_path / "o")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.decoder.project_in.weight"] = torch.zeros(32, 12)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BadCheckpoint, match="project_in / project_out do not fit"):
        load_canonical(str(path))


# --- mixtures of experts (issue 12) ----------------------------------------------------------------

@pytest.mark.parametrize("family", MOE_CASES)
def test_each_expert_and_the_router_match_the_hf_modules(built, family):
    """Expert e's canonical MLP equals the HF experts module with every token sent to e; the
    router's columns give the HF gate's logits; the shared expert and its gate (Qwen2-MoE) equal
    HF's shared_expert / shared_expert_gate."""
    from tests.tiny_models import N_EXPERTS, _as_layer, hf_expert, hf_moe, hf_router_logits

    model, loaded, _, hf = built(family)
    dims = loaded.canonical.dims
    assert dims.n_experts == N_EXPERTS and loaded.canonical.conventions["n_experts"] == N_EXPERTS
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for l, layer in enumerate(hf.layers(model)):
            lw = loaded.canonical.layer(l)
            x = torch.randn(B * S, dims.d_model, generator=g)
            assert_close(x @ lw.W_router, hf_router_logits(layer, x))
            for e in range(N_EXPERTS):
                assert_close(c_mlp(_as_layer(lw, lw.experts[e]), x), hf_expert(layer, e, x))
            block = hf_moe(layer)
            if hasattr(block, "shared_expert"):
                assert_close(c_mlp(lw, x), block.shared_expert(x))
                assert_close(x @ lw.W_shared_gate, block.shared_expert_gate(x))
            else:
                assert lw.W_in.shape == (dims.d_model, 0) and lw.W_shared_gate is None


def _fused_checkpoint(tmp_path, family):
    """The same tiny model saved with fused 3-D expert tensors (transformers 5's in-memory layout)."""
    import json

    from safetensors.torch import save_file

    src = save_tiny(family, tmp_path / "per-expert")
    model, _ = tiny_model(family)
    out = tmp_path / "fused"
    out.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(out / "model.safetensors"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / f).exists():
            (out / f).write_bytes((src / f).read_bytes())
    json.loads((out / "config.json").read_text())
    return src, out


@pytest.mark.parametrize("family", [pytest.param("qwen2_moe", id="qwen2_moe"), pytest.param("olmoe", id="olmoe")])
def test_fused_3d_expert_tensors_read_like_per_expert_ones(tmp_path, family):
    src, fused = _fused_checkpoint(tmp_path, family)
    a, b = load_canonical(str(src)).canonical, load_canonical(str(fused)).canonical
    roles = {p.role for p in b.parameters}
    assert "unknown" not in roles and {"expert.W_gate_in", "expert.W_out", "W_router"} <= roles
    for l in range(a.dims.n_layers):
        la, lb = a.layer(l), b.layer(l)
        assert_close(la.W_router, lb.W_router)
        for e in range(a.dims.n_experts):
            for name in ("W_in", "W_gate", "W_out"):
                assert_close(getattr(la.experts[e], name), getattr(lb.experts[e], name))


def test_experts_are_read_one_at_a_time(built):
    """A layer reads no expert tensor until an expert is asked for, and then only that expert's."""
    from indexer.load import SafetensorsSource

    _, _, path, _ = built("mixtral")
    reads = []

    class Counting(SafetensorsSource):  # the real source, recording the names it reads
        def get(self, name):
            reads.append(name)
            return super().get(name)

    source = Counting(sorted(path.glob("*.safetensors")))
    from transformers import AutoConfig

    from indexer.adapters import adapter_for

    config = AutoConfig.from_pretrained(str(path))
    canonical = adapter_for(config.model_type).adapt(source, config, torch.float32)
    reads.clear()
    lw = canonical.layer(1)
    assert not [n for n in reads if ".experts." in n]
    lw.experts[2]
    assert sorted(n for n in reads if ".experts." in n) == sorted(
        f"model.layers.1.block_sparse_moe.experts.2.{w}.weight" for w in ("w1", "w2", "w3"))


def test_moe_with_dense_layers_is_one_unsupported_line(tmp_path):
    from indexer.errors import UnsupportedArchitecture

    path = _with_config(tmp_path, "qwen3_moe", mlp_only_layers=[1])
    with pytest.raises(UnsupportedArchitecture, match="mlp_only_layers"):
        load_canonical(str(path))
