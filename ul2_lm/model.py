"""The decoder-only Transformer language model (PaLM-style, multi-query attention).

Pre-norm blocks of RMSNorm -> attention -> residual, RMSNorm -> SwiGLU -> residual; rotary
position embeddings; no biases; input and output embeddings tied. Attention is causal, except
that tokens of a bidirectional prefix (seqio's `decoder_causal_attention`) see each other, and
tokens of different packed segments never see each other.

Initialisation follows T5X / PaLM: the embedding is N(0, 1) and used unscaled on input (RMSNorm
sits in front of every block, so the residual stream's scale needs no help), and the tied output
logits are divided by sqrt(d_model), which makes them unit-variance at initialisation. Kernels are
truncated normal with variance 1/fan_in. Keeping every parameter at a natural scale of about one
suits Adafactor, whose updates are relative to the parameter's scale.

Numerics: parameters in `param_dtype`, matmuls in `dtype` (bfloat16 on accelerators); norms,
attention softmax and the output logits run in float32. Dropout (`dropout_rate`) applies to the
input embeddings and to the output of every attention and feed-forward block before the residual
add; the module holds no RNG state: a dropout key is passed in per call.

Every parameter carries logical axis names ('embed', 'mlp', 'heads', 'kv_heads', 'head_dim',
'vocab', and 'layers' for the stacked axis of scanned layers) and the main activations are
constrained by 'activation_*' names; ul2_lm.partitioning maps both to mesh axes.

For speed on CPU (benchmarks/RESULTS_model.md) projections run as 2-D matmuls, and attention
has a hand-written backward pass, tested against autodiff of textbook attention.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ul2_lm.partitioning import constrain

# Rematerialisation policies by config name. 'none' keeps every activation for the backward pass;
# the others recompute, inside each layer, whatever the policy does not save.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj"),
}

_DTYPES = ("float32", "bfloat16")

BATCH, LENGTH, EMBED = "activation_batch", "activation_length", "activation_embed"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Transformer. `dtype` is the compute dtype; softmax, norms and
    logits always run in float32."""

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    num_kv_heads: int = 1
    max_seq_len: int = 2048
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    rope_max_wavelength: float = 10_000.0
    norm_eps: float = 1e-6
    logits_soft_cap: float | None = None

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "mlp_dim",
                     "num_kv_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_kv_heads={self.num_kv_heads} does not divide "
                             f"num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even (rotary "
                             "embeddings rotate pairs of features)")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; expected one of {_DTYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat_policy={self.remat_policy!r}; expected one of "
                             f"{sorted(REMAT_POLICIES)}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"ModelConfig.dropout_rate={self.dropout_rate!r} must be in [0, 1)")
        if self.logits_soft_cap is not None and self.logits_soft_cap <= 0:
            raise ValueError(f"ModelConfig.logits_soft_cap={self.logits_soft_cap!r} must be positive")


def _truncated_normal(key: jax.Array, shape: Sequence[int], stddev: float, dtype) -> jax.Array:
    # A standard normal truncated to [-2, 2] has stddev 0.8796; divide it out (as variance_scaling).
    return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
            * (stddev / 0.87962566103423978)).astype(dtype)


class Projection(nnx.Module):
    """A bias-free linear map held as one `kernel` of shape in_shape + out_shape.

    Calling it contracts the trailing len(in_shape) dimensions of its input with the leading
    dimensions of the kernel: x[..., *in_shape] -> y[..., *out_shape].
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], names: Sequence[str], *,
                 dtype: str, param_dtype: str, rngs: nnx.Rngs):
        shape = tuple(in_shape) + tuple(out_shape)
        if len(names) != len(shape):
            raise ValueError(f"Projection: {len(names)} axis names {tuple(names)} for a kernel of "
                             f"shape {shape}")
        stddev = 1.0 / math.sqrt(math.prod(in_shape))
        self.kernel = nnx.Param(_truncated_normal(rngs.params(), shape, stddev, param_dtype),
                                sharding_names=tuple(names))
        self.num_in_dims = len(in_shape)
        self.dtype = dtype

    def matrices(self, x: jax.Array) -> tuple[jax.Array, jax.Array, tuple[int, ...]]:
        """x as [tokens, in_size] and the kernel as [in_size, out_size], both in the compute
        dtype, and the shape the 2-D product takes back."""
        n = self.num_in_dims
        kernel = self.kernel[...].astype(self.dtype)
        in_size = math.prod(kernel.shape[:n])
        out_shape = x.shape[:x.ndim - n] + kernel.shape[n:]
        return x.astype(self.dtype).reshape(-1, in_size), kernel.reshape(in_size, -1), out_shape

    def __call__(self, x: jax.Array) -> jax.Array:
        # As one 2-D matmul: on CPU, XLA handles the gradients of a rank-2 dot without the
        # strided transposes it inserts for a contraction over several batch-like dimensions.
        x2, kernel, out_shape = self.matrices(x)
        return jnp.dot(x2, kernel).reshape(out_shape)


class RMSNorm(nnx.Module):
    """Root-mean-square normalisation with a learned scale (no centring, no bias), in float32."""

    def __init__(self, dim: int, *, eps: float, dtype: str, param_dtype: str):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), sharding_names=("embed",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * inv_rms * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_tables(positions: jax.Array, head_dim: int, max_wavelength: float
                ) -> tuple[jax.Array, jax.Array]:
    """(sin, cos), each [batch, length, head_dim // 2] float32, for integer `positions`."""
    fraction = 2.0 * jnp.arange(head_dim // 2, dtype=jnp.float32) / head_dim
    inv_timescale = max_wavelength ** -fraction
    angles = positions.astype(jnp.float32)[..., None] * inv_timescale
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates feature pairs (i, i + head_dim/2) of x[batch, length, heads, head_dim]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(segment_ids: jax.Array, causal_attention: jax.Array | None = None
                   ) -> jax.Array:
    """Which key each query may attend to: bool [batch, length, length].

    A query sees a key when both are in the same nonzero segment and either the key is not later
    than the query, or both belong to the bidirectional prefix (causal_attention == 1), as T5X's
    make_decoder_mask.
    """
    length = segment_ids.shape[-1]
    index = jnp.arange(length)
    visible = (index[None, :] <= index[:, None])[None]
    if causal_attention is not None:
        prefix = causal_attention.astype(bool)
        visible = visible | (prefix[:, :, None] & prefix[:, None, :])
    same_segment = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids != 0)[:, None, :]
    return visible & same_segment


_MASKED = float(jnp.finfo(jnp.float32).min)


def _attention_scores(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 scores [B, K, L, G, S] of q [B, L, K, G, H] against k [B, S, K, H], masked."""
    # Output in dot_general's natural order (batch dims, query free dims, key free dims): with
    # one K/V head no operand or result needs a transpose.
    scores = jnp.einsum("blkgh,bskh->bklgs", q, k, preferred_element_type=jnp.float32)
    return jnp.where(mask[:, None, :, None, :], scores, _MASKED)


@jax.custom_vjp
def _grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    return _grouped_attention_fwd(q, k, v, mask)[0]


def _grouped_attention_fwd(q, k, v, mask):
    scores = _attention_scores(q, k, mask)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    # A query that sees no key at all (padding) gets zero weights and a zero output.
    row_max = jnp.where(row_max == _MASKED, 0.0, row_max)
    weights = jnp.exp(scores - row_max)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    total = jnp.where(total == 0.0, 1.0, total)
    out = jnp.einsum("bklgs,bskh->bklgh", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32) / total
    out = out.astype(q.dtype)
    return out, (q, k, v, mask, row_max + jnp.log(total), out)


def _grouped_attention_bwd(residuals, d_out):
    q, k, v, mask, log_total, out = residuals
    # Recomputing the probabilities from the saved log-normaliser keeps O(L) per query between
    # the passes instead of the O(L^2) probability matrix.
    probs = jnp.exp(_attention_scores(q, k, mask) - log_total)
    d_v = jnp.einsum("bklgs,bklgh->bskh", probs.astype(d_out.dtype), d_out,
                     preferred_element_type=jnp.float32).astype(v.dtype)
    d_probs = jnp.einsum("bklgh,bskh->bklgs", d_out, v, preferred_element_type=jnp.float32)
    row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_scores = (probs * (d_probs - row_dot)).astype(q.dtype)
    d_q = jnp.einsum("bklgs,bskh->blkgh", d_scores, k)
    d_k = jnp.einsum("bklgs,blkgh->bskh", d_scores, q)
    return d_q, d_k, d_v, None


_grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention: q [B, L, N, H], k/v [B, S, K, H] with K dividing N, mask [B, L, S].

    The N query heads are viewed as K groups of N/K, so each K/V head serves its group without
    being repeated in memory. Scores and softmax in float32; q must already carry the 1/sqrt(H)
    scale. The backward pass is written out (softmax gradient via the row sums of d_out * out, as
    flash attention): on CPU it runs about 1.5x faster than differentiating the forward.
    """
    batch, length, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q = q.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = _grouped_attention(q, k, v, mask)
    return jnp.moveaxis(out, 1, 2).reshape(batch, length, num_heads, head_dim)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Attention(nnx.Module):
    """Multi-head self-attention with `num_kv_heads` shared key/value heads and rotary positions."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q_proj = Projection((d,), (n, h), ("embed", "heads", "head_dim"), **common)
        self.k_proj = Projection((d,), (k, h), ("embed", "kv_heads", "head_dim"), **common)
        self.v_proj = Projection((d,), (k, h), ("embed", "kv_heads", "head_dim"), **common)
        self.o_proj = Projection((n, h), (d,), ("heads", "head_dim", "embed"), **common)
        self.scale = 1.0 / math.sqrt(h)
        # Filled by Transformer.init_cache for incremental decoding: [B, max_len, K, H].
        self.cached_key = nnx.data(None)
        self.cached_value = nnx.data(None)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array,
                 cache_index: jax.Array | None = None) -> jax.Array:
        sin, cos = rope
        q = checkpoint_name(self.q_proj(x), "query_proj")
        k = checkpoint_name(self.k_proj(x), "key_proj")
        v = checkpoint_name(self.v_proj(x), "value_proj")
        q = constrain(apply_rope(q, sin, cos) * jnp.asarray(self.scale, q.dtype),
                      (BATCH, LENGTH, "activation_heads", "activation_head_dim"))
        k = constrain(apply_rope(k, sin, cos),
                      (BATCH, LENGTH, "activation_kv_heads", "activation_head_dim"))
        v = constrain(v, (BATCH, LENGTH, "activation_kv_heads", "activation_head_dim"))
        if cache_index is not None:
            start = (0, cache_index, 0, 0)
            self.cached_key[...] = jax.lax.dynamic_update_slice(
                self.cached_key[...], k.astype(self.cached_key.dtype), start)
            self.cached_value[...] = jax.lax.dynamic_update_slice(
                self.cached_value[...], v.astype(self.cached_value.dtype), start)
            k, v = self.cached_key[...].astype(q.dtype), self.cached_value[...].astype(q.dtype)
        out = dot_product_attention(q, k, v, mask)
        out = constrain(out, (BATCH, LENGTH, "activation_heads", "activation_head_dim"))
        return self.o_proj(out)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.gate_proj = Projection((cfg.d_model,), (cfg.mlp_dim,), ("embed", "mlp"), **common)
        self.up_proj = Projection((cfg.d_model,), (cfg.mlp_dim,), ("embed", "mlp"), **common)
        self.down_proj = Projection((cfg.mlp_dim,), (cfg.d_model,), ("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        hidden = constrain(hidden, (BATCH, LENGTH, "activation_mlp"))
        return self.down_proj(hidden)


class Block(nnx.Module):
    """One pre-norm Transformer layer."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.attention_norm = RMSNorm(cfg.d_model, **norm)
        self.attention = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, **norm)
        self.mlp = MLP(cfg, rngs=rngs)
        self.dropout_rate = cfg.dropout_rate

    def __call__(self, x: jax.Array, rope, mask: jax.Array, dropout_key: jax.Array | None = None,
                 cache_index: jax.Array | None = None) -> jax.Array:
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        h = self.attention(self.attention_norm(x), rope, mask, cache_index)
        x = x + _dropout(h, self.dropout_rate, keys[0])
        h = self.mlp(self.mlp_norm(x))
        x = x + _dropout(h, self.dropout_rate, keys[1])
        return constrain(x, (BATCH, LENGTH, EMBED))


class Transformer(nnx.Module):
    """Decoder-only language model: tokens [B, L] -> logits [B, L, vocab] (float32).

    With cfg.scan_layers the layers are one Block whose parameters have a leading 'layers' axis,
    applied with nnx.scan (one compiled layer however deep the model); otherwise `layers` is a
    list of Blocks. Both layouts initialise identically from the same key.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embedding = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), jnp.float32
                              ).astype(cfg.param_dtype),
            sharding_names=("vocab", "embed"))
        layer_keys = jax.random.split(rngs.params(), cfg.num_layers)
        if cfg.scan_layers:
            self.layers = nnx.vmap(lambda key: Block(cfg, rngs=nnx.Rngs(params=key)),
                                   transform_metadata={nnx.PARTITION_NAME: "layers"})(layer_keys)
        else:
            self.layers = nnx.List([Block(cfg, rngs=nnx.Rngs(params=key)) for key in layer_keys])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=cfg.dtype,
                                  param_dtype=cfg.param_dtype)
        # Decoding state (Transformer.init_cache): the next cache slot, and per slot whether it
        # holds a real token and whether that token is in the bidirectional prefix.
        self.cache_index = nnx.data(None)
        self.cache_valid = nnx.data(None)
        self.cache_prefix = nnx.data(None)

    # --- pieces -------------------------------------------------------------------------------

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Input embeddings [B, L, d_model] in the compute dtype (what `input_embeddings` replaces)."""
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.config.dtype)
        return constrain(x, (BATCH, LENGTH, EMBED))

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and the tied output projection: [B, L, d_model] -> float32 [B, L, vocab]."""
        cfg = self.config
        x = self.final_norm(x) * jnp.asarray(1.0 / math.sqrt(cfg.d_model), cfg.dtype)
        embedding = self.embedding[...].astype(cfg.dtype)
        logits = jnp.dot(x.reshape(-1, cfg.d_model), embedding.T,
                         preferred_element_type=jnp.float32).reshape(x.shape[:-1] + (-1,))
        if cfg.logits_soft_cap is not None:
            logits = cfg.logits_soft_cap * jnp.tanh(logits / cfg.logits_soft_cap)
        return constrain(logits, (BATCH, LENGTH, "activation_vocab"))

    def _apply_layers(self, x: jax.Array, rope, mask: jax.Array, dropout_rng: jax.Array | None,
                      cache_index: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        keys = None
        if dropout_rng is not None and cfg.dropout_rate > 0:
            keys = jax.random.split(dropout_rng, cfg.num_layers)

        def apply(layer: Block, x: jax.Array, key: jax.Array | None) -> jax.Array:
            return layer(x, rope, mask, key, cache_index)

        policy = REMAT_POLICIES[cfg.remat_policy]
        if cfg.remat_policy != "none":
            # Inside scan the loop already stops XLA from merging recomputation with the forward.
            apply = nnx.remat(apply, policy=policy, prevent_cse=not cfg.scan_layers)

        if cfg.scan_layers:
            if keys is None:
                scan = nnx.scan(lambda x, layer: apply(layer, x, None),
                                in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
                return scan(x, self.layers)
            scan = nnx.scan(lambda x, layer, key: apply(layer, x, key),
                            in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
            return scan(x, self.layers, keys)
        for i, layer in enumerate(self.layers):
            x = apply(layer, x, None if keys is None else keys[i])
        return x

    def _inputs(self, tokens, input_embeddings):
        if input_embeddings is not None:
            x = input_embeddings.astype(self.config.dtype)
        elif tokens is not None:
            x = self.embed(tokens)
        else:
            raise ValueError("Transformer: pass tokens or input_embeddings")
        if x.shape[1] > self.config.max_seq_len:
            raise ValueError(f"Transformer: sequence length {x.shape[1]} exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        return x

    # --- training / scoring -------------------------------------------------------------------

    def __call__(self, tokens: jax.Array | None, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None,
                 causal_attention: jax.Array | None = None,
                 dropout_rng: jax.Array | None = None,
                 input_embeddings: jax.Array | None = None) -> jax.Array:
        """Logits [B, L, vocab] (float32) for a batch of (possibly packed) sequences: `logits`
        of `hidden_states`, whose arguments it takes.
        """
        return self.logits(self.hidden_states(
            tokens, positions=positions, segment_ids=segment_ids,
            causal_attention=causal_attention, dropout_rng=dropout_rng,
            input_embeddings=input_embeddings))

    def hidden_states(self, tokens: jax.Array | None, *, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None,
                      causal_attention: jax.Array | None = None,
                      dropout_rng: jax.Array | None = None,
                      input_embeddings: jax.Array | None = None) -> jax.Array:
        """The last layer's output [B, L, d_model], before the final norm and the logits.

        positions: [B, L] RoPE positions (default 0..L-1; packed data restarts them per segment).
        segment_ids: [B, L], 0 = padding (default all ones: one segment per row).
        causal_attention: [B, L], 1 = token in the bidirectional prefix (seqio's
          decoder_causal_attention); None = fully causal.
        dropout_rng: None = deterministic; a key = dropout at cfg.dropout_rate.
        input_embeddings: [B, L, d_model] used instead of embed(tokens) (prompt tuning passes its
          prompt joined to embed(tokens)); tokens may then be None.
        """
        cfg = self.config
        x = self._inputs(tokens, input_embeddings)
        batch, length = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        mask = attention_mask(segment_ids, causal_attention)
        rope = rope_tables(positions, cfg.head_dim, cfg.rope_max_wavelength)
        if dropout_rng is not None and cfg.dropout_rate > 0:
            embed_key, dropout_rng = jax.random.split(dropout_rng)
            x = _dropout(x, cfg.dropout_rate, embed_key)
        return self._apply_layers(x, rope, mask, dropout_rng)

    # --- incremental decoding -----------------------------------------------------------------

    def _attention_modules(self) -> list[Attention]:
        if self.config.scan_layers:
            return [self.layers.attention]
        return [layer.attention for layer in self.layers]

    def init_cache(self, batch_size: int, max_len: int, dtype: str | None = None) -> None:
        """Adds an empty key/value cache of `max_len` slots (nnx.Cache variables) for decoding.

        prefill and decode_step write consecutive slots; the caller keeps the total number of
        tokens (padding included) within max_len, since a jitted step cannot check it.
        """
        cfg = self.config
        if max_len > cfg.max_seq_len:
            raise ValueError(f"init_cache: max_len={max_len} exceeds max_seq_len={cfg.max_seq_len}")
        dtype = dtype or cfg.dtype
        shape = (batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
        names = (BATCH, LENGTH, "activation_kv_heads", "activation_head_dim")
        if cfg.scan_layers:
            shape, names = (cfg.num_layers,) + shape, ("layers",) + names
        for attention in self._attention_modules():
            attention.cached_key = nnx.Cache(jnp.zeros(shape, dtype), sharding_names=names)
            attention.cached_value = nnx.Cache(jnp.zeros(shape, dtype), sharding_names=names)
        self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))
        self.cache_valid = nnx.Cache(jnp.zeros((batch_size, max_len), bool),
                                     sharding_names=(BATCH, LENGTH))
        self.cache_prefix = nnx.Cache(jnp.zeros((batch_size, max_len), bool),
                                      sharding_names=(BATCH, LENGTH))

    def clear_cache(self) -> None:
        """Drops the decoding cache, leaving only parameters in the module's state."""
        for attention in self._attention_modules():
            attention.cached_key = None
            attention.cached_value = None
        self.cache_index = self.cache_valid = self.cache_prefix = None

    def prefill(self, tokens: jax.Array | None, *, positions: jax.Array | None = None,
                causal_attention: jax.Array | None = None, token_mask: jax.Array | None = None,
                input_embeddings: jax.Array | None = None) -> jax.Array:
        """Empties the cache, then runs a prompt [B, L] through it; returns its logits [B, L, V].

        token_mask: [B, L], 0 = padding (e.g. left padding of shorter prompts); padding is never
        attended to, and default positions count real tokens only. causal_attention marks the
        bidirectional prefix, as in __call__.
        """
        return self.logits(self._prefill_hidden(tokens, positions, causal_attention, token_mask,
                                                input_embeddings))

    def _prefill_hidden(self, tokens, positions, causal_attention, token_mask, input_embeddings):
        """prefill up to the last layer's output (no logits)."""
        if self.cache_index is None:
            raise ValueError("prefill: call init_cache(batch_size, max_len) first")
        self.cache_index[...] = jnp.zeros((), jnp.int32)
        self.cache_valid[...] = jnp.zeros_like(self.cache_valid[...])
        self.cache_prefix[...] = jnp.zeros_like(self.cache_prefix[...])
        return self._cached_hidden(tokens, positions, causal_attention, token_mask, input_embeddings)

    def decode_step(self, tokens: jax.Array | None, *, positions: jax.Array | None = None,
                    input_embeddings: jax.Array | None = None) -> jax.Array:
        """Appends tokens [B, T] (usually T = 1) causally to the cache; returns logits [B, T, V].

        Default positions continue from the number of real tokens already in the cache.
        """
        if self.cache_index is None:
            raise ValueError("decode_step: call init_cache and prefill first")
        return self.logits(self._cached_hidden(tokens, positions, None, None, input_embeddings))

    def _cached_hidden(self, tokens, positions, causal_attention, token_mask, input_embeddings):
        cfg = self.config
        x = self._inputs(tokens, input_embeddings)
        batch, length = x.shape[:2]
        index = self.cache_index[...]
        if token_mask is None:
            token_mask = jnp.ones((batch, length), bool)
        token_mask = token_mask.astype(bool)
        prefix = (jnp.zeros((batch, length), bool) if causal_attention is None
                  else causal_attention.astype(bool) & token_mask)
        if positions is None:
            done = self.cache_valid[...].sum(axis=1, dtype=jnp.int32)[:, None]
            positions = done + jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - token_mask
        valid = jax.lax.dynamic_update_slice(self.cache_valid[...], token_mask, (0, index))
        cached_prefix = jax.lax.dynamic_update_slice(self.cache_prefix[...], prefix, (0, index))
        self.cache_valid[...] = valid
        self.cache_prefix[...] = cached_prefix
        self.cache_index[...] = index + length

        query_slot = index + jnp.arange(length)
        key_slot = jnp.arange(valid.shape[1])
        visible = (key_slot[None, :] <= query_slot[:, None])[None]
        visible = visible | (prefix[:, :, None] & cached_prefix[:, None, :])
        mask = visible & valid[:, None, :]
        rope = rope_tables(positions, cfg.head_dim, cfg.rope_max_wavelength)
        return self._apply_layers(x, rope, mask, None, cache_index=index)


# --- converting parameters between the scanned and per-layer layouts -------------------------


def stack_layer_params(params: dict) -> dict:
    """Per-layer parameters {'layers': {0: {...}, 1: {...}}} (nnx.to_pure_dict of an unscanned
    model) -> the scanned layout {'layers': {...}} with a leading layer axis."""
    layers = params["layers"]
    ordered = [layers[i] for i in sorted(layers, key=int)]
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *ordered)}


def unstack_layer_params(params: dict) -> dict:
    """The inverse of stack_layer_params."""
    stacked = params["layers"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "layers": {i: jax.tree.map(lambda x, i=i: x[i], stacked)
                                 for i in range(num_layers)}}
