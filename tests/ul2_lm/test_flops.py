"""The analytic FLOP count agrees with what XLA compiles."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ul2_lm import flops, model_sizes
from ul2_lm.model import ModelConfig, Transformer

# Wide enough that matmuls dominate the elementwise work XLA also counts.
CFG = ModelConfig(vocab_size=512, num_layers=2, d_model=128, num_heads=4, head_dim=32,
                  mlp_dim=512, num_kv_heads=1, scan_layers=False)
B, L = 2, 64


def xla_flops(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float(analysis["flops"])


@pytest.fixture(scope="module")
def split_model():
    return nnx.split(Transformer(CFG, rngs=nnx.Rngs(params=0)))


def test_forward_flops_match_xla_cost_analysis(split_model):
    graphdef, params = split_model
    tokens = jnp.zeros((B, L), jnp.int32)
    measured = xla_flops(lambda p, t: nnx.merge(graphdef, p)(t), params, tokens)
    # The einsum attention computes the masked half too: compare with causal=False.
    predicted = flops.forward_flops_per_token(CFG, L, causal=False) * B * L
    assert measured == pytest.approx(predicted, rel=0.03)


def test_training_flops_match_xla_cost_analysis_of_the_gradient(split_model):
    graphdef, params = split_model
    tokens = jnp.zeros((B, L), jnp.int32)

    def loss(p, t):
        logits = nnx.merge(graphdef, p)(t)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), t[..., None], -1).sum()

    measured = xla_flops(jax.grad(loss), params, tokens)
    predicted = flops.training_flops_per_token(CFG, L, causal=False) * B * L
    assert measured == pytest.approx(predicted, rel=0.03)


def test_causal_attention_counts_half_of_the_score_and_value_work():
    full = flops.attention_flops_per_token(CFG, L, causal=False)
    assert flops.attention_flops_per_token(CFG, L) == full / 2
    assert (flops.forward_flops_per_token(CFG, L, causal=False)
            - flops.forward_flops_per_token(CFG, L)) == full / 2


def test_training_is_six_flops_per_matmul_parameter_plus_attention():
    cfg = model_sizes.SIZES["1b"]
    counts = model_sizes.count_params(cfg)
    # Matmul weights = every parameter except the norm scales; the tied embedding counts once.
    norms = (2 * cfg.num_layers + 1) * cfg.d_model
    assert flops.matmul_params(cfg) == counts["total"] - norms
    attention = 3 * flops.attention_flops_per_token(cfg, 2048)
    assert flops.training_flops_per_token(cfg, 2048) == 6 * flops.matmul_params(cfg) + attention
    # At the paper's scale attention is a small part of the total (about 5% for 1B at 2048 tokens).
    assert attention < 0.1 * flops.training_flops_per_token(cfg, 2048)
