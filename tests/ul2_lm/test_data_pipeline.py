"""The input pipeline: the batch contract, UL2 examples kept whole, determinism, resume, shards."""

import itertools
import json

import numpy as np
import pytest

from ul2_lm import ul2
from ul2_lm.data import corpus as corpus_lib
from ul2_lm.data import pipeline
from ul2_lm.data import sources
from ul2_lm.data import tasks
from ul2_lm.data import testing
from ul2_lm.data import vocab as vocab_lib


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UL2_LM_CACHE", str(tmp_path_factory.getbasetemp() / "ul2_lm_cache"))
        yield


def _take(iterator, n):
    out = [next(iterator) for _ in range(n)]
    iterator.close()
    return out


def _segments(batch):
    """Per packed segment: (inputs, targets, loss weights, causal mask, input tokens, tokens)."""
    for row in range(batch["decoder_target_tokens"].shape[0]):
        seg_ids = batch["decoder_segment_ids"][row]
        for s in range(1, seg_ids.max() + 1):
            where = seg_ids == s
            tokens = batch["decoder_target_tokens"][row][where]
            causal = batch["decoder_causal_attention"][row][where]
            weights = batch["decoder_loss_weights"][row][where]
            n_inputs = int(causal.sum()) - 1  # seqio marks one position past the inputs
            yield (tokens[:n_inputs], tokens[n_inputs:], weights, causal,
                   batch["decoder_input_tokens"][row][where], batch["decoder_positions"][row][where])


@pytest.fixture(scope="module")
def train_batches():
    cfg = testing.tiny_data_config(ul2={"preset": "ul2", "rates": None})
    return cfg, _take(pipeline.make_train_iterator(cfg, global_batch_size=4), 6)


def test_batches_have_the_contract_features_dtypes_and_shapes(train_batches):
    _, batches = train_batches
    for batch in batches:
        assert set(batch) == set(pipeline.BATCH_FEATURES)
        for name, array in batch.items():
            assert array.dtype == np.int32 and array.shape == (4, 128), name


def test_loss_is_on_targets_and_the_bidirectional_prefix_is_the_inputs(train_batches):
    _, batches = train_batches
    for batch in batches:
        padding = batch["decoder_segment_ids"] == 0
        assert not batch["decoder_loss_weights"][padding].any()
        assert not batch["decoder_causal_attention"][padding].any()
        for inputs, targets, weights, causal, shifted, positions in _segments(batch):
            n = len(inputs)
            np.testing.assert_array_equal(weights, [0] * n + [1] * len(targets))
            np.testing.assert_array_equal(causal, [1] * (n + 1) + [0] * (len(targets) - 1))
            np.testing.assert_array_equal(positions, np.arange(len(weights)))
            np.testing.assert_array_equal(shifted[1:], np.concatenate([inputs, targets])[:-1])
            assert shifted[0] == 0 and inputs[0] in (3, 4, 5)  # a mode token opens the inputs


def test_every_packed_example_rebuilds_its_own_document_text(train_batches):
    # Denoising happens per example before packing: reconstructing each packed segment and
    # joining the chunks of each document gives back that document, so no span crossed a
    # segment boundary and nothing was lost or truncated.
    cfg, batches = train_batches
    vocab = tasks.vocabulary(cfg)
    ids = vocab_lib.special_ids(vocab)
    rebuilt = [ul2.reconstruct(i, t, ids) for b in batches for i, t, *_ in _segments(b)]
    world = corpus_lib.Corpus(0)
    examples = tasks.examples(tasks.source(cfg), "train", vocabulary=vocab,
                              mixture=tasks.mixture(cfg), seq_len=128, seed=0)
    by_document = {}
    for tokens, ((doc, _), _, _) in zip(rebuilt, examples):
        by_document.setdefault(doc, []).append(tokens)
    assert len(by_document) > 10
    for doc, chunks in list(by_document.items())[:-1]:  # the last may continue in the next batch
        text = world.monolingual("train", doc)[1]
        np.testing.assert_array_equal(np.concatenate(chunks), vocab.encode(text))


def test_rows_are_densely_packed(train_batches):
    _, batches = train_batches
    assert np.mean([(b["decoder_segment_ids"] > 0).mean() for b in batches]) > 0.6
    assert max(b["decoder_segment_ids"].max() for b in batches) > 1


def test_same_seed_same_batches_other_seed_other_batches(train_batches):
    cfg, batches = train_batches
    again = _take(pipeline.make_train_iterator(cfg, global_batch_size=4), 2)
    other = _take(pipeline.make_train_iterator(cfg, global_batch_size=4, seed=1), 2)
    for a, b in zip(batches, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(batches[0]["decoder_target_tokens"], other[0]["decoder_target_tokens"])


def test_resume_from_a_state_gives_the_next_uninterrupted_batch():
    cfg = testing.tiny_data_config()
    reference = pipeline.make_train_iterator(cfg, global_batch_size=8)
    states, batches = [reference.state()], []
    for _ in range(22):  # 176 rows: past the first packing run of 128 examples
        batches.append(next(reference))
        states.append(json.loads(json.dumps(reference.state())))  # as a checkpoint stores it
    reference.close()
    assert states[-1]["batches"] == 22
    crossed = [n for n in range(1, 22) if states[n]["start"] != states[n - 1]["start"]]
    assert crossed, "the test should cross a packing-run boundary"
    for n in [0, 5, crossed[0] - 1, crossed[0], 20]:
        resumed = pipeline.make_train_iterator(cfg, global_batch_size=8, state=states[n])
        for want in batches[n:n + 2]:
            got = next(resumed)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"resume at {n}: {k}")
        assert resumed.state() == states[min(n + 2, 22)]
        resumed.close()


def test_a_state_from_other_settings_is_refused():
    cfg = testing.tiny_data_config()
    it = pipeline.make_train_iterator(cfg, global_batch_size=4)
    next(it)
    state = it.state()
    it.close()
    with pytest.raises(ValueError, match="state does not match"):
        pipeline.make_train_iterator(cfg, global_batch_size=8, state=state)


def _write_lines(path, n):
    world = corpus_lib.Corpus(0)
    path.write_text("".join(world.monolingual("train", i)[1] + "\n" for i in range(n)))
    return path


def test_two_shards_are_disjoint_and_together_cover_the_data(tmp_path):
    src = sources.TextFilesSource(str(_write_lines(tmp_path / "docs.txt", 250)))
    for split, repeat in [("validation", False), ("train", True), ("train", False)]:
        n = len(src.split_lines(split))
        per_shard = [list(itertools.islice(
            src.documents(split, seed=3, shard_index=s, num_shards=2, repeat=repeat), n // 2))
            for s in range(2)]
        keys = [{k for k, _ in shard} for shard in per_shard]
        texts = [{t for _, t in shard} for shard in per_shard]
        assert not keys[0] & keys[1] and not texts[0] & texts[1]
        expected = {src.text(int(line)) for line in src.split_lines(split)}
        assert texts[0] | texts[1] == expected, split


def test_each_host_gets_its_own_part_of_the_global_batch():
    cfg = testing.tiny_data_config()
    hosts = [_take(pipeline.make_train_iterator(cfg, global_batch_size=8, shard_index=s,
                                                num_shards=2), 1)[0] for s in range(2)]
    assert all(h["decoder_target_tokens"].shape == (4, 128) for h in hosts)
    assert not np.array_equal(hosts[0]["decoder_target_tokens"], hosts[1]["decoder_target_tokens"])
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.make_train_iterator(cfg, global_batch_size=9, num_shards=2)


def test_eval_iterators_are_finite_fixed_and_independent_of_the_training_seed():
    cfg = testing.tiny_data_config(num_eval_batches=3)
    first = list(pipeline.make_eval_iterator(cfg, global_batch_size=4))
    cfg.seed = 17
    second = list(pipeline.make_eval_iterator(cfg, global_batch_size=4))
    assert len(first) == len(second) == 3
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["decoder_target_tokens"], b["decoder_target_tokens"])
    train = _take(pipeline.make_train_iterator(cfg, global_batch_size=4), 1)[0]
    assert not np.array_equal(train["decoder_target_tokens"], first[0]["decoder_target_tokens"])
    with pytest.raises(ValueError, match="no resumable state"):
        pipeline.make_eval_iterator(cfg, global_batch_size=4).state()


def test_an_eval_split_that_runs_out_ends_with_a_padded_batch(tmp_path):
    cfg = testing.tiny_data_config(task="ul2_textfiles", vocab=dict(testing.TINY_VOCAB, kind="embedded"),
                                   text_files=str(_write_lines(tmp_path / "few.txt", 30)),
                                   num_eval_batches=0)
    batches = list(pipeline.make_eval_iterator(cfg, global_batch_size=8))
    segments = sum(int(b["decoder_segment_ids"].max(axis=1).sum()) for b in batches)
    assert segments >= 30  # all 30 lines (fewer than 100: validation reads them all)
    assert not batches[-1]["decoder_loss_weights"][-1].any()
    hosts = [list(pipeline.make_eval_iterator(cfg, global_batch_size=8, shard_index=s, num_shards=2,
                                              num_batches=len(batches) + 1)) for s in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == len(batches) + 1  # equal counts, padded with zeros
    assert not hosts[0][-1]["decoder_loss_weights"].any()


def test_text_file_task_trains_on_the_files(tmp_path):
    for i in range(2):
        _write_lines(tmp_path / f"part{i}.txt", 60)
    cfg = testing.tiny_data_config(task="ul2_textfiles", text_files=str(tmp_path / "part*.txt"),
                                   vocab=dict(testing.TINY_VOCAB, kind="auto", size=700))
    vocab = tasks.vocabulary(cfg)
    assert "textfiles" in vocab.sentencepiece_model_file
    batch = _take(pipeline.make_train_iterator(cfg, global_batch_size=2), 1)[0]
    ids = vocab_lib.special_ids(vocab)
    inputs, targets, *_ = next(_segments(batch))
    text = vocab.decode(ul2.reconstruct(inputs, targets, ids).tolist())
    assert text in (tmp_path / "part0.txt").read_text() + (tmp_path / "part1.txt").read_text()


def test_tfds_wiki40b_task_reads_both_languages_with_mock_data():
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    cfg = testing.tiny_data_config(task="ul2_wiki40b_ende", vocab=dict(testing.TINY_VOCAB, kind="embedded"))
    with tfds.testing.mock_data(num_examples=12):
        src = tasks.source(cfg)
        docs = list(itertools.islice(src.documents("train", seed=0), 8))
        assert [k % 2 for k, _ in docs] == [0, 1] * 4  # en, de, en, de: half and half
        batch = _take(pipeline.make_train_iterator(cfg, global_batch_size=2), 1)[0]
        assert batch["decoder_loss_weights"].sum() > 0
        evals = list(pipeline.make_eval_iterator(cfg, global_batch_size=2, num_batches=2))
        assert len(evals) >= 1


def test_bad_data_config_fails_naming_the_path_before_anything_is_built(tmp_path):
    missing = str(tmp_path / "no_such_dir" / "*.txt")
    cfg = testing.tiny_data_config(task="ul2_textfiles", text_files=missing)
    errors = pipeline.describe_data_config_errors(cfg)
    assert len(errors) == 1 and missing in errors[0]
    with pytest.raises(ValueError, match="no_such_dir"):
        pipeline.make_train_iterator(cfg, global_batch_size=2)
    bad = testing.tiny_data_config(task="ul2_nothing", vocab={"kind": "sentencepiece_file", "path": "/x.model"},
                                   ul2={"preset": "t5"})
    messages = "\n".join(pipeline.describe_data_config_errors(bad))
    for named in ["ul2_nothing", "/x.model", "t5"]:
        assert named in messages


def test_unpacked_batches_hold_one_example_per_row():
    cfg = testing.tiny_data_config(pack=False)
    batch = _take(pipeline.make_train_iterator(cfg, global_batch_size=4), 1)[0]
    assert set(batch) == set(pipeline.BATCH_FEATURES)
    assert batch["decoder_segment_ids"].max() == 1
    assert all(len(list(_segments({k: v[r:r + 1] for k, v in batch.items()}))) == 1 for r in range(4))


def test_closing_an_iterator_whose_reader_stopped_early_stops_its_thread_at_once():
    """A consumer that takes one batch of a finite stream and walks away (a trainer at its last
    step, an interrupted evaluation) must not leave the prefetch thread behind, blocked."""
    import time

    def produce():
        for _ in range(5):
            yield {"x": np.zeros(2)}, None

    iterator = pipeline.BatchIterator(produce, prefetch=1, state=None, local_batch_size=1,
                                      seq_len=2, vocab=None)
    next(iterator)
    time.sleep(0.3)  # the producer has run dry and waits for room for its end marker
    start = time.monotonic()
    iterator.close()
    assert not iterator._thread.is_alive()
    assert time.monotonic() - start < 5
