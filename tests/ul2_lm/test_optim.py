"""The optimiser: schedules, Adafactor as T5X configures it, parameter groups, gradient
accumulation, and the NaN/Inf guard."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ul2_lm import optim
from ul2_lm.config import ConfigError


def optim_config(**changes):
    c = ml_collections.ConfigDict(dict(
        name="adafactor", schedule="cosine", peak_learning_rate=0.01, final_learning_rate=0.001,
        warmup_steps=10, decay_steps=None, decay_rate=0.8, clipping_threshold=1.0,
        multiply_by_parameter_scale=True, factored=True, min_dim_size_to_factor=128,
        global_norm_clip=None, weight_decay=None))
    c.update(changes)
    return c


def values(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


# --- Schedules -------------------------------------------------------------------------------

def test_cosine_warms_up_from_zero_to_the_peak_then_decays_to_the_final_rate():
    schedule = optim.make_schedule(optim_config(warmup_steps=10), num_steps=100)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), 0.01, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), 0.001, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(500)), 0.001, rtol=1e-6)  # holds after the end
    warmup, decay = values(schedule, range(0, 11)), values(schedule, range(10, 101))
    assert np.all(np.diff(warmup) > 0)
    assert np.all(np.diff(decay) <= 1e-9) and np.any(np.diff(decay) < 0)
    # Half-way through the cosine the rate is half-way between peak and final.
    np.testing.assert_allclose(float(schedule(55)), (0.01 + 0.001) / 2, rtol=1e-5)


def test_without_warmup_the_first_step_runs_at_the_peak():
    schedule = optim.make_schedule(optim_config(warmup_steps=0), num_steps=50)
    np.testing.assert_allclose(float(schedule(0)), 0.01, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(50)), 0.001, rtol=1e-6)


def test_decay_steps_sets_where_the_cosine_ends():
    schedule = optim.make_schedule(optim_config(decay_steps=40), num_steps=100)
    np.testing.assert_allclose(float(schedule(40)), 0.001, rtol=1e-6)
    assert float(schedule(30)) > 0.001


def test_constant_and_rsqrt_schedules():
    constant = optim.make_schedule(optim_config(schedule="constant"), num_steps=100)
    assert float(constant(0)) == 0.0
    np.testing.assert_allclose(values(constant, [10, 50, 100]), 0.01, rtol=1e-6)

    rsqrt = optim.make_schedule(optim_config(schedule="rsqrt", final_learning_rate=0.0),
                                num_steps=1000)
    np.testing.assert_allclose(float(rsqrt(10)), 0.01, rtol=1e-6)
    np.testing.assert_allclose(float(rsqrt(40)), 0.01 * np.sqrt(10 / 40), rtol=1e-5)
    floored = optim.make_schedule(optim_config(schedule="rsqrt"), num_steps=10**6)
    np.testing.assert_allclose(float(floored(10**6)), 0.001, rtol=1e-6)


def test_the_optimiser_steps_along_its_schedule():
    """The schedule returned for logging is the one the updates follow."""
    tx, schedule = optim.make_optimizer(
        optim_config(multiply_by_parameter_scale=False, clipping_threshold=None), num_steps=20)
    params = {"w": jnp.ones((3,))}
    state = tx.init(params)
    for step in range(4):
        updates, state = tx.update({"w": jnp.ones((3,))}, state, params)
        # With a constant gradient Adafactor's normalised update is exactly 1 per coordinate.
        np.testing.assert_allclose(np.asarray(updates["w"]), -float(schedule(step)), rtol=1e-5)


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="optim.schedule"):
        optim.make_schedule(optim_config(schedule="linear"), num_steps=10)
    with pytest.raises(ConfigError, match="optim.decay_steps"):
        optim.make_schedule(optim_config(warmup_steps=20), num_steps=10)
    with pytest.raises(ConfigError, match="momentun"):
        optim.make_optimizer(optim_config(), 100, param_labels={"w": "prompt"},
                             group_overrides={"prompt": {"momentun": 0.9}})


# --- Adafactor -------------------------------------------------------------------------------

def second_moments(state):
    """The FactoredState inside an Adafactor chain's state."""
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "v_row"))
             if hasattr(s, "v_row")]
    assert len(found) == 1
    return found[0]


def test_large_matrices_get_factored_second_moments_and_small_ones_full():
    tx, _ = optim.make_optimizer(optim_config(), num_steps=100)
    params = {"big": jnp.zeros((256, 512)), "small": jnp.zeros((64, 512)),
              "vector": jnp.zeros((7,))}
    moments = second_moments(tx.init(params))
    assert moments.v_row["big"].shape == (256,) and moments.v_col["big"].shape == (512,)
    assert moments.v["big"].size == 1  # no full-size statistics for a factored matrix
    # 64 < min_dim_size_to_factor=128: a full second moment.
    assert moments.v["small"].shape == (64, 512) and moments.v_row["small"].size == 1
    assert moments.v["vector"].shape == (7,)

    unfactored, _ = optim.make_optimizer(optim_config(factored=False), num_steps=100)
    assert second_moments(unfactored.init(params)).v["big"].shape == (256, 512)


def one_update(cfg, params, grads, num_steps=100):
    tx, _ = optim.make_optimizer(cfg, num_steps=num_steps)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def rms(x):
    return float(jnp.sqrt(jnp.mean(jnp.square(x))))


def test_parameter_scaling_makes_steps_proportional_to_the_parameter_rms():
    params = {"w": 5.0 * jax.random.normal(jax.random.key(0), (32, 16))}
    grads = {"w": jax.random.normal(jax.random.key(1), (32, 16))}
    cfg = optim_config(warmup_steps=0)
    scaled = one_update(cfg, params, grads)["w"]
    absolute = one_update(optim_config(warmup_steps=0, multiply_by_parameter_scale=False),
                          params, grads)["w"]
    np.testing.assert_allclose(np.asarray(scaled), np.asarray(absolute) * rms(params["w"]),
                               rtol=1e-5)


def test_parameter_groups_get_their_own_settings():
    """New small parameters (a prompt) can train without parameter scaling."""
    params = {"layer": {"kernel": 4.0 * jnp.ones((8, 8))}, "prompt": 4.0 * jnp.ones((3, 8))}
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
    cfg = optim_config(warmup_steps=0)
    tx, _ = optim.make_optimizer(
        cfg, 100, param_labels=optim.labels_by_path([(r"^prompt", "prompt")]),
        group_overrides={"prompt": {"multiply_by_parameter_scale": False}})
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["layer"]["kernel"]), -0.01 * 4.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(updates["prompt"]), -0.01, rtol=1e-5)

    with pytest.raises(ValueError, match="'lora'"):
        optim.make_optimizer(cfg, 100, param_labels={"a": "lora", "b": "default"})


def test_update_clipping_bounds_each_update_after_a_gradient_spike():
    params = {"w": jnp.ones((16, 16))}
    lr, threshold = 0.01, 1.0

    def spike_update(cfg):
        tx, _ = optim.make_optimizer(cfg, num_steps=100)
        update = jax.jit(tx.update)
        state = tx.init(params)
        small = {"w": 1e-3 * jax.random.normal(jax.random.key(2), (16, 16))}
        for _ in range(50):
            _, state = update(small, state, params)
        spike = {"w": 1e3 * jax.random.normal(jax.random.key(3), (16, 16))}
        return update(spike, state, params)[0]["w"]

    cfg = dict(warmup_steps=0, schedule="constant", peak_learning_rate=lr)
    bound = lr * threshold * rms(params["w"])
    clipped = spike_update(optim_config(clipping_threshold=threshold, **cfg))
    assert rms(clipped) <= bound * (1 + 1e-5)
    # Unclipped, the spike's step is about 1 / sqrt(1 - decay_t) = 51^0.4 ~ 4.8 times larger.
    assert rms(spike_update(optim_config(clipping_threshold=None, **cfg))) > 3 * bound


def test_global_norm_clipping_caps_the_gradient_adafactor_sees():
    params = {"a": jnp.ones((4, 4)), "b": jnp.ones((6,))}
    grads = {"a": jnp.full((4, 4), 10.0), "b": jnp.full((6,), -10.0)}  # global norm 100
    tx, _ = optim.make_optimizer(optim_config(global_norm_clip=2.0), num_steps=100)
    _, state = tx.update(grads, tx.init(params), params)
    # At the first step Adafactor's second moment is exactly the squared gradient it was given.
    moments = second_moments(state)
    seen = sum(float(jnp.sum(v)) for v in jax.tree.leaves(moments.v))
    np.testing.assert_allclose(seen, 2.0**2, rtol=1e-5)


def test_weight_decay_shrinks_matrices_and_spares_vectors():
    params = {"kernel": jnp.full((4, 4), 2.0), "scale": jnp.full((4,), 2.0)}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates = one_update(optim_config(weight_decay=0.1), params, zero)
    np.testing.assert_allclose(np.asarray(updates["kernel"]), -0.2, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(updates["scale"]), 0.0)


# --- Gradient accumulation -------------------------------------------------------------------

def token_batch(num_examples=8, length=5, seed=0):
    rng = np.random.default_rng(seed)
    weights = (rng.random((num_examples, length)) < 0.6).astype(np.float32)
    weights[0::4] = 1.0  # microbatch 0 (examples 0, 4) has many more tokens than the others
    weights[1::4, 1:] = 0.0
    return {
        "inputs": rng.normal(size=(num_examples, length, 3)).astype(np.float32),
        "targets": rng.normal(size=(num_examples, length)).astype(np.float32),
        "weights": weights,
    }


def mlp_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w1": jax.random.normal(k1, (3, 6)), "w2": jax.random.normal(k2, (6,))}


def summed_loss(params, batch, rng):
    hidden = jnp.tanh(batch["inputs"] @ params["w1"])
    err = jnp.square(hidden @ params["w2"] - batch["targets"])
    return jnp.sum(err * batch["weights"]), jnp.sum(batch["weights"])


def token_mean(batch, num_microbatches, params=None):
    """Token-mean loss and gradients over microbatches, divided once as the train step does."""
    params = mlp_params() if params is None else params
    value_and_grad = jax.value_and_grad(summed_loss, has_aux=True)

    @jax.jit
    def run(batch):
        (loss, weight), grads = optim.accumulate_gradients(
            lambda mb, key: value_and_grad(params, mb, key), batch, num_microbatches)
        denominator = jnp.maximum(weight, 1.0)  # a microbatch may hold no target token
        return loss / denominator, jax.tree.map(lambda g: g / denominator, grads), weight

    return run(batch)


@pytest.mark.parametrize("num_microbatches", [2, 4, 8])
def test_microbatches_give_the_big_batch_gradient(num_microbatches):
    batch = token_batch()
    big_loss, big_grads, big_weight = token_mean(batch, 1)
    loss, grads, weight = token_mean(batch, num_microbatches)
    np.testing.assert_allclose(float(loss), float(big_loss), rtol=1e-6)
    np.testing.assert_allclose(float(weight), float(big_weight))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(big_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)

    # Averaging per-microbatch means instead would weigh tokens unequally: the test batch is
    # built so that this makes a visible difference.
    naive = np.mean([float(token_mean({k: v[i::num_microbatches] for k, v in batch.items()}, 1)[0])
                     for i in range(num_microbatches)])
    assert abs(naive - float(big_loss)) > 1e-3


def test_each_microbatch_gets_its_own_key_and_slice():
    batch = {"x": jnp.arange(6.0)}
    seen = optim.accumulate_gradients(
        lambda mb, key: (mb["x"], jax.random.key_data(key)[None]), batch, 3, jax.random.key(7))
    # Microbatch i holds examples i, i + 3: the sum of slices is [0+1+2, 3+4+5].
    np.testing.assert_array_equal(np.asarray(seen[0]), [3.0, 12.0])
    expected = sum(np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(7), i)))
                   .astype(np.uint32) for i in range(3))
    np.testing.assert_array_equal(np.asarray(seen[1][0]).astype(np.uint32), expected)
    with pytest.raises(ValueError, match="batch\\['x'\\] has 6 examples"):
        optim.accumulate_gradients(lambda mb, key: mb["x"], batch, 4)


# --- The NaN/Inf guard -----------------------------------------------------------------------

def guarded_step():
    tx, _ = optim.make_optimizer(optim_config(warmup_steps=0), num_steps=100)

    @jax.jit
    def step(params, opt_state, skipped, grads, loss):
        return optim.guarded_update(tx, grads, opt_state, params, skipped, loss)

    params = {"w": jnp.array([[1.0, -0.0], [3.0, 4.0]]), "b": jnp.array([0.5, -2.0])}
    return tx, step, params


def bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_step_is_skipped_leaving_the_state_bitwise_unchanged(bad):
    tx, step, params = guarded_step()
    good = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    params, opt_state, skipped, finite = step(params, tx.init(params), jnp.int32(0), good,
                                              jnp.float32(1.0))
    assert bool(finite) and int(skipped) == 0
    poisoned = {"w": jnp.ones((2, 2)).at[0, 1].set(bad), "b": jnp.ones((2,))}
    out = step(params, opt_state, skipped, poisoned, jnp.float32(1.0))
    assert not bool(out.finite) and int(out.skipped_steps) == 1
    assert bits(out.params) == bits(params)
    assert bits(out.opt_state) == bits(opt_state)
    # A non-finite loss with finite gradients is dropped too.
    out = step(params, opt_state, skipped, good, jnp.float32(np.nan))
    assert not bool(out.finite) and bits(out.params) == bits(params)


def test_a_finite_step_is_applied():
    tx, step, params = guarded_step()
    grads = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    out = step(params, tx.init(params), jnp.int32(3), grads, jnp.float32(1.0))
    assert bool(out.finite) and int(out.skipped_steps) == 3
    assert bits(out.params) != bits(params)


def test_all_finite_looks_at_floating_leaves_only():
    assert bool(optim.all_finite({"a": jnp.ones(3), "n": jnp.arange(3)}))
    assert not bool(optim.all_finite({"a": jnp.array([1.0, -np.inf]), "n": jnp.arange(3)}))
    assert bool(optim.all_finite({}))


def test_the_stop_policy_raises_naming_the_step():
    with pytest.raises(optim.NonFiniteError, match="step 17.*newest checkpoint is step 10"):
        optim.check_finite(jnp.array(False), step=17, nan_policy="stop", last_saved_step=10)
    assert optim.check_finite(jnp.array(False), step=17, nan_policy="skip") is False
    assert optim.check_finite(jnp.array(True), step=17, nan_policy="stop") is True
    with pytest.raises(ConfigError, match="train.nan_policy"):
        optim.check_finite(True, step=1, nan_policy="ignore")


# --- Where the optimiser state lives ---------------------------------------------------------

def test_optimiser_state_is_sharded_like_its_parameters():
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((4, 2), ("data", "tensor"))
    params = {"square": jnp.zeros((256, 256)), "wide": jnp.zeros((128, 512)),
              "prompt": jnp.zeros((8, 16))}
    shardings = {"square": NamedSharding(mesh, P("data", "tensor")),
                 "wide": NamedSharding(mesh, P("data", "tensor")),
                 "prompt": NamedSharding(mesh, P(None, "tensor"))}
    tx, _ = optim.make_optimizer(
        optim_config(global_norm_clip=1.0), 100,
        param_labels=optim.labels_by_path([("prompt", "prompt")]),
        group_overrides={"prompt": {"multiply_by_parameter_scale": False}})
    abstract = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, P())
    placed = optim.opt_state_shardings(abstract, params, shardings, replicated)
    specs = {optim.path_str(path): sharding.spec for (path, _), sharding in zip(
        jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(placed))}
    default = "1/inner_states/default/inner_state/0/"
    # v_row averages over the larger (for a square matrix: the last) dimension, v_col over the
    # other; each keeps the sharding of the dimension it still has.
    assert specs[default + "v_row/square"] == P("data")
    assert specs[default + "v_col/square"] == P("tensor")
    assert specs[default + "v_row/wide"] == P("data")
    assert specs[default + "v_col/wide"] == P("tensor")
    assert specs["1/inner_states/prompt/inner_state/0/v/prompt"] == P(None, "tensor")
    assert specs[default + "count"] == P()
    # The layout is usable: the state can be created directly in it.
    state = jax.jit(tx.init, out_shardings=placed)(params)
    assert jax.tree.structure(state) == jax.tree.structure(abstract)


def test_stacked_layers_are_optimised_as_separate_layers():
    """With scanned layers marked as stacked, the updates equal those of unscanned layers."""
    num_layers = 3
    scales = jnp.array([0.5, 1.0, 4.0])  # layers of different size make per-layer RMS matter
    kernels = scales[:, None, None] * jax.random.normal(jax.random.key(0), (num_layers, 128, 160))
    stacked_params = {"layers": {"kernel": kernels}, "embed": jnp.ones((16, 4))}
    listed_params = {"layers": {str(i): {"kernel": kernels[i]} for i in range(num_layers)},
                     "embed": jnp.ones((16, 4))}
    cfg = optim_config(warmup_steps=0, global_norm_clip=1.0)
    stacked_tx, _ = optim.make_optimizer(
        cfg, 100, stacked=optim.labels_by_path([("^layers/", True)], default=False))
    listed_tx, _ = optim.make_optimizer(cfg, 100)
    stacked_state, listed_state = stacked_tx.init(stacked_params), listed_tx.init(listed_params)
    plain_tx, _ = optim.make_optimizer(cfg, 100)
    plain_state = plain_tx.init(stacked_params)
    for step in range(3):
        key = jax.random.key(step + 1)
        grads = {"layers": {"kernel": jax.random.normal(key, kernels.shape) * (step + 1)},
                 "embed": jnp.full((16, 4), 0.1)}
        listed_grads = {"layers": {str(i): {"kernel": grads["layers"]["kernel"][i]}
                                   for i in range(num_layers)}, "embed": grads["embed"]}
        stacked_updates, stacked_state = jax.jit(stacked_tx.update)(grads, stacked_state,
                                                                    stacked_params)
        listed_updates, listed_state = jax.jit(listed_tx.update)(listed_grads, listed_state,
                                                                 listed_params)
        plain_updates, plain_state = jax.jit(plain_tx.update)(grads, plain_state, stacked_params)
        for i in range(num_layers):
            np.testing.assert_allclose(
                np.asarray(stacked_updates["layers"]["kernel"][i]),
                np.asarray(listed_updates["layers"][str(i)]["kernel"]), rtol=2e-5, atol=1e-9)
        np.testing.assert_allclose(np.asarray(stacked_updates["embed"]),
                                   np.asarray(listed_updates["embed"]), rtol=1e-6)
    # Without the marking, one parameter scale is shared by all layers: visibly different.
    assert not np.allclose(np.asarray(plain_updates["layers"]["kernel"][0]),
                           np.asarray(listed_updates["layers"]["0"]["kernel"]), rtol=1e-2)

    moments = [s for s in jax.tree.leaves(stacked_state, is_leaf=lambda x: hasattr(x, "v_row"))
               if hasattr(s, "v_row")]
    factored = [m.v_row["layers"]["kernel"] for m in moments
                if hasattr(m.v_row["layers"]["kernel"], "shape")][0]
    assert factored.shape == (num_layers, 128)
