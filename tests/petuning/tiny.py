"""Tiny models, batches and a short training run shared by the petuning tests."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ul2_lm import optim, partitioning, steps, synthetic, train_state
from ul2_lm.model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=64, num_layers=2, d_model=16, num_heads=2, head_dim=8, mlp_dim=32,
                  max_seq_len=32)
B, L = 2, 10


def count(tree) -> int:
    """Number of array elements in a pytree (parameters, optimiser state)."""
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def config(scan: bool = True, **changes) -> ModelConfig:
    return dataclasses.replace(CFG, scan_layers=scan, **changes)


@functools.cache
def _per_layer_params(seed: int, changes: tuple) -> dict:
    # Drawn with numpy: JAX's random initialisers compile once per kernel shape, which would
    # dominate the run time of these tests. Kernels get the base model's 1/fan_in variance.
    abstract = nnx.eval_shape(lambda: Transformer(config(False, **dict(changes)), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = optim.path_str(path)
        if name.endswith("scale"):
            return np.ones(x.shape, np.float32)
        fan_in = x.shape[0] * (x.shape[1] if name.endswith("o_proj/kernel") else 1)
        stddev = 1.0 if name == "embedding" else fan_in ** -0.5
        return (stddev * rng.standard_normal(x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(nnx.state(abstract)))


def base(scan: bool = True, seed: int = 0, **changes) -> Transformer:
    """A base Transformer; the scanned and per-layer layouts of a seed hold the same weights."""
    model = nnx.eval_shape(lambda: Transformer(config(scan, **changes), rngs=nnx.Rngs(0)))
    params = _per_layer_params(seed, tuple(sorted(changes.items())))
    if scan:
        layers = [params["layers"][i] for i in sorted(params["layers"])]
        params = {**params, "layers": jax.tree.map(lambda *xs: np.stack(xs), *layers)}
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return model


def tokens(seed: int = 1, shape=(B, L)) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(2, CFG.vocab_size, shape), jnp.int32)


@nnx.jit
def run(model, tokens, **kwargs):
    return model(tokens, **kwargs)


def base_params(model) -> dict:
    """The parameters that are not a method's own (LoRA, prompt), as a pure dict."""
    from petuning.report import BASE_PARAMS
    return nnx.to_pure_dict(nnx.state(model, BASE_PARAMS))


def randomize(model, filter_, seed: int = 7, scale: float = 0.3) -> None:
    """Gives the parameters `filter_` selects random values (e.g. a LoRA B away from zero)."""
    state = nnx.state(model, filter_)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))


def train(make_model, trainable, *, num_steps: int = 3, param_labels=None, group_overrides=None,
          peak_learning_rate: float = 1e-2, scan: bool = True, dropout: bool = False):
    """Runs the project's train step on synthetic batches on a one-device mesh.

    Returns (layout, initial state, final state, frozen, losses)."""
    mesh = partitioning.make_mesh((("data", 1), ("fsdp", 1), ("tensor", 1)),
                                  devices=jax.devices()[:1])
    rules = partitioning.DEFAULT_RULES
    # As ul2_lm.train_state.optimizer: Adafactor per layer for a scanned stack.
    stacked = optim.labels_by_path([(r"^layers/", True)], default=False) if scan else None
    tx, _ = optim.make_optimizer(ml_collections.ConfigDict(
        {"peak_learning_rate": peak_learning_rate, "schedule": "constant"}), num_steps,
        param_labels=param_labels, group_overrides=group_overrides, stacked=stacked)
    layout = train_state.make_layout(make_model, tx, mesh, rules, trainable=trainable)
    state, frozen = train_state.create(make_model, tx, layout, mesh, rules, trainable=trainable)
    initial = jax.tree.map(np.asarray, state)
    step = jax.jit(steps.make_train_step(layout.graphdef, tx, seed=0, dropout=dropout))
    losses = []
    with partitioning.activate(mesh, rules):
        for i in range(num_steps):
            batch = synthetic.example_batch(0, "train", i, 0, 1, 4, L + 2, CFG.vocab_size)
            state, metrics = step(state, frozen, batch)
            losses.append(float(metrics["loss"]))
    return layout, initial, state, frozen, losses


def leaf_paths(tree) -> list[str]:
    return [optim.path_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
