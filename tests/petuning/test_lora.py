"""LoRA's contract: a no-op at initialisation, the adapters alone train, merge and unmerge
round-trip, adapters export and import in either layer layout, bad settings are named."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from petuning import lora
from petuning.lora import LoRAConfig, LoRAProjection
from tests.petuning.tiny import (CFG, B, L, base, base_params, count, leaf_paths, randomize,
                                 run, tokens, train)
from ul2_lm.model import Transformer, stack_layer_params

SCAN = pytest.mark.parametrize("scan", [True, False], ids=["scanned", "per_layer"])


def adapted(scan=True, key=0, **settings):
    # One shared config where the test allows: each distinct config compiles its own forward.
    return lora.apply_lora(base(scan), LoRAConfig(**{"rank": 2, "dropout_rate": 0.5, **settings}),
                           key=key)


@SCAN
def test_output_is_unchanged_at_initialisation(scan):
    x = tokens()
    model = adapted(scan)
    np.testing.assert_array_equal(run(model, x), run(base(scan), x))
    # ...because B starts at zero while A does not.
    proj = model.layers.attention.q_proj if scan else model.layers[0].attention.q_proj
    assert not np.any(np.asarray(proj.lora_b[...]))
    assert np.std(np.asarray(proj.lora_a[...])) > 0


@SCAN
def test_adapters_are_the_only_lora_params_and_the_base_keeps_its_layout(scan):
    model = adapted(scan)
    _, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
    assert {p.rsplit("/", 1)[-1] for p in leaf_paths(nnx.to_pure_dict(adapters))} == {
        "lora_a", "lora_b"}
    # A pretrained checkpoint of the plain model fits the frozen part exactly.
    reference = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(base(scan))))
    assert jax.tree.map(jnp.shape, nnx.to_pure_dict(frozen)) == reference


@SCAN
def test_adapters_carry_logical_axes_derived_from_their_kernel(scan):
    model = adapted(scan)
    stack = ("layers",) if scan else ()
    for path, proj in nnx.iter_modules(model):
        if not isinstance(proj, LoRAProjection):
            continue
        names = proj.kernel.get_metadata()["out_sharding"]
        n = len(stack) + proj.num_in_dims
        assert proj.lora_a.get_metadata()["out_sharding"] == names[:n] + ("lora_rank",), path
        assert proj.lora_b.get_metadata()["out_sharding"] == (
            names[:len(stack)] + ("lora_rank",) + names[n:]), path
        assert proj.lora_a.shape[:len(stack)] == proj.kernel.shape[:len(stack)]


def test_the_update_is_scale_times_x_a_b_with_alpha_over_rank_or_its_square_root():
    assert LoRAConfig(rank=4, alpha=8).scale == 2.0
    assert LoRAConfig(rank=4, alpha=8, use_rslora=True).scale == 4.0
    assert LoRAConfig(rank=4).scale == 1.0  # alpha defaults to the rank
    x = jax.random.normal(jax.random.key(0), (3, CFG.d_model))
    for use_rslora in (False, True):
        model = adapted(False, alpha=8, use_rslora=use_rslora)
        randomize(model, nnx.LoRAParam)
        proj = model.layers[0].attention.q_proj
        a = proj.lora_a[...].reshape(CFG.d_model, 2)
        b = proj.lora_b[...].reshape(2, -1)
        base_out = jnp.dot(x, proj.kernel[...].reshape(CFG.d_model, -1))
        scale = 8 / (math.sqrt(2) if use_rslora else 2)
        expected = base_out + scale * (x @ a @ b)
        np.testing.assert_allclose(proj(x).reshape(3, -1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("own_input", [False, True], ids=["shared_input", "dropout_input"])
def test_the_written_out_backward_pass_equals_autodiff(own_input):
    keys = jax.random.split(jax.random.key(1), 5)
    x, ax = (jax.random.normal(k, (6, 8)) for k in keys[:2])
    kernel, a, b = (jax.random.normal(k, shape) for k, shape in
                    zip(keys[2:], ((8, 5), (8, 2), (2, 5))))
    adapter_input = ax if own_input else None

    def textbook(x, adapter_input, kernel, a, b):
        return x @ kernel + 0.7 * (((x if adapter_input is None else adapter_input) @ a) @ b)

    args = (x, adapter_input, kernel, a, b)
    # Every subset a caller asks for: adapters only (LoRA training), with the input (a stack of
    # layers), with the kernel (nothing frozen), and the input alone.
    for wrt in ((3, 4), (0, 3, 4), (0, 2, 3, 4), (0,)) + (((0, 1, 3, 4),) if own_input else ()):
        ours = jax.grad(lambda *p: jnp.sum(jnp.sin(lora.lora_matmul(*p, 0.7))), wrt)(*args)
        theirs = jax.grad(lambda *p: jnp.sum(jnp.sin(textbook(*p))), wrt)(*args)
        for got, want in zip(ours, theirs):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lora.lora_matmul(*args, 0.7), textbook(*args), rtol=1e-6)


def test_a_frozen_kernel_gets_no_weight_gradient_matmul():
    x, kernel = jnp.ones((64, 32)), jnp.ones((32, 48))
    a, b = jnp.ones((32, 2)), jnp.ones((2, 48))
    step = jax.jit(jax.grad(lambda x, a, b: jnp.sum(lora.lora_matmul(x, None, kernel, a, b, 1.0)),
                            (0, 1, 2)))
    def dot_results(fn, *args):
        return {line.rsplit("-> ", 1)[-1] for line in fn.lower(*args).as_text().splitlines()
                if "stablehlo.dot_general" in line}

    # The kernel's gradient is the one [32, 48] dot; it appears only when the kernel is asked for.
    assert "tensor<32x48xf32>" not in dot_results(step, x, a, b)
    with_kernel = jax.jit(jax.grad(
        lambda x, k, a, b: jnp.sum(lora.lora_matmul(x, None, k, a, b, 1.0)), (0, 1, 2, 3)))
    assert "tensor<32x48xf32>" in dot_results(with_kernel, x, kernel, a, b)


@SCAN
def test_targets_select_projections_by_regex_name_list_or_all_linear(scan):
    per_model = 1 if scan else CFG.num_layers
    count = lambda targets: len(lora.target_paths(base(scan), targets))
    assert count(lora.DEFAULT_TARGETS) == 7 * per_model
    assert count(lora.ALL_LINEAR) == 7 * per_model
    assert count(r"attention/(q|v)_proj$") == 2 * per_model
    assert count(("q_proj", "v_proj")) == 2 * per_model
    assert count(r"mlp/") == 3 * per_model
    model = adapted(scan, targets=r"attention/(q|v)_proj$")
    swapped = [p for p, m in nnx.iter_modules(model) if isinstance(m, LoRAProjection)]
    assert len(swapped) == 2 * per_model
    assert all(p[-1] in ("q_proj", "v_proj") for p in swapped)


def test_a_layer_index_in_the_pattern_selects_layers_of_a_per_layer_model():
    assert lora.target_paths(base(False), r"^layers/1/attention/") == [
        f"layers/1/attention/{name}" for name in ("k_proj", "o_proj", "q_proj", "v_proj")]


def test_trainable_count_follows_rank_times_in_plus_out():
    d, n, h, f = CFG.d_model, CFG.num_heads, CFG.head_dim, CFG.mlp_dim
    kv = CFG.num_kv_heads * h
    shapes = [(d, n * h), (d, kv), (d, kv), (n * h, d), (d, f), (d, f), (f, d)]
    rank = 3
    expected = CFG.num_layers * rank * sum(i + o for i, o in shapes)
    for scan in (True, False):
        model = adapted(scan, rank=rank)
        assert count(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))) == expected


@pytest.mark.parametrize("settings, message", [
    ({"rank": 0}, "rank must be a positive int, got 0"),
    ({"rank": -2}, "rank must be a positive int, got -2"),
    ({"rank": 9}, r"rank=9 exceeds the smaller dimension \(8\) of layers/attention/k_proj"),
    ({"rank": 2, "targets": "attention/z_proj"}, r"targets='attention/z_proj' matches no"),
    ({"rank": 2, "targets": "(q_proj"}, r"targets='\(q_proj' is not a valid regex"),
    ({"rank": 2, "dropout_rate": 1.0}, "dropout_rate must be in"),
    ({"rank": 2, "alpha": 0}, "alpha must be a positive number"),
])
def test_bad_settings_fail_naming_the_value(settings, message):
    with pytest.raises(ValueError, match=message):
        lora.apply_lora(base(True), LoRAConfig(**settings))


def test_adapters_are_not_stacked_on_an_adapted_model():
    with pytest.raises(TypeError, match="plain ul2_lm Transformer"):
        lora.apply_lora(adapted(True), LoRAConfig(rank=2))


@SCAN
def test_merge_and_unmerge_round_trip(scan):
    model = adapted(scan)
    randomize(model, nnx.LoRAParam)
    x = tokens()
    unmerged_logits = run(model, x)
    kernels = base_params(model)
    assert not np.allclose(unmerged_logits, run(base(scan), x), atol=1e-3)

    lora.merge(model)
    np.testing.assert_allclose(run(model, x), unmerged_logits, rtol=1e-5, atol=1e-5)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), base_params(model), kernels)
    assert sum(jax.tree.leaves(changed)) == 7 * (1 if scan else CFG.num_layers)

    lora.unmerge(model)
    np.testing.assert_allclose(run(model, x), unmerged_logits, rtol=1e-5, atol=1e-5)
    # Float round trip: W + D - D equals W to rounding, not bitwise.
    for a, b in zip(jax.tree.leaves(base_params(model)), jax.tree.leaves(kernels)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@SCAN
def test_merged_parameters_load_into_a_plain_transformer(scan):
    model = adapted(scan)
    randomize(model, nnx.LoRAParam)
    x = tokens()
    plain = base(scan, seed=5)
    state = nnx.state(plain)
    nnx.replace_by_pure_dict(state, lora.merged_base_params(model))
    nnx.update(plain, state)
    np.testing.assert_allclose(run(plain, x), run(model, x), rtol=1e-5, atol=1e-5)


def test_scanned_and_per_layer_layouts_get_the_same_adapters_and_dropout():
    scanned, per_layer = adapted(True, key=3), adapted(False, key=3)
    jax.tree.map(np.testing.assert_array_equal, lora.adapter_params(scanned),
                 lora.adapter_params(per_layer))
    randomize(per_layer, nnx.LoRAParam)
    state = nnx.state(scanned, nnx.LoRAParam)
    nnx.replace_by_pure_dict(state, stack_layer_params(lora.adapter_params(per_layer)))
    nnx.update(scanned, state)
    x, key = tokens(), jax.random.key(11)
    np.testing.assert_allclose(run(scanned, x), run(per_layer, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(scanned, x, dropout_rng=key), run(per_layer, x, dropout_rng=key),
                               rtol=1e-5, atol=1e-5)


def test_adapter_dropout_is_keyed_and_off_without_a_key():
    model = adapted(True)
    randomize(model, nnx.LoRAParam)
    x = tokens()
    plain = run(model, x)
    first = run(model, x, dropout_rng=jax.random.key(1))
    assert not np.allclose(first, plain, atol=1e-4)
    np.testing.assert_array_equal(first, run(model, x, dropout_rng=jax.random.key(1)))
    assert not np.allclose(first, run(model, x, dropout_rng=jax.random.key(2)), atol=1e-4)
    # The keys live only for the call: the model's state is parameters again afterwards.
    assert not nnx.state(model, lora._DropoutKey)
    np.testing.assert_array_equal(run(model, x), plain)


def test_cached_decoding_with_adapters_equals_the_full_forward():
    model = adapted(True)
    randomize(model, nnx.LoRAParam)
    x = tokens(5)
    causal = jnp.broadcast_to((jnp.arange(L) < 4).astype(jnp.int32), (B, L))
    full = run(model, x, causal_attention=causal)
    model.init_cache(B, L)
    logits = [nnx.jit(lambda m, t, c: m.prefill(t, causal_attention=c))(model, x[:, :4],
                                                                         causal[:, :4])]
    step = nnx.jit(lambda m, t: m.decode_step(t))
    for t in range(4, L):
        logits.append(step(model, x[:, t:t + 1]))
    np.testing.assert_allclose(jnp.concatenate(logits, axis=1), full, rtol=1e-5, atol=1e-5)


def test_training_moves_only_the_adapters():
    make = lambda: adapted(True)
    # With the trainer's dropout on, the adapters' input dropout runs inside the step too.
    layout, _, state, frozen, losses = train(make, nnx.LoRAParam, dropout=True)
    assert all(np.isfinite(losses))
    params = nnx.to_pure_dict(nnx.state(make(), nnx.LoRAParam))
    assert leaf_paths(state.params) == leaf_paths(params)
    # Every frozen parameter is bitwise what it was; the adapters moved.
    trained = nnx.merge(layout.graphdef, state.params, frozen)
    jax.tree.map(np.testing.assert_array_equal, base_params(trained), base_params(make()))
    assert all(np.any(np.asarray(b)) for p, b in zip(leaf_paths(state.params),
                                                       jax.tree.leaves(state.params))
               if p.endswith("lora_b"))
    # Optimiser state exists for the adapters only: one unfactored second moment per trainable
    # value plus Adafactor's placeholders and counters, and nothing keyed by a frozen path.
    n_trainable = count(state.params)
    n_state = count(state.opt_state)
    assert n_trainable <= n_state <= n_trainable + 8 * len(jax.tree.leaves(state.params)) + 16
    assert not any(name in p for p in leaf_paths(state.opt_state)
                   for name in ("kernel", "embedding", "scale"))
    assert n_trainable < 0.25 * count(base_params(trained))


def test_rematerialised_layers_train_the_adapters_as_stored_activations_do():
    # The adapted matmul's written-out backward pass under the remat policies the configs use.
    results = {}
    for policy in ("none", "dots_no_batch", "full"):
        cfg = dataclasses.replace(CFG, remat_policy=policy)

        def make_model(cfg=cfg):
            return lora.apply_lora(Transformer(cfg, rngs=nnx.Rngs(params=0)),
                                   LoRAConfig(rank=2, dropout_rate=0.1), key=1)

        _, _, state, _, losses = train(make_model, nnx.LoRAParam, num_steps=2, dropout=True)
        results[policy] = losses, jax.tree.leaves(state.params)
    for policy in ("dots_no_batch", "full"):
        np.testing.assert_allclose(results[policy][0], results["none"][0], rtol=1e-6)
        for got, want in zip(results[policy][1], results["none"][1]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_adapter_export_and_import_round_trip_across_layouts(tmp_path):
    model = adapted(True, key=4, alpha=3.0, use_rslora=True)
    randomize(model, nnx.LoRAParam)
    lora.save_adapter(model, tmp_path, base_model_name_or_path="runs/base_tiny")
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert fields["peft_type"] == "LORA"
    assert (fields["r"], fields["lora_alpha"], fields["use_rslora"]) == (2, 3.0, True)
    assert fields["lora_dropout"] == 0.5
    assert fields["target_modules"] == lora.DEFAULT_TARGETS
    assert fields["base_model_name_or_path"] == "runs/base_tiny"
    assert (tmp_path / "adapter_model.npz").is_file()

    expected = lora.adapter_params(model)
    for scan in (True, False):
        loaded = lora.load_adapter(base(scan), tmp_path)
        assert loaded.lora_config == model.lora_config
        jax.tree.map(np.testing.assert_array_equal, lora.adapter_params(loaded), expected)
    # Loading into an adapted model replaces its adapters.
    again = lora.load_adapter(adapted(False, key=9, alpha=3.0, use_rslora=True), tmp_path)
    jax.tree.map(np.testing.assert_array_equal, lora.adapter_params(again), expected)


def test_an_adapter_for_another_shape_is_refused_naming_the_parameter(tmp_path):
    lora.save_adapter(adapted(False), tmp_path)
    wider = base(False, mlp_dim=48)
    with pytest.raises(ValueError, match=r"layers/0/mlp/down_proj/lora_a has shape \(32, 2\)"):
        lora.load_adapter(wider, tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(base(), tmp_path / "missing")
