"""Prompt tuning: a trainable [P, d_model] prompt in front of the embedded input (Lester et al.
2021).

`apply_prompt(model, PromptConfig(...))` returns a `PromptTunedModel`: the same Transformer (its
parameters keep their paths) plus one `PromptParam` named 'prompt', with logical axes
('prompt', 'embed'). `PromptParam` is the trainable filter. The model's calls keep their
signatures and shapes: the prompt is joined to `embed(tokens)` through the `input_embeddings`
path, counts as part of the bidirectional prefix, shifts every position by P, and its logits are
dropped, so callers see [B, L, V] aligned with their tokens and no loss can fall on it.

The prompt is placed once per *row*: prompt tuning finetunes on unpacked batches
(config.data.pack=False). In a packed row only the segment with id 1 would see the prompt.

Initialisers are closures over the (frozen) embedding table, `init(key, embedding, length)`:
`sampled_vocab` (the paper's choice: embeddings of tokens drawn from the 5,000 most frequent),
`random_uniform`, and `from_token_ids` (a text's embeddings, repeated or cut to P).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from petuning import adapter_files
from petuning.grafting import adopt
from ul2_lm.model import Transformer

Initializer = Callable[[jax.Array, jax.Array, int], jax.Array]

INITS = ("vocab", "uniform", "text")


class PromptParam(nnx.Param):
    """The trainable prompt of prompt tuning (a distinct type, so that it is the filter)."""


def sampled_vocab(top_k: int = 5000, order: Sequence[int] | None = None) -> Initializer:
    """Embeddings of `length` token ids drawn from the `top_k` most frequent ones.

    `order` lists token ids from most to least frequent; by default the ids ascend, which is the
    frequency order of a SentencePiece vocabulary. Ids are drawn without replacement when there
    are enough of them.
    """
    if top_k < 1:
        raise ValueError(f"PromptConfig.top_k must be >= 1, got {top_k!r}")

    def init(key: jax.Array, embedding: jax.Array, length: int) -> jax.Array:
        candidates = (np.arange(embedding.shape[0]) if order is None
                      else np.asarray(order, np.int32))[:top_k]
        ids = jax.random.choice(key, jnp.asarray(candidates), (length,),
                                replace=length > len(candidates))
        return jnp.take(embedding, ids, axis=0).astype(jnp.float32)

    return init


def random_uniform(scale: float = 0.5) -> Initializer:
    """Independent draws from U(-scale, scale)."""

    def init(key: jax.Array, embedding: jax.Array, length: int) -> jax.Array:
        return jax.random.uniform(key, (length, embedding.shape[1]), jnp.float32, -scale, scale)

    return init


def from_token_ids(token_ids: Sequence[int]) -> Initializer:
    """The embeddings of `token_ids` (e.g. a tokenised task description), repeated or cut to
    the prompt length."""
    ids = np.asarray(token_ids, np.int32).reshape(-1)
    if ids.size == 0:
        raise ValueError("PromptConfig: the initialisation text has no tokens")

    def init(key: jax.Array, embedding: jax.Array, length: int) -> jax.Array:
        del key
        if ids.min() < 0 or ids.max() >= embedding.shape[0]:
            raise ValueError(f"PromptConfig.init_token_ids: ids must lie in [0, "
                             f"{embedding.shape[0]}), got {ids.min()}..{ids.max()}")
        return jnp.take(embedding, jnp.asarray(np.resize(ids, length)), axis=0).astype(jnp.float32)

    return init


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How to build the prompt.

    length: P, the number of prompt vectors.
    init: 'vocab' (sampled vocabulary embeddings), 'uniform', or 'text'.
    top_k, token_order: for 'vocab' (see `sampled_vocab`).
    uniform_scale: for 'uniform'.
    init_token_ids / init_text: for 'text': the ids, or a text that `apply(..., encode=...)`
      tokenises.
    param_dtype: storage dtype of the prompt.
    """

    length: int = 100
    init: str = "vocab"
    top_k: int = 5000
    token_order: tuple[int, ...] | None = None
    uniform_scale: float = 0.5
    init_token_ids: tuple[int, ...] | None = None
    init_text: str | None = None
    param_dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.length, int) or isinstance(self.length, bool) or self.length < 1:
            raise ValueError(f"PromptConfig.length must be a positive int, got {self.length!r}")
        if self.init not in INITS:
            raise ValueError(f"PromptConfig.init={self.init!r}; expected one of {list(INITS)}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"PromptConfig.top_k must be a positive int, got {self.top_k!r}")
        if not self.uniform_scale > 0:
            raise ValueError(f"PromptConfig.uniform_scale must be positive, got "
                             f"{self.uniform_scale!r}")
        if self.init == "text" and self.init_token_ids is None and self.init_text is None:
            raise ValueError("PromptConfig.init='text' needs init_token_ids or init_text")
        if self.param_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"PromptConfig.param_dtype={self.param_dtype!r}; expected "
                             "'float32' or 'bfloat16'")
        for name in ("token_order", "init_token_ids"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(i) for i in value))


def initializer(config: PromptConfig, encode: Callable[[str], Sequence[int]] | None = None
                ) -> Initializer:
    """The initialiser `config` names."""
    if config.init == "vocab":
        return sampled_vocab(config.top_k, config.token_order)
    if config.init == "uniform":
        return random_uniform(config.uniform_scale)
    ids = config.init_token_ids
    if ids is None:
        if encode is None:
            raise ValueError("PromptConfig.init_text needs a tokeniser: pass encode= (e.g. "
                             "vocabulary.encode), or give init_token_ids")
        ids = encode(config.init_text)
    return from_token_ids(ids)


def initial_prompt(config: PromptConfig, embedding: jax.Array, key: jax.Array | int = 0, *,
                   encode: Callable[[str], Sequence[int]] | None = None) -> jax.Array:
    """The initial prompt [P, d_model] for an embedding table. Call it again after restoring a
    pretrained base: the prompt should be drawn from the embeddings the model was trained with."""
    key = jax.random.key(key) if isinstance(key, int) else key
    prompt = initializer(config, encode)(key, jnp.asarray(embedding), config.length)
    return prompt.astype(config.param_dtype)


def check_budget(prompt_length: int, seq_len: int, max_seq_len: int) -> None:
    """Raises ValueError when P + seq_len positions do not fit the model's max_seq_len."""
    if prompt_length + seq_len > max_seq_len:
        raise ValueError(f"prompt length {prompt_length} + sequence length {seq_len} = "
                         f"{prompt_length + seq_len} exceeds the model's max_seq_len="
                         f"{max_seq_len}; shorten the prompt or the sequences")


class PromptTunedModel(Transformer):
    """A Transformer with a trainable prompt in front of every row (build it with `apply_prompt`).

    __call__, init_cache, prefill and decode_step take and return what Transformer's do, for
    the caller's tokens only: P = prompt_length positions are added internally. Cached decoding
    sees the prompt through prefill, so step-by-step logits equal the full forward.
    """

    def __init__(self, base: Transformer, prompt: jax.Array):
        adopt(self, base)
        self.prompt = PromptParam(prompt, sharding_names=("prompt", "embed"))

    @property
    def prompt_length(self) -> int:
        return int(self.prompt.shape[0])

    def _join(self, tokens, input_embeddings) -> jax.Array:
        x = self.embed(tokens) if input_embeddings is None else input_embeddings.astype(self.config.dtype)
        check_budget(self.prompt_length, x.shape[1], self.config.max_seq_len)
        prompt = jnp.broadcast_to(self.prompt[...].astype(self.config.dtype)[None],
                                  (x.shape[0],) + tuple(self.prompt.shape))
        return jnp.concatenate([prompt, x], axis=1)

    def _prompt_columns(self, batch: int, value, dtype) -> jax.Array:
        return jnp.full((batch, self.prompt_length), value, dtype)

    def _shift(self, positions: jax.Array | None) -> jax.Array | None:
        if positions is None:
            return None
        batch = positions.shape[0]
        own = jnp.broadcast_to(jnp.arange(self.prompt_length, dtype=positions.dtype),
                               (batch, self.prompt_length))
        return jnp.concatenate([own, positions + self.prompt_length], axis=1)

    def _prefix(self, batch: int, causal_attention: jax.Array | None, length: int) -> jax.Array:
        if causal_attention is None:
            causal_attention = jnp.zeros((batch, length), jnp.int32)
        return jnp.concatenate([self._prompt_columns(batch, 1, causal_attention.dtype),
                                causal_attention], axis=1)

    def __call__(self, tokens: jax.Array | None, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None,
                 causal_attention: jax.Array | None = None,
                 dropout_rng: jax.Array | None = None,
                 input_embeddings: jax.Array | None = None) -> jax.Array:
        x = self._join(tokens, input_embeddings)
        batch, length = x.shape[0], x.shape[1] - self.prompt_length
        if segment_ids is not None:
            # Unpacked rows hold segment 1 (0 = padding): the prompt joins it.
            segment_ids = jnp.concatenate(
                [self._prompt_columns(batch, 1, segment_ids.dtype), segment_ids], axis=1)
        hidden = self.hidden_states(
            None, positions=self._shift(positions), segment_ids=segment_ids,
            causal_attention=self._prefix(batch, causal_attention, length),
            dropout_rng=dropout_rng, input_embeddings=x)
        # No logits for the prompt's own positions: nothing reads them.
        return self.logits(hidden[:, self.prompt_length:])

    def init_cache(self, batch_size: int, max_len: int, dtype: str | None = None) -> None:
        """A cache for `max_len` of the caller's tokens (plus the prompt's P slots)."""
        check_budget(self.prompt_length, max_len, self.config.max_seq_len)
        super().init_cache(batch_size, max_len + self.prompt_length, dtype)

    def prefill(self, tokens: jax.Array | None, *, positions: jax.Array | None = None,
                causal_attention: jax.Array | None = None, token_mask: jax.Array | None = None,
                input_embeddings: jax.Array | None = None) -> jax.Array:
        x = self._join(tokens, input_embeddings)
        batch, length = x.shape[0], x.shape[1] - self.prompt_length
        if token_mask is not None:
            token_mask = jnp.concatenate(
                [self._prompt_columns(batch, 1, token_mask.dtype), token_mask], axis=1)
        hidden = self._prefill_hidden(None, self._shift(positions),
                                      self._prefix(batch, causal_attention, length),
                                      token_mask, x)
        return self.logits(hidden[:, self.prompt_length:])

    def decode_step(self, tokens: jax.Array | None, *, positions: jax.Array | None = None,
                    input_embeddings: jax.Array | None = None) -> jax.Array:
        if positions is not None:
            positions = positions + self.prompt_length
        return super().decode_step(tokens, positions=positions, input_embeddings=input_embeddings)


def apply_prompt(model: Transformer, config: PromptConfig, *, key: jax.Array | int = 0,
                 seq_len: int | None = None,
                 encode: Callable[[str], Sequence[int]] | None = None) -> PromptTunedModel:
    """`model` with a trainable prompt, initialised from its embedding table as `config` says.

    Consumes `model` (the result shares its parameters). `seq_len`, when given, is checked
    against the budget: P + seq_len must fit max_seq_len.
    """
    if type(model) is not Transformer:
        raise TypeError(f"apply_prompt expects a plain ul2_lm Transformer, got "
                        f"{type(model).__name__} (a prompt cannot be stacked on another method)")
    check_budget(config.length, 1 if seq_len is None else seq_len, model.config.max_seq_len)
    prompt = initial_prompt(config, model.embedding[...], key, encode=encode)
    return PromptTunedModel(model, prompt)


_PEFT_INIT_NAMES = {"vocab": "SAMPLE_VOCAB", "uniform": "RANDOM", "text": "TEXT"}


def save_prompt(model: PromptTunedModel, directory, *, config: PromptConfig | None = None,
                base_model_name_or_path: str | None = None):
    """Writes the prompt alone: adapter_model.npz ('prompt', float32 [P, d_model]) and
    adapter_config.json (PEFT's prompt-tuning field names)."""
    if not isinstance(model, PromptTunedModel):
        raise TypeError(f"save_prompt expects a PromptTunedModel, got {type(model).__name__}")
    fields = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": model.prompt_length,
        "token_dim": int(model.prompt.shape[1]),
        "num_transformer_submodules": 1,
        "prompt_tuning_init": _PEFT_INIT_NAMES[config.init] if config else None,
        "prompt_tuning_init_text": config.init_text if config else None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
    }
    prompt = np.asarray(jax.device_get(model.prompt[...]), np.float32)
    return adapter_files.write(directory, {"prompt": prompt}, fields)


def load_prompt(model: Transformer, directory) -> PromptTunedModel:
    """Puts the prompt saved in `directory` in front of a plain Transformer, or replaces the
    prompt of a PromptTunedModel of the same length."""
    arrays, fields = adapter_files.read(directory)
    if fields.get("peft_type") != "PROMPT_TUNING":
        raise ValueError(f"{directory}/{adapter_files.CONFIG_FILE}: peft_type is "
                         f"{fields.get('peft_type')!r}, not 'PROMPT_TUNING'")
    prompt = arrays.get("prompt")
    d_model = model.config.d_model
    if prompt is None or prompt.ndim != 2 or prompt.shape[1] != d_model:
        raise ValueError(f"prompt in {str(directory)!r} has shape "
                         f"{None if prompt is None else prompt.shape}; the model needs [P, {d_model}]")
    if isinstance(model, PromptTunedModel):
        if model.prompt.shape != prompt.shape:
            raise ValueError(f"prompt in {str(directory)!r} has shape {prompt.shape}; the "
                             f"model's prompt has {tuple(model.prompt.shape)}")
        model.prompt[...] = jnp.asarray(prompt, model.prompt.dtype)
        return model
    if type(model) is not Transformer:
        raise TypeError(f"load_prompt expects a Transformer, got {type(model).__name__}")
    check_budget(prompt.shape[0], 1, model.config.max_seq_len)
    return PromptTunedModel(model, jnp.asarray(prompt))
