"""The input pipeline: config.data -> an iterator of this host's numpy batches.

Batches are dicts of int32 [local_batch, seq_len] arrays with seqio's packed prefix-LM names
(BATCH_FEATURES): UL2 examples from ul2_lm/data/tasks.py, packed by seqio's
PrefixLMFeatureConverter. Each host reads only its own shard of the documents and yields
`global_batch_size // num_shards` rows per batch.

Order is a pure function of (config, seed, shard): the same settings give the same batches.
`state()` after n batches is a small JSON-able dict; an iterator built from it yields exactly
the batch an uninterrupted iterator would yield next. It rests on seqio's packing: the
converter packs each run of `seq_len` consecutive examples on its own, so the state names the
first example of the current run (document position and chunk) and how many packed rows of the
run were consumed; resuming recomputes at most one run.

A background thread keeps `prefetch` batches ready so the trainer does not wait on the host.
TensorFlow runs on the CPU only (it never sees the accelerators).
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import queue
import threading
import weakref
from collections.abc import Iterator, Mapping

import numpy as np

from ul2_lm.data import finetune_tasks
from ul2_lm.data import tasks
from ul2_lm.data import tf_setup

tf_setup.quiet_tensorflow()
import tensorflow as tf  # noqa: E402

BATCH_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                  "decoder_positions", "decoder_segment_ids", "decoder_causal_attention")
EVAL_SEED = 0  # evaluation data does not depend on the training seed: runs stay comparable
STATE_VERSION = 1

_get = tasks._get  # pylint: disable=protected-access


def describe_data_config_errors(data_config) -> list[str]:
    """Everything wrong with config.data that would stop the data being built (one line each)."""
    return tasks.describe_errors(data_config) + finetune_tasks.describe_errors(data_config)


def validate_data_config(data_config) -> None:
    """Raises ValueError listing every problem `describe_data_config_errors` finds."""
    errors = describe_data_config_errors(data_config)
    if errors:
        raise ValueError("bad data config:\n  " + "\n  ".join(errors))


def vocabulary(data_config):
    """The seqio vocabulary of config.data (its vocab_size is the model's vocab size)."""
    if finetune_tasks.is_finetune_task(_get(data_config, "task")):
        return finetune_tasks.vocabulary(data_config)
    return tasks.vocabulary(data_config)


def _example_maker(data_config, task, split, *, vocab, seq_len, seed, shard_index, num_shards,
                   repeat):
    """(make_examples(start), settings for the fingerprint) of a pretraining or finetuning task."""
    if finetune_tasks.is_finetune_task(task):
        src = finetune_tasks.source(data_config, task)
        settings = dict(num_examples=finetune_tasks.num_examples(data_config),
                        subset_seed=finetune_tasks.subset_seed(data_config),
                        mode_token=finetune_tasks.mode_token(data_config))

        def make_examples(first):
            return finetune_tasks.examples(src, split, vocabulary=vocab, seq_len=seq_len, seed=seed,
                                           shard_index=shard_index, num_shards=num_shards,
                                           start=first, repeat=repeat, **settings)
        return make_examples, dict(settings, source=repr(src))
    src = tasks.source(data_config, task)
    mixture = tasks.mixture(data_config)

    def make_examples(first):  # noqa: F811
        return tasks.examples(src, split, vocabulary=vocab, mixture=mixture, seq_len=seq_len,
                              seed=seed, shard_index=shard_index, num_shards=num_shards,
                              start=first, repeat=repeat)
    return make_examples, dict(source=repr(src), mixture=mixture)


@dataclasses.dataclass
class _Position:
    start: tuple[int, int]  # first example of the current packing run: (document, chunk)
    rows: int  # packed rows of that run already emitted


def _packed_rows(make_examples, start: tuple[int, int], seq_len: int, pack: bool
                 ) -> Iterator[tuple[dict, _Position]]:
    """Packed rows from `start`, each with the position that follows it."""
    run = seq_len if pack else 1  # examples seqio packs together (its padded_batch size)
    run_ends: dict[int, tuple[int, int]] = {}

    def generate():
        for count, (position, inputs, targets) in enumerate(make_examples(start)):
            if count % run == run - 1:
                # The next run starts after this example: the next chunk of the same document
                # (skipped harmlessly if the document has no more chunks).
                run_ends[count // run] = (position[0], position[1] + 1)
            yield {"inputs": inputs, "targets": targets}

    spec = tf.TensorSpec([None], tf.int32)
    ds = tf.data.Dataset.from_generator(generate, output_signature={"inputs": spec, "targets": spec})
    converter = tasks.UL2PrefixLMFeatureConverter(pack=pack)
    ds = converter(ds, tasks.task_feature_lengths(seq_len))
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    run_index, in_run, current = 0, 0, _Position(tuple(start), 0)
    for row in ds.as_numpy_iterator():
        if not pack:
            nonpad = (row["decoder_target_tokens"] != 0).astype(np.int32)
            row["decoder_segment_ids"] = nonpad
            row["decoder_positions"] = np.arange(seq_len, dtype=np.int32) * nonpad
        in_run += int(row["decoder_segment_ids"].max())
        if in_run >= run:
            current = _Position(run_ends.pop(run_index), 0)
            run_index, in_run = run_index + 1, 0
        else:
            current = _Position(current.start, current.rows + 1)
        yield {k: row[k] for k in BATCH_FEATURES}, current


class BatchIterator:
    """Iterator of this host's batches; `state()` is where it stands (train iterators only)."""

    def __init__(self, produce, *, prefetch: int, state: dict | None, local_batch_size: int,
                 seq_len: int, vocab):
        self.local_batch_size, self.seq_len, self.vocabulary = local_batch_size, seq_len, vocab
        self._state = state
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(produce,), daemon=True)
        self._thread.start()
        _open_iterators.add(self)

    def _offer(self, item) -> bool:
        """Puts `item` in the queue once there is room; False if the iterator is closed first
        (a consumer that stopped reading never leaves this thread blocked)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, produce):
        items = produce()
        try:
            for item in items:
                if not self._offer(item):
                    return
            self._offer(StopIteration())
        except BaseException as e:  # surfaced to the consumer, not lost in the thread
            self._offer(e)
        finally:
            items.close()  # releases the TensorFlow iterator in the thread that made it

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put(item)  # keep raising on later calls
            raise item
        batch, self._state = item
        return batch

    def state(self) -> dict:
        """JSON-able position after the last batch returned; pass it as `state=` to resume."""
        if self._state is None:
            raise ValueError("evaluation iterators have no resumable state")
        return dict(self._state)

    def close(self):
        """Stops the prefetch thread (also done at interpreter exit)."""
        self._stop.set()
        self._thread.join(timeout=30)
        _open_iterators.discard(self)


_open_iterators: "weakref.WeakSet[BatchIterator]" = weakref.WeakSet()


@atexit.register
def _close_all():
    # A prefetch thread still inside TensorFlow at interpreter exit aborts the process.
    for iterator in list(_open_iterators):
        iterator.close()


def _fingerprint(**settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def _batches(rows: Iterator[tuple[dict, _Position]], local_batch: int, seq_len: int,
             num_batches: int | None, pad_last: bool):
    """Stacks rows into batches; yields (batch, position after it)."""
    made, last = 0, None
    zeros = {k: np.zeros(seq_len, np.int32) for k in BATCH_FEATURES}
    while num_batches is None or made < num_batches:
        chunk = list(zip(*[r for _, r in zip(range(local_batch), rows)]))
        if not chunk:
            if not pad_last or num_batches is None:
                return
            # Every host yields the same number of evaluation batches, whatever its shard holds.
            chunk = [(zeros,), (last,)]
        features, positions = chunk
        if len(features) < local_batch:
            if not pad_last:
                return
            features = features + (zeros,) * (local_batch - len(features))
        last = positions[-1]
        yield {k: np.stack([f[k] for f in features]) for k in BATCH_FEATURES}, last
        made += 1


def _local_batch(global_batch_size: int, num_shards: int) -> int:
    if global_batch_size % num_shards:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{num_shards} data shards (hosts)")
    return global_batch_size // num_shards


def make_train_iterator(data_config, *, global_batch_size: int, seq_len: int | None = None,
                        seed: int | None = None, shard_index: int = 0, num_shards: int = 1,
                        state: Mapping | None = None, prefetch: int | None = None) -> BatchIterator:
    """Endless training batches of config.data for host `shard_index` of `num_shards`.

    Reads config.data: task, vocab, seq_len (unless given), seed (unless given), pack, ul2,
    text_files, tfds / tfds_data_dir, prefetch_batches (unless `prefetch` is given). `state`
    (from `BatchIterator.state()`) resumes exactly.
    """
    prefetch = prefetch or int(_get(data_config, "prefetch_batches", 2))
    validate_data_config(data_config)
    seq_len = int(seq_len or _get(data_config, "seq_len", 512))
    seed = int(seed if seed is not None else _get(data_config, "seed", 0))
    pack = bool(_get(data_config, "pack", True))
    local_batch = _local_batch(global_batch_size, num_shards)
    vocab = vocabulary(data_config)
    make_examples, settings = _example_maker(
        data_config, _get(data_config, "task", "ul2_embedded_ende"), "train", vocab=vocab,
        seq_len=seq_len, seed=seed, shard_index=shard_index, num_shards=num_shards, repeat=True)
    fingerprint = _fingerprint(task=_get(data_config, "task"), **settings,
                               vocab=vocab.sentencepiece_model_file,
                               seq_len=seq_len, seed=seed, pack=pack, local_batch=local_batch,
                               shard_index=shard_index, num_shards=num_shards)
    if state is not None:
        state = dict(state)
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != fingerprint:
            raise ValueError(
                "data iterator state does not match this data config, seed, batch or shard "
                f"(state fingerprint {state.get('fingerprint')!r}, this iterator {fingerprint!r})")
    start = tuple(state["start"]) if state else (0, 0)
    skip_rows = int(state["rows"]) if state else 0
    batches_done = int(state["batches"]) if state else 0

    def produce():
        rows = _packed_rows(make_examples, start, seq_len, pack)
        for _ in range(skip_rows):
            next(rows)
        for n, (batch, position) in enumerate(_batches(rows, local_batch, seq_len, None, False),
                                              batches_done + 1):
            yield batch, {"version": STATE_VERSION, "fingerprint": fingerprint,
                          "start": list(position.start), "rows": position.rows, "batches": n}

    initial = state or {"version": STATE_VERSION, "fingerprint": fingerprint, "start": [0, 0],
                        "rows": 0, "batches": 0}
    return BatchIterator(produce, prefetch=prefetch, state=initial, local_batch_size=local_batch,
                         seq_len=seq_len, vocab=vocab)


def make_eval_iterator(data_config, *, global_batch_size: int, seq_len: int | None = None,
                       shard_index: int = 0, num_shards: int = 1, split: str | None = None,
                       num_batches: int | None = None, task: str | None = None,
                       prefetch: int = 2) -> BatchIterator:
    """Finite evaluation batches: one pass over the split in a fixed order, no shuffling.

    Reads config.data: eval_task (default: task), eval_split (default 'validation'),
    num_eval_batches (None or 0: the whole split), and what `make_train_iterator` reads. The
    UL2 noise uses a fixed seed, so evaluation data is the same whatever the training seed.
    When the split runs out, the last batch is padded with all-zero rows (loss weight 0), and
    with `num_batches` set, all-zero batches follow up to `num_batches`: every host yields the
    same number of batches, as collective evaluation steps need.
    """
    validate_data_config(data_config)
    seq_len = int(seq_len or _get(data_config, "seq_len", 512))
    pack = bool(_get(data_config, "pack", True))
    local_batch = _local_batch(global_batch_size, num_shards)
    task = task or _get(data_config, "eval_task") or _get(data_config, "task")
    split = split or _get(data_config, "eval_split", "validation")
    num_batches = num_batches if num_batches is not None else _get(data_config, "num_eval_batches")
    vocab = vocabulary(data_config)
    make_examples, _ = _example_maker(data_config, task, split, vocab=vocab, seq_len=seq_len,
                                      seed=EVAL_SEED, shard_index=shard_index,
                                      num_shards=num_shards, repeat=False)

    def produce():
        rows = _packed_rows(make_examples, (0, 0), seq_len, pack)
        for batch, _ in _batches(rows, local_batch, seq_len, num_batches or None, True):
            yield batch, None

    return BatchIterator(produce, prefetch=prefetch, state=None, local_batch_size=local_batch,
                         seq_len=seq_len, vocab=vocab)
