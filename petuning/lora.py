"""LoRA: trainable low-rank updates to the frozen linear projections (Hu et al. 2021).

`apply_lora(model, LoRAConfig(...))` swaps every projection whose module path matches the
targets for a `LoRAProjection`, which computes

    y = x W + scale * dropout(x) A B,    A: in_shape + (rank,),  B: (rank,) + out_shape,

with A random and B zero, so the model's output is unchanged until B trains. A and B are
`nnx.LoRAParam`s, which makes `nnx.LoRAParam` the trainable filter; W keeps its path and its
`nnx.Param` type, so the frozen part of a LoRA run is laid out exactly as a pretrained checkpoint.
Scanned layers get adapters stacked along the same leading 'layers' axis as their kernels.

The paper leaves the targets, the initialisation and alpha open. Defaults here: adapters on all
seven projections of every layer (attention q/k/v/o and the gated FFN, which is also
'all-linear' for this model, as the output embedding is tied), A ~ N(0, 1/fan_in) truncated at two
standard deviations, B = 0, alpha = rank (scale 1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.custom_derivatives import SymbolicZero

from petuning import adapter_files
from petuning.grafting import (PathParts, adopt, modules_of_type, path_name, replace_submodule)
from ul2_lm.model import (ModelConfig, Projection, Transformer, stack_layer_params,
                          unstack_layer_params)

DEFAULT_TARGETS = r"(attention/[qkvo]_proj|mlp/(gate|up|down)_proj)$"
ALL_LINEAR = "all-linear"

# Folded into the model's dropout key to give the adapters a stream of their own.
_DROPOUT_STREAM = 0x4C6F5241


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """How to add LoRA adapters.

    rank: r, the inner dimension of A and B.
    alpha: the numerator of the scale; None = rank.
    targets: which projections get adapters: a regex searched in each module path (layer indices
      of unscanned models included, e.g. 'layers/3/attention/q_proj'), a sequence of module
      names (('q_proj', 'v_proj'), as PEFT's list form), or 'all-linear'.
    dropout_rate: dropout on the adapter's input, active when the model is called with a
      dropout_rng.
    use_rslora: scale = alpha / sqrt(rank) (rank-stabilised LoRA) instead of alpha / rank.
    param_dtype: storage dtype of A and B.
    """

    rank: int = 4
    alpha: float | None = None
    targets: str | tuple[str, ...] = DEFAULT_TARGETS
    dropout_rate: float = 0.0
    use_rslora: bool = False
    param_dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be a positive int, got {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"LoRAConfig.alpha must be a positive number or None, got {self.alpha!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"LoRAConfig.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        if self.param_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"LoRAConfig.param_dtype={self.param_dtype!r}; expected 'float32' or "
                             "'bfloat16'")
        targets = self.targets
        if isinstance(targets, str):
            if not targets:
                raise ValueError("LoRAConfig.targets is empty")
            if targets != ALL_LINEAR:
                try:
                    re.compile(targets)
                except re.error as e:
                    raise ValueError(f"LoRAConfig.targets={targets!r} is not a valid regex: {e}")
        else:
            targets = tuple(targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"LoRAConfig.targets={self.targets!r}: give a regex, "
                                 f"{ALL_LINEAR!r}, or a non-empty sequence of module names")
            object.__setattr__(self, "targets", targets)

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        """alpha / rank, or alpha / sqrt(rank) under rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class _DropoutKey(nnx.Variable):
    """A per-call dropout key, present only while the model runs."""


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def lora_matmul(x: jax.Array, adapter_input: jax.Array | None, kernel: jax.Array, a: jax.Array,
                b: jax.Array, scale: float) -> jax.Array:
    """x @ kernel + scale * (adapter_input @ a) @ b, for 2-D operands; adapter_input None = x.

    The backward pass is written out (autodiff gives the same values): it computes only the
    cotangents asked for (a frozen kernel gets no weight-gradient matmul) and A's gradient as
    the wide [rank, in] product, transposed afterwards behind an optimisation barrier. Left to
    itself, XLA's CPU backend folds that transpose into the dot and computes the tall [in, rank]
    layout, 5-8x slower (benchmarks/RESULTS_finetuning.md).
    """
    return _forward(x, x if adapter_input is None else adapter_input, kernel, a, b, scale)[0]


def _forward(x, ax, kernel, a, b, scale):
    """(x @ kernel + scale * (ax @ a) @ b, and ax @ a)."""
    h = ax @ a
    return x @ kernel + (h @ b) * jnp.asarray(scale, h.dtype), h


def _lora_matmul_fwd(x, adapter_input, kernel, a, b, scale):
    own_input = adapter_input is not None
    ax = adapter_input.value if own_input else x.value
    y, h = _forward(x.value, ax, kernel.value, a.value, b.value, scale)
    # What the backward pass needs, by which cotangents are asked for; None marks the rest
    # (and whether the adapter had an input of its own).
    residuals = (x.value if kernel.perturbed else None,
                 kernel.value if x.perturbed else None,
                 None if own_input else ax, ax if own_input else None, a.value, b.value, h)
    return y, residuals


def _lora_matmul_bwd(scale, residuals, dy):
    x, kernel, shared_input, own_input, a, b, h = residuals
    ax = own_input if shared_input is None else shared_input
    if isinstance(dy, SymbolicZero):
        return None, None, None, None, None
    g = (dy @ b.T) * jnp.asarray(scale, dy.dtype)  # [tokens, rank]
    d_a = jax.lax.optimization_barrier(g.T @ ax).T.astype(a.dtype)
    d_b = (h.T @ dy * jnp.asarray(scale, dy.dtype)).astype(b.dtype)
    d_ax = (g @ a.T).astype(ax.dtype)
    dx = None if kernel is None else (dy @ kernel.T).astype(dy.dtype)
    if shared_input is not None:
        dx, d_ax = d_ax if dx is None else dx + d_ax, None
    d_kernel = None if x is None else (x.T @ dy).astype(x.dtype)
    return dx, d_ax, d_kernel, d_a, d_b


lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd, symbolic_zeros=True)


class LoRAProjection(Projection):
    """A Projection plus a low-rank update: x W + scale * dropout(x) A B.

    Holds the base `kernel` (same path, same type) and `lora_a`, `lora_b` (nnx.LoRAParam, with
    logical axes: A the kernel's input axes + 'lora_rank', B 'lora_rank' + its output axes, and
    'layers' in front when stacked). After `merge` the update lives in the kernel and the
    adapter path is skipped until `unmerge`.
    """

    def __init__(self, base: Projection, lora_a: jax.Array, *, scale: float,
                 dropout_rate: float, num_stack_dims: int):
        adopt(self, base)
        s, n = num_stack_dims, self.num_in_dims
        shape = tuple(self.kernel.shape)
        names = tuple(self.kernel.get_metadata().get("out_sharding") or (None,) * len(shape))
        rank = lora_a.shape[-1]
        self.lora_a = nnx.LoRAParam(lora_a, sharding_names=names[:s + n] + ("lora_rank",))
        self.lora_b = nnx.LoRAParam(
            jnp.zeros(shape[:s] + (rank,) + shape[s + n:], lora_a.dtype),
            sharding_names=names[:s] + ("lora_rank",) + names[s + n:])
        self.scale = float(scale)
        self.dropout_rate = float(dropout_rate)
        self.num_stack_dims = num_stack_dims
        self.merged = False
        self.dropout_key = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.merged:
            return super().__call__(x)
        x2, kernel, out_shape = self.matrices(x)
        in_size = kernel.shape[0]
        a = self.lora_a[...].astype(self.dtype).reshape(in_size, -1)
        b = self.lora_b[...].astype(self.dtype).reshape(a.shape[1], -1)
        adapter_input = None
        if self.dropout_key is not None and self.dropout_rate > 0:
            keep = jax.random.bernoulli(self.dropout_key[...], 1.0 - self.dropout_rate, x2.shape)
            adapter_input = jnp.where(keep, x2 / (1.0 - self.dropout_rate), jnp.zeros_like(x2))
        return lora_matmul(x2, adapter_input, kernel, a, b, self.scale).reshape(out_shape)

    def delta(self) -> jax.Array:
        """scale * A B in the kernel's shape (float32), stacked layers included."""
        s = self.num_stack_dims
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        lead, rank = a.shape[:s], a.shape[-1]
        product = jnp.matmul(a.reshape(lead + (-1, rank)), b.reshape(lead + (rank, -1)),
                             precision=jax.lax.Precision.HIGHEST)
        return (self.scale * product).reshape(self.kernel.shape)


class LoRATransformer(Transformer):
    """A Transformer whose projections carry LoRA adapters (build it with `apply_lora`).

    Same call signature and decoding methods as Transformer; a `dropout_rng` also drives the
    adapters' input dropout (from a stream of its own, so the base model's dropout is as
    without adapters).
    """

    def __init__(self, base: Transformer, config: LoRAConfig):
        adopt(self, base)
        self.lora_config = config

    def hidden_states(self, tokens: jax.Array | None, *, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None,
                      causal_attention: jax.Array | None = None,
                      dropout_rng: jax.Array | None = None,
                      input_embeddings: jax.Array | None = None) -> jax.Array:
        # __call__ goes through here, so both get the adapters' dropout.
        kwargs = dict(positions=positions, segment_ids=segment_ids,
                      causal_attention=causal_attention, dropout_rng=dropout_rng,
                      input_embeddings=input_embeddings)
        if dropout_rng is None or self.lora_config.dropout_rate == 0:
            return super().hidden_states(tokens, **kwargs)
        self._set_dropout_keys(jax.random.fold_in(dropout_rng, _DROPOUT_STREAM))
        try:
            return super().hidden_states(tokens, **kwargs)
        finally:
            self._set_dropout_keys(None)

    def _set_dropout_keys(self, key: jax.Array | None) -> None:
        found = list(modules_of_type(self, LoRAProjection))
        if key is None:
            for _, proj in found:
                proj.dropout_key = None
            return
        names = sorted({_canonical(path)[0] for path, _ in found})
        num_layers = self.config.num_layers
        # One split for every module; a module's keys depend on its layout-free name and its
        # layer only, so the scanned and per-layer layouts drop the same units.
        keys = jax.random.split(key, len(names) * num_layers).reshape(len(names), num_layers)
        for path, proj in found:
            name, index = _canonical(path)
            row = keys[names.index(name)]
            proj.dropout_key = _DropoutKey(row if proj.num_stack_dims else row[index or 0])


def _canonical(path: PathParts) -> tuple[str, int | None]:
    """The path without its layer index, and the index (None for stacked or non-layer modules)."""
    index = next((p for p in path if isinstance(p, int)), None)
    return path_name(tuple(p for p in path if not isinstance(p, int))), index


def _stack_dims(cfg: ModelConfig, path: PathParts) -> int:
    return 1 if cfg.scan_layers and path and path[0] == "layers" else 0


def _matches(targets: str | tuple[str, ...], name: str) -> bool:
    if targets == ALL_LINEAR:
        return True
    if isinstance(targets, str):
        return re.search(targets, name) is not None
    return name.rsplit("/", 1)[-1] in targets


def target_paths(model: nnx.Module, targets: str | Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """The module paths of the projections that `targets` selects (as LoRAConfig.targets)."""
    targets = LoRAConfig(targets=targets).targets
    return [path_name(path) for path, _ in modules_of_type(model, Projection)
            if _matches(targets, path_name(path))]


def _initial_a(key: jax.Array, plans, num_layers: int, dtype) -> list[jax.Array]:
    """A for every planned projection, ~ N(0, 1/fan_in) truncated at two standard deviations.

    One draw serves them all (a single random op compiles much faster than one per projection),
    laid out by layout-free module name and layer, so that the scanned and per-layer layouts of
    a model get identical adapters from the same key.
    """
    sizes = {_canonical(path)[0]: math.prod(in_shape) * rank
             for path, _, _, in_shape, rank in plans}
    offsets, total = {}, 0
    for name in sorted(sizes):
        offsets[name] = total
        total += num_layers * sizes[name]
    # A standard normal truncated to [-2, 2] has stddev 0.8796; divide it out.
    draws = jax.random.truncated_normal(key, -2.0, 2.0, (total,), jnp.float32) / 0.87962566103423978
    out = []
    for path, _, stacked, in_shape, rank in plans:
        name, index = _canonical(path)
        shape = ((num_layers,) if stacked else ()) + in_shape + (rank,)
        start = offsets[name] + (index or 0) * sizes[name]
        values = draws[start:start + math.prod(shape)].reshape(shape)
        out.append((values / math.sqrt(math.prod(in_shape))).astype(dtype))
    return out


def apply_lora(model: Transformer, config: LoRAConfig, *, key: jax.Array | int = 0
               ) -> LoRATransformer:
    """`model` with LoRA adapters on the projections `config.targets` selects.

    Consumes `model`: the result shares its parameters (the base kernels are not copied).
    `key` (a PRNG key or an int seed) draws the A matrices; the scanned and per-layer layouts
    get identical adapters from the same key. Raises ValueError, naming the value, when the
    targets match no projection or the rank exceeds a selected matrix's smaller dimension.
    """
    if type(model) is not Transformer:
        raise TypeError(f"apply_lora expects a plain ul2_lm Transformer, got "
                        f"{type(model).__name__} (adapters cannot be stacked on another method)")
    key = jax.random.key(key) if isinstance(key, int) else key
    cfg = model.config
    projections = list(modules_of_type(model, Projection))
    selected = [(path, proj) for path, proj in projections
                if _matches(config.targets, path_name(path))]
    if not selected:
        names = sorted({_canonical(path)[0] for path, _ in projections})
        raise ValueError(f"LoRAConfig.targets={config.targets!r} matches no projection; the "
                         f"model's projections are {names}")
    plans = []
    for path, proj in selected:
        s, n = _stack_dims(cfg, path), proj.num_in_dims
        shape = tuple(proj.kernel.shape)
        in_shape, out_shape = shape[s:s + n], shape[s + n:]
        smaller = min(math.prod(in_shape), math.prod(out_shape))
        if config.rank > smaller:
            raise ValueError(f"LoRAConfig.rank={config.rank} exceeds the smaller dimension "
                             f"({smaller}) of {path_name(path)}, a {math.prod(in_shape)} x "
                             f"{math.prod(out_shape)} matrix")
        plans.append((path, proj, s, in_shape, config.rank))
    initial = _initial_a(key, plans, cfg.num_layers, config.param_dtype)
    for (path, proj, s, _, _), lora_a in zip(plans, initial):
        replace_submodule(model, path, LoRAProjection(
            proj, lora_a, scale=config.scale, dropout_rate=config.dropout_rate,
            num_stack_dims=s))
    return LoRATransformer(model, config)


def _lora_projections(model: nnx.Module) -> list[tuple[PathParts, LoRAProjection]]:
    found = list(modules_of_type(model, LoRAProjection))
    if not found:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters (see apply_lora)")
    return found


def merge(model: nnx.Module) -> nnx.Module:
    """Folds scale * A B into every adapted kernel, in place; the adapter path is then skipped,
    so the logits stay the same (to float rounding) and inference runs at base-model cost.
    Already merged projections are left alone. Returns `model`."""
    for _, proj in _lora_projections(model):
        if not proj.merged:
            kernel = proj.kernel[...]
            proj.kernel[...] = (kernel.astype(jnp.float32) + proj.delta()).astype(kernel.dtype)
            proj.merged = True
    return model


def unmerge(model: nnx.Module) -> nnx.Module:
    """Undoes `merge`: subtracts scale * A B again, in place. The kernels come back to float
    rounding (float32: within a few ulps of the update's size), not bitwise. Returns `model`."""
    for _, proj in _lora_projections(model):
        if proj.merged:
            kernel = proj.kernel[...]
            proj.kernel[...] = (kernel.astype(jnp.float32) - proj.delta()).astype(kernel.dtype)
            proj.merged = False
    return model


def merged_base_params(model: LoRATransformer) -> dict:
    """The base model's parameters (a pure dict with the plain Transformer's structure) with the
    adapters folded in: a checkpoint a plain Transformer loads. `model` is not changed."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    for path, proj in _lora_projections(model):
        if proj.merged:
            continue
        node = params
        for part in path:
            node = node[part]
        kernel = node["kernel"]
        node["kernel"] = (kernel.astype(jnp.float32) + proj.delta()).astype(kernel.dtype)
    return params


def adapter_params(model: LoRATransformer) -> dict:
    """The adapters alone as a pure dict in the per-layer layout ({'layers': {0: ...}})."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    if model.config.scan_layers and "layers" in params:
        params = unstack_layer_params(params)
    return params


def _peft_config(config: LoRAConfig, base_model_name_or_path: str | None) -> dict:
    targets = config.targets if isinstance(config.targets, str) else list(config.targets)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.dropout_rate,
        "target_modules": targets,
        "use_rslora": config.use_rslora,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }


def save_adapter(model: LoRATransformer, directory: str | os.PathLike, *,
                 base_model_name_or_path: str | None = None):
    """Writes the adapters alone: adapter_model.npz (float32, per-layer paths such as
    'layers/0/attention/q_proj/lora_a') and adapter_config.json (PEFT's field names)."""
    if not isinstance(model, LoRATransformer):
        raise TypeError(f"save_adapter expects a LoRATransformer, got {type(model).__name__}")
    return adapter_files.write(directory, adapter_files.flatten(adapter_params(model)),
                               _peft_config(model.lora_config, base_model_name_or_path))


def read_adapter_config(directory: str | os.PathLike) -> LoRAConfig:
    """The LoRAConfig recorded in an adapter directory's adapter_config.json."""
    _, fields = adapter_files.read(directory)
    if fields.get("peft_type") != "LORA":
        raise ValueError(f"{directory}/{adapter_files.CONFIG_FILE}: peft_type is "
                         f"{fields.get('peft_type')!r}, not 'LORA'")
    targets = fields["target_modules"]
    return LoRAConfig(rank=int(fields["r"]), alpha=float(fields["lora_alpha"]),
                      targets=targets if isinstance(targets, str) else tuple(targets),
                      dropout_rate=float(fields.get("lora_dropout", 0.0)),
                      use_rslora=bool(fields.get("use_rslora", False)))


def load_adapter(model: Transformer, directory: str | os.PathLike) -> LoRATransformer:
    """Adds the adapters saved in `directory` to a plain Transformer (scanned or not, whatever
    the layout they were trained in), or loads them into a LoRATransformer of the same config."""
    arrays, _ = adapter_files.read(directory)
    config = read_adapter_config(directory)
    if isinstance(model, LoRATransformer):
        if (model.lora_config.rank, model.lora_config.targets) != (config.rank, config.targets):
            raise ValueError(f"adapter in {str(directory)!r} has rank {config.rank} and targets "
                             f"{config.targets!r}; the model's adapters have rank "
                             f"{model.lora_config.rank} and targets {model.lora_config.targets!r}")
    else:
        model = apply_lora(model, config)
    expected = adapter_files.flatten(adapter_params(model), leaf=lambda x: x)
    missing, unexpected = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter in {str(directory)!r} does not fit the model: missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}")
    for name, value in arrays.items():
        if value.shape != expected[name].shape:
            raise ValueError(f"adapter in {str(directory)!r}: {name} has shape {value.shape}, "
                             f"the model expects {expected[name].shape}")
    tree = adapter_files.unflatten(arrays)
    if model.config.scan_layers and "layers" in tree:
        tree = stack_layer_params(tree)
    state = nnx.state(model, nnx.LoRAParam)
    dtypes = jax.tree.map(lambda v: v.dtype, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x, d: jnp.asarray(x, d), tree, dtypes))
    nnx.update(model, state)
    return model
