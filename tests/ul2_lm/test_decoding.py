"""Decoding: the KV cache changes speed, never the tokens; beams are scored as they claim."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from petuning.prompt import PromptConfig, apply_prompt
from ul2_lm import decoding
from ul2_lm.model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=64, num_layers=2, d_model=64, num_heads=4, head_dim=16, mlp_dim=128,
                  max_seq_len=48)
N = 10  # new tokens
PROMPTS = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46]]


def build(cfg=CFG, seed=0):
    # At initialisation the residual copy of the input embedding dominates the logits and greedy
    # repeats the last prompt token; larger kernels give varied continuations worth comparing.
    model = Transformer(cfg, rngs=nnx.Rngs(params=seed))
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * 3.0 if x.ndim >= 3 else x, state))


@pytest.fixture(scope="module")
def model():
    return build()


@pytest.fixture(scope="module")
def prompts():
    return decoding.left_pad(PROMPTS)


@pytest.fixture(scope="module")
def greedy(model, prompts):
    return decoding.greedy_decode(model, *prompts, max_new_tokens=N)


@nnx.jit
def _forward(model, tokens, causal):
    return model(tokens, causal_attention=causal)


def teacher_forced(model, prompts, continuations):
    """Per-token log-probs [R, N] and argmax predictions [R, N] of each continuation after its
    prompt (unpadded, BOS included), from one full forward pass with the prompt as prefix."""
    width = max(len(p) for p in prompts) + N
    tokens = np.zeros((len(prompts), width), np.int32)
    causal = np.zeros_like(tokens)
    for r, (p, c) in enumerate(zip(prompts, continuations)):
        seq = list(p) + list(c)
        tokens[r, :len(seq)] = seq
        causal[r, :len(p)] = 1
    log_probs = jax.nn.log_softmax(_forward(model, jnp.asarray(tokens), jnp.asarray(causal)))
    out_lp = np.zeros((len(prompts), N), np.float32)
    out_arg = np.zeros((len(prompts), N), np.int32)
    for r, (p, c) in enumerate(zip(prompts, continuations)):
        rows = np.arange(len(p) - 1, len(p) - 1 + len(c))
        out_lp[r, :len(c)] = np.asarray(log_probs[r, rows, np.asarray(c)])
        out_arg[r, :len(c)] = np.asarray(jnp.argmax(log_probs[r, rows], axis=-1))
    return out_lp, out_arg


def with_bos(prompt):
    return [decoding.BOS_ID] + list(prompt)


def test_left_pad_puts_bos_first_and_padding_on_the_left():
    tokens, mask = decoding.left_pad([[7, 8], [9]], length=4)
    np.testing.assert_array_equal(tokens, [[0, 0, 7, 8], [0, 0, 0, 9]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match="length=2"):
        decoding.left_pad([[7, 8]], length=2)


def test_greedy_picks_the_models_argmax_at_every_step(model, greedy):
    tokens = np.asarray(greedy.tokens)
    # Guard: the comparison is only worth something if the rows are not constant.
    assert all(len(set(row)) > 2 for row in tokens)
    lengths = np.asarray(greedy.lengths)
    continuations = [row[:n] for row, n in zip(tokens, lengths)]
    log_probs, argmax = teacher_forced(model, [with_bos(p) for p in PROMPTS], continuations)
    for r, n in enumerate(lengths):
        np.testing.assert_array_equal(argmax[r, :n], tokens[r, :n])
    np.testing.assert_allclose(greedy.log_probs, log_probs.sum(axis=1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("variant", ["mqa_scanned", "gqa_unscanned"])
def test_cached_greedy_equals_recomputing_the_whole_sequence(variant, model, prompts, greedy):
    if variant == "gqa_unscanned":
        model = build(dataclasses.replace(CFG, num_kv_heads=2, scan_layers=False), seed=1)
        greedy = decoding.greedy_decode(model, *prompts, max_new_tokens=N)
    reference = decoding.greedy_decode_uncached(model, *prompts, max_new_tokens=N)
    np.testing.assert_array_equal(greedy.tokens, reference.tokens)
    np.testing.assert_array_equal(greedy.lengths, reference.lengths)
    np.testing.assert_allclose(greedy.log_probs, reference.log_probs, rtol=1e-5, atol=1e-4)


def test_the_prompt_is_a_bidirectional_prefix_unless_asked_otherwise(model, prompts, greedy):
    causal = decoding.greedy_decode(model, *prompts, max_new_tokens=N, bidirectional_prompt=False)
    assert not np.array_equal(greedy.tokens, causal.tokens)
    # A causal prompt is the plain language-model case (the longest prompt has no padding).
    longest = jnp.asarray(prompts[0][3:])
    first = int(_forward(model, longest, None)[0, -1].argmax())
    assert int(causal.tokens[3, 0]) == first


def test_decoding_leaves_the_callers_model_without_a_cache(model, greedy):
    assert not nnx.state(model, nnx.Cache)


def test_eos_stops_its_row_while_the_others_continue(model, prompts):
    never = decoding.greedy_decode(model, *prompts, max_new_tokens=N, eos_id=-1)
    tokens = np.asarray(never.tokens)
    # Declare row 0's fourth token the end of sequence; rows that never emit it run on.
    step = 3
    stop = int(tokens[0, step])
    assert stop not in tokens[0, :step]
    running = [r for r in range(1, len(PROMPTS)) if stop not in tokens[r]]
    assert running
    stopped = decoding.greedy_decode(model, *prompts, max_new_tokens=N, eos_id=stop)
    out = np.asarray(stopped.tokens)
    np.testing.assert_array_equal(out[0, :step + 1], tokens[0, :step + 1])
    assert (out[0, step + 1:] == decoding.PAD_ID).all()
    assert int(stopped.lengths[0]) == step + 1
    np.testing.assert_array_equal(out[running], tokens[running])
    assert (np.asarray(stopped.lengths)[running] == N).all()
    assert decoding.token_lists(stopped, eos_id=stop)[0] == tokens[0, :step].tolist()


def test_a_rows_output_does_not_depend_on_the_other_rows_or_its_padding(model, prompts, greedy):
    others = decoding.left_pad([PROMPTS[0], [60, 61, 62, 63], [2], [33] * 7])
    np.testing.assert_array_equal(
        decoding.greedy_decode(model, *others, max_new_tokens=N).tokens[0], greedy.tokens[0])
    padded = decoding.left_pad(PROMPTS, length=len(prompts[0][0]) + 3)
    np.testing.assert_array_equal(
        decoding.greedy_decode(model, *padded, max_new_tokens=N).tokens, greedy.tokens)


def test_beam_search_with_one_beam_is_greedy(model, prompts, greedy):
    beams = decoding.beam_search(model, *prompts, max_new_tokens=N, beam_size=1, alpha=0.6)
    np.testing.assert_array_equal(beams.best.tokens, greedy.tokens)
    np.testing.assert_array_equal(beams.best.lengths, greedy.lengths)
    np.testing.assert_allclose(beams.best.log_probs, greedy.log_probs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beams_are_sorted_distinct_and_score_their_length_penalised_log_prob(
        model, prompts, greedy, alpha):
    k = 4
    # An end-of-sequence id the model often emits, so that hypotheses end both ways.
    eos = int(greedy.tokens[0, 2])
    beams = decoding.beam_search(model, *prompts, max_new_tokens=N, beam_size=k, alpha=alpha,
                                 eos_id=eos)
    tokens, lengths = np.asarray(beams.tokens), np.asarray(beams.lengths)
    assert (lengths < N).any() and (lengths == N).any()
    scores = np.asarray(beams.scores)
    assert tokens.shape == (len(PROMPTS), k, N)
    assert np.all(np.diff(scores, axis=1) <= 0)
    flat_prompts = [with_bos(p) for p in PROMPTS for _ in range(k)]
    continuations = [tokens[r, j, :lengths[r, j]] for r in range(len(PROMPTS)) for j in range(k)]
    log_probs, _ = teacher_forced(model, flat_prompts, continuations)
    log_probs = log_probs.sum(axis=1).reshape(len(PROMPTS), k)
    np.testing.assert_allclose(beams.log_probs, log_probs, rtol=1e-5, atol=1e-4)
    penalty = ((5.0 + lengths) / 6.0) ** alpha
    np.testing.assert_allclose(scores, log_probs / penalty, rtol=1e-5, atol=1e-4)
    for r in range(len(PROMPTS)):
        assert len({tuple(c) for c in continuations[r * k:(r + 1) * k]}) == k
        # A hypothesis ends at EOS or at max_new_tokens, and holds padding after it.
        for j in range(k):
            n = lengths[r, j]
            assert n == N or tokens[r, j, n - 1] == eos
            assert eos not in tokens[r, j, :n - 1]
            assert (tokens[r, j, n:] == decoding.PAD_ID).all()


def test_beam_search_rows_are_independent(model, prompts):
    others = decoding.left_pad([PROMPTS[0], [60, 61, 62, 63], [2], [33] * 7])
    a = decoding.beam_search(model, *prompts, max_new_tokens=N, beam_size=4)
    b = decoding.beam_search(model, *others, max_new_tokens=N, beam_size=4)
    np.testing.assert_array_equal(a.tokens[0], b.tokens[0])
    np.testing.assert_allclose(a.scores[0], b.scores[0], rtol=1e-5)


def test_a_prompt_tuned_model_decodes_through_the_same_cache(prompts):
    tuned = apply_prompt(build(seed=2), PromptConfig(length=5, init="uniform"), key=3)
    cached = decoding.greedy_decode(tuned, *prompts, max_new_tokens=N)
    reference = decoding.greedy_decode_uncached(tuned, *prompts, max_new_tokens=N)
    np.testing.assert_array_equal(cached.tokens, reference.tokens)


def test_bad_requests_name_the_problem(model, prompts):
    tokens, mask = prompts
    with pytest.raises(ValueError, match="left-padded"):
        decoding.greedy_decode(model, tokens, mask[:, ::-1], max_new_tokens=N)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoding.greedy_decode(model, tokens, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="beam_size"):
        decoding.beam_search(model, tokens, mask, max_new_tokens=N, beam_size=40)
    with pytest.raises(ValueError, match="max_seq_len"):
        decoding.greedy_decode(model, tokens, mask, max_new_tokens=CFG.max_seq_len)
