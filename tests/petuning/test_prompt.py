"""Prompt tuning's contract: a [P, d] prompt in front of every row, invisible in the shapes the
caller sees, equal under cached decoding, trained alone against a bitwise-frozen base."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from petuning import prompt as prompt_lib
from petuning.prompt import PromptConfig, PromptParam, PromptTunedModel
from tests.petuning.tiny import (CFG, B, L, base, base_params, count, leaf_paths, run, tokens,
                                 train)

P = 4


def prompted(scan=True, key=0, **settings) -> PromptTunedModel:
    return prompt_lib.apply_prompt(base(scan), PromptConfig(**{"length": P, **settings}), key=key)


def rows_of(table, prompt):
    """For each prompt row, the ids of the embedding rows it equals (exactly)."""
    table, prompt = np.asarray(table), np.asarray(prompt)
    return [set(np.flatnonzero((table == row).all(axis=1))) for row in prompt]


def test_sampled_vocabulary_init_draws_distinct_frequent_tokens():
    model = prompted(length=6, top_k=10)
    table = model.embedding[...]
    found = rows_of(table, model.prompt[...])
    ids = [min(f) for f in found]
    assert all(f for f in found) and all(i < 10 for i in ids)
    assert len(set(ids)) == 6  # without replacement
    # Another frequency order draws from its own head.
    order = tuple(range(CFG.vocab_size - 1, -1, -1))
    reordered = prompted(length=6, top_k=10, token_order=order)
    assert all(min(f) >= CFG.vocab_size - 10 for f in rows_of(table, reordered.prompt[...]))
    # More prompt vectors than candidates: drawn with replacement.
    many = prompted(length=8, top_k=3)
    assert {min(f) for f in rows_of(table, many.prompt[...])} <= {0, 1, 2}


def test_uniform_init_stays_in_range_and_is_not_a_vocabulary_row():
    model = prompted(init="uniform", uniform_scale=0.1)
    values = np.asarray(model.prompt[...])
    assert values.shape == (P, CFG.d_model)
    assert np.abs(values).max() <= 0.1 and values.std() > 0.01
    assert not any(rows_of(model.embedding[...], values))


def test_text_init_repeats_or_cuts_the_text_embeddings():
    model = prompted(init="text", init_token_ids=(7, 9, 11), length=5)
    expected = np.asarray(model.embedding[...])[[7, 9, 11, 7, 9]]
    np.testing.assert_array_equal(model.prompt[...], expected)
    encoded = prompt_lib.apply_prompt(
        base(), PromptConfig(length=2, init="text", init_text="ab"),
        encode=lambda text: [ord(c) - 90 for c in text])
    np.testing.assert_array_equal(encoded.prompt[...], np.asarray(encoded.embedding[...])[[7, 8]])


def test_the_prompt_is_a_replicable_prompt_param_and_the_base_keeps_its_layout():
    model = prompted()
    _, trainable, frozen = nnx.split(model, PromptParam, ...)
    assert leaf_paths(nnx.to_pure_dict(trainable)) == ["prompt"]
    assert trainable["prompt"].get_metadata()["out_sharding"] == ("prompt", "embed")
    reference = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(base())))
    assert jax.tree.map(jnp.shape, nnx.to_pure_dict(frozen)) == reference


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "per_layer"])
def test_logits_align_with_the_tokens_and_equal_the_prompt_joined_forward(scan):
    model = prompted(scan)
    x = tokens()
    causal = jnp.broadcast_to((jnp.arange(L) < 5).astype(jnp.int32), (B, L))
    logits = run(model, x, causal_attention=causal)
    assert logits.shape == (B, L, CFG.vocab_size)
    # The same computation spelled out on the base model: prompt first, in the prefix,
    # positions 0..P+L-1, and the prompt's own logits dropped.
    plain = base(scan)
    joined = jnp.concatenate([jnp.broadcast_to(model.prompt[...], (B, P, CFG.d_model)),
                              plain.embed(x)], axis=1)
    spelled = run(plain, None, input_embeddings=joined,
                  causal_attention=jnp.concatenate([jnp.ones((B, P), jnp.int32), causal], 1))
    np.testing.assert_allclose(logits, spelled[:, P:], rtol=1e-5, atol=1e-5)
    # Explicit positions and segment ids of an unpacked batch mean the same as the defaults.
    positions = jnp.broadcast_to(jnp.arange(L), (B, L))
    np.testing.assert_allclose(
        run(model, x, causal_attention=causal, positions=positions,
            segment_ids=jnp.ones((B, L), jnp.int32)), logits, rtol=1e-5, atol=1e-5)
    # And the prompt matters.
    assert not np.allclose(logits, run(plain, x, causal_attention=causal), atol=1e-3)


def test_an_example_does_not_depend_on_the_rest_of_its_batch():
    model = prompted()
    x = tokens(3, (3, L))
    # Row 0 alone, then beside two other rows, one of them padded.
    segment_ids = jnp.array([[1] * L, [1] * L, [1] * 6 + [0] * (L - 6)], jnp.int32)
    together = run(model, x, segment_ids=segment_ids)
    alone = run(model, x[:1], segment_ids=segment_ids[:1])
    np.testing.assert_allclose(together[:1], alone, rtol=1e-5, atol=1e-5)
    swapped = run(model, x[::-1], segment_ids=segment_ids[::-1])
    np.testing.assert_allclose(swapped[2:], alone, rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_the_full_forward():
    model = prompted()
    x = tokens(5)
    prefix_len = 4
    causal = jnp.broadcast_to((jnp.arange(L) < prefix_len).astype(jnp.int32), (B, L))
    full = run(model, x, causal_attention=causal)
    model.init_cache(B, L)
    prefill = nnx.jit(lambda m, t, c: m.prefill(t, causal_attention=c))
    step = nnx.jit(lambda m, t: m.decode_step(t))
    logits = [prefill(model, x[:, :prefix_len], causal[:, :prefix_len])]
    for t in range(prefix_len, L):
        logits.append(step(model, x[:, t:t + 1]))
    np.testing.assert_allclose(jnp.concatenate(logits, axis=1), full, rtol=1e-5, atol=1e-5)


def test_cached_decoding_with_left_padding_equals_the_unpadded_row():
    model = prompted()
    x = tokens(6, (B, 8))
    token_mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    alone = run(model, x[:1, 2:])
    model.init_cache(B, 8)
    logits = [nnx.jit(lambda m, t, k: m.prefill(t, token_mask=k))(model, x[:, :5], token_mask)]
    step = nnx.jit(lambda m, t: m.decode_step(t))
    for t in range(5, 8):
        logits.append(step(model, x[:, t:t + 1]))
    np.testing.assert_allclose(jnp.concatenate(logits, axis=1)[:1, 2:], alone, rtol=1e-5,
                               atol=1e-5)


def test_a_prompt_that_leaves_no_room_for_the_sequence_is_refused():
    budget = CFG.max_seq_len
    with pytest.raises(ValueError, match=rf"prompt length 30 \+ sequence length 8 = 38 exceeds "
                                         rf"the model's max_seq_len={budget}"):
        prompt_lib.apply_prompt(base(), PromptConfig(length=30), seq_len=8)
    model = prompted()
    with pytest.raises(ValueError, match=rf"prompt length {P} \+ sequence length 30"):
        model(tokens(shape=(1, 30)))
    with pytest.raises(ValueError, match=rf"prompt length {P} \+ sequence length 29"):
        model.init_cache(1, 29)


@pytest.mark.parametrize("settings, message", [
    ({"length": 0}, "PromptConfig.length must be a positive int, got 0"),
    ({"init": "zeros"}, "PromptConfig.init='zeros'"),
    ({"init": "text"}, "needs init_token_ids or init_text"),
    ({"top_k": 0}, "top_k must be a positive int"),
])
def test_bad_settings_fail_naming_the_value(settings, message):
    with pytest.raises(ValueError, match=message):
        PromptConfig(**settings)


def test_training_moves_only_the_prompt():
    make = lambda: prompted()
    layout, initial, state, frozen, losses = train(make, PromptParam, peak_learning_rate=0.3)
    assert all(np.isfinite(losses))
    assert leaf_paths(state.params) == ["prompt"]
    trained = nnx.merge(layout.graphdef, state.params, frozen)
    jax.tree.map(np.testing.assert_array_equal, base_params(trained), base_params(make()))
    assert not np.array_equal(state.params["prompt"], initial.params["prompt"])
    n_trainable = count(state.params)
    assert n_trainable == P * CFG.d_model
    assert n_trainable <= count(state.opt_state) <= n_trainable + 16


def test_the_prompt_can_be_redrawn_from_a_restored_embedding():
    # The trainer builds the model before restoring the pretrained base, so it redraws the
    # prompt from the restored table.
    restored = jnp.arange(CFG.vocab_size * CFG.d_model, dtype=jnp.float32).reshape(
        CFG.vocab_size, CFG.d_model)
    fresh = prompt_lib.initial_prompt(PromptConfig(length=3, top_k=8), restored, key=1)
    assert fresh.shape == (3, CFG.d_model)
    assert all(f and min(f) < 8 for f in rows_of(restored, fresh))


def test_the_prompt_exports_alone_and_imports_back(tmp_path):
    config = PromptConfig(length=P, init="uniform")
    model = prompt_lib.apply_prompt(base(), config, key=3)
    prompt_lib.save_prompt(model, tmp_path, config=config, base_model_name_or_path="runs/base")
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (fields["peft_type"], fields["num_virtual_tokens"], fields["token_dim"]) == (
        "PROMPT_TUNING", P, CFG.d_model)
    assert fields["prompt_tuning_init"] == "RANDOM"
    for target in (base(False), prompted(key=9)):
        loaded = prompt_lib.load_prompt(target, tmp_path)
        assert isinstance(loaded, PromptTunedModel)
        np.testing.assert_array_equal(loaded.prompt[...], model.prompt[...])
    with pytest.raises(ValueError, match=r"prompt in .* has shape \(4, 16\); the model's prompt "
                                         r"has \(6, 16\)"):
        prompt_lib.load_prompt(prompted(length=6), tmp_path)
