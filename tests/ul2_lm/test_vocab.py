"""SentencePiece vocabularies: trained once, cached by recipe, round-trip text, UL2 ids in place."""

import threading

import pytest

from ul2_lm.data import corpus as corpus_lib
from ul2_lm.data import finetune_sources as fs
from ul2_lm.data import tasks
from ul2_lm.data import testing
from ul2_lm.data import vocab as vocab_lib


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UL2_LM_CACHE", str(tmp_path_factory.getbasetemp() / "ul2_lm_cache"))
        yield


@pytest.fixture(scope="module")
def vocab():
    return tasks.vocabulary(testing.tiny_data_config())


def _count_training(monkeypatch):
    calls = []
    real = vocab_lib._train  # pylint: disable=protected-access

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(vocab_lib, "_train", counting)
    return calls


def test_vocabulary_is_trained_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    calls = _count_training(monkeypatch)
    first = vocab_lib.embedded_vocab(300, extra_ids=10, num_documents=300, cache=tmp_path)
    again = vocab_lib.embedded_vocab(300, extra_ids=10, num_documents=300, cache=tmp_path)
    assert len(calls) == 1
    assert first.sentencepiece_model_file == again.sentencepiece_model_file
    assert first.encode("Seilu nailed") == again.encode("Seilu nailed")
    other = vocab_lib.embedded_vocab(300, extra_ids=10, num_documents=301, cache=tmp_path)
    assert len(calls) == 2 and other.sentencepiece_model_file != first.sentencepiece_model_file


def test_the_cache_directory_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("UL2_LM_CACHE", str(tmp_path / "elsewhere"))
    v = vocab_lib.train_vocab(["a b c d e f g"] * 20, 120, extra_ids=5, recipe="letters")
    assert v.sentencepiece_model_file.startswith(str(tmp_path / "elsewhere" / "vocab"))


def test_concurrent_callers_train_once_and_all_get_a_complete_model(tmp_path, monkeypatch):
    calls = _count_training(monkeypatch)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        vocab_lib.embedded_vocab(300, extra_ids=10, num_documents=200, cache=tmp_path)))
        for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3
    assert all(r.vocab_size == results[0].vocab_size for r in results)
    assert not list((tmp_path / "vocab").glob("tmp*"))  # no partial files left behind


def test_corpus_text_round_trips_in_every_language(vocab):
    world = corpus_lib.Corpus(0)
    for lang in corpus_lib.LANGUAGES:
        text = world.summarization("test", 11, lang)[0]
        ids = vocab.encode(text)
        assert vocab.unk_id not in ids
        assert vocab.decode(ids) == text


def test_embedded_finetuning_prompts_have_no_unknown_pieces(vocab):
    world = corpus_lib.Corpus(0)
    sentence = world.parallel("test", 5, "xen", "xsc")[1]
    names = [corpus_lib.LANGUAGE_NAMES[lang] for lang in corpus_lib.LANGUAGES]
    texts = [fs.SUMMARIZATION_PROMPT.format(lang=name, text=sentence) for name in names]
    texts += [fs.TRANSLATION_PROMPT.format(src_lang=a, tgt_lang=b, text=sentence)
              for a in names for b in names if a != b]
    for template, fields in vocab_lib.EMBEDDED_PROMPTS:
        texts.append(template.format(text=sentence, **{k: corpus_lib.LANGUAGE_NAMES[v]
                                                       for k, v in fields.items()}))
    for text in texts:
        ids = vocab.encode(text)
        assert vocab.unk_id not in ids, text
        assert vocab.decode(ids) == text


def test_size_counts_the_extra_ids_at_the_top(vocab):
    assert vocab.vocab_size == testing.TINY_VOCAB["size"]
    assert vocab.extra_ids == testing.TINY_VOCAB["extra_ids"]
    ids = vocab_lib.special_ids(vocab)
    assert ids.num_sentinels == 100 and ids.lowest_sentinel == vocab.vocab_size - 100
    assert vocab.tokenizer.id_to_piece(vocab.vocab_size - 1) == "▁<extra_id_0>"  # T5's order
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)


def test_mode_tokens_are_single_pieces(vocab):
    ids = vocab_lib.special_ids(vocab)
    for token, i in ids.mode:
        assert vocab.tokenizer.id_to_piece(i) == token
        assert i < ids.lowest_sentinel


def test_text_files_use_the_same_code_path(tmp_path, monkeypatch):
    calls = _count_training(monkeypatch)
    (tmp_path / "a.txt").write_text("der Hund sieht die Katze\nthe dog sees the cat\n" * 50)
    v = vocab_lib.text_files_vocab(str(tmp_path / "*.txt"), 300, extra_ids=10, cache=tmp_path)
    assert len(calls) == 1
    assert v.decode(v.encode("the dog sees die Katze")) == "the dog sees die Katze"
    assert v.decode(v.encode("ünknöwn")) == "ünknöwn"  # byte fallback for unseen characters


def test_a_glob_that_matches_nothing_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        vocab_lib.text_files_vocab(str(tmp_path / "nothing_here*.txt"), 300)
