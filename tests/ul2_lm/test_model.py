"""The Transformer's contract: masking, packing, decoding, layouts and numerics."""

import dataclasses
import functools
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ul2_lm import model as model_lib
from ul2_lm.model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=97, num_layers=2, d_model=32, num_heads=4, head_dim=8, mlp_dim=64,
                  num_kv_heads=1, max_seq_len=64)
GQA = dataclasses.replace(CFG, num_kv_heads=2)
B, L = 2, 12


def build(cfg=CFG, seed=0):
    return Transformer(cfg, rngs=nnx.Rngs(params=seed))


@nnx.jit
def run(model, tokens, **kwargs):
    # Compiled once per model structure and input shape: much faster than op-by-op calls.
    return model(tokens, **kwargs)


@pytest.fixture(scope="module")
def model():
    return build()


def tokens(seed=1, shape=(B, L), vocab=CFG.vocab_size):
    return jax.random.randint(jax.random.key(seed), shape, 1, vocab, jnp.int32)


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


def test_logits_shape_and_dtype(model):
    logits = run(model, tokens())
    assert logits.shape == (B, L, CFG.vocab_size)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_future_tokens_do_not_change_earlier_logits(model):
    x = tokens()
    y = x.at[:, 7].set((x[:, 7] + 1) % CFG.vocab_size)
    a, b = run(model, x), run(model, y)
    close(a[:, :7], b[:, :7])
    assert not np.allclose(a[:, 7:], b[:, 7:])


def test_prefix_is_bidirectional_and_targets_do_not_leak_backward(model):
    prefix_len = 5
    causal = jnp.broadcast_to((jnp.arange(L) < prefix_len).astype(jnp.int32), (B, L))
    x = tokens()
    base = run(model, x, causal_attention=causal)
    # A later prefix token is seen by earlier prefix positions.
    y = x.at[:, 3].set((x[:, 3] + 1) % CFG.vocab_size)
    assert not np.allclose(base[:, 0], run(model, y, causal_attention=causal)[:, 0])
    # A target token is seen by nobody before it, prefix included.
    z = x.at[:, 8].set((x[:, 8] + 1) % CFG.vocab_size)
    close(base[:, :8], run(model, z, causal_attention=causal)[:, :8])
    # Without the prefix flags the same model is causal everywhere.
    close(run(model, x)[:, :3], run(model, y)[:, :3])


def test_packed_segments_equal_separate_sequences(model):
    a, b = tokens(2, (1, 5)), tokens(3, (1, 4))
    prefix_a = jnp.array([[1, 1, 0, 0, 0]])
    prefix_b = jnp.array([[1, 0, 0, 0]])
    pad = jnp.zeros((1, 3), jnp.int32)
    packed = jnp.concatenate([a, b, pad + 5], axis=1)
    segments = jnp.array([[1] * 5 + [2] * 4 + [0] * 3])
    positions = jnp.array([list(range(5)) + list(range(4)) + [0] * 3])
    causal = jnp.concatenate([prefix_a, prefix_b, pad], axis=1)
    logits = run(model, packed, positions=positions, segment_ids=segments, causal_attention=causal)
    close(logits[:, :5], run(model, a, causal_attention=prefix_a))
    close(logits[:, 5:9], run(model, b, causal_attention=prefix_b))


def test_padding_does_not_change_real_tokens(model):
    x = tokens(4, (1, 8))
    segments = jnp.array([[1] * 6 + [0] * 2])
    garbage = x.at[:, 6:].set(3)
    close(run(model, x, segment_ids=segments)[:, :6], run(model, garbage, segment_ids=segments)[:, :6])


def test_input_embeddings_replace_the_token_lookup(model):
    x = tokens()
    close(run(model, None, input_embeddings=model.embed(x)), run(model, x))


@pytest.mark.parametrize("cfg", [CFG, dataclasses.replace(GQA, scan_layers=False)],
                         ids=["mqa_scanned", "gqa_unscanned"])
def test_cached_decoding_equals_full_forward_after_a_bidirectional_prefill(cfg):
    model = build(cfg)
    x = tokens(5)
    prefix_len = 6
    causal = jnp.broadcast_to((jnp.arange(L) < prefix_len).astype(jnp.int32), (B, L))
    full = run(model, x, causal_attention=causal)

    model.init_cache(B, 16)
    prefill = nnx.jit(lambda m, t, c: m.prefill(t, causal_attention=c))
    step = nnx.jit(lambda m, t: m.decode_step(t))
    steps = [prefill(model, x[:, :prefix_len], causal[:, :prefix_len])]
    for t in range(prefix_len, L):
        steps.append(step(model, x[:, t:t + 1]))
    close(jnp.concatenate(steps, axis=1), full)

    # A second prefill starts the cache afresh.
    again = prefill(model, x[:, :prefix_len], causal[:, :prefix_len])
    close(again, full[:, :prefix_len])


def test_cached_decoding_under_jit_with_left_padded_prompts(model):
    # Row 0 has a 3-token prompt left-padded to 5; row 1 a full 5-token prompt.
    x = tokens(6, (B, 9))
    token_mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    alone = run(model, x[:1, 2:])

    model = nnx.clone(model)
    model.init_cache(B, 12)
    prefill = nnx.jit(lambda m, t, mask: m.prefill(t, token_mask=mask))
    step = nnx.jit(lambda m, t: m.decode_step(t))
    steps = [prefill(model, x[:, :5], token_mask)]
    for t in range(5, 9):
        steps.append(step(model, x[:, t:t + 1]))
    logits = jnp.concatenate(steps, axis=1)
    close(logits[:1, 2:], alone)
    close(logits[1:], run(model_without_cache(model), x[1:]))
    model.clear_cache()
    assert not nnx.state(model, nnx.Cache)


def model_without_cache(model):
    clone = nnx.clone(model)
    clone.clear_cache()
    return clone


def test_decoding_before_init_cache_is_an_error(model):
    with pytest.raises(ValueError, match="init_cache"):
        model.decode_step(tokens(shape=(B, 1)))


def test_scanned_and_per_layer_layouts_initialise_alike_and_give_the_same_logits():
    scanned = build(CFG)
    unscanned = build(dataclasses.replace(CFG, scan_layers=False))
    scanned_params = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
    unscanned_params = nnx.to_pure_dict(nnx.state(unscanned, nnx.Param))
    stacked = model_lib.stack_layer_params(unscanned_params)
    jax.tree.map(np.testing.assert_array_equal, stacked, scanned_params)
    roundtrip = model_lib.unstack_layer_params(stacked)
    jax.tree.map(np.testing.assert_array_equal, roundtrip, unscanned_params)

    x = tokens()
    close(run(scanned, x), run(unscanned, x))
    # Converted weights give the same function, whatever their origin.
    other = build(CFG, seed=7)
    moved = build(dataclasses.replace(CFG, scan_layers=False))
    nnx.update(moved, model_lib.unstack_layer_params(
        nnx.to_pure_dict(nnx.state(other, nnx.Param))))
    close(run(moved, x), run(other, x))


@functools.cache
def loss_and_grads(cfg):
    graphdef, params = nnx.split(build(cfg))
    x = tokens()

    def loss(p):
        logits = nnx.merge(graphdef, p)(x)
        return jnp.mean(jax.nn.logsumexp(logits, -1)
                        - jnp.take_along_axis(logits, x[..., None], -1)[..., 0])

    return jax.jit(jax.value_and_grad(loss))(params)


REMAT_CASES = [(True, p) for p in sorted(set(model_lib.REMAT_POLICIES) - {"none"})] + [(False, "full")]


@pytest.mark.parametrize("scan,policy", REMAT_CASES,
                         ids=[f"{'scanned' if s else 'unscanned'}-{p}" for s, p in REMAT_CASES])
def test_remat_policies_give_the_same_loss_and_gradients(scan, policy):
    base_loss, base_grads = loss_and_grads(dataclasses.replace(CFG, scan_layers=scan))
    loss, grads = loss_and_grads(dataclasses.replace(CFG, scan_layers=scan, remat_policy=policy))
    close(loss, base_loss)
    jax.tree.map(close, grads, base_grads)


def test_bfloat16_compute_is_close_to_float32(model):
    x = tokens()
    low = build(dataclasses.replace(CFG, dtype="bfloat16"))
    logits = run(low, x)
    assert logits.dtype == jnp.float32
    reference = run(model, x)
    assert np.abs(np.asarray(logits - reference)).max() < 0.1 * np.abs(np.asarray(reference)).max()
    assert np.mean(np.argmax(logits, -1) == np.argmax(reference, -1)) > 0.8


def test_bfloat16_parameters_are_stored_in_bfloat16():
    params = nnx.state(build(dataclasses.replace(CFG, param_dtype="bfloat16")), nnx.Param)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_every_parameter_has_logical_axis_names(scan):
    state = nnx.state(build(dataclasses.replace(CFG, scan_layers=scan)), nnx.Param)
    specs = nnx.get_partition_spec(state)
    flat = jax.tree_util.tree_leaves_with_path(state)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(flat) == len(flat_specs)
    for (path, leaf), spec in zip(flat, flat_specs):
        name = jax.tree_util.keystr(path)
        assert len(spec) == leaf.ndim and None not in spec, (name, spec)
        assert (spec[0] == "layers") == (scan and "layers" in name), (name, spec)


def test_the_module_holds_only_parameters():
    graphdef, params, rest = nnx.split(build(dataclasses.replace(CFG, dropout_rate=0.1)),
                                       nnx.Param, ...)
    assert not jax.tree.leaves(rest)
    assert jax.tree.leaves(params)


def test_dropout_is_off_without_a_key_and_keyed_otherwise():
    cfg = dataclasses.replace(CFG, dropout_rate=0.3)
    model, reference = build(cfg), build(CFG)
    x = tokens()
    close(run(model, x), run(reference, x))
    one = run(model, x, dropout_rng=jax.random.key(1))
    close(one, run(model, x, dropout_rng=jax.random.key(1)))
    assert not np.allclose(one, run(model, x, dropout_rng=jax.random.key(2)))
    assert not np.allclose(one, run(model, x))


def test_logits_soft_cap_bounds_the_logits():
    capped = build(dataclasses.replace(CFG, logits_soft_cap=0.5))
    assert np.abs(np.asarray(run(capped, tokens()))).max() <= 0.5


def reference_attention(q, k, v, mask):
    """Textbook softmax attention with each K/V head repeated for its group of query heads."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.where(mask[:, None], jnp.einsum("blnh,bsnh->bnls", q, k), -jnp.inf)
    sees_something = mask[:, None].any(-1, keepdims=True)
    probs = jnp.where(sees_something, jax.nn.softmax(scores, axis=-1), 0.0)
    return jnp.einsum("bnls,bsnh->blnh", probs, v)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_grouped_attention_and_its_gradient_equal_textbook_attention(num_kv_heads):
    keys = jax.random.split(jax.random.key(num_kv_heads), 4)
    q = jax.random.normal(keys[0], (2, 6, 4, 8))
    k, v = (jax.random.normal(key, (2, 6, num_kv_heads, 8)) for key in keys[1:3])
    # Random visibility, and one query (row 0, position 2) that sees nothing, like padding.
    mask = jax.random.bernoulli(keys[3], 0.6, (2, 6, 6)).at[0, 2].set(False)
    out = jax.jit(model_lib.dot_product_attention)(q, k, v, mask)
    close(out, jax.jit(reference_attention)(q, k, v, mask))
    assert not np.asarray(out[0, 2]).any()

    def grads(fn):
        loss = lambda *a: jnp.sum(jnp.sin(fn(*a, mask)))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    jax.tree.map(close, grads(model_lib.dot_product_attention), grads(reference_attention))


def test_attention_mask_follows_t5x_make_decoder_mask():
    segments = jnp.array([[1, 1, 1, 2, 2, 0]])
    causal = jnp.array([[1, 1, 0, 1, 0, 0]])
    mask = np.asarray(model_lib.attention_mask(segments, causal)[0]).astype(int)
    expected = np.array([
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
    ])
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("field,value", [("num_kv_heads", 3), ("remat_policy", "some"),
                                         ("dtype", "float16"), ("head_dim", 7),
                                         ("dropout_rate", 1.0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(CFG, **{field: value})


def test_sequences_longer_than_max_seq_len_are_rejected(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        run(model, tokens(shape=(1, CFG.max_seq_len + 1)))


def test_model_flops_sizes_and_benchmark_load_without_tensorflow_or_seqio():
    # The accelerator hosts have no TensorFlow: these modules must not need it at import time.
    code = (
        "import importlib.util, sys\n"
        "import ul2_lm.model, ul2_lm.model_sizes, ul2_lm.flops\n"
        "spec = importlib.util.spec_from_file_location('bench', 'benchmarks/train_throughput.py')\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'seqio'))\n"
        "assert not loaded, loaded\n")
    root = pathlib.Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)
