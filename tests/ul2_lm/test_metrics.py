"""Generation metrics: the values follow the metrics' definitions on hand-countable examples."""

import importlib.util
import math

import numpy as np
import pytest

from ul2_lm import metrics

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

SENTENCES = ["the cat sat on the mat", "a dog barked at the postman", "it rained all day"]


def test_identical_texts_score_perfectly():
    assert metrics.bleu(SENTENCES, SENTENCES) == pytest.approx(100.0)
    assert metrics.chrf(SENTENCES, SENTENCES) == pytest.approx(100.0)
    assert metrics.rouge_l(SENTENCES, SENTENCES) == pytest.approx(1.0)


def test_disjoint_texts_score_zero():
    other = ["xylophones quietly hum", "seven purple zebras", "nobody knows why"]
    assert metrics.bleu(other, SENTENCES) == pytest.approx(0.0, abs=1e-6)
    assert metrics.chrf(["qqqq zzzz"], ["abcd efgh"]) == pytest.approx(0.0, abs=1e-6)
    assert metrics.rouge_l(other, SENTENCES) == pytest.approx(0.0)


def test_bleu_is_the_geometric_mean_of_clipped_ngram_precisions_times_brevity_penalty():
    # 'the cat sat on the mat' against 'the cat sat on a mat': 1- to 4-gram matches 5/6, 3/5,
    # 2/4, 1/3; equal lengths, so no brevity penalty.
    expected = 100 * math.exp(np.mean(np.log([5 / 6, 3 / 5, 2 / 4, 1 / 3])))
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(
        expected, abs=0.01)
    # Every n-gram of a 5-word prefix of a 6-word reference matches: only the penalty remains.
    assert metrics.bleu(["the cat sat on the"], ["the cat sat on the mat"]) == pytest.approx(
        100 * math.exp(1 - 6 / 5), abs=0.01)


def test_chinese_bleu_counts_characters():
    # With no spaces the default tokeniser sees one word each; 'zh' sees 5 of 6 characters.
    assert metrics.bleu(["北京欢迎你"], ["北京欢迎你们"]) == pytest.approx(0.0, abs=1e-6)
    assert metrics.bleu(["北京欢迎你"], ["北京欢迎你们"], language="zh") == pytest.approx(
        100 * math.exp(1 - 6 / 5), abs=0.01)


def test_rouge_l_is_the_f_measure_of_the_longest_common_subsequence():
    # LCS of 'the cat was on the mat' and 'the cat sat on the mat' is 5 of 6 words each way.
    assert metrics.rouge_l(["the cat was on the mat"], ["the cat sat on the mat"]) == \
        pytest.approx(5 / 6)
    # Averaged over examples, not pooled.
    assert metrics.rouge_l(["the cat was on the mat", "it rained all day"],
                           ["the cat sat on the mat", "it rained all day"]) == \
        pytest.approx((5 / 6 + 1) / 2)


def test_rouge_l_stems_english_only_and_keeps_every_script_intact():
    assert metrics.rouge_l(["the cats running"], ["the cat runs"], language="en") == \
        pytest.approx(1.0)
    assert metrics.rouge_l(["the cats running"], ["the cat runs"], language="de") == \
        pytest.approx(1 / 3)
    # 'bär' stays one word (an ASCII-only tokeniser splits it and scores 3/5 here).
    assert metrics.rouge_l(["der bär schläft"], ["der bär läuft"], language="de") == \
        pytest.approx(2 / 3)
    assert metrics.rouge_l(["北京欢迎您"], ["北京欢迎你"], language="zh") == pytest.approx(4 / 5)
    # One language per example.
    assert metrics.rouge_l(["the cats running", "der bär schläft"],
                           ["the cat runs", "der bär läuft"], language=["en", "de"]) == \
        pytest.approx((1 + 2 / 3) / 2)


def test_generation_metrics_by_task_kind():
    translation = metrics.generation_metrics("translation", SENTENCES, SENTENCES)
    assert translation["bleu"] == pytest.approx(100.0)
    assert translation["chrf"] == pytest.approx(100.0)
    summary = metrics.generation_metrics("summarization", SENTENCES, SENTENCES)
    assert summary == {"rougeL": pytest.approx(1.0), "skipped": {}}
    with pytest.raises(ValueError, match="task_kind='qa'"):
        metrics.generation_metrics("qa", SENTENCES, SENTENCES)
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        metrics.generation_metrics("translation", SENTENCES, SENTENCES[:2])


def test_bleurt_is_skipped_with_instructions_instead_of_failing(tmp_path):
    result = metrics.generation_metrics("translation", SENTENCES, SENTENCES)
    assert "bleurt" not in result
    note = result["skipped"]["bleurt"]
    assert "pip install git+https://github.com/google-research/bleurt" in note
    assert "config.evaluation.bleurt_checkpoint" in note

    missing = str(tmp_path / "no_such_checkpoint")
    assert missing in metrics.generation_metrics("translation", SENTENCES, SENTENCES,
                                                 bleurt_checkpoint=missing)["skipped"]["bleurt"]
    with pytest.raises(metrics.BleurtUnavailable, match="bleurt_checkpoint"):
        metrics.bleurt(SENTENCES, SENTENCES, None)
    if importlib.util.find_spec("bleurt") is None:
        result = metrics.generation_metrics("translation", SENTENCES, SENTENCES,
                                            bleurt_checkpoint=str(tmp_path))
        assert "not installed" in result["skipped"]["bleurt"]


def test_perplexity_is_exp_of_the_mean_token_nll():
    assert metrics.perplexity(6.0, 3) == pytest.approx(math.exp(2.0))
    with pytest.raises(ValueError, match="num_tokens"):
        metrics.perplexity(1.0, 0)
    # A uniform model over V tokens has perplexity V; weights pick the scored tokens.
    vocab = 7
    logits = np.zeros((2, 3, vocab), np.float32)
    logits[1, 2, 0] = 50.0  # confident and wrong, but unweighted
    targets = np.array([[1, 2, 3], [4, 5, 6]])
    weights = np.array([[1, 1, 0], [0, 1, 0]])
    assert metrics.token_perplexity(logits, targets, weights) == pytest.approx(vocab, rel=1e-5)
