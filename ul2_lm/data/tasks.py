"""UL2 pretraining tasks: a document source, a vocabulary and the denoiser mixture, as seqio tasks.

Task names (`config.data.task`):
- `ul2_embedded_ende`: the embedded bilingual corpus (xen and xde documents mixed).
- `ul2_textfiles`: the user's text files, one document per line (`config.data.text_files`:
  paths or globs, comma-separated or a list).
- `ul2_wiki40b_ende`, `ul2_wiki40b_enzh`: TFDS Wiki-40B English and German (or Chinese),
  interleaved half and half.
- `ul2_tfds`: any TFDS text dataset(s) (`config.data.tfds.name`, comma-separated to mix).

`examples()` turns a source's documents into UL2 (inputs, targets) pairs; the seqio task and
the input pipeline (ul2_lm/data/pipeline.py) both use it, so they produce the same examples.
`seqio_task(config.data)` registers the task with seqio (idempotently) for seqio-based tools;
`get_dataset()` runs it through seqio with the prefix-LM feature converter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import threading
from collections.abc import Callable, Iterator

import numpy as np

from ul2_lm import ul2
from ul2_lm.data import sources as sources_lib
from ul2_lm.data import tf_setup
from ul2_lm.data import vocab as vocab_lib

tf_setup.quiet_tensorflow()
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
TFDS_VOCAB_SAMPLE_DOCUMENTS = 50_000


def _get(cfg, key, default=None):
    """Reads a key of a ConfigDict or a dict; missing, None or '' -> default."""
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None or (isinstance(value, str) and not value) else value


def _tfds_data_dir(data):
    return _get(_get(data, "tfds"), "data_dir") or _get(data, "tfds_data_dir")


def _embedded(data):
    return sources_lib.EmbeddedSource(corpus_seed=int(_get(data, "corpus_seed", 0)),
                                      bitext_rate=float(_get(data, "bitext_rate", 0.0)))


def _text_files(data):
    patterns = _get(data, "text_files")
    if not patterns:
        raise ValueError("config.data.text_files is empty: task 'ul2_textfiles' needs paths or globs")
    return sources_lib.TextFilesSource(patterns if isinstance(patterns, str) else list(patterns))


def _wiki40b(*langs):
    def make(data):
        return sources_lib.InterleavedSource([
            sources_lib.TfdsSource(f"wiki40b/{lang}:1.3.0", data_dir=_tfds_data_dir(data),
                                   clean=sources_lib.clean_wiki40b) for lang in langs])
    return make


def _tfds(data):
    tfds_cfg = _get(data, "tfds")
    names = _get(tfds_cfg, "name")
    if not names:
        raise ValueError("config.data.tfds.name is empty: task 'ul2_tfds' needs a TFDS dataset name")
    splits = _get(tfds_cfg, "splits")
    split_names = dict(splits) if splits else None
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    text_feature = _get(tfds_cfg, "text_feature", "text")
    clean = sources_lib.clean_wiki40b if all(n.startswith("wiki40b") for n in names) else None
    return sources_lib.InterleavedSource([
        sources_lib.TfdsSource(n, text_feature=text_feature, data_dir=_tfds_data_dir(data),
                               split_names=split_names, clean=clean) for n in names])


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    make_source: Callable[[object], sources_lib.Source]


TASKS = {t.name: t for t in [
    TaskSpec("ul2_embedded_ende", _embedded),
    TaskSpec("ul2_textfiles", _text_files),
    TaskSpec("ul2_wiki40b_ende", _wiki40b("en", "de")),
    TaskSpec("ul2_wiki40b_enzh", _wiki40b("en", "zh-cn")),
    TaskSpec("ul2_tfds", _tfds),
]}


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"config.data.task={name!r} is not one of {sorted(TASKS)}")
    return TASKS[name]


def source(data_config, task: str | None = None) -> sources_lib.Source:
    return task_spec(task or _get(data_config, "task", "ul2_embedded_ende")).make_source(data_config)


def mixture(data_config) -> ul2.Mixture:
    cfg = _get(data_config, "ul2")
    rates = _get(cfg, "rates")
    return ul2.make_mixture(_get(cfg, "preset", "ul2r"), dict(rates) if rates else None)


_vocab_cache: dict = {}


def vocabulary(data_config) -> seqio.SentencePieceVocabulary:
    """`config.data.vocab` -> the vocabulary (trained on first use, then cached on disk).

    kind 'auto' (or unset) / 'task': trained on the task's own training text (for the embedded
    task, the embedded corpus; for text files, their first lines; for TFDS, its first
    documents); 'embedded': the embedded corpus's vocabulary whatever the task;
    'sentencepiece_file': an existing model at `path`. `size` counts the `extra_ids` (default
    100) that serve as sentinels; `sample_documents` sets the embedded corpus's training sample.
    A corpus too small for `size` pieces gets fewer: read the size from the result.
    """
    cfg = _get(data_config, "vocab") or {}
    kind = _get(cfg, "kind", "auto")
    size = int(_get(cfg, "size", vocab_lib.DEFAULT_SIZE))
    extra_ids = int(_get(cfg, "extra_ids", vocab_lib.DEFAULT_EXTRA_IDS))
    src = source(data_config) if kind in ("auto", "task") else None
    key = (kind, size, extra_ids, _get(cfg, "path"), _get(cfg, "sample_documents"),
           repr(src) if src is not None else None, str(vocab_lib.cache_dir()))
    if key in _vocab_cache:
        return _vocab_cache[key]
    if kind == "sentencepiece_file":
        path = _get(cfg, "path")
        if not path or not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"config.data.vocab.path: no SentencePiece model at {path!r}")
        result = seqio.SentencePieceVocabulary(str(path), extra_ids=extra_ids)
    elif kind == "embedded" or isinstance(src, sources_lib.EmbeddedSource):
        seed = src.corpus.seed if src is not None else int(_get(data_config, "corpus_seed", 0))
        result = vocab_lib.embedded_vocab(
            size, seed=seed, extra_ids=extra_ids,
            num_documents=int(_get(cfg, "sample_documents", vocab_lib.EMBEDDED_SAMPLE_DOCUMENTS)))
    elif kind in ("auto", "task") and isinstance(src, sources_lib.TextFilesSource):
        result = vocab_lib.text_files_vocab(src.files, size, extra_ids=extra_ids)
    elif kind in ("auto", "task"):
        docs = src.documents("train", seed=0, repeat=False)
        texts = (text for _, text in itertools.islice(docs, TFDS_VOCAB_SAMPLE_DOCUMENTS))
        result = vocab_lib.train_vocab(texts, size, extra_ids=extra_ids, name="tfds",
                                       recipe=f"{src!r} first {TFDS_VOCAB_SAMPLE_DOCUMENTS}",
                                       byte_fallback=True)
    else:
        raise ValueError(f"config.data.vocab.kind={kind!r} is not one of "
                         "'auto', 'task', 'embedded', 'sentencepiece_file'")
    _vocab_cache[key] = result
    return result


def task_feature_lengths(seq_len: int) -> dict[str, int]:
    """Lengths for the prefix-LM converter: they sum to the packed sequence length."""
    return {"inputs": seq_len // 2, "targets": seq_len - seq_len // 2}


class UL2PrefixLMFeatureConverter(seqio.PrefixLMFeatureConverter):
    """seqio's prefix-LM converter, checking inputs + targets against the whole sequence.

    UL2 examples are budgeted as a whole (a prefix-LM example may be almost all inputs, a
    span-corruption one mostly inputs or mostly targets), and the converter packs the
    concatenation, so only the sum of the two lengths matters. Output is unchanged.
    """

    def _validate_dataset(self, ds, expected_features, expected_lengths, strict, error_label):
        if error_label == "input_validation":
            total = sum(expected_lengths.values())
            expected_lengths = {k: total for k in expected_lengths}
        return super()._validate_dataset(ds, expected_features, expected_lengths, strict, error_label)


def examples(src: sources_lib.Source, split: str, *, vocabulary, mixture: ul2.Mixture,
             seq_len: int, seed: int, shard_index: int = 0, num_shards: int = 1,
             start: tuple[int, int] = (0, 0), repeat: bool = True
             ) -> Iterator[tuple[tuple[int, int], np.ndarray, np.ndarray]]:
    """((document position, chunk), inputs, targets) for this shard from `start` on.

    A document longer than one sequence is split into several examples (chunks); each
    example's noise is seeded by (seed, split, document key, chunk). `start` = (p, q) resumes
    at chunk q of the shard's p-th document.
    """
    ids = vocab_lib.special_ids(vocabulary)
    encode = vocabulary.tokenizer.EncodeAsIds
    split_id = SPLIT_IDS.get(split, 3)
    first, skip = start
    docs = src.documents(split, seed=seed, shard_index=shard_index, num_shards=num_shards,
                         start=first, repeat=repeat)
    for position, (key, text) in enumerate(docs, first):
        chunks = ul2.denoise_document(encode(text), mixture, ids, seq_len, key=(seed, split_id, key))
        for q, (inputs, targets) in enumerate(chunks):
            if q >= skip:
                yield (position, q), inputs, targets
        skip = 0


# -- seqio registration -------------------------------------------------------------------------

_registry_lock = threading.Lock()
_registered: dict[str, str] = {}  # task name -> fingerprint of what it was registered with


def _ul2_preprocessor(ds, sequence_length, output_features, *, mixture, seed):
    vocabulary = output_features["targets"].vocabulary
    ids = vocab_lib.special_ids(vocabulary)
    budget = sum(sequence_length.values()) if sequence_length else 512

    def denoise(text, key, split_id):
        pairs = list(ul2.denoise_document(vocabulary.tokenizer.EncodeAsIds(text.decode("utf-8")),
                                          mixture, ids, budget, key=(seed, int(split_id), int(key))))
        lengths = lambda xs: np.array([len(x) for x in xs], np.int64)  # noqa: E731
        flat = lambda xs: np.concatenate(xs).astype(np.int32) if xs else np.zeros(0, np.int32)  # noqa: E731
        ins, outs = [p[0] for p in pairs], [p[1] for p in pairs]
        return flat(ins), lengths(ins), flat(outs), lengths(outs)

    def to_examples(ex):
        ins, in_len, outs, out_len = tf.numpy_function(
            denoise, [ex["text"], ex["key"], ex["split_id"]], [tf.int32, tf.int64, tf.int32, tf.int64])
        in_len.set_shape([None])
        out_len.set_shape([None])
        return tf.data.Dataset.from_tensor_slices({
            "inputs": tf.RaggedTensor.from_row_lengths(tf.reshape(ins, [-1]), in_len),
            "targets": tf.RaggedTensor.from_row_lengths(tf.reshape(outs, [-1]), out_len)})

    return ds.flat_map(to_examples)


def seqio_task(data_config, task: str | None = None) -> seqio.Task:
    """The seqio task for a data config, registered once per distinct setting.

    The name is the task's own when free or registered with the same settings; another
    setting under the same name is registered as `<name>_<hash>`. Safe to call repeatedly and
    from several threads.
    """
    name = task or _get(data_config, "task", "ul2_embedded_ende")
    src = source(data_config, name)
    vocabulary_ = vocabulary(data_config)
    mix = mixture(data_config)
    seed = int(_get(data_config, "seed", 0))
    fingerprint = hashlib.sha256(repr((repr(src), vocabulary_.sentencepiece_model_file,
                                       vocabulary_.extra_ids, mix, seed)).encode()).hexdigest()[:10]
    with _registry_lock:
        for candidate in (name, f"{name}_{fingerprint}"):
            if _registered.get(candidate) == fingerprint:
                return seqio.TaskRegistry.get(candidate)
            if candidate not in seqio.TaskRegistry.names():
                break

        def dataset_fn(split, shuffle_files, seed=None):
            def documents():
                for key, text in src.documents(split, seed=seed or 0, repeat=shuffle_files):
                    yield {"text": text, "key": key, "split_id": SPLIT_IDS.get(split, 3)}
            return tf.data.Dataset.from_generator(documents, output_signature={
                "text": tf.TensorSpec([], tf.string), "key": tf.TensorSpec([], tf.int64),
                "split_id": tf.TensorSpec([], tf.int64)})

        feature = seqio.Feature(vocabulary_, add_eos=False, dtype=tf.int32)
        seqio.TaskRegistry.add(
            candidate,
            source=seqio.FunctionDataSource(dataset_fn, splits=list(SPLIT_IDS)),
            preprocessors=[_bind(_ul2_preprocessor, mixture=mix, seed=seed)],
            output_features={"inputs": feature, "targets": feature})
        _registered[candidate] = fingerprint
        return seqio.TaskRegistry.get(candidate)


def _bind(fn, **kwargs):
    # seqio inspects a preprocessor's signature to pass sequence_length / output_features.
    def preprocessor(ds, sequence_length, output_features):
        return fn(ds, sequence_length, output_features, **kwargs)
    preprocessor.__name__ = fn.__name__
    return preprocessor


def get_dataset(data_config, *, split: str = "train", seq_len: int | None = None,
                shuffle: bool = False, seed: int | None = None) -> tf.data.Dataset:
    """The task through seqio: UL2 examples packed by the prefix-LM feature converter."""
    task = seqio_task(data_config)
    seq_len = int(seq_len or _get(data_config, "seq_len", 512))
    return seqio.get_dataset(
        task.name, task_feature_lengths=task_feature_lengths(seq_len), dataset_split=split,
        shuffle=shuffle, seed=seed, num_epochs=1, trim_output_features=False,
        feature_converter=UL2PrefixLMFeatureConverter(pack=bool(_get(data_config, "pack", True))))


def describe_errors(data_config) -> list[str]:
    """Problems with config.data that would stop the data from being built, each naming its key."""
    from ul2_lm.data import finetune_tasks  # pylint: disable=g-import-not-at-top  (it imports us)

    errors = []
    known = sorted(TASKS) + sorted(finetune_tasks.FINETUNE_TASKS)
    for key in ("task", "eval_task"):
        name = _get(data_config, key)
        if name is not None and name not in known:
            errors.append(f"config.data.{key}={name!r} is not one of {known}")
    for key in ("task", "eval_task"):
        name = _get(data_config, key)
        if name in TASKS:
            try:
                errors += source(data_config, name).errors()
            except ValueError as e:
                errors.append(str(e))
    cfg = _get(data_config, "vocab") or {}
    kind = _get(cfg, "kind", "auto")
    if kind not in ("auto", "task", "embedded", "sentencepiece_file"):
        errors.append(f"config.data.vocab.kind={kind!r} is not one of "
                      "'auto', 'task', 'embedded', 'sentencepiece_file'")
    if kind == "sentencepiece_file" and not tf.io.gfile.exists(_get(cfg, "path", "")):
        errors.append(f"config.data.vocab.path: no SentencePiece model at {_get(cfg, 'path')!r}")
    size, extra_ids = _get(cfg, "size", vocab_lib.DEFAULT_SIZE), _get(cfg, "extra_ids", 100)
    if kind != "sentencepiece_file" and int(size) <= int(extra_ids) + 8:
        errors.append(f"config.data.vocab.size={size} leaves no room next to {extra_ids} extra ids")
    seq_len = _get(data_config, "seq_len", 512)
    if int(seq_len) < 8:
        errors.append(f"config.data.seq_len={seq_len} is too short for a UL2 example (>= 8)")
    try:
        mixture(data_config)
    except ValueError as e:
        errors.append(str(e))
    n = _get(data_config, "num_eval_batches", 1)
    if int(n) < 0:
        errors.append(f"config.data.num_eval_batches={n} is negative")
    return errors
