"""Finetuning tasks: prompted pairs, target-only loss after feature conversion, exact nested data
subsets, the embedded, TFDS and file-backed tasks, and the messages for bad input."""

import itertools
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ul2_lm.data import corpus as corpus_lib
from ul2_lm.data import finetune_sources as fs
from ul2_lm.data import finetune_tasks as ft
from ul2_lm.data import pipeline
from ul2_lm.data import testing


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UL2_LM_CACHE", str(tmp_path_factory.getbasetemp() / "ul2_lm_cache"))
        yield


def _cfg(task, **finetune):
    return testing.tiny_data_config(task=task, finetune=finetune)


@pytest.fixture(scope="module")
def vocab():
    return ft.vocabulary(_cfg("ft_embedded_xen_xde"))


def _pairs(task, split, indices, **finetune):
    return list(ft.source(_cfg(task, **finetune)).pairs(split, indices))


def test_inputs_carry_the_task_prompt():
    world = corpus_lib.Corpus(0)
    (inp, tgt), = _pairs("ft_embedded_xen_xde", "train", [7])
    assert (inp, tgt) == ("Translate Xenglish to Xdeutsch: " + world.parallel("train", 7)[0],
                          world.parallel("train", 7)[1])
    (inp, _), = _pairs("ft_embedded_xsc_xde", "test", [3])
    assert inp == "Translate Xscots to Xdeutsch: " + world.parallel("test", 3, "xsc", "xde")[0]
    (inp, tgt), = _pairs("ft_embedded_summ_xde", "validation", [5])
    doc, summary = world.summarization("validation", 5, "xde")
    assert (inp, tgt) == ("Summarize the following document in Xdeutsch: " + doc, summary)
    (inp, _), = _pairs("ft_embedded_xen_xde", "train", [7],
                       translation_prompt="<{src_lang}> {text} <{tgt_lang}>")
    assert inp == f"<Xenglish> {world.parallel('train', 7)[0]} <Xdeutsch>"


def test_a_bad_translation_prompt_names_the_key():
    for template in ("Translate: no text field", "{text} into {language}"):
        with pytest.raises(ValueError, match="config.data.finetune.translation_prompt"):
            ft.source(_cfg("ft_embedded_xen_xde", translation_prompt=template))


def test_concatenated_summarisation_holds_both_languages_end_to_end():
    src = ft.source(_cfg("ft_embedded_summ"))
    n = src.size("validation")
    assert n == 2 * fs.EMBEDDED_SPLIT_SIZES["validation"]
    first, last = src.pairs("validation", [0, n - 1])
    assert "in Xenglish:" in first[0] and "in Xdeutsch:" in last[0]


def _segments(row):
    """(input tokens, target tokens, weights of the targets, weights of the inputs) per segment."""
    for s in range(1, row["decoder_segment_ids"].max() + 1):
        where = row["decoder_segment_ids"] == s
        tokens = row["decoder_target_tokens"][where]
        weights = row["decoder_loss_weights"][where]
        n_inputs = int(row["decoder_causal_attention"][where].sum()) - 1
        yield tokens[:n_inputs], tokens[n_inputs:], weights[n_inputs:], weights[:n_inputs]


@pytest.mark.parametrize("pack", [False, True])
def test_loss_weights_cover_exactly_the_target_after_feature_conversion(vocab, pack):
    cfg = _cfg("ft_embedded_xen_xde", num_examples=12)
    src = ft.source(cfg)

    def make(start):
        return ft.examples(src, "train", vocabulary=vocab, seq_len=128, seed=0, num_examples=12,
                           mode_token=ft.mode_token(cfg), start=start)

    expected = [(i, t) for _, i, t in itertools.islice(make((0, 0)), 12)]
    rows = [r for r, _ in itertools.islice(pipeline._packed_rows(make, (0, 0), 128, pack), 12)]
    segments = [s for r in rows for s in _segments(r)]
    if pack:
        assert len(segments) > len(rows)  # several examples share a row
    for (inputs, targets, target_weights, input_weights), (want_in, want_tgt) in zip(segments, expected):
        np.testing.assert_array_equal(inputs, want_in)
        np.testing.assert_array_equal(targets, want_tgt)
        assert target_weights.all() and not input_weights.any()
        assert targets[-1] == vocab.eos_id
        assert vocab.decode(inputs.tolist()).startswith("[S2S] Translate")
    for r in rows:  # nothing outside a segment carries loss
        assert not r["decoder_loss_weights"][r["decoder_segment_ids"] == 0].any()


def test_a_long_pair_is_cut_to_the_sequence_keeping_the_prompt(vocab):
    inputs, targets = ft.encode_pair(vocab, "Translate: " + "groon kait " * 200, "fliend " * 10,
                                     seq_len=64)
    assert len(inputs) + len(targets) == 64
    assert targets[-1] == vocab.eos_id  # the short target is kept whole
    assert vocab.decode(inputs.tolist()).startswith("[S2S] Translate")
    inputs, targets = ft.encode_pair(vocab, "groon " * 200, "fliend " * 200, seq_len=64)
    assert (len(inputs), len(targets)) == (32, 32)


def test_subsets_are_exact_seeded_and_nested():
    sizes = [10, 100, 1000, 8000]
    subsets = [ft.subset_indices(100_000, n, seed=3) for n in sizes]
    for n, subset in zip(sizes, subsets):
        assert len(subset) == n == len(set(subset.tolist()))
        assert subset.min() >= 0 and subset.max() < 100_000
    for small, large in zip(subsets, subsets[1:]):
        np.testing.assert_array_equal(large[:len(small)], small)
    np.testing.assert_array_equal(ft.subset_indices(100_000, 100, seed=3), subsets[1])
    assert set(ft.subset_indices(100_000, 100, seed=4).tolist()) != set(subsets[1].tolist())
    assert sorted(ft.subset_indices(50, None, seed=0).tolist()) == list(range(50))


def test_embedded_training_split_supports_the_largest_sweep():
    src = ft.source(_cfg("ft_embedded_xen_xde"))
    assert src.size("train") >= 100_000
    assert len(ft.training_pairs(src, num_examples=100_000, seed=0)) == 100_000


def test_a_subset_larger_than_the_split_is_one_clear_error():
    with pytest.raises(ValueError, match=r"num_examples=2001\b.*2000 examples"):
        ft.subset_indices(2000, 2001, seed=0)
    src = ft.source(_cfg("ft_embedded_xen_xde"))
    with pytest.raises(ValueError, match=r"num_examples=1000001\b.*1000000 examples"):
        ft.training_pairs(src, num_examples=1_000_001, seed=0)


def _texts(stream, n):
    return [(tuple(i), tuple(t)) for _, i, t in itertools.islice(stream, n)]


def test_epochs_visit_the_subset_once_each_in_a_fresh_deterministic_order(vocab):
    src = ft.source(_cfg("ft_embedded_xen_xde"))

    def stream(**kw):
        return ft.examples(src, "train", vocabulary=vocab, seq_len=128, seed=1, num_examples=8,
                           subset_seed=5, **kw)

    first, second, third = (_texts(stream(), 24)[k:k + 8] for k in (0, 8, 16))
    subset = [ft.encode_pair(vocab, i, t, seq_len=128)
              for i, t in ft.training_pairs(src, num_examples=8, seed=5)]
    assert sorted(first) == sorted(second) == sorted(third) == sorted(
        (tuple(i), tuple(t)) for i, t in subset)
    assert first != second or second != third
    assert _texts(stream(), 24) == first + second + third
    other = ft.examples(src, "train", vocabulary=vocab, seq_len=128, seed=2, num_examples=8,
                        subset_seed=5)
    assert sorted(_texts(other, 8)) == sorted(first)  # the training seed reorders, same data
    assert _texts(stream(start=(5, 0)), 10) == _texts(stream(), 15)[5:]
    assert _texts(stream(start=(5, 1)), 10) == _texts(stream(), 16)[6:]


def test_shards_split_the_stream_and_evaluation_is_one_ordered_pass(vocab):
    src = ft.source(_cfg("ft_embedded_xen_xde"))
    kw = dict(vocabulary=vocab, seq_len=128, seed=0, num_examples=10)
    whole = _texts(ft.examples(src, "train", **kw), 10)
    shards = [_texts(ft.examples(src, "train", shard_index=s, num_shards=2, **kw), 5)
              for s in (0, 1)]
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]
    small = fs.EmbeddedTranslation("xen", "xde", sizes={"train": 10, "validation": 6, "test": 6})
    evaluation = list(ft.examples(small, "validation", vocabulary=vocab, seq_len=128, seed=0,
                                  repeat=False))
    assert [p for p, _, _ in evaluation] == [(k, 0) for k in range(6)]
    want = [ft.encode_pair(vocab, i, t, seq_len=128) for i, t in small.pairs("validation", range(6))]
    assert [(tuple(i), tuple(t)) for _, i, t in evaluation] == [(tuple(i), tuple(t)) for i, t in want]


def test_embedded_tasks_differ_by_split_and_are_deterministic():
    for task in ("ft_embedded_xen_xde", "ft_embedded_summ_xen", "ft_embedded_xsc_xde"):
        by_split = {s: _pairs(task, s, range(5)) for s in ("train", "validation", "test")}
        assert by_split == {s: _pairs(task, s, range(5)) for s in by_split}
        assert len({tuple(p) for p in by_split.values()}) == 3, task
    xen = _pairs("ft_embedded_xen_xde", "test", range(5))
    xsc = _pairs("ft_embedded_xsc_xde", "test", range(5))
    assert [t for _, t in xen] == [t for _, t in xsc]  # same sentences, related source language
    assert [i for i, _ in xen] != [i for i, _ in xsc]


def test_tfds_tasks_produce_prompted_examples_on_mock_data(vocab):
    with tfds.testing.mock_data(num_examples=4):
        for task, prompt in (("ft_wmt14_ende", "Translate English to German: "),
                             ("ft_wmt19_enzh", "Translate English to Chinese: ")):
            src = ft.source(_cfg(task))
            for split in ("train", "validation", "test"):
                assert src.size(split) == 4
                pairs = src.pairs(split, range(4))
                assert all(i.startswith(prompt) and len(i) > len(prompt) and t for i, t in pairs)
        src = ft.source(_cfg("ft_mlsum_cnndm"))
        assert src.size("train") == 16
        pairs = src.pairs("train", range(16))
        for k, lang in enumerate(("German", "Spanish", "French", "English")):
            assert all(i.startswith(f"Summarize the following document in {lang}: ")
                       for i, _ in pairs[4 * k:4 * k + 4])
        cut = list(itertools.islice(ft.examples(src, "train", vocabulary=vocab, seq_len=128,
                                                seed=0, num_examples=5), 5))
        assert all(len(i) + len(t) <= 128 and t[-1] == vocab.eos_id for _, i, t in cut)


def test_tsv_and_jsonl_files_are_finetuning_tasks(tmp_path, vocab):
    pairs = [(f"Translate groon {k}", f"fliend {k}") for k in range(250)]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"{i}\t{t}\n" for i, t in pairs) + "\n")
    jsonl = tmp_path / "dev.jsonl"
    jsonl.write_text("".join(json.dumps({"input": i, "target": t}) + "\n" for i, t in pairs[:3]))
    held_out = ft.source(_cfg("ft_files", files=str(tsv)))
    assert (held_out.size("train"), held_out.size("validation"), held_out.size("test")) == (246, 2, 2)
    assert held_out.pairs("test", [0]) == [pairs[99]]
    by_split = ft.source(_cfg("ft_files", files={"train": str(tsv), "validation": str(jsonl)}))
    assert by_split.pairs("validation", range(3)) == pairs[:3]
    assert set(ft.training_pairs(by_split, num_examples=250, seed=0)) == set(pairs)
    (_, inputs, targets), = itertools.islice(
        ft.examples(by_split, "train", vocabulary=vocab, seq_len=64, seed=0, num_examples=1), 1)
    assert vocab.decode(inputs.tolist()).startswith("[S2S] Translate groon")


@pytest.mark.parametrize("name,content,message", [
    ("empty.tsv", "", r"empty\.tsv.*empty"),
    ("blank.tsv", "\n\n", r"blank\.tsv.*empty"),
    ("three.tsv", "a\tb\nc\td\te\n", r"three\.tsv:2: expected 2 tab-separated columns.*got 3"),
    ("one.tsv", "a\tb\nno tab here\n", r"one\.tsv:2: expected 2 tab-separated columns.*got 1"),
    ("bad.jsonl", '{"input": "a", "target": "b"}\n{"input": "a"\n', r"bad\.jsonl:2: not a JSON"),
    ("keys.jsonl", '{"input": "a", "output": "b"}\n', r"keys\.jsonl:1: expected"),
])
def test_bad_pair_files_get_one_message_naming_path_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    src = ft.source(_cfg("ft_files", files=str(tmp_path / name)))
    with pytest.raises(ValueError, match=message):
        src.size("train")
    errors = ft.describe_errors(_cfg("ft_files", files=str(tmp_path / name)))
    assert len(errors) == 1 and errors[0].startswith("config.data.finetune.files:")


def test_a_missing_pair_file_is_named(tmp_path):
    missing = str(tmp_path / "nowhere.tsv")
    with pytest.raises(FileNotFoundError, match="nowhere.tsv"):
        ft.source(_cfg("ft_files", files=missing)).size("train")
    assert "nowhere.tsv" in ft.describe_errors(_cfg("ft_files", files=missing))[0]
    with pytest.raises(ValueError, match="config.data.finetune.files is empty"):
        ft.source(_cfg("ft_files"))
