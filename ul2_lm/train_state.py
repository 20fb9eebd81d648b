"""The training state, created directly in its sharded layout.

Parameters live as plain nested dicts of arrays (`nnx.to_pure_dict`), split into the *trainable*
part, which gets gradients and optimiser state, and the *frozen* rest (empty when everything
trains; the frozen base under LoRA or prompt tuning). Freezing is structural: the optimiser never
sees a frozen array. A module is rebuilt inside the step with `nnx.merge(graphdef, trainable,
frozen)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ul2_lm import optim, partitioning


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser steps taken.
    params: Any  # trainable parameters (pure dict).
    opt_state: Any
    skipped_steps: jax.Array  # int32 scalar: steps dropped by the NaN guard.


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a model's state splits and where each part lives on the mesh."""

    graphdef: nnx.GraphDef
    abstract_params: Any  # trainable, ShapeDtypeStructs
    abstract_frozen: Any
    param_shardings: Any
    frozen_shardings: Any
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs with .sharding set: a restore target.


def _pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state)


def optimizer(config, model_config, num_steps: int | None = None, *, param_labels=None,
              group_overrides=None):
    """(tx, schedule) for a run: config.optim, with Adafactor's statistics, update clipping and
    parameter scale computed per layer for scanned layers, exactly as for unscanned ones.
    `param_labels` / `group_overrides`: parameter groups (see optim.make_optimizer), e.g. a
    finetuning method's new parameters (petuning.optimizer_groups)."""
    stacked = (optim.labels_by_path([(r"^layers/", True)], default=False)
               if model_config.scan_layers else None)
    return optim.make_optimizer(config.optim, num_steps or config.train.num_steps, stacked=stacked,
                                param_labels=param_labels, group_overrides=group_overrides)


def make_layout(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                mesh: Mesh, rules, trainable: nnx.filterlib.Filter = nnx.Param) -> Layout:
    """Works out, without allocating anything, the shapes and shardings of a training run."""
    graphdef, abstract_trainable, abstract_frozen = nnx.split(
        nnx.eval_shape(make_model), trainable, ...)
    param_shardings = _pure(partitioning.state_shardings(abstract_trainable, mesh, rules))
    frozen_shardings = _pure(partitioning.state_shardings(abstract_frozen, mesh, rules))
    abstract_params = _pure(abstract_trainable)
    abstract_frozen = _pure(abstract_frozen)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=optim.opt_state_shardings(jax.eval_shape(tx.init, abstract_params),
                                            abstract_params, param_shardings, replicated),
        skipped_steps=replicated,
    )
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(step=scalar, params=abstract_params,
                          opt_state=jax.eval_shape(tx.init, abstract_params), skipped_steps=scalar)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return Layout(graphdef=graphdef, abstract_params=abstract_params,
                  abstract_frozen=abstract_frozen, param_shardings=param_shardings,
                  frozen_shardings=frozen_shardings, state_shardings=shardings,
                  abstract_state=abstract)


def create(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation,
           layout: Layout, mesh: Mesh, rules, trainable: nnx.filterlib.Filter = nnx.Param,
           *, with_frozen: bool = True) -> tuple[TrainState, Any]:
    """Initialises (train state, frozen params), each array born with its final sharding.

    with_frozen=False returns (state, None) and never materialises the frozen part (the
    compiler drops its initialisation): for a finetuning run whose frozen base comes from a
    checkpoint."""

    def init():
        _, params, frozen = nnx.split(make_model(), trainable, ...)
        params, frozen = _pure(params), _pure(frozen)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), skipped_steps=jnp.zeros((), jnp.int32))
        return (state, frozen) if with_frozen else (state, None)

    shardings = (layout.state_shardings, layout.frozen_shardings if with_frozen else None)
    with partitioning.activate(mesh, rules):
        return jax.jit(init, out_shardings=shardings)()


def fresh_opt_state(tx: optax.GradientTransformation, params, layout: Layout):
    """The optimiser's initial state for `params`, in the layout's shardings."""
    return jax.jit(tx.init, out_shardings=layout.state_shardings.opt_state)(params)


