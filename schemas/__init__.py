"""The single declaration of every zeropass table (docs/DESIGN.md §4).

Everything else is generated from ``TABLES``: Parquet schemas for the writer, DuckDB views
for the reader, and docs/TABLES.md. A golden test (tests/test_schemas.py) pins the rendered
declaration so that any change shows up as a reviewed diff.

Imports pyarrow only.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from .kinds import FF_KINDS, HEAD_DIM_KINDS, KINDS, READ_KINDS, WRITE_KINDS

# Bump when a table changes in a way old datasets cannot be read with; datasets record it in
# their manifest and the query layer refuses a mismatch with a "rebuild" message.
SCHEMA_VERSION = 4  # 2: vectors_by_token; 3: vectors.expert (mixture of experts), models.series, models.step; 4: dictionaries


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    doc: str
    nullable: bool = False


@dataclass(frozen=True)
class Table:
    name: str
    doc: str
    columns: tuple[Column, ...]
    # Directory levels under DIR/<table>/ (Hive style, e.g. model=gpt2/layer=3); values are
    # also stored inside the files, so a Parquet file read alone is self-describing.
    partition_by: tuple[str, ...]
    # A table computed from another table's files (``schemas.layout.view_sql``) rather than
    # written per model; `zeropass compact` stores it (sorted) for the compacted models.
    derived_from: str | None = None

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(
            [pa.field(c.name, c.type, nullable=c.nullable, metadata={"doc": c.doc}) for c in self.columns],
            metadata={"table": self.name, "schema_version": str(SCHEMA_VERSION)},
        )

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


def _c(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> Column:
    return Column(name, type_, doc, nullable)


_MODEL = _c("model", pa.string(), "Short slug chosen at index time (`--name`), e.g. `minilm`.")
_LAYER = _c("layer", pa.int16(), "Layer index, 0-based.")
_HEAD = _c("head", pa.int16(), "Query-head index within the layer, 0-based.")
_SIDE = _c("side", pa.string(), "`top` (largest scores) or `bottom` (smallest, most negative first).")
_RANK = _c("rank", pa.int32(), "1-based rank within (unit, side): 1 is the most extreme.")

TABLES: dict[str, Table] = {}


def _table(name: str, doc: str, partition_by: tuple[str, ...], *columns: Column, derived_from: str | None = None) -> Table:
    t = Table(name, doc, tuple(columns), partition_by, derived_from)
    TABLES[name] = t
    return t


MODELS = _table(
    "models",
    "One row per indexed model: provenance, dimensions and the settings it was indexed with.",
    ("model",),
    _MODEL,
    _c("source", pa.string(), "What was passed to `zeropass index`: a local path, GGUF file or hub id."),
    _c("revision", pa.string(), "Hub commit of the checkpoint, when known.", nullable=True),
    _c("architecture", pa.string(), "Adapter family the checkpoint was read with (its layout, e.g. gpt2, llama, gemma2); docs/ADAPTERS.md lists them with their model_types."),
    _c("hf_architecture", pa.string(), "The Hugging Face class named in config.json.", nullable=True),
    _c("n_layers", pa.int32(), "Number of transformer blocks."),
    _c("n_heads", pa.int32(), "Query heads per layer."),
    _c("n_kv_heads", pa.int32(), "Key/value heads per layer (fewer than n_heads under grouped-query attention)."),
    _c("d_model", pa.int32(), "Width of the residual stream."),
    _c("d_head", pa.int32(), "Width of one attention head."),
    _c("d_ff", pa.int32(), "Number of FF neurons per layer."),
    _c("d_vocab", pa.int32(), "Vocabulary size (rows of W_E)."),
    _c("n_ctx", pa.int32(), "Learned positions (rows of W_pos); null without learned positions.", nullable=True),
    _c("tied", pa.bool_(), "True when W_U is W_E transposed (also for encoders without an LM head)."),
    _c("vocab_id", pa.string(), "Content hash of the vocabulary; joins `tokens`. Models sharing it share token ids."),
    _c("variant", pa.string(), "`raw` (the paper), `folded` (norm gains folded in) or `diff` (a fine-tuning delta)."),
    _c("series", pa.string(), "Training-checkpoint series the model belongs to (`zeropass index-many`, `[[series]]`); null otherwise.", nullable=True),
    _c("step", pa.int64(), "Training step of the checkpoint within its series; null otherwise.", nullable=True),
    _c("k", pa.int32(), "Tokens kept per side for each vector (`--k`)."),
    _c("n_pairs", pa.int32(), "Entries kept per side for each head circuit (`--pairs`)."),
    _c("settings", pa.string(), "All index settings as JSON (layers, device, variant, base model for diffs, ...)."),
    _c("weights_sha256", pa.string(), "JSON object: weight file name -> sha256 of its bytes."),
    _c("zeropass_version", pa.string(), "Version of zeropass that wrote the model."),
    _c("schema_version", pa.int32(), "Schema version of the tables (schemas.SCHEMA_VERSION)."),
    _c("created_at", pa.timestamp("s", tz="UTC"), "When indexing finished."),
)

TOKENS = _table(
    "tokens",
    "One row per vocabulary entry, shared by every model whose vocabulary has the same content.",
    ("vocab_id",),
    _c("vocab_id", pa.string(), "Content hash of the vocabulary (see `models.vocab_id`)."),
    _c("token_id", pa.int32(), "Token id."),
    _c("piece", pa.string(), "Raw vocabulary entry, e.g. `Ġthe` (byte-level BPE) or `##ing` (WordPiece)."),
    _c("token", pa.string(), "Decoded text of the token alone, e.g. ` the`."),
    _c("norm", pa.string(), "Search form: decoded text, whitespace-stripped, NFKC, lower-cased."),
    _c("special", pa.bool_(), "True for special tokens ([CLS], <|endoftext|>, ...)."),
)

VECTORS = _table(
    "vectors",
    "Top-k and bottom-k vocabulary tokens of every vector-shaped parameter. Read-side vectors "
    f"({', '.join(READ_KINDS)}) are scored as W_E @ r; write-side vectors ({', '.join(WRITE_KINDS)}) as w @ W_U.",
    ("model", "layer"),
    _MODEL,
    _c("layer", pa.int16(), "Layer index, 0-based; null for `pos` (embedding level).", nullable=True),
    _c("kind", pa.string(), "; ".join(f"`{k.name}`: {k.doc}, {k.side} side" for k in KINDS) + "."),
    _c("head", pa.int16(), "Head for q/o; key/value head for k/v (equal to the query head without GQA); null otherwise.", nullable=True),
    _c("expert", pa.int16(), "Mixture of experts: the routed expert of an ff_* vector or a router row, 0-based; null for dense FF neurons, a shared expert's neurons and its gate, and every other kind.", nullable=True),
    _c("dictionary", pa.string(), "Dictionary (SAE, transcoder; `zeropass index-sae`) of a decoder/encoder row; null for the model's own vectors.", nullable=True),
    _c("idx", pa.int32(), "Neuron index (ff_*), dimension within the head (q/k/v/o), position (pos), expert (router; 0 for the shared expert's gate), feature (decoder/encoder), 0 for biases."),
    _c("unit", pa.string(), "Human name: `L5.N123` (FF neuron), `L5.E3.N123` (neuron of expert 3), `L5.E3.router` / `L5.shared_router` (router rows), `L5.H3.d7` (head dim), `L5.attn_bias`, `L5.ff_bias`, `P12` (position), `res-L8.F17` (feature 17 of dictionary res-L8)."),
    _SIDE,
    _RANK,
    _c("token_id", pa.int32(), "Token id in the model's vocabulary."),
    _c("token", pa.string(), "Decoded token text."),
    _c("score", pa.float32(), "Projection score (dot product with the token's embedding / unembedding column)."),
)

VECTORS_BY_TOKEN = _table(
    "vectors_by_token",
    "The rows of `vectors` again, one file per model sorted by token_id (then layer, kind, head, expert, idx, side, rank), "
    "for token search: a token's rows sit in one or two row groups instead of one per layer file. Without the "
    "`unit` and `token` texts, which would cost as much as the rest: join `tokens` for the text; the unit name "
    "follows from layer, kind, head, expert and idx.",
    ("model",),
    *(next(c for c in VECTORS.columns if c.name == name)
      for name in ("model", "token_id", "layer", "kind", "head", "expert", "dictionary", "idx", "side", "rank", "score")),
)

PAIRS = _table(
    "pairs",
    "Exact global top-N and bottom-N entries of each head's vocabulary x vocabulary circuits "
    "QK = (W_E W_Q)(W_E W_K)^T and OV = (W_E W_V)(W_O W_U); ties broken by lower row, then lower column.",
    ("model", "layer"),
    _MODEL,
    _LAYER,
    _HEAD,
    _c("circuit", pa.string(), "`qk` (rows: query token, columns: key token) or `ov` (rows: source token, columns: promoted token)."),
    _SIDE,
    _RANK,
    _c("src_id", pa.int32(), "Row token id: the query token (qk) or the attended source token (ov)."),
    _c("src", pa.string(), "Row token text."),
    _c("dst_id", pa.int32(), "Column token id: the key token (qk) or the promoted output token (ov)."),
    _c("dst", pa.string(), "Column token text."),
    _c("score", pa.float64(), "Entry of the circuit matrix, computed in float64."),
)

PAIRS_BY_TOKEN = _table(
    "pairs_by_token",
    "The rows of `pairs` again, each twice: once under its source token and once under its destination token "
    "(`endpoint`), for token search across many models. Not written per model: for a model's own files it is "
    "computed from `pairs` when read; `zeropass compact` stores it sorted by token_id, so a token's pairs sit in "
    "a few row groups of one file instead of a scan of every model's pairs.",
    ("model", "layer"),
    _MODEL,
    _c("token_id", pa.int32(), "The token: `src_id` for endpoint `src`, `dst_id` for endpoint `dst`."),
    _c("endpoint", pa.string(), "`src` or `dst`: which end of the pair the token is."),
    *PAIRS.columns[1:],
    derived_from="pairs",
)

HEAD_TOKENS = _table(
    "head_tokens",
    "Per head and circuit, the tokens with the most extreme row maximum (roles query / source) and "
    "column maximum (roles key / output); side `bottom` uses row / column minima.",
    ("model", "layer"),
    _MODEL,
    _LAYER,
    _HEAD,
    _c("circuit", pa.string(), "`qk` or `ov`."),
    _c("role", pa.string(), "`query` / `key` for qk rows / columns; `source` / `output` for ov rows / columns."),
    _SIDE,
    _RANK,
    _c("token_id", pa.int32(), "Token id."),
    _c("token", pa.string(), "Token text."),
    _c("score", pa.float64(), "The row or column maximum (top) or minimum (bottom)."),
)

HEADS = _table(
    "heads",
    "One row per attention head with its metrics (definitions in docs/PAIRS.md).",
    ("model", "layer"),
    _MODEL,
    _LAYER,
    _HEAD,
    _c("kv_head", pa.int16(), "Key/value head this query head reads (grouped-query attention)."),
    _c("unit", pa.string(), "Human name, `L5.H3`."),
    _c("ov_copying_score", pa.float64(), "Sum(lambda)/Sum(|lambda|) over eigenvalues of the reduced OV matrix W_V W_O (Elhage et al. 2021).", nullable=True),
    _c("ov_copying_score_full", pa.float64(), "The same over the full OV circuit W_E W_V W_O W_U.", nullable=True),
    _c("qk_copying_score_full", pa.float64(), "The same over the full QK circuit W_E W_Q W_K^T W_E^T (same-token attention).", nullable=True),
    _c("ov_self_top1_frac", pa.float64(), "Fraction of tokens whose largest OV output is the token itself.", nullable=True),
    _c("qk_self_top1_frac", pa.float64(), "Fraction of query tokens whose largest QK score is on the same key token.", nullable=True),
    _c("ov_norm", pa.float64(), "Frobenius norm of W_V W_O.", nullable=True),
    _c("qk_norm", pa.float64(), "Frobenius norm of W_Q W_K^T.", nullable=True),
    _c("w_q_norm", pa.float64(), "Frobenius norm of W_Q[h].", nullable=True),
    _c("w_k_norm", pa.float64(), "Frobenius norm of W_K[kv].", nullable=True),
    _c("w_v_norm", pa.float64(), "Frobenius norm of W_V[kv].", nullable=True),
    _c("w_o_norm", pa.float64(), "Frobenius norm of W_O[h].", nullable=True),
)

PARAMETERS = _table(
    "parameters",
    "Coverage: every tensor of the checkpoint, and which table covers it or why none does.",
    ("model",),
    _MODEL,
    _c("name", pa.string(), "Tensor name in the checkpoint."),
    _c("shape", pa.list_(pa.int64()), "Tensor shape."),
    _c("layer", pa.int16(), "Layer the tensor belongs to; null for model-level tensors.", nullable=True),
    _c("role", pa.string(), "Canonical role, e.g. W_Q, W_out, ln_attn_w, W_E."),
    _c("covered_by", pa.string(), "`table:kind` that projects it (e.g. `vectors:ff_value`), `embedding` for the bases; null if none.", nullable=True),
    _c("reason", pa.string(), "Why the tensor is not a residual-space direction, when not covered.", nullable=True),
)


ALIGNMENTS = _table(
    "alignments",
    "Parameter alignment of two models (Dar et al. 2023, §5): Pearson correlation over the shared "
    "vocabulary of their parameters projected to embedding space, per layer pair and for matched units "
    "(definitions in docs/ALIGN.md). Written by `zeropass align A B`.",
    ("model_a", "model_b"),
    _c("model_a", pa.string(), "Slug of the first model (the one whose layers and units are matched)."),
    _c("model_b", pa.string(), "Slug of the second model."),
    _c("space", pa.string(), "`embedding` (projections over the shared vocabulary) or `raw` (raw parameters, equal d_model only: the baseline)."),
    _c("kind", pa.string(), f"{', '.join(FF_KINDS + HEAD_DIM_KINDS)} (one parameter kind); `layer` (mean of the kinds, level `layer`); `layer_excess` (`layer` minus its row and column means plus the grand mean: the layer-matching criterion); `ff` / `head` (neuron / head similarity used for matching, level `unit`)."),
    _c("level", pa.string(), "`layer`: one row per (layer_a, layer_b, kind), every layer pair; `unit`: one row per unit pair within a matched layer pair."),
    _c("layer_a", pa.int16(), "Layer of model_a, 0-based."),
    _c("layer_b", pa.int16(), "Layer of model_b, 0-based."),
    _c("idx_a", pa.int32(), "Neuron (ff kinds) or query-head (q/k/v/o, head) index in model_a; null at level `layer`.", nullable=True),
    _c("idx_b", pa.int32(), "Neuron or head index in model_b; null at level `layer`.", nullable=True),
    _c("unit_a", pa.string(), "Human name of the unit of model_a, `L5.N123` or `L5.H3`; null at level `layer`.", nullable=True),
    _c("unit_b", pa.string(), "Human name of the unit of model_b; null at level `layer`.", nullable=True),
    _c("score", pa.float64(), "Level `layer`: mean over model_a's units of the best similarity in layer_b (|Pearson rho| for neurons, mean canonical correlation for heads). Level `unit`: the pair's similarity."),
    _c("matched", pa.bool_(), "Level `layer`: the layer pair is in the Hungarian layer matching. Level `unit`: the pair is in the Hungarian unit matching (false rows give model_a's unit's best model_b unit when that differs)."),
    _c("n_tokens", pa.int32(), "Rows the correlations run over: shared vocabulary tokens (`embedding`) or d_model coordinates (`raw`)."),
)


# -- dictionaries (SAEs, transcoders; docs/DICTIONARIES.md) ---------------------------------------
# A dictionary's projections are rows of `vectors` (kinds decoder / encoder, `dictionary` set), in
# files listed under the manifest's "dictionaries" section: `show`, `similar`, token search, remote
# reading, merge, publish and `check` read them as they read a model's vectors. `features` and
# `features_by_token` are views of those rows alone (schemas.layout.table_sources).

_DICTIONARY = _c("dictionary", pa.string(), "Dictionary name (`zeropass index-sae --name`), unique in the dataset.")
_FEATURE = _c("feature", pa.int32(), "Feature index within the dictionary, 0-based.")
_FEATURE_UNIT = _c("unit", pa.string(), "Human name of the feature, `res-L8.F17`.")

DICTIONARIES = _table(
    "dictionaries",
    "One row per dictionary (sparse autoencoder or transcoder) indexed against a model of the dataset.",
    ("model", "dictionary"),
    _MODEL,
    _DICTIONARY,
    _c("layer", pa.int16(), "Layer of the hook the dictionary was trained on."),
    _c("site", pa.string(), "Where it reads and writes: `resid_pre`, `resid_post`, `resid_mid`, `mlp_out`, `attn_out`, `z` (per-head attention values, decoded through W_O) or `transcoder` (reads the MLP input, writes the MLP output)."),
    _c("hook", pa.string(), "The hook name as the dictionary's files give it (e.g. `blocks.8.hook_resid_pre`, `layers.8.mlp`)."),
    _c("d_in", pa.int32(), "Width of the activations it reads (d_model; n_heads x d_head for `z`)."),
    _c("d_sae", pa.int32(), "Number of features."),
    _c("architecture", pa.string(), "`standard`, `topk`, `jumprelu`, `gated`, ... as the files name it."),
    _c("format", pa.string(), "`saelens`, `gemma-scope` or `sparsify`."),
    _c("source", pa.string(), "What was passed to `zeropass index-sae` (a path or hub id with subfolder)."),
    _c("revision", pa.string(), "Hub commit of the dictionary, when known.", nullable=True),
    _c("k", pa.int32(), "Tokens kept per side for each decoder / encoder row."),
    _c("n_neighbours", pa.int32(), "Neighbours kept per feature (`feature_neighbours`)."),
    _c("settings", pa.string(), "All settings as JSON (the file's own config, variant, neighbour scope, weights sha256)."),
    _c("zeropass_version", pa.string(), "Version of zeropass that wrote the dictionary."),
    _c("created_at", pa.timestamp("s", tz="UTC"), "When indexing finished."),
)

FEATURES = _table(
    "features",
    "Top-k and bottom-k vocabulary tokens of every dictionary feature: the decoder row scored as w @ W_U (write side), "
    "the encoder column as W_E @ r (read side). The `vectors` rows of kind decoder / encoder, feature = vectors.idx.",
    ("model", "layer"),
    _MODEL,
    _DICTIONARY,
    _LAYER,
    _FEATURE,
    _FEATURE_UNIT,
    _c("kind", pa.string(), "`decoder` (what the feature writes) or `encoder` (what it reads)."),
    _SIDE,
    _RANK,
    _c("token_id", pa.int32(), "Token id in the model's vocabulary."),
    _c("token", pa.string(), "Decoded token text."),
    _c("score", pa.float32(), "Projection score."),
    derived_from="vectors",
)

FEATURES_BY_TOKEN = _table(
    "features_by_token",
    "The rows of `features` from the dictionaries' `vectors_by_token` files, sorted by token_id: token search over "
    "features. Without the token text (join `tokens`).",
    ("model",),
    _MODEL,
    _c("token_id", pa.int32(), "Token id in the model's vocabulary."),
    _DICTIONARY,
    _LAYER,
    _FEATURE,
    _FEATURE_UNIT,
    _c("kind", pa.string(), "`decoder` or `encoder`."),
    _SIDE,
    _RANK,
    _c("score", pa.float32(), "Projection score."),
    derived_from="vectors_by_token",
)

FEATURE_STATS = _table(
    "feature_stats",
    "Per dictionary feature, what a reader needs beside the token lists.",
    ("model", "dictionary"),
    _MODEL,
    _DICTIONARY,
    _LAYER,
    _FEATURE,
    _FEATURE_UNIT,
    _c("decoder_norm", pa.float64(), "L2 norm of the decoder row as stored (before W_O for hook_z)."),
    _c("encoder_norm", pa.float64(), "L2 norm of the encoder column."),
    _c("b_enc", pa.float64(), "Encoder bias of the feature.", nullable=True),
    _c("threshold", pa.float64(), "JumpReLU threshold; null for other architectures.", nullable=True),
)

FEATURE_NEIGHBOURS = _table(
    "feature_neighbours",
    "Per feature, the top-N write-side directions by cosine with its decoder direction (in the residual stream): "
    "the model's FF values at or below its layer and the decoder rows of the dictionaries indexed with it at or "
    "below its layer (docs/DICTIONARIES.md).",
    ("model", "dictionary"),
    _MODEL,
    _DICTIONARY,
    _LAYER,
    _FEATURE,
    _FEATURE_UNIT,
    _RANK,
    _c("neighbour", pa.string(), "Unit of the neighbour: `L5.N123` (FF value) or `res-L8.F3` (another feature)."),
    _c("neighbour_kind", pa.string(), "`ff_value` or `decoder`."),
    _c("neighbour_layer", pa.int16(), "Layer of the neighbour."),
    _c("cosine", pa.float64(), "Cosine similarity of the two directions, computed in float64."),
)


def render() -> str:
    """A stable text rendering of every table, for the golden test and the docs."""
    lines = [f"schema_version {SCHEMA_VERSION}", ""]
    for t in TABLES.values():
        where = f"derived from {t.derived_from}" if t.derived_from else f"partitioned by {', '.join(t.partition_by)}"
        lines.append(f"## {t.name}  ({where})")
        lines.append(t.doc)
        lines.append("")
        lines.append("| column | type | null | description |")
        lines.append("|---|---|---|---|")
        for c in t.columns:
            lines.append(f"| `{c.name}` | {c.type} | {'yes' if c.nullable else 'no'} | {c.doc} |")
        lines.append("")
    return "\n".join(lines)


def empty_select_sql(table: Table) -> str:
    """SQL selecting zero rows with the table's columns and types (a view over no files)."""
    return "SELECT " + ", ".join(f"CAST(NULL AS {duckdb_type(c.type)}) AS {c.name}" for c in table.columns) + " WHERE false"


def duckdb_type(t: pa.DataType) -> str:
    """DuckDB type name for the pyarrow types used above."""
    if pa.types.is_string(t):
        return "VARCHAR"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_int16(t):
        return "SMALLINT"
    if pa.types.is_int32(t):
        return "INTEGER"
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_float32(t):
        return "FLOAT"
    if pa.types.is_float64(t):
        return "DOUBLE"
    if pa.types.is_timestamp(t):
        return "TIMESTAMP WITH TIME ZONE"
    if pa.types.is_list(t):
        return duckdb_type(t.value_type) + "[]"
    raise TypeError(f"no DuckDB type for {t}")
