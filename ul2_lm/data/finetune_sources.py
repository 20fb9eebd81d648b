"""Finetuning sources: (input, target) text pairs per split, with the task's prompt applied.

A pair source knows each split's size and hands out the pairs at given indices
(`pairs(split, indices)`), so a finetuning run can draw an exact, seeded subset of the training
split. The embedded sources generate pairs on demand from the embedded corpus (random access,
nothing stored); file sources read a user's TSV or JSONL file; TFDS sources read a split once,
in its fixed file order, keeping only the pairs asked for. `ConcatenatedPairSource` puts several
sources end to end (the multilingual summarisation task).

The prompt goes in front of the input text: a template with `{text}` and the task's fields
(`{src_lang}`, `{tgt_lang}` for translation, `{lang}` for summarisation).
"""

from __future__ import annotations

import abc
import json
import os
import string
from collections.abc import Mapping, Sequence

from ul2_lm.data import corpus as corpus_lib

TRANSLATION_PROMPT = "Translate {src_lang} to {tgt_lang}: {text}"
SUMMARIZATION_PROMPT = "Summarize the following document in {lang}: {text}"  # the paper's
LANGUAGE_NAMES = {**corpus_lib.LANGUAGE_NAMES, "en": "English", "de": "German", "zh": "Chinese",
                  "es": "Spanish", "fr": "French"}
EMBEDDED_SPLIT_SIZES = {"train": 1_000_000, "validation": 2_000, "test": 2_000}
FILE_HOLD_OUT_EVERY = 100


def prompt_filler(template: str, key: str = "prompt", **fields: str):
    """`text -> template with text and fields filled`; a template that names another field, or
    has no `{text}`, is an error naming `key`."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"{key}={template!r} is not a format string: {e}") from e
    unknown = names - set(fields) - {"text"}
    if "text" not in names or unknown:
        raise ValueError(f"{key}={template!r} must contain {{text}} and may use only "
                         f"{sorted(fields)}; it has {sorted(names)}")
    return lambda text: template.format(text=text, **fields)


class PairSource(abc.ABC):
    """(input, target) text pairs of the splits 'train', 'validation' and 'test'."""

    @abc.abstractmethod
    def size(self, split: str) -> int:
        """Number of pairs in the split."""

    @abc.abstractmethod
    def pairs(self, split: str, indices: Sequence[int]) -> Sequence[tuple[str, str]]:
        """The pairs at `indices` (in that order), prompt applied; may be computed lazily."""

    def errors(self) -> list[str]:
        """Problems that would stop this source from producing data (missing or bad files...)."""
        return []


class _Lazy(Sequence):
    def __init__(self, fn, indices):
        self.fn, self.indices = fn, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.fn(int(self.indices[i]))


def _check_split(split: str, sizes: Mapping[str, int]):
    if split not in sizes:
        raise ValueError(f"finetuning split {split!r} is not one of {sorted(sizes)}")


class EmbeddedTranslation(PairSource):
    """Sentence pairs of the embedded corpus, `src` -> `tgt` (xen, xde or xsc)."""

    def __init__(self, src: str, tgt: str, *, corpus_seed: int = 0,
                 prompt: str = TRANSLATION_PROMPT, sizes: Mapping[str, int] | None = None):
        self.corpus = corpus_lib.Corpus(corpus_seed)
        self.src, self.tgt, self.template = src, tgt, prompt
        self.sizes = dict(sizes or EMBEDDED_SPLIT_SIZES)
        self.prompt = prompt_filler(prompt, "config.data.finetune.translation_prompt",
                                    src_lang=LANGUAGE_NAMES[src], tgt_lang=LANGUAGE_NAMES[tgt])

    def __repr__(self):
        return (f"EmbeddedTranslation({self.src}->{self.tgt}, corpus_seed={self.corpus.seed}, "
                f"version={corpus_lib.VERSION}, prompt={self.template!r}, sizes={self.sizes})")

    def size(self, split):
        _check_split(split, self.sizes)
        return self.sizes[split]

    def pairs(self, split, indices):
        _check_split(split, self.sizes)

        def pair(i):
            source, target = self.corpus.parallel(split, i, self.src, self.tgt)
            return self.prompt(source), target
        return _Lazy(pair, indices)


class EmbeddedSummarization(PairSource):
    """Document/summary pairs of the embedded corpus in `lang`, with the paper's prompt."""

    def __init__(self, lang: str, *, corpus_seed: int = 0, sizes: Mapping[str, int] | None = None):
        self.corpus = corpus_lib.Corpus(corpus_seed)
        self.lang = lang
        self.sizes = dict(sizes or EMBEDDED_SPLIT_SIZES)
        self.prompt = prompt_filler(SUMMARIZATION_PROMPT, lang=LANGUAGE_NAMES[lang])

    def __repr__(self):
        return (f"EmbeddedSummarization({self.lang}, corpus_seed={self.corpus.seed}, "
                f"version={corpus_lib.VERSION}, sizes={self.sizes})")

    def size(self, split):
        _check_split(split, self.sizes)
        return self.sizes[split]

    def pairs(self, split, indices):
        _check_split(split, self.sizes)

        def pair(i):
            document, summary = self.corpus.summarization(split, i, self.lang)
            return self.prompt(document), summary
        return _Lazy(pair, indices)


class ConcatenatedPairSource(PairSource):
    """Several sources end to end: index i of a split runs through each source's pairs in turn."""

    def __init__(self, sources: Sequence[PairSource]):
        if not sources:
            raise ValueError("a concatenated pair source needs at least one source")
        self.sources = list(sources)

    def __repr__(self):
        return f"ConcatenatedPairSource({self.sources!r})"

    def errors(self):
        return [e for s in self.sources for e in s.errors()]

    def size(self, split):
        return sum(s.size(split) for s in self.sources)

    def pairs(self, split, indices):
        bounds, total = [], 0
        for s in self.sources:
            bounds.append((total, total + s.size(split)))
            total = bounds[-1][1]
        groups: dict[int, list[tuple[int, int]]] = {}
        for slot, i in enumerate(indices):
            i = int(i)
            if not 0 <= i < total:
                raise IndexError(f"pair index {i} is outside the {split} split ({total} pairs)")
            k = next(j for j, (lo, hi) in enumerate(bounds) if lo <= i < hi)
            groups.setdefault(k, []).append((slot, i - bounds[k][0]))
        parts = {k: self.sources[k].pairs(split, [local for _, local in group])
                 for k, group in groups.items()}
        where = {slot: (k, n) for k, group in groups.items() for n, (slot, _) in enumerate(group)}
        return _Lazy(lambda slot: parts[where[slot][0]][where[slot][1]], list(range(len(indices))))


def read_pairs_file(path: str) -> list[tuple[str, str]]:
    """A user's pairs: TSV (`input<TAB>target` per line) or JSONL (`{"input": .., "target": ..}`).

    The format follows the extension (.jsonl/.json: JSONL, anything else: TSV). Blank lines are
    skipped. A missing file, a file with no pairs, or a bad line raises ValueError /
    FileNotFoundError naming the path (and the line number).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"finetuning file {path!r} does not exist")
    jsonl = path.endswith((".jsonl", ".json"))
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            if jsonl:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not a JSON object ({e.msg})") from e
                if not (isinstance(record, dict) and isinstance(record.get("input"), str)
                        and isinstance(record.get("target"), str)):
                    raise ValueError(f'{path}:{number}: expected {{"input": str, "target": str}}, '
                                     f"got {line[:80]!r}")
                pairs.append((record["input"], record["target"]))
            else:
                columns = line.split("\t")
                if len(columns) != 2:
                    raise ValueError(f"{path}:{number}: expected 2 tab-separated columns "
                                     f"(input<TAB>target), got {len(columns)}")
                pairs.append((columns[0], columns[1]))
    if not pairs:
        raise ValueError(f"finetuning file {path!r} is empty: no {'JSONL' if jsonl else 'TSV'} pairs")
    return pairs


class PairFilesSource(PairSource):
    """A user's TSV / JSONL pair files, inputs used as they are (the user writes the prompt).

    `files`: one path (every 100th line is held out, alternately for validation and test, when
    the file has at least 200 pairs; with fewer, every split reads all pairs) or a mapping of
    split -> path.
    """

    def __init__(self, files: str | Mapping[str, str]):
        self.files = files if isinstance(files, str) else dict(files)
        self._splits = None

    def __repr__(self):
        stats = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in self._paths()
                 if os.path.isfile(p)]
        return f"PairFilesSource({self.files!r}, {stats})"

    def _paths(self):
        return [self.files] if isinstance(self.files, str) else list(self.files.values())

    def errors(self):
        try:
            self._load()
        except (ValueError, OSError) as e:
            return [f"config.data.finetune.files: {e}"]
        return []

    def _load(self):
        if self._splits is None:
            if isinstance(self.files, str):
                pairs = read_pairs_file(self.files)
                if len(pairs) < 2 * FILE_HOLD_OUT_EVERY:
                    self._splits = {s: pairs for s in ("train", "validation", "test")}
                else:
                    k = FILE_HOLD_OUT_EVERY
                    self._splits = {
                        "train": [p for i, p in enumerate(pairs) if i % k < k - 2],
                        "validation": [p for i, p in enumerate(pairs) if i % k == k - 2],
                        "test": [p for i, p in enumerate(pairs) if i % k == k - 1]}
            else:
                self._splits = {s: read_pairs_file(p) for s, p in self.files.items()}
        return self._splits

    def size(self, split):
        splits = self._load()
        _check_split(split, splits)
        return len(splits[split])

    def pairs(self, split, indices):
        splits = self._load()
        _check_split(split, splits)
        return [splits[split][int(i)] for i in indices]


class TfdsPairSource(PairSource):
    """Two text features of a TFDS dataset as (input, target), the input behind a prompt.

    `split_names` maps our split names to TFDS split strings (default: the same name). A split's
    size comes from the dataset info, or from one counting pass where the info has none.
    `pairs` reads the split once in its fixed order and keeps the pairs asked for.
    """

    def __init__(self, name: str, input_feature: str, target_feature: str, *, prompt,
                 prompt_repr: str = "", split_names: Mapping[str, str] | None = None,
                 data_dir: str | None = None):
        self.name, self.data_dir = name, data_dir
        self.input_feature, self.target_feature = input_feature, target_feature
        self.prompt, self.prompt_repr = prompt, prompt_repr
        self.split_names = dict(split_names or {})
        self._sizes: dict[str, int] = {}

    def __repr__(self):
        return (f"TfdsPairSource({self.name!r}, {self.input_feature!r}->{self.target_feature!r}, "
                f"prompt={self.prompt_repr!r}, splits={self.split_names})")

    def _dataset(self, split):
        from ul2_lm.data import tf_setup

        tf_setup.quiet_tensorflow()
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        if self.name.split("/")[0].split(":")[0] == "mlsum":
            register_mlsum()
        return tfds, tfds.load(self.name, split=self.split_names.get(split, split),
                               shuffle_files=False, data_dir=self.data_dir)

    def size(self, split):
        if split not in self._sizes:
            tfds, ds = self._dataset(split)
            try:
                n = tfds.builder(self.name, data_dir=self.data_dir).info.splits[
                    self.split_names.get(split, split)].num_examples
            except (KeyError, ValueError, TypeError):
                n = 0
            self._sizes[split] = int(n) if n else int(ds.reduce(0, lambda c, _: c + 1).numpy())
        return self._sizes[split]

    def pairs(self, split, indices):
        wanted: dict[int, list[int]] = {}
        for slot, i in enumerate(indices):
            wanted.setdefault(int(i), []).append(slot)
        out: list = [None] * len(indices)
        if wanted:
            last = max(wanted)
            _, ds = self._dataset(split)
            for i, example in enumerate(ds.as_numpy_iterator()):
                if i in wanted:
                    pair = (self.prompt(example[self.input_feature].decode("utf-8", "replace")),
                            example[self.target_feature].decode("utf-8", "replace"))
                    for slot in wanted[i]:
                        out[slot] = pair
                if i >= last:
                    break
        missing = [int(indices[s]) for s, p in enumerate(out) if p is None]
        if missing:
            raise IndexError(f"{self!r}: split {split!r} has no pair at index {missing[0]}")
        return out


_mlsum_registered = False


def register_mlsum():
    """Registers an `mlsum` TFDS builder (configs de, es, fr, ru, tu) when TFDS has none.

    It builds from MLSum's released JSONL files, `{lang}_{split}.jsonl` with `text` and
    `summary`, placed in the TFDS manual directory (MLSum is not downloadable from here).
    """
    global _mlsum_registered
    from ul2_lm.data import tf_setup

    tf_setup.quiet_tensorflow()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    if _mlsum_registered or "mlsum" in tfds.list_builders(with_community_datasets=False):
        return

    class Mlsum(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
        """MLSum (Scialom et al. 2020): news articles and their summaries in five languages."""

        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=lang) for lang in ("de", "es", "fr", "ru", "tu")]
        MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put MLSum's {lang}_train.jsonl, {lang}_val.jsonl and "
                                        "{lang}_test.jsonl in the manual directory.")

        def _info(self):
            text = tfds.features.Text()
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(
                {"text": text, "summary": text, "title": text, "topic": text, "url": text,
                 "date": text}))

        def _split_generators(self, dl_manager):
            lang = self.builder_config.name
            return {split: self._generate_examples(dl_manager.manual_dir / f"{lang}_{name}.jsonl")
                    for split, name in (("train", "train"), ("validation", "val"), ("test", "test"))}

        def _generate_examples(self, path):
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    record = json.loads(line)
                    yield i, {k: str(record.get(k, "")) for k in
                              ("text", "summary", "title", "topic", "url", "date")}

    _mlsum_registered = True
