"""SentencePiece vocabularies: trained on first use from a text sample, cached on disk.

`train_vocab(texts, size)` is the one code path: the embedded corpus and a user's text files
both go through it. The model file is cached under `$UL2_LM_CACHE/vocab` (default
`~/.cache/ul2_lm/vocab`), named by a hash of the training recipe, so a second call with the same
recipe loads it without retraining. Training holds a file lock and the finished model is renamed
into place, so concurrent processes (several hosts on a shared disk, parallel tests) never see a
partial file and train it once.

Ids follow seqio's convention (0 pad, 1 eos, 2 unk). The UL2 mode tokens are user-defined
symbols of the SentencePiece model; the sentinels are seqio's extra ids at the top of the
vocabulary, so `size` counts them: a 2048 vocabulary is 1948 pieces + 100 extra ids.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from ul2_lm import ul2
from ul2_lm.data import corpus as corpus_lib
from ul2_lm.data import finetune_sources as fs
from ul2_lm.data import tf_setup

tf_setup.quiet_tensorflow()
import seqio  # noqa: E402
import sentencepiece as spm  # noqa: E402

DEFAULT_SIZE = 2048
DEFAULT_EXTRA_IDS = 100
EMBEDDED_SAMPLE_DOCUMENTS = 20_000
TEXT_FILES_SAMPLE_LINES = 200_000
_RECIPE_VERSION = 1  # bump when the trainer options below change
EMBEDDED_SAMPLE_VERSION = 2  # bump when embedded_vocab's sample changes (2: finetuning prompts)
# The embedded finetuning tasks' prompts (ft_embedded_xen_xde, ft_embedded_xsc_xde,
# ft_embedded_summ_{xen,xde}): template and fields, language codes in place of names.
EMBEDDED_PROMPTS = (
    (fs.TRANSLATION_PROMPT, {"src_lang": "xen", "tgt_lang": "xde"}),
    (fs.TRANSLATION_PROMPT, {"src_lang": "xsc", "tgt_lang": "xde"}),
    (fs.SUMMARIZATION_PROMPT, {"lang": "xen"}),
    (fs.SUMMARIZATION_PROMPT, {"lang": "xde"}),
)
EMBEDDED_PROMPT_EVERY = 8  # one round of prompts per this many sampled documents


def cache_dir() -> Path:
    """$UL2_LM_CACHE, or ~/.cache/ul2_lm."""
    return Path(os.environ.get("UL2_LM_CACHE") or Path.home() / ".cache" / "ul2_lm")


def _trainer_options(size: int, extra_ids: int, byte_fallback: bool) -> dict:
    return dict(
        vocab_size=size - extra_ids, model_type="unigram", character_coverage=1.0,
        byte_fallback=byte_fallback, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        user_defined_symbols=list(ul2.MODE_TOKENS), shuffle_input_sentence=False,
        max_sentence_length=1 << 16, num_threads=1, minloglevel=2,
        hard_vocab_limit=False)  # a small corpus gets a smaller vocabulary, not an error


def train_vocab(texts: Iterable[str], size: int = DEFAULT_SIZE, *, extra_ids: int = DEFAULT_EXTRA_IDS,
                name: str = "custom", recipe: str | None = None, byte_fallback: bool = False,
                cache: str | os.PathLike | None = None) -> seqio.SentencePieceVocabulary:
    """A seqio SentencePiece vocabulary of `size` ids (extra ids included), trained on `texts`.

    `recipe` names what `texts` are (e.g. a corpus version and sample size); the cache entry is
    keyed on it, so `texts` is not even read when the entry exists. Without a recipe the key is a
    hash of the text itself.
    """
    if size <= extra_ids + len(ul2.MODE_TOKENS) + 3:
        raise ValueError(f"vocabulary size {size} leaves no room next to {extra_ids} extra ids")
    options = _trainer_options(size, extra_ids, byte_fallback)
    if recipe is None:
        texts = list(texts)
        recipe = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    key = hashlib.sha256(json.dumps([_RECIPE_VERSION, recipe, options, extra_ids],
                                    sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache or cache_dir()) / "vocab"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{size}-{key}.model"
    if not path.exists():
        with open(folder / f"{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():  # another process may have trained it while we waited
                _train(texts, options, path)
    return seqio.SentencePieceVocabulary(str(path), extra_ids=extra_ids)


def _train(texts: Iterable[str], options: dict, path: Path):
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        sample = Path(tmp) / "sample.txt"
        with open(sample, "w", encoding="utf-8") as f:
            lines = 0
            for text in texts:
                text = " ".join(text.split())  # one line per text
                if text:
                    f.write(text + "\n")
                    lines += 1
        if not lines:
            raise ValueError(f"no text to train the vocabulary {path.name} on")
        try:
            spm.SentencePieceTrainer.train(input=str(sample), model_prefix=str(Path(tmp) / "model"),
                                           **options)
        except RuntimeError as e:  # e.g. fewer pieces than characters (+ 256 byte pieces)
            raise ValueError(f"training vocabulary {path.name} "
                             f"({options['vocab_size']} pieces) failed: {e}") from e
        os.replace(Path(tmp) / "model.model", path)


def _embedded_prompts(world: corpus_lib.Corpus, index: int) -> list[str]:
    """Each embedded finetuning prompt around a sentence of parallel text `index` in the language
    it introduces (the source language of a translation, the document's of a summary)."""
    texts = []
    for template, fields in EMBEDDED_PROMPTS:
        lang = fields.get("src_lang", fields.get("lang"))
        sentence = world.parallel("train", index, "xen", lang)[1]
        names = {key: fs.LANGUAGE_NAMES[code] for key, code in fields.items()}
        texts.append(fs.prompt_filler(template, **names)(sentence))
    return texts


def embedded_vocab(size: int = DEFAULT_SIZE, *, seed: int = 0, extra_ids: int = DEFAULT_EXTRA_IDS,
                   num_documents: int = EMBEDDED_SAMPLE_DOCUMENTS,
                   cache: str | os.PathLike | None = None) -> seqio.SentencePieceVocabulary:
    """The embedded corpus's vocabulary, trained on its first `num_documents` training texts,
    some parallel text, and the embedded finetuning tasks' prompts (so that their words, the
    language names' capital X and the ':' are pieces, not unknown)."""
    world = corpus_lib.Corpus(seed)

    def sample():  # every language, so that translation and zero-shot tests tokenize well
        for i in range(num_documents):
            yield world.monolingual("train", i)[1]
            if i % 4 == 0:
                yield " ".join(world.parallel("train", i, "xen", lang)[1] for lang in ("xde", "xsc"))
            if i % EMBEDDED_PROMPT_EVERY == 0:
                yield from _embedded_prompts(world, i)

    prompts = json.dumps([list(EMBEDDED_PROMPTS), EMBEDDED_PROMPT_EVERY], sort_keys=True)
    recipe = (f"embedded corpus v{corpus_lib.VERSION} sample v{EMBEDDED_SAMPLE_VERSION} "
              f"seed {seed} documents {num_documents} prompts {prompts}")
    return train_vocab(sample(), size, extra_ids=extra_ids, name="embedded", recipe=recipe,
                       cache=cache)


def expand_text_files(patterns: str | Sequence[str]) -> list[str]:
    """The files a text-file setting names: comma-separated paths or globs, sorted, deduplicated."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern.strip())))
        files += [m for m in matched if os.path.isfile(m) and m not in files]
    return files


def text_files_vocab(patterns: str | Sequence[str], size: int = DEFAULT_SIZE, *,
                     extra_ids: int = DEFAULT_EXTRA_IDS, max_lines: int = TEXT_FILES_SAMPLE_LINES,
                     cache: str | os.PathLike | None = None) -> seqio.SentencePieceVocabulary:
    """A vocabulary trained on the first `max_lines` lines of the user's text files."""
    files = expand_text_files(patterns)
    if not files:
        raise FileNotFoundError(f"no text files match {patterns!r}")
    stats = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]

    def sample():
        for f in files:
            with open(f, encoding="utf-8") as lines:
                yield from lines

    recipe = json.dumps(["text files", stats, max_lines])
    return train_vocab(itertools.islice(sample(), max_lines), size, extra_ids=extra_ids,
                       name="textfiles", recipe=recipe, byte_fallback=True, cache=cache)


def special_ids(vocab: seqio.SentencePieceVocabulary) -> ul2.SpecialIds:
    """The ids the UL2 objective needs: mode tokens, sentinels (extra ids), eos."""
    tokenizer = vocab.tokenizer
    mode = []
    for token in ul2.MODE_TOKENS:
        i = tokenizer.piece_to_id(token)
        if i == tokenizer.unk_id():
            raise ValueError(f"vocabulary {vocab.sentencepiece_model_file} has no piece {token}: "
                             "UL2 mode tokens must be user-defined symbols of the model")
        mode.append((token, int(i)))
    if vocab.extra_ids < 1:
        raise ValueError(f"vocabulary {vocab.sentencepiece_model_file} has no extra ids for sentinels")
    return ul2.SpecialIds(mode=tuple(mode), vocab_size=vocab.vocab_size,
                          num_sentinels=vocab.extra_ids, eos=vocab.eos_id)
