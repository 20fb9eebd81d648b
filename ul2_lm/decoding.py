"""Generation from a prefix-LM: greedy decoding and beam search over the model's KV cache.

Prompts are laid out as the model saw its prefixes in finetuning (seqio's
PrefixLMFeatureConverter): a BOS 0, then the input tokens, all of them in the bidirectional
prefix; the first generated token is predicted at the last prompt position. Prompts of different
lengths are left-padded (`left_pad`), so every row's last prompt token sits in the last column and
all rows decode in lockstep; the model keeps padding out of attention and counts positions over
real tokens only.

Each decoder is one jit-compiled program: the model is split into (graphdef, state) outside,
merged inside, the cache is created and filled by prefill, and a `lax.while_loop` runs
`decode_step` until every row has produced EOS or `max_new_tokens`. The caller's model is never
changed. Any module with the Transformer's decoding interface (init_cache / prefill /
decode_step, e.g. petuning's prompt-tuned model) works.

`greedy_decode_uncached` recomputes the whole sequence at every step, with no cache: the reference
the cached decoders are tested and benchmarked against.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PAD_ID = 0
BOS_ID = 0  # seqio's shifted-right decoder inputs start each sequence with 0.
EOS_ID = 1

# The logical name of the batch axis on the model's cache variables (ul2_lm.model.init_cache).
_BATCH_AXIS_NAME = "activation_batch"
_NEG_INF = float("-inf")


class Decoded(NamedTuple):
    """One sequence per row.

    tokens: int32 [B, max_new_tokens], generated ids; an ended row holds its EOS, then PAD_ID.
    lengths: int32 [B], generated tokens including EOS (max_new_tokens when EOS never came).
    log_probs: float32 [B], sum of the model's log-probabilities of those tokens.
    """

    tokens: jax.Array
    lengths: jax.Array
    log_probs: jax.Array


class Beams(NamedTuple):
    """`beam_size` hypotheses per row, best first.

    tokens: int32 [B, k, max_new_tokens]; lengths, log_probs: as in Decoded, [B, k];
    scores: float32 [B, k], log_probs / length_penalty(lengths, alpha), sorted descending.
    """

    tokens: jax.Array
    lengths: jax.Array
    log_probs: jax.Array
    scores: jax.Array

    @property
    def best(self) -> Decoded:
        """The top hypothesis of every row."""
        return Decoded(self.tokens[:, 0], self.lengths[:, 0], self.log_probs[:, 0])


def length_penalty(length, alpha: float):
    """GNMT's ((5 + length) / 6) ** alpha (T5X's brevity penalty); beam scores divide by it."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def left_pad(inputs: Sequence[Sequence[int]], *, length: int | None = None,
             add_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> (prompt_tokens, prompt_mask), int32 [B, length], left-padded.

    add_bos puts BOS_ID in front of every prompt, as the finetuning data has it. `length`
    defaults to the longest prompt; a longer prompt is an error (cut it before).
    """
    rows = [([BOS_ID] if add_bos else []) + [int(t) for t in row] for row in inputs]
    if not rows:
        raise ValueError("left_pad: no prompts given")
    if not all(rows):
        raise ValueError("left_pad: an empty prompt (with add_bos=False) has no token to "
                         "predict from")
    longest = max(len(row) for row in rows)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"left_pad: a prompt has {longest} tokens (BOS included: {add_bos}), "
                         f"more than length={length}")
    tokens = np.full((len(rows), length), PAD_ID, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return tokens, mask


def token_lists(decoded: Decoded, eos_id: int = EOS_ID) -> list[list[int]]:
    """The generated ids of every row as plain lists, cut before EOS (ready to detokenise)."""
    tokens, lengths = np.asarray(decoded.tokens), np.asarray(decoded.lengths)
    out = []
    for row, n in zip(tokens, lengths):
        row = row[:n].tolist()
        out.append(row[:-1] if row and row[-1] == eos_id else row)
    return out


def greedy_decode(model: nnx.Module, prompt_tokens, prompt_mask=None, *, max_new_tokens: int,
                  eos_id: int = EOS_ID, bidirectional_prompt: bool = True,
                  cache_dtype: str | None = None) -> Decoded:
    """Greedy decoding with the KV cache (the paper's decoding).

    prompt_tokens, prompt_mask: int [B, L] left-padded prompts (see `left_pad`); mask 1 = real
    token, None = no padding. bidirectional_prompt: the prompt is the bidirectional prefix (the
    finetuning format); False = fully causal. cache_dtype: default the model's compute dtype.
    """
    tokens, mask = _check_prompts(prompt_tokens, prompt_mask, max_new_tokens)
    graphdef, state = nnx.split(model)
    return _greedy_cached(graphdef, state, tokens, mask, jnp.int32(eos_id),
                          max_new_tokens=max_new_tokens, bidirectional_prompt=bidirectional_prompt,
                          cache_dtype=cache_dtype)


def greedy_decode_uncached(model: nnx.Module, prompt_tokens, prompt_mask=None, *,
                           max_new_tokens: int, eos_id: int = EOS_ID,
                           bidirectional_prompt: bool = True) -> Decoded:
    """Greedy decoding that runs the full sequence through the model at every step (no cache).

    Same arguments and result as `greedy_decode`; a slow reference for tests and benchmarks.
    Under jit the sequence has a fixed length (prompt + max_new_tokens - 1) at every step.
    """
    tokens, mask = _check_prompts(prompt_tokens, prompt_mask, max_new_tokens)
    graphdef, state = nnx.split(model)
    return _greedy_uncached(graphdef, state, tokens, mask, jnp.int32(eos_id),
                            max_new_tokens=max_new_tokens,
                            bidirectional_prompt=bidirectional_prompt)


def beam_search(model: nnx.Module, prompt_tokens, prompt_mask=None, *, max_new_tokens: int,
                beam_size: int, alpha: float = 0.6, eos_id: int = EOS_ID,
                bidirectional_prompt: bool = True, cache_dtype: str | None = None) -> Beams:
    """Beam search with the KV cache; hypotheses are ranked by log-prob / length_penalty.

    The prompt is prefilled once per row and its cache tiled `beam_size` times; after every step
    the cache rows are gathered to follow their beams. As in fairseq, each step keeps the
    `beam_size` best non-EOS continuations alive and finishes an EOS continuation only when it
    ranks among the best `beam_size` candidates; a row stops once it holds `beam_size` finished
    hypotheses, and at max_new_tokens its best live beams finish as they are. With beam_size 1
    this is exactly greedy decoding. Other arguments as in `greedy_decode`.
    """
    tokens, mask = _check_prompts(prompt_tokens, prompt_mask, max_new_tokens)
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_search: beam_size must be a positive int, got {beam_size!r}")
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_size is not None and 2 * beam_size > vocab_size:
        raise ValueError(f"beam_search: beam_size={beam_size} needs 2 * beam_size <= vocab_size "
                         f"({vocab_size})")
    graphdef, state = nnx.split(model)
    return _beam_search(graphdef, state, tokens, mask, jnp.int32(eos_id), jnp.float32(alpha),
                        max_new_tokens=max_new_tokens, beam_size=beam_size,
                        bidirectional_prompt=bidirectional_prompt, cache_dtype=cache_dtype)


# --- input checks ------------------------------------------------------------------------------


def _check_prompts(prompt_tokens, prompt_mask, max_new_tokens):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    tokens = jnp.asarray(prompt_tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"prompt_tokens must be [batch, length] with length >= 1, got shape "
                         f"{tokens.shape}")
    mask = jnp.ones_like(tokens) if prompt_mask is None else jnp.asarray(prompt_mask, jnp.int32)
    if mask.shape != tokens.shape:
        raise ValueError(f"prompt_mask shape {mask.shape} differs from prompt_tokens shape "
                         f"{tokens.shape}")
    try:
        m = np.asarray(mask) != 0
    except jax.errors.TracerArrayConversionError:  # Under an outer jit: nothing to check.
        m = None
    if m is not None:
        if not m[:, -1].all() or (m[:, 1:] < m[:, :-1]).any():
            bad = int(np.flatnonzero(~m[:, -1] | (m[:, 1:] < m[:, :-1]).any(axis=1))[0])
            raise ValueError(f"prompt_mask row {bad} is not left-padded (zeros, then ones up to "
                             "the last column); build prompts with decoding.left_pad")
    return tokens, mask


# --- the cache as loop state -------------------------------------------------------------------


def _map_batch_axis(fn, cache: nnx.State) -> nnx.State:
    """Applies fn(array, batch_axis) to every cache variable that has a batch axis."""

    def apply(var):
        names = var.get_metadata().get("out_sharding") or ()
        if _BATCH_AXIS_NAME not in names:
            if var[...].ndim:
                raise ValueError(f"decoding: a cache variable of shape {var[...].shape} has no "
                                 f"{_BATCH_AXIS_NAME!r} axis name; cannot follow beams")
            return var
        return var.replace(fn(var[...], names.index(_BATCH_AXIS_NAME)))

    return jax.tree.map(apply, cache, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _prefill(graphdef, state, tokens, mask, cache_len, bidirectional_prompt, cache_dtype):
    """Merges the model, fills a fresh cache with the prompts; returns (step_fn, cache, logits)
    where logits [B, V] predict the first new token and step_fn(cache, tokens [B]) -> (cache,
    logits [B, V]) appends one token per row. `cache` is a pair (cache variables, the rest of
    the model's state): NNX transforms inside decode_step (nnx.scan over layers) refuse
    variables from outside the loop, so the parameters travel in the loop state too."""
    model = nnx.merge(graphdef, state)
    model.init_cache(tokens.shape[0], cache_len, cache_dtype)
    logits = model.prefill(tokens, token_mask=mask,
                           causal_attention=mask if bidirectional_prompt else None)
    step_graph, cache, rest = nnx.split(model, nnx.Cache, ...)

    def step(cache_and_rest, last_tokens):
        stepper = nnx.merge(step_graph, *cache_and_rest)
        logits = stepper.decode_step(last_tokens[:, None])[:, 0]
        return (nnx.state(stepper, nnx.Cache), cache_and_rest[1]), logits

    return step, (cache, rest), logits[:, -1]


def _lengths(tokens, eos_id):
    is_eos = tokens == eos_id
    return jnp.where(is_eos.any(axis=-1), jnp.argmax(is_eos, axis=-1) + 1,
                     tokens.shape[-1]).astype(jnp.int32)


# --- greedy ------------------------------------------------------------------------------------


class _Greedy(NamedTuple):
    step: jax.Array  # index of the next token to choose
    last: jax.Array  # [B] the token chosen at step - 1
    tokens: jax.Array  # [B, N]
    done: jax.Array  # [B] EOS already chosen
    log_probs: jax.Array  # [B]


def _greedy_choose(state: _Greedy, logits, eos_id) -> _Greedy:
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    choice = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    choice = jnp.where(state.done, PAD_ID, choice)
    gained = jnp.take_along_axis(log_probs, choice[:, None], axis=-1)[:, 0]
    tokens = jax.lax.dynamic_update_slice(state.tokens, choice[:, None], (0, state.step))
    return _Greedy(step=state.step + 1, last=choice, tokens=tokens,
                   done=state.done | (choice == eos_id),
                   log_probs=state.log_probs + jnp.where(state.done, 0.0, gained))


def _greedy_start(batch, max_new_tokens):
    return _Greedy(step=jnp.zeros((), jnp.int32), last=jnp.zeros((batch,), jnp.int32),
                   tokens=jnp.full((batch, max_new_tokens), PAD_ID, jnp.int32),
                   done=jnp.zeros((batch,), bool), log_probs=jnp.zeros((batch,), jnp.float32))


def _unfinished(max_new_tokens):
    return lambda carry: (carry[0].step < max_new_tokens) & ~jnp.all(carry[0].done)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "bidirectional_prompt",
                                             "cache_dtype"))
def _greedy_cached(graphdef, state, tokens, mask, eos_id, *, max_new_tokens, bidirectional_prompt,
                   cache_dtype):
    batch, prompt_len = tokens.shape
    # The last chosen token is never fed back, so the cache needs max_new_tokens - 1 new slots.
    step, cache, logits = _prefill(graphdef, state, tokens, mask, prompt_len + max_new_tokens - 1,
                                   bidirectional_prompt, cache_dtype)
    greedy = _greedy_choose(_greedy_start(batch, max_new_tokens), logits, eos_id)

    def body(carry):
        greedy, cache = carry
        cache, logits = step(cache, greedy.last)
        return _greedy_choose(greedy, logits, eos_id), cache

    greedy, _ = jax.lax.while_loop(_unfinished(max_new_tokens), body, (greedy, cache))
    return Decoded(greedy.tokens, _lengths(greedy.tokens, eos_id), greedy.log_probs)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "bidirectional_prompt"))
def _greedy_uncached(graphdef, state, tokens, mask, eos_id, *, max_new_tokens,
                     bidirectional_prompt):
    batch, prompt_len = tokens.shape
    grow = max_new_tokens - 1
    valid = jnp.concatenate([mask, jnp.ones((batch, grow), jnp.int32)], axis=1)
    positions = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - valid
    causal = (jnp.concatenate([mask, jnp.zeros((batch, grow), jnp.int32)], axis=1)
              if bidirectional_prompt else None)
    sequence = jnp.concatenate([tokens, jnp.full((batch, grow), PAD_ID, jnp.int32)], axis=1)

    def next_logits(state, sequence, step):
        # Merged inside the loop: NNX transforms in the model refuse outer-trace variables.
        logits = nnx.merge(graphdef, state)(sequence, positions=positions, segment_ids=valid,
                                            causal_attention=causal)
        return jax.lax.dynamic_index_in_dim(logits, prompt_len - 1 + step, axis=1, keepdims=False)

    greedy = _greedy_choose(_greedy_start(batch, max_new_tokens),
                            next_logits(state, sequence, 0), eos_id)

    def body(carry):
        greedy, sequence, state = carry
        sequence = jax.lax.dynamic_update_slice(sequence, greedy.last[:, None],
                                                (0, prompt_len - 1 + greedy.step))
        return (_greedy_choose(greedy, next_logits(state, sequence, greedy.step), eos_id),
                sequence, state)

    greedy, _, _ = jax.lax.while_loop(_unfinished(max_new_tokens), body,
                                      (greedy, sequence, state))
    return Decoded(greedy.tokens, _lengths(greedy.tokens, eos_id), greedy.log_probs)


# --- beam search -------------------------------------------------------------------------------


class _Beam(NamedTuple):
    step: jax.Array
    alive_tokens: jax.Array  # [B, k, N]
    alive_log_probs: jax.Array  # [B, k]
    parents: jax.Array  # [B, k] which previous beam each live beam extends (cache rows to take)
    last: jax.Array  # [B, k] the token each live beam chose last
    tokens: jax.Array  # [B, k, N] finished hypotheses
    log_probs: jax.Array  # [B, k]
    scores: jax.Array  # [B, k], -inf for an empty slot
    lengths: jax.Array  # [B, k]
    num_finished: jax.Array  # [B]
    done: jax.Array  # [B] the row holds k finished hypotheses


def _gather_beams(x, index):
    """x [B, n, ...] -> [B, m, ...] along axis 1 by index [B, m]."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _beam_choose(beam: _Beam, log_probs, *, beam_size, max_new_tokens, alpha, eos_id) -> _Beam:
    """One beam step from next-token log-probs [B, k, V] of the live beams."""
    batch, _, vocab = log_probs.shape
    candidates = (beam.alive_log_probs[:, :, None] + log_probs).reshape(batch, -1)
    # 2k candidates hold at least k that do not end in EOS (a beam has one EOS continuation).
    cand_log_probs, flat = jax.lax.top_k(candidates, 2 * beam_size)
    parents, choice = flat // vocab, (flat % vocab).astype(jnp.int32)
    cand_tokens = _gather_beams(beam.alive_tokens, parents)
    at_step = jnp.arange(max_new_tokens) == beam.step
    cand_tokens = jnp.where(at_step, choice[:, :, None], cand_tokens)
    is_eos = choice == eos_id

    in_beam = jnp.arange(2 * beam_size) < beam_size
    last_step = beam.step == max_new_tokens - 1
    finishing = in_beam & (is_eos | last_step) & ~beam.done[:, None]
    length = beam.step + 1
    new_scores = jnp.where(finishing, cand_log_probs / length_penalty(length, alpha), _NEG_INF)
    pool_scores = jnp.concatenate([beam.scores, new_scores], axis=1)
    scores, keep = jax.lax.top_k(pool_scores, beam_size)
    pick = lambda old, new: _gather_beams(jnp.concatenate([old, new], axis=1), keep)
    num_finished = beam.num_finished + finishing.sum(axis=1)

    live_scores = jnp.where(is_eos, _NEG_INF, cand_log_probs)
    alive_log_probs, live = jax.lax.top_k(live_scores, beam_size)
    return _Beam(
        step=beam.step + 1,
        alive_tokens=_gather_beams(cand_tokens, live),
        alive_log_probs=alive_log_probs,
        parents=_gather_beams(parents, live),
        last=_gather_beams(choice, live),
        tokens=pick(beam.tokens, cand_tokens),
        log_probs=pick(beam.log_probs, cand_log_probs),
        scores=scores,
        lengths=pick(beam.lengths, jnp.full(choice.shape, length, jnp.int32)),
        num_finished=num_finished,
        done=num_finished >= beam_size)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "beam_size",
                                             "bidirectional_prompt", "cache_dtype"))
def _beam_search(graphdef, state, tokens, mask, eos_id, alpha, *, max_new_tokens, beam_size,
                 bidirectional_prompt, cache_dtype):
    batch, prompt_len = tokens.shape
    k, n = beam_size, max_new_tokens
    step, cache, logits = _prefill(graphdef, state, tokens, mask, prompt_len + n - 1,
                                   bidirectional_prompt, cache_dtype)
    # Beams of a row are rows b*k .. b*k + k - 1 of the tiled cache.
    cache = (_map_batch_axis(lambda x, axis: jnp.repeat(x, k, axis=axis), cache[0]), cache[1])
    first = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    beam = _Beam(
        step=jnp.zeros((), jnp.int32),
        alive_tokens=jnp.full((batch, k, n), PAD_ID, jnp.int32),
        # Only beam 0 is live at first: the k copies of the prompt would give k equal beams.
        alive_log_probs=jnp.where(jnp.arange(k) == 0, 0.0, _NEG_INF)[None].repeat(batch, 0),
        parents=jnp.zeros((batch, k), jnp.int32), last=jnp.zeros((batch, k), jnp.int32),
        tokens=jnp.full((batch, k, n), PAD_ID, jnp.int32),
        log_probs=jnp.zeros((batch, k), jnp.float32),
        scores=jnp.full((batch, k), _NEG_INF, jnp.float32),
        lengths=jnp.zeros((batch, k), jnp.int32),
        num_finished=jnp.zeros((batch,), jnp.int32), done=jnp.zeros((batch,), bool))
    choose = functools.partial(_beam_choose, beam_size=k, max_new_tokens=n, alpha=alpha,
                               eos_id=eos_id)
    beam = choose(beam, jnp.broadcast_to(first[:, None], (batch, k, first.shape[-1])))

    def body(carry):
        beam, cache = carry
        rows = (jnp.arange(batch)[:, None] * k + beam.parents).reshape(-1)
        cache = (_map_batch_axis(lambda x, axis: jnp.take(x, rows, axis=axis), cache[0]),
                 cache[1])
        cache, logits = step(cache, beam.last.reshape(-1))
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return choose(beam, log_probs.reshape(batch, k, -1)), cache

    beam, _ = jax.lax.while_loop(_unfinished(n), body, (beam, cache))
    return Beams(beam.tokens, beam.lengths, beam.log_probs, beam.scores)
