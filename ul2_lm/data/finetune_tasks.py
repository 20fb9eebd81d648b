"""Finetuning tasks: prompted (input, target) pairs as prefix-LM examples, and exact data subsets.

A finetuning example is `{'inputs': [mode token] + prompted input ids, 'targets': target ids +
[eos]}`; seqio's PrefixLMFeatureConverter joins them into one sequence with a bidirectional
prefix over the inputs and loss weights on the target tokens only (pack=False for prompt
tuning, which needs the prompt in front of every row; pack=True otherwise).

Task names (`config.data.task` / `eval_task`):
- `ft_embedded_xen_xde`: embedded corpus translation xen -> xde.
- `ft_embedded_xsc_xde`: the related language xsc -> xde (zero-shot evaluation of a model
  finetuned on `ft_embedded_xen_xde`).
- `ft_embedded_summ_xen`, `ft_embedded_summ_xde`: embedded summarisation in one language;
  `ft_embedded_summ`: both, concatenated.
- `ft_wmt14_ende`: TFDS wmt14_translate/de-en, En -> De (validation = newstest2013,
  test = newstest2014).
- `ft_wmt19_enzh`: TFDS wmt19_translate/zh-en, En -> Zh (validation = TFDS validation, the dev
  set; TFDS has no newstest2020-2022, so test reads validation unless `finetune.splits` says
  otherwise).
- `ft_mlsum_cnndm`: MLSum De/Es/Fr and CNN/DailyMail concatenated, each article behind
  "Summarize the following document in {lang}:".
- `ft_files`: the user's TSV / JSONL pair files (`finetune.files`), inputs used as written.

The training data of a run is an exact subset of the training split: the first N indices of a
permutation seeded by the subset seed, so for one seed smaller subsets are prefixes of larger
ones (nested data-size sweeps). Each epoch over the subset has its own seeded order.

Config keys read (all under config.data unless noted): task, corpus_seed, seed,
tfds.data_dir (or tfds_data_dir), finetune.num_examples (None: the whole training split),
finetune.subset_seed (default: data.seed), finetune.translation_prompt (default
TRANSLATION_PROMPT), finetune.mode_token (default '[S2S]'; '' or 'none' for none),
finetune.files, finetune.splits (split -> TFDS split string, for TFDS tasks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ul2_lm.data import finetune_sources as fs
from ul2_lm.data import tasks
from ul2_lm.data import vocab as vocab_lib

_get = tasks._get  # pylint: disable=protected-access
DEFAULT_MODE_TOKEN = "[S2S]"
SUMMARIZATION_TFDS = (("mlsum/de", "text", "summary", "de"), ("mlsum/es", "text", "summary", "es"),
                      ("mlsum/fr", "text", "summary", "fr"),
                      ("cnn_dailymail", "article", "highlights", "en"))


def _finetune(data):
    return _get(data, "finetune")


def _corpus_seed(data):
    return int(_get(data, "corpus_seed", 0))


def _translation_prompt(data):
    return _get(_finetune(data), "translation_prompt", fs.TRANSLATION_PROMPT)


def _split_names(data, default=None):
    splits = _get(_finetune(data), "splits")
    return {**(default or {}), **(dict(splits) if splits else {})}


def _embedded_translation(src, tgt):
    return lambda data: fs.EmbeddedTranslation(src, tgt, corpus_seed=_corpus_seed(data),
                                               prompt=_translation_prompt(data))


def _embedded_summarization(*langs):
    def make(data):
        parts = [fs.EmbeddedSummarization(lang, corpus_seed=_corpus_seed(data)) for lang in langs]
        return parts[0] if len(parts) == 1 else fs.ConcatenatedPairSource(parts)
    return make


def _tfds_translation(name, src, tgt, split_names=None):
    def make(data):
        template = _translation_prompt(data)
        prompt = fs.prompt_filler(template, "config.data.finetune.translation_prompt",
                                  src_lang=fs.LANGUAGE_NAMES[src], tgt_lang=fs.LANGUAGE_NAMES[tgt])
        return fs.TfdsPairSource(name, src, tgt, prompt=prompt, prompt_repr=template,
                                 split_names=_split_names(data, split_names),
                                 data_dir=tasks._tfds_data_dir(data))  # pylint: disable=protected-access
    return make


def _tfds_summarization(data):
    parts = []
    for name, text, summary, lang in SUMMARIZATION_TFDS:
        prompt = fs.prompt_filler(fs.SUMMARIZATION_PROMPT, lang=fs.LANGUAGE_NAMES[lang])
        parts.append(fs.TfdsPairSource(name, text, summary, prompt=prompt,
                                       prompt_repr=fs.SUMMARIZATION_PROMPT,
                                       split_names=_split_names(data),
                                       data_dir=tasks._tfds_data_dir(data)))  # pylint: disable=protected-access
    return fs.ConcatenatedPairSource(parts)


def _files(data):
    files = _get(_finetune(data), "files")
    if not files:
        raise ValueError("config.data.finetune.files is empty: task 'ft_files' needs a TSV or "
                         "JSONL path, or a mapping split -> path")
    return fs.PairFilesSource(files if isinstance(files, str) else dict(files))


@dataclasses.dataclass(frozen=True)
class FinetuneTaskSpec:
    name: str
    make_source: Callable[[object], fs.PairSource]
    embedded: bool  # its text is the embedded corpus's (its vocabulary is the embedded one)
    kind: str = "translation"  # 'translation' | 'summarization': which generation metrics apply
    language: str | None = None  # the targets' language code, when metrics tokenise by it


FINETUNE_TASKS = {t.name: t for t in [
    FinetuneTaskSpec("ft_embedded_xen_xde", _embedded_translation("xen", "xde"), True),
    FinetuneTaskSpec("ft_embedded_xsc_xde", _embedded_translation("xsc", "xde"), True),
    FinetuneTaskSpec("ft_embedded_summ_xen", _embedded_summarization("xen"), True, "summarization"),
    FinetuneTaskSpec("ft_embedded_summ_xde", _embedded_summarization("xde"), True, "summarization"),
    FinetuneTaskSpec("ft_embedded_summ", _embedded_summarization("xen", "xde"), True,
                     "summarization"),
    FinetuneTaskSpec("ft_wmt14_ende", _tfds_translation("wmt14_translate/de-en", "en", "de"), False,
                     language="de"),
    FinetuneTaskSpec("ft_wmt19_enzh", _tfds_translation("wmt19_translate/zh-en", "en", "zh",
                                                        {"test": "validation"}), False,
                     language="zh"),
    FinetuneTaskSpec("ft_mlsum_cnndm", _tfds_summarization, False, "summarization"),
    FinetuneTaskSpec("ft_files", _files, False),
]}


def is_finetune_task(name: str | None) -> bool:
    return name in FINETUNE_TASKS


def source(data_config, task: str | None = None) -> fs.PairSource:
    """The pair source of `task` (default config.data.task)."""
    name = task or _get(data_config, "task")
    if name not in FINETUNE_TASKS:
        raise ValueError(f"config.data.task={name!r} is not a finetuning task: one of "
                         f"{sorted(FINETUNE_TASKS)}")
    return FINETUNE_TASKS[name].make_source(data_config)


def num_examples(data_config) -> int | None:
    """config.data.finetune.num_examples (None: the whole training split)."""
    n = _get(_finetune(data_config), "num_examples")
    return None if n is None else int(n)


def subset_seed(data_config) -> int:
    return int(_get(_finetune(data_config), "subset_seed", _get(data_config, "seed", 0)))


def mode_token(data_config) -> str | None:
    token = _get(_finetune(data_config), "mode_token", DEFAULT_MODE_TOKEN)
    return None if token.lower() == "none" else token


def subset_indices(dataset_size: int, size: int | None, seed: int) -> np.ndarray:
    """The training subset: the first `size` indices of a seeded permutation of the split.

    Nested: for one seed, the subset of size n is a prefix of the subset of size m > n.
    size None = the whole split (still in the seeded order).
    """
    if size is None:
        size = dataset_size
    if size < 1 or size > dataset_size:
        raise ValueError(f"config.data.finetune.num_examples={size}: the training split has "
                         f"{dataset_size} examples (need 1 <= num_examples <= {dataset_size})")
    return np.random.default_rng([int(seed), 0x5E7]).permutation(dataset_size)[:size]


def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the subset's examples in `epoch` (a fresh seeded permutation per epoch)."""
    return np.random.default_rng([int(seed), 0xE90C, int(epoch)]).permutation(size)


def encode_pair(vocabulary, input_text: str, target_text: str, *, seq_len: int,
                mode_token: str | None = DEFAULT_MODE_TOKEN) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) int32 ids: [mode token] + input, target + [eos], within `seq_len`.

    When the two do not fit, the input loses its end first (the prompt stays), down to half
    the sequence; the target keeps at least the other half.
    """
    tokenizer = vocabulary.tokenizer
    prefix = []
    if mode_token:
        piece = tokenizer.piece_to_id(mode_token)
        if piece == tokenizer.unk_id():
            raise ValueError(f"config.data.finetune.mode_token={mode_token!r} is not a piece of "
                             f"vocabulary {vocabulary.sentencepiece_model_file}")
        prefix = [int(piece)]
    inputs = prefix + list(tokenizer.EncodeAsIds(input_text))
    targets = list(tokenizer.EncodeAsIds(target_text)) + [vocabulary.eos_id]
    if len(inputs) + len(targets) > seq_len:
        keep_targets = min(len(targets), max(seq_len - len(inputs), seq_len - seq_len // 2))
        inputs, targets = inputs[:seq_len - keep_targets], targets[:keep_targets]
    return np.asarray(inputs, np.int32), np.asarray(targets, np.int32)


def training_pairs(src: fs.PairSource, *, num_examples: int | None, seed: int
                   ) -> Sequence[tuple[str, str]]:
    """The run's finetuning data: the seeded, nested subset of the training split."""
    return src.pairs("train", subset_indices(src.size("train"), num_examples, seed))


def examples(src: fs.PairSource, split: str, *, vocabulary, seq_len: int, seed: int,
             num_examples: int | None = None, subset_seed: int | None = None,
             mode_token: str | None = DEFAULT_MODE_TOKEN, shard_index: int = 0,
             num_shards: int = 1, start: tuple[int, int] = (0, 0), repeat: bool = True
             ) -> Iterator[tuple[tuple[int, int], np.ndarray, np.ndarray]]:
    """((position, 0), inputs, targets) for this shard, like `tasks.examples` (same resume).

    repeat=True (training, split 'train'): endless epochs over the subset of `num_examples`
    (drawn with `subset_seed`, default `seed`), each epoch in its own order drawn with `seed`;
    shard s of n takes positions s, s + n, ... of that stream. repeat=False (evaluation): one
    pass over the whole split in index order; seeds are not used. start = (p, q) resumes at
    position p (q > 0: after position p, whose only example was already consumed).
    """
    first = start[0] + (1 if start[1] > 0 else 0)
    if repeat:
        data = training_pairs(src, num_examples=num_examples,
                              seed=seed if subset_seed is None else subset_seed)
    else:
        data = src.pairs(split, range(src.size(split)))
    n = len(data)
    epoch, order = None, None
    position = first
    while True:
        g = position * num_shards + shard_index
        if not repeat and g >= n:
            return
        if repeat and g // n != epoch:
            epoch = g // n
            order = epoch_order(n, seed, epoch)
        input_text, target_text = data[int(order[g % n]) if repeat else g]
        inputs, targets = encode_pair(vocabulary, input_text, target_text, seq_len=seq_len,
                                      mode_token=mode_token)
        yield (position, 0), inputs, targets
        position += 1


def vocabulary(data_config, task: str | None = None):
    """The vocabulary of a finetuning run: the pretrained model's.

    Embedded tasks with vocab kind 'auto'/'task' use the embedded corpus's vocabulary; other
    tasks need `config.data.vocab.kind='sentencepiece_file'` (or 'embedded').
    """
    name = task or _get(data_config, "task")
    kind = _get(_get(data_config, "vocab") or {}, "kind", "auto")
    if kind in ("auto", "task"):
        if not FINETUNE_TASKS[name].embedded:
            raise ValueError(f"config.data.vocab.kind={kind!r}: finetuning task {name!r} needs the "
                             "pretrained model's vocabulary: set kind='sentencepiece_file' and path")
        cfg = _get(data_config, "vocab") or {}
        return vocab_lib.embedded_vocab(
            int(_get(cfg, "size", vocab_lib.DEFAULT_SIZE)), seed=_corpus_seed(data_config),
            extra_ids=int(_get(cfg, "extra_ids", vocab_lib.DEFAULT_EXTRA_IDS)),
            num_documents=int(_get(cfg, "sample_documents", vocab_lib.EMBEDDED_SAMPLE_DOCUMENTS)))
    return tasks.vocabulary(data_config)


def describe_errors(data_config) -> list[str]:
    """Problems with the finetuning settings of config.data, each naming its key."""
    errors = []
    for key in ("task", "eval_task"):
        name = _get(data_config, key)
        if is_finetune_task(name):
            try:
                errors += source(data_config, name).errors()
            except ValueError as e:
                errors.append(str(e))
    n = _get(_finetune(data_config), "num_examples")
    if n is not None and int(n) < 1:
        errors.append(f"config.data.finetune.num_examples={n} must be positive (or None: all)")
    return errors
