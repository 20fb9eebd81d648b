"""Synthetic batches: the trainer's data source where TensorFlow and seqio are not installed.

Each batch is a pure function of (seed, split, batch index, shard), so resuming at a step needs
no replay. The sequences are a copied random prefix (inputs) followed by its reverse (targets):
learnable, so a falling loss shows the trainer works, with no data files or tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator

import ml_collections
import numpy as np

FIRST_TOKEN = 2  # 0 is padding, 1 end-of-sequence.


def example_batch(seed: int, split: str, index: int, shard_index: int, num_shards: int,
                  batch_size: int, seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Rows [shard_index * batch_size, (shard_index + 1) * batch_size) of global batch `index`."""
    split_id = {"train": 0, "validation": 1, "test": 2}.get(split, 3)
    rng = np.random.default_rng([seed, split_id, index])
    prefix_len = seq_len // 2
    prefix = rng.integers(FIRST_TOKEN, vocab_size, size=(batch_size * num_shards, prefix_len))
    prefix = prefix[shard_index * batch_size:(shard_index + 1) * batch_size]
    full = np.concatenate([prefix, prefix[:, ::-1]], axis=1)[:, :seq_len]
    full = np.pad(full, ((0, 0), (0, seq_len - full.shape[1])))
    inputs = np.pad(full[:, :-1], ((0, 0), (1, 0)))  # Shifted right, as seqio's converter does.
    is_target = np.arange(seq_len) >= prefix_len
    causal_attention = np.arange(seq_len) <= prefix_len  # Prefix plus the first target input.
    return {
        "decoder_input_tokens": inputs.astype(np.int32),
        "decoder_target_tokens": full.astype(np.int32),
        "decoder_loss_weights": np.broadcast_to(is_target, full.shape).astype(np.int32),
        "decoder_positions": np.broadcast_to(np.arange(seq_len), full.shape).astype(np.int32),
        "decoder_segment_ids": np.ones_like(full, dtype=np.int32),
        "decoder_causal_attention": np.broadcast_to(causal_attention, full.shape).astype(np.int32),
    }


class Batches:
    """Batches of one split for one host; `state()` resumes exactly, like the seqio pipeline's."""

    def __init__(self, config: ml_collections.ConfigDict, *, split: str, shard_index: int,
                 num_shards: int, global_batch_size: int, state: dict | None = None,
                 num_batches: int | None = None):
        self._config = config
        self._split, self._shard_index, self._num_shards = split, shard_index, num_shards
        self._local_batch = global_batch_size // num_shards
        self._index = int(state["batches"]) if state else 0
        self._stop = None if num_batches is None else self._index + num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._stop is not None and self._index >= self._stop:
            raise StopIteration
        data = self._config.data
        batch = example_batch(data.seed, self._split, self._index, self._shard_index,
                              self._num_shards, self._local_batch, data.seq_len, data.vocab.size)
        self._index += 1
        return batch

    def state(self) -> dict:
        return {"batches": self._index}

    def close(self) -> None:
        """Nothing to release (the data pipeline's iterators stop a thread here)."""
