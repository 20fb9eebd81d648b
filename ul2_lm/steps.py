"""The compiled train and eval steps.

The train step is a pure function of (state, frozen params, batch): dropout keys come from the
run seed folded with the step number, so a run resumed from a checkpoint replays exactly the
same computation as one that never stopped.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ul2_lm import losses, optim
from ul2_lm.train_state import TrainState

Batch = dict[str, jax.Array]


def _forward(graphdef: nnx.GraphDef, params, frozen, batch: Batch, dropout_rng=None) -> jax.Array:
    model = nnx.merge(graphdef, params, frozen)
    return model(
        batch["decoder_input_tokens"],
        positions=batch.get("decoder_positions"),
        segment_ids=batch.get("decoder_segment_ids"),
        causal_attention=batch.get("decoder_causal_attention"),
        dropout_rng=dropout_rng,
    )


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, seed: int,
                    num_microbatches: int = 1, z_loss: float = 0.0, dropout: bool = False):
    """Returns train_step(state, frozen, batch) -> (state, metrics).

    Gradients are the mean over all target tokens of the global batch, however it is split into
    microbatches: each microbatch contributes sums, divided once by the total weight.
    """

    def summed_loss(params, frozen, microbatch, rng):
        logits = _forward(graphdef, params, frozen, microbatch, rng if dropout else None)
        nll, z, weight = losses.weighted_cross_entropy(
            logits, microbatch["decoder_target_tokens"], microbatch["decoder_loss_weights"], z_loss)
        return nll + z, (nll, weight)

    grad_fn = jax.grad(summed_loss, has_aux=True)

    def train_step(state: TrainState, frozen, batch: Batch):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        grads, (nll, weight) = optim.accumulate_gradients(
            lambda mb, key: grad_fn(state.params, frozen, mb, key), batch, num_microbatches, rng)
        denominator = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        loss = nll / denominator
        # A non-finite step is dropped (state kept bitwise); under 'stop' the host then raises.
        update = optim.guarded_update(tx, grads, state.opt_state, state.params,
                                      state.skipped_steps, loss)
        new_state = TrainState(step=state.step + 1, params=update.params,
                               opt_state=update.opt_state, skipped_steps=update.skipped_steps)
        metrics = {
            "loss": loss,
            "target_tokens": weight,
            "grad_norm": optax.global_norm(grads),
            "finite": update.finite,
        }
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef):
    """Returns eval_step(params, frozen, batch) -> {'nll_sum', 'weight_sum'} (summed, exact)."""

    def eval_step(params, frozen, batch: Batch) -> dict[str, Any]:
        logits = _forward(graphdef, params, frozen, batch)
        nll, _, weight = losses.weighted_cross_entropy(
            logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])
        return {"nll_sum": nll, "weight_sum": weight}

    return eval_step
