"""Document sources: where a task's raw text comes from, as positioned, sharded streams.

A source yields `(key, text)` pairs for one split and one shard. Positions count this shard's
documents, so `documents(..., start=p)` resumes exactly where a stream that had yielded p
documents would continue: the input pipeline's exact resume rests on that. `key` is a unique
integer per document occurrence (it seeds the document's UL2 noise).

Shards are interleaved: shard s of n takes positions s, s + n, s + 2n, ... of the split's global
order, so shards are disjoint and together cover the data.
"""

from __future__ import annotations

import abc
import fractions
import math
import mmap
import re
from collections.abc import Iterator, Sequence

import numpy as np

from ul2_lm.data import corpus as corpus_lib

TRAIN, VALIDATION, TEST = "train", "validation", "test"


class Source(abc.ABC):
    """A positioned stream of documents."""

    @abc.abstractmethod
    def documents(self, split: str, *, seed: int, shard_index: int = 0, num_shards: int = 1,
                  start: int = 0, repeat: bool = True) -> Iterator[tuple[int, str]]:
        """This shard's (key, text) pairs from shard position `start` on.

        repeat=True: endless, reshuffled each epoch by `seed` where the source can shuffle.
        repeat=False: one pass in a fixed order (evaluation); the seed is not used.
        """

    def errors(self) -> list[str]:
        """Problems that would stop this source from producing data (missing files...)."""
        return []


class EmbeddedSource(Source):
    """Pretraining text of the embedded corpus: monolingual documents of both languages and,
    at `bitext_rate`, bilingual ones (a passage and its translation, `Corpus.bitext`), evenly
    spread.

    Endless with repeat=True (every document is new); one pass is its first `pass_documents`.
    """

    def __init__(self, corpus_seed: int = 0, pass_documents: int = 10_000,
                 bitext_rate: float = 0.0):
        if not 0.0 <= bitext_rate <= 1.0:
            raise ValueError(f"bitext_rate must be in [0, 1], got {bitext_rate!r}")
        self.corpus = corpus_lib.Corpus(corpus_seed)
        self.pass_documents = pass_documents
        self.bitext_rate = float(bitext_rate)

    def __repr__(self):
        rate = f", bitext_rate={self.bitext_rate:g}" if self.bitext_rate else ""
        return (f"EmbeddedSource(corpus_seed={self.corpus.seed}, version={corpus_lib.VERSION}"
                f"{rate})")

    def text(self, split: str, index: int) -> str:
        """Document `index`: bilingual when the running count of bitext crosses an integer."""
        r = self.bitext_rate
        if r and math.floor((index + 1) * r) > math.floor(index * r):
            return self.corpus.bitext(split, index)
        return self.corpus.monolingual(split, index)[1]

    def documents(self, split, *, seed, shard_index=0, num_shards=1, start=0, repeat=True):
        del seed  # documents are independent draws: their order is already random
        position = start
        while True:
            index = position * num_shards + shard_index
            if not repeat and index >= self.pass_documents:
                return
            yield index, self.text(split, index)
            position += 1


class TextFilesSource(Source):
    """One document per line of the user's text files (a list of paths or globs).

    Every 100th line (line 99, 199, ...) is held out as the validation split when there are at
    least 100 lines; with fewer, validation reads all lines.
    """

    HOLD_OUT_EVERY = 100

    def __init__(self, patterns: str | Sequence[str]):
        from ul2_lm.data import vocab  # the glob rules live with the text-file vocabulary

        self.patterns = patterns
        self.files = vocab.expand_text_files(patterns)
        self._index = None

    def __repr__(self):
        return f"TextFilesSource({self.files!r})"

    def errors(self):
        if not self.files:
            return [f"config.data.text_files: no file matches {self.patterns!r}"]
        return []

    def _lines(self):
        if self._index is None:
            if self.errors():
                raise FileNotFoundError(self.errors()[0])
            maps, starts, ends, file_of = [], [], [], []
            for i, path in enumerate(self.files):
                with open(path, "rb") as f:
                    data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if f.seek(0, 2) else b""
                maps.append(data)
                newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10) if len(data) else \
                    np.zeros(0, np.int64)
                line_ends = np.append(newlines, len(data)) if (len(data) and data[-1:] != b"\n") \
                    else newlines
                starts.append(np.concatenate([[0], line_ends[:-1] + 1]) if len(line_ends) else line_ends)
                ends.append(line_ends)
                file_of.append(np.full(len(line_ends), i))
            self._index = (maps, np.concatenate(starts).astype(np.int64),
                           np.concatenate(ends).astype(np.int64), np.concatenate(file_of))
        return self._index

    def split_lines(self, split: str) -> np.ndarray:
        """Global line numbers of a split, in file order."""
        n = len(self._lines()[1])
        lines = np.arange(n)
        if n < self.HOLD_OUT_EVERY:
            return lines
        held_out = lines % self.HOLD_OUT_EVERY == self.HOLD_OUT_EVERY - 1
        return lines[held_out] if split in (VALIDATION, TEST) else lines[~held_out]

    def text(self, line: int) -> str:
        maps, starts, ends, file_of = self._lines()
        return maps[file_of[line]][starts[line]:ends[line]].decode("utf-8", errors="replace").strip()

    def documents(self, split, *, seed, shard_index=0, num_shards=1, start=0, repeat=True):
        lines = self.split_lines(split)
        n = len(lines)
        if n == 0:
            return
        position, epoch, order = start, None, None
        while True:
            p = position * num_shards + shard_index
            if not repeat and p >= n:
                return
            if repeat and p // n != epoch:  # a fresh permutation each epoch
                epoch = p // n
                order = np.random.default_rng([seed, epoch]).permutation(n)
            line = lines[order[p % n]] if repeat else lines[p]
            yield p, self.text(int(line))
            position += 1


_WIKI40B_MARKERS = re.compile(r"_START_(ARTICLE|SECTION|PARAGRAPH)_|_NEWLINE_")


def clean_wiki40b(text: str) -> str:
    """Wiki-40B text without its structure markers."""
    return " ".join(_WIKI40B_MARKERS.sub("\n", text).split())


class TfdsSource(Source):
    """A text feature of a TFDS dataset, streamed (shuffled by file order with the seed)."""

    def __init__(self, name: str, *, text_feature: str = "text", data_dir: str | None = None,
                 split_names: dict | None = None, clean=None):
        self.name, self.text_feature, self.data_dir = name, text_feature, data_dir
        self.split_names = dict(split_names or {})
        self.clean = clean

    def __repr__(self):
        return f"TfdsSource({self.name!r}, text_feature={self.text_feature!r}, splits={self.split_names})"

    def documents(self, split, *, seed, shard_index=0, num_shards=1, start=0, repeat=True):
        from ul2_lm.data import tf_setup

        tf_setup.quiet_tensorflow()
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        tfds_split = self.split_names.get(split, split)
        shard = tfds.even_splits(tfds_split, n=num_shards)[shard_index] if num_shards > 1 else tfds_split
        read_config = tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=True,
                                      interleave_cycle_length=1 if not repeat else 16,
                                      add_tfds_id=False)
        ds = tfds.load(self.name, split=shard, shuffle_files=repeat, read_config=read_config,
                       data_dir=self.data_dir)
        if repeat:
            ds = ds.repeat()
        ds = ds.skip(start)  # reads, but does not tokenize, the skipped records
        for position, example in enumerate(ds.as_numpy_iterator(), start):
            text = example[self.text_feature].decode("utf-8", errors="replace")
            yield position * num_shards + shard_index, self.clean(text) if self.clean else text


class InterleavedSource(Source):
    """Several sources mixed at fixed rates in a deterministic, evenly spread pattern.

    Position p goes to the first half of the sources iff ceil((p + 1) r) > ceil(p r), r being
    that half's share, recursively: every prefix of the stream holds each source at its rate
    (within one document), and where each source stands at any position is known in O(log n),
    which keeps resume exact and cheap.
    """

    def __init__(self, sources: Sequence[Source], rates: Sequence[float] | None = None):
        if not sources:
            raise ValueError("an interleaved source needs at least one source")
        rates = list(rates) if rates is not None else [1.0] * len(sources)
        if len(rates) != len(sources) or min(rates) <= 0:
            raise ValueError(f"interleave rates must be positive, one per source; got {rates}")
        self.sources = list(sources)
        self.rates = [fractions.Fraction(r).limit_denominator(10_000) for r in rates]

    def __repr__(self):
        return f"InterleavedSource({self.sources!r}, rates={[str(r) for r in self.rates]})"

    def errors(self):
        return [e for s in self.sources for e in s.errors()]

    def _route(self, p: int, lo: int, hi: int) -> tuple[int, int]:
        """(source, its local position) of position p among sources lo..hi-1."""
        if hi - lo == 1:
            return lo, p
        mid = (lo + hi) // 2
        share = sum(self.rates[lo:mid]) / sum(self.rates[lo:hi])
        before = -((-p * share.numerator) // share.denominator)  # ceil(p * share)
        if -((-(p + 1) * share.numerator) // share.denominator) > before:
            return self._route(before, lo, mid)
        return self._route(p - before, mid, hi)

    def _counts(self, p: int, lo: int, hi: int) -> list[int]:
        """How many of positions 0..p-1 each source among lo..hi-1 receives."""
        if hi - lo == 1:
            return [p]
        mid = (lo + hi) // 2
        share = sum(self.rates[lo:mid]) / sum(self.rates[lo:hi])
        first = -((-p * share.numerator) // share.denominator)
        return self._counts(first, lo, mid) + self._counts(p - first, mid, hi)

    def documents(self, split, *, seed, shard_index=0, num_shards=1, start=0, repeat=True):
        n = len(self.sources)
        streams = [s.documents(split, seed=seed, shard_index=shard_index, num_shards=num_shards,
                               start=c, repeat=repeat)
                   for s, c in zip(self.sources, self._counts(start, 0, n))]
        position = start
        while True:
            i, _ = self._route(position, 0, n)
            try:
                key, text = next(streams[i])
            except StopIteration:
                return  # a finite split ends with its first exhausted source
            yield key * n + i, text
            position += 1
