"""Canonical weights: every supported architecture is read into these tensors (docs/DESIGN.md §2).

Row-vector convention throughout: a layer computes ``x @ W``. Shapes use the same
dimension names everywhere: ``d_model``, ``d_head``, ``d_ff``, ``d_vocab``, ``n_heads``,
``n_kv_heads``, ``n_ctx``. All tensors are float32 on the CPU unless a caller moves them.

An adapter (``indexer/adapters``) produces one :class:`Embeddings` for the model and one
:class:`LayerWeights` per layer, lazily, so that memory stays bounded by one layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Optional

from torch import Tensor

NormPosition = Literal["pre", "post"]
QKNorm = Literal["head", "full"]


def _bad(message: str):
    from .errors import BadCheckpoint

    return BadCheckpoint(message)


@dataclass(frozen=True)
class Dims:
    """Sizes of a model, named as in the tables."""

    architecture: str  # the family adapter's name, e.g. "gpt2", "bert", "llama"
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_ff: int
    d_vocab: int
    n_ctx: Optional[int]  # learned positions only; None for RoPE / relative models
    tied: bool  # W_U is W_E.T (also True for encoders without an LM head)
    gated: bool  # SwiGLU-style MLP with W_gate
    norm_position: NormPosition  # "pre" (GPT-2, Llama, NeoX) or "post" (BERT, MPNet)
    parallel_attn_mlp: bool = False  # GPT-NeoX: attention and MLP both read the same x
    # A norm of the query / key states after projection (LayerWeights.q_norm_w): over each
    # head's d_head ("head": Qwen3, Gemma 3, and the LayerNorms of Phi / StableLM qk_layernorm
    # and Cohere use_qk_norm) or over all heads at once ("full": OLMo-2).
    qk_norm: Optional[QKNorm] = None
    # A norm without a bias is an RMSNorm, except in families whose norms are all LayerNorms,
    # some without a bias (Cohere; StableLM's q/k norms; Phi): they still subtract the mean.
    # Folding only needs the gain (and bias) either way: the centring is left out like the scaling.
    centred_norms: bool = False
    # Mixture of experts (Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE): routed experts per layer, each an
    # MLP of width d_ff; d_ff_shared is the width of LayerWeights.W_in in those layers (the
    # always-on shared expert of Qwen2-MoE, 0 without one). n_experts 0: a dense model.
    n_experts: int = 0
    d_ff_shared: int = 0

    def __post_init__(self):
        # Sizes come from config.json: an inconsistent one is the user's checkpoint, not our bug.
        for name in ("n_layers", "n_heads", "n_kv_heads", "d_model", "d_head", "d_ff", "d_vocab"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _bad(f"config.json gives {name} = {v!r} for this {self.architecture} model; "
                           f"it must be a positive integer: fix config.json")
        if self.n_heads % self.n_kv_heads:
            raise _bad(f"config.json is inconsistent: n_heads {self.n_heads} is not a multiple of "
                       f"n_kv_heads {self.n_kv_heads} (grouped-query attention shares each kv head "
                       f"by a whole number of query heads); fix config.json")

    def describe(self) -> str:
        """The sizes, in one phrase for messages."""
        experts = f", {self.n_experts} experts" if self.n_experts else ""
        return (f"n_layers {self.n_layers}, n_heads {self.n_heads}, n_kv_heads {self.n_kv_heads}, "
                f"d_model {self.d_model}, d_head {self.d_head}, d_ff {self.d_ff}{experts}")

    @property
    def d_ff_dense(self) -> int:
        """Width of LayerWeights.W_in / W_out: d_ff, or in a MoE model the shared expert's (maybe 0)."""
        return self.d_ff_shared if self.n_experts else self.d_ff

    def kv_head(self, head: int) -> int:
        """The key/value head that query head ``head`` uses under grouped-query attention."""
        return head // (self.n_heads // self.n_kv_heads)


@dataclass
class Embeddings:
    """Model-level tensors."""

    W_E: Tensor  # [d_vocab, d_model] token embeddings
    W_U: Tensor  # [d_model, d_vocab] unembedding (W_E.T when tied / no LM head)
    W_pos: Optional[Tensor] = None  # [n_ctx, d_model] learned absolute positions
    b_U: Optional[Tensor] = None  # [d_vocab] LM-head bias, if any
    # Pre-LN models: the final norm before W_U. Post-LN encoders: the embedding LayerNorm
    # (applied to W_E + W_pos before layer 0).
    ln_final_w: Optional[Tensor] = None  # [d_model]
    ln_final_b: Optional[Tensor] = None  # [d_model]
    ln_embed_w: Optional[Tensor] = None  # [d_model] post-LN encoders only
    ln_embed_b: Optional[Tensor] = None  # [d_model]

    def check(self, dims: Dims, names: Optional["TensorNames"] = None) -> None:
        """BadCheckpoint when a tensor's shape contradicts ``dims`` (i.e. config.json)."""
        d, V = dims.d_model, self.W_E.shape[0]
        at = names and (lambda role: names(role, None))
        _check_shapes(self, {"W_E": (V, d), "W_U": (d, V), "b_U": (V,), "ln_final_w": (d,),
                             "ln_final_b": (d,), "ln_embed_w": (d,), "ln_embed_b": (d,)}, dims, "the embeddings", at)
        if self.W_pos is not None and self.W_pos.shape[1:] != (d,):
            _check_shapes(self, {"W_pos": (self.W_pos.shape[0], d)}, dims, "the embeddings", at)


@dataclass
class ExpertFF:
    """One routed expert's MLP, canonical like the dense one: ``act(x @ W_gate) * (x @ W_in) @ W_out``."""

    W_in: Tensor  # [d_model, d_ff]  its FF keys are the columns
    W_out: Tensor  # [d_ff, d_model] its FF values are the rows
    W_gate: Optional[Tensor] = None  # [d_model, d_ff]


class Experts:
    """A layer's routed experts, read one at a time (``experts[e]``) so memory holds one expert,
    not a layer's worth of them (a Mixtral layer's experts are 5.6 GB in float32).

    ``read(e) -> ExpertFF``; ``map(f)`` is a lazy view applying ``f`` to each expert read (folding).
    """

    def __init__(self, n: int, read: Callable[[int], ExpertFF]):
        self.n, self._read = n, read

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, e: int) -> ExpertFF:
        if not 0 <= e < self.n:
            raise IndexError(f"expert {e} out of range: the layer has experts 0..{self.n - 1}")
        return self._read(e)

    def __iter__(self):
        return (self[e] for e in range(self.n))

    def map(self, f: Callable[[ExpertFF], ExpertFF]) -> "Experts":
        return Experts(self.n, lambda e: f(self._read(e)))


@dataclass
class LayerWeights:
    """One transformer block in canonical form.

    Attention (per head h, with kv = dims.kv_head(h)):
        q = x @ W_Q[h] + b_Q[h];  k = x @ W_K[kv] + b_K[kv];  v = x @ W_V[kv] + b_V[kv]
        out = sum_h (pattern_h @ v_h) @ W_O[h] + b_O
    MLP:
        pre = x @ W_in + b_in;  (gated: act(x @ W_gate + b_gate) * pre, else act(pre))
        out = hidden @ W_out + b_out
    Norms: ``ln_attn`` / ``ln_mlp`` are the norms *before* attention / MLP for pre-LN models
    and the norms *after* the residual add for post-LN models (see ``Dims.norm_position``).
    ``*_b`` is None for RMSNorm.
    """

    W_Q: Tensor  # [n_heads, d_model, d_head]
    W_K: Tensor  # [n_kv_heads, d_model, d_head]
    W_V: Tensor  # [n_kv_heads, d_model, d_head]
    W_O: Tensor  # [n_heads, d_head, d_model]
    W_in: Tensor  # [d_model, d_ff]   FF keys are its columns
    W_out: Tensor  # [d_ff, d_model]  FF values are its rows
    W_gate: Optional[Tensor] = None  # [d_model, d_ff] gated MLPs only
    b_Q: Optional[Tensor] = None  # [n_heads, d_head]
    b_K: Optional[Tensor] = None  # [n_kv_heads, d_head]
    b_V: Optional[Tensor] = None  # [n_kv_heads, d_head]
    b_O: Optional[Tensor] = None  # [d_model]
    b_in: Optional[Tensor] = None  # [d_ff]
    b_gate: Optional[Tensor] = None  # [d_ff]
    b_out: Optional[Tensor] = None  # [d_model]
    ln_attn_w: Optional[Tensor] = None  # [d_model]
    ln_attn_b: Optional[Tensor] = None
    ln_mlp_w: Optional[Tensor] = None  # [d_model]
    ln_mlp_b: Optional[Tensor] = None
    # Post-norms (Gemma 2/3, OLMo-2): applied to what a sublayer writes, before the residual add.
    ln_attn_out_w: Optional[Tensor] = None  # [d_model]
    ln_attn_out_b: Optional[Tensor] = None
    ln_mlp_out_w: Optional[Tensor] = None  # [d_model]
    ln_mlp_out_b: Optional[Tensor] = None
    # Gains of the query / key norms (Dims.qk_norm says over what they normalise) and, for a
    # LayerNorm with one (Phi), their biases, one row per head.
    q_norm_w: Optional[Tensor] = None  # [n_heads, d_head]
    k_norm_w: Optional[Tensor] = None  # [n_kv_heads, d_head]
    q_norm_b: Optional[Tensor] = None  # [n_heads, d_head]
    k_norm_b: Optional[Tensor] = None  # [n_kv_heads, d_head]
    act: str = "gelu"  # name of the MLP activation, as the HF config spells it
    # Mixture of experts (Dims.n_experts > 0): logits = x @ W_router (x the MLP's normed input),
    # the top experts' MLPs are summed; W_in / W_out above are then the shared expert (width
    # Dims.d_ff_shared, 0 without one) and W_shared_gate its sigmoid gate (Qwen2-MoE).
    W_router: Optional[Tensor] = None  # [d_model, n_experts]; expert e's router vector is column e
    experts: Optional[Experts] = None
    W_shared_gate: Optional[Tensor] = None  # [d_model, 1]

    def attention_only(self) -> "LayerWeights":
        """This block without its MLP (weights, biases, router, experts set to None): what the
        head circuits read, so that the MLP is not kept alive through them (Llama-2-7B shapes:
        541 MB of float32, docs/BENCHMARKS.md §11)."""
        return replace(self, W_in=None, W_out=None, W_gate=None, b_in=None, b_gate=None, b_out=None,
                       W_router=None, experts=None, W_shared_gate=None)

    def check(self, dims: Dims, layer: int, names: Optional["TensorNames"] = None) -> None:
        """BadCheckpoint when a tensor's shape contradicts ``dims`` (i.e. config.json)."""
        h, kv, d, e, f = dims.n_heads, dims.n_kv_heads, dims.d_model, dims.d_head, dims.d_ff_dense
        _check_shapes(self, {
            "W_Q": (h, d, e), "W_K": (kv, d, e), "W_V": (kv, d, e), "W_O": (h, e, d),
            "W_in": (d, f), "W_out": (f, d), "W_gate": (d, f),
            "b_Q": (h, e), "b_K": (kv, e), "b_V": (kv, e), "b_O": (d,), "b_in": (f,), "b_gate": (f,),
            "b_out": (d,), "ln_attn_w": (d,), "ln_attn_b": (d,), "ln_mlp_w": (d,), "ln_mlp_b": (d,),
            "ln_attn_out_w": (d,), "ln_attn_out_b": (d,), "ln_mlp_out_w": (d,), "ln_mlp_out_b": (d,),
            "q_norm_w": (h, e), "k_norm_w": (kv, e), "q_norm_b": (h, e), "k_norm_b": (kv, e), "W_router": (d, dims.n_experts), "W_shared_gate": (d, 1),
        }, dims, f"layer {layer}", names and (lambda role: names(role, layer)))
        if dims.n_experts and (self.experts is None or self.W_router is None or len(self.experts) != dims.n_experts):
            raise _bad(f"layer {layer} has {0 if self.experts is None else len(self.experts)} experts and "
                       f"{'no' if self.W_router is None else 'a'} router, but config.json says {dims.n_experts} "
                       f"experts; fix config.json or the checkpoint")
        for i, ex in enumerate(self.experts or ()):
            _check_shapes(ex, {"W_in": (d, dims.d_ff), "W_out": (dims.d_ff, d), "W_gate": (d, dims.d_ff)},
                          dims, f"layer {layer} expert {i}", names and (lambda role: names(f"expert.{role}", layer)))


@dataclass
class ParamRole:
    """How one checkpoint tensor is accounted for (the ``parameters`` table)."""

    name: str  # the tensor's name in the checkpoint
    shape: tuple[int, ...]
    role: str  # e.g. "W_Q", "W_out", "ln_attn_w", "W_E"
    covered_by: Optional[str]  # "vectors:ff_value", "pairs:ov", ... or None
    reason: Optional[str] = None  # why it is not a residual-space direction, when not covered
    layer: Optional[int] = None


@dataclass
class Canonical:
    """A whole model in canonical form; layers are produced on demand by ``layer(l)``."""

    dims: Dims
    embeddings: Embeddings
    layer_fn: object  # callable(int) -> LayerWeights; lazy so memory is bounded by a layer
    parameters: list[ParamRole] = field(default_factory=list)
    # What the model does at run time that ``raw`` deliberately does not apply, recorded so a
    # reader can: e.g. Gemma's embedding multiplier sqrt(d_model), logit softcapping.
    conventions: dict = field(default_factory=dict)

    def layer(self, l: int) -> LayerWeights:
        return self.layer_fn(l)  # type: ignore[operator]

    def layers(self):
        for l in range(self.dims.n_layers):
            yield self.layer(l)


# (canonical role, layer or None) -> the checkpoint tensors that role was read from, for messages.
TensorNames = Callable[[str, Optional[int]], list]


def _check_shapes(obj, expected: dict, dims: Dims, where: str, names: Optional[Callable[[str], list]] = None) -> None:
    for name, shape in expected.items():
        t = getattr(obj, name)
        if t is not None and tuple(t.shape) != tuple(shape):
            tensors = names(name) if names else []
            named = f" (checkpoint tensor {', '.join(tensors)})" if tensors else ""
            raise _bad(f"{where}: {name}{named} has shape {tuple(t.shape)}, which does not match config.json "
                       f"({dims.describe()}: expected {tuple(shape)}); fix config.json or the checkpoint")
