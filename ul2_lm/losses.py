"""Token-level losses. Loss = per-token negative log-likelihood in nats on target tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                           z_loss: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sums over tokens: (sum of weighted NLL, sum of weighted z-loss, sum of weights).

    Sums rather than means, so microbatches and hosts combine exactly: the loss of a batch is
    sum(nll) / sum(weights) however the batch was split. The z-loss (PaLM, T5X) keeps the
    softmax normaliser near 1; it is a training regulariser only and never part of the reported
    loss.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    nll = (log_z - target_logit) * weights
    z = z_loss * jnp.square(log_z) * weights
    return nll.sum(), z.sum(), weights.sum()
