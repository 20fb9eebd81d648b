"""The UL2 objective: denoiser statistics, sentinel layout, lossless round trip, mixture rates."""

import subprocess
import sys

import numpy as np
import pytest

from ul2_lm import ul2

IDS = ul2.SpecialIds(mode=(("[NLU]", 3), ("[NLG]", 4), ("[S2S]", 5)), vocab_size=1000,
                     num_sentinels=100)
SPAN_DENOISERS = [d for d in ul2.DENOISERS.values() if not d.is_prefix_lm]


def _text(rng, n):
    return rng.integers(10, IDS.lowest_sentinel, size=n).astype(np.int32)


def _is_sentinel(t):
    return IDS.lowest_sentinel <= t < IDS.vocab_size


def test_the_paper_denoiser_table():
    table = {(d.mode_token, d.mean_span_length, d.noise_density) for d in ul2.DENOISERS.values()}
    assert table == {("[NLU]", 3.0, 0.15), ("[NLU]", 8.0, 0.15), ("[NLG]", 3.0, 0.5),
                     ("[NLG]", 8.0, 0.5), ("[NLG]", 64.0, 0.15), ("[NLG]", 64.0, 0.5),
                     ("[S2S]", None, None)}


@pytest.mark.parametrize("denoiser", SPAN_DENOISERS, ids=lambda d: d.name)
def test_measured_corruption_rate_and_span_length_match_the_spec(denoiser):
    rng = np.random.default_rng(0)
    # As long as the pipeline makes them (long enough for span 64 at rate 0.15 to matter).
    n, examples = ul2.max_text_length(denoiser, 2048, IDS.num_sentinels), 150
    noise = spans = 0
    for _ in range(examples):
        inputs, targets = ul2.corrupt(_text(rng, n), denoiser, IDS, rng)
        num_spans = sum(map(_is_sentinel, inputs))
        noise += len(targets) - num_spans - 1  # minus the sentinels and eos
        spans += num_spans
    assert noise / (n * examples) == pytest.approx(denoiser.noise_density, rel=0.03)
    assert noise / spans == pytest.approx(denoiser.mean_span_length, rel=0.05)


def test_prefix_lm_splits_uniformly_and_predicts_the_continuation():
    rng = np.random.default_rng(1)
    (s,) = ul2.S_DENOISERS
    fractions = []
    for _ in range(2000):
        tokens = _text(rng, 100)
        inputs, targets = ul2.corrupt(tokens, s, IDS, rng)
        assert inputs[0] == IDS.mode_id("[S2S]") and targets[-1] == IDS.eos
        np.testing.assert_array_equal(np.concatenate([inputs[1:], targets[:-1]]), tokens)
        fractions.append((len(inputs) - 1) / 100)
    assert np.mean(fractions) == pytest.approx(0.5, abs=0.02)
    assert min(fractions) > 0 and max(fractions) < 1  # both sides non-empty


@pytest.mark.parametrize("denoiser", list(ul2.DENOISERS.values()), ids=lambda d: d.name)
def test_inputs_and_targets_reconstruct_the_text(denoiser):
    rng = np.random.default_rng(2)
    for n in [1, 2, 3, 7, 40, 333]:
        tokens = _text(rng, n)
        inputs, targets = ul2.corrupt(tokens, denoiser, IDS, rng)
        assert inputs[0] == IDS.mode_id(denoiser.mode_token)
        assert inputs.dtype == targets.dtype == np.int32
        np.testing.assert_array_equal(ul2.reconstruct(inputs, targets, IDS), tokens)


@pytest.mark.parametrize("denoiser", SPAN_DENOISERS, ids=lambda d: d.name)
def test_sentinels_count_down_from_the_top_of_the_vocabulary(denoiser):
    rng = np.random.default_rng(3)
    inputs, targets = ul2.corrupt(_text(rng, 500), denoiser, IDS, rng)
    in_sentinels = [t for t in inputs if _is_sentinel(t)]
    target_sentinels = [t for t in targets if _is_sentinel(t)]
    expected = list(range(IDS.vocab_size - 1, IDS.vocab_size - 1 - len(in_sentinels), -1))
    assert in_sentinels == target_sentinels == expected
    assert _is_sentinel(targets[0]) and targets[-1] == IDS.eos


def test_spans_are_capped_by_the_number_of_sentinels():
    few = ul2.SpecialIds(mode=IDS.mode, vocab_size=1000, num_sentinels=4)
    rng = np.random.default_rng(4)
    x = ul2.DENOISERS["x_span3_rate50"]
    inputs, targets = ul2.corrupt(_text(rng, 400), x, few, rng)
    assert sum(few.lowest_sentinel <= t for t in inputs) <= 4
    assert ul2.max_text_length(x, 512, 4) * 0.5 / 3 <= 4 + 1


@pytest.mark.parametrize("budget", [16, 128, 512])
def test_documents_split_into_examples_that_fit_the_budget_and_lose_nothing(budget):
    rng = np.random.default_rng(5)
    mixture = ul2.make_mixture("ul2")
    for _ in range(20):
        doc = _text(rng, int(rng.integers(1, 3 * budget)))
        examples = list(ul2.denoise_document(doc, mixture, IDS, budget, key=(7, 1, 2)))
        assert all(len(i) + len(t) <= budget for i, t in examples)
        rebuilt = np.concatenate([ul2.reconstruct(i, t, IDS) for i, t in examples])
        np.testing.assert_array_equal(rebuilt, doc)


def test_denoising_is_a_pure_function_of_the_key():
    doc = _text(np.random.default_rng(6), 300)
    mixture = ul2.make_mixture("ul2")
    run = lambda key: [np.concatenate(x) for x in ul2.denoise_document(doc, mixture, IDS, 128, key)]  # noqa: E731
    first, again, other = run((1, 2, 3)), run((1, 2, 3)), run((1, 2, 4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again)) and len(first) == len(again)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_ul2r_mixes_half_s_quarter_r_quarter_x():
    mixture = ul2.make_mixture("ul2r")
    rng = np.random.default_rng(7)
    modes = [ul2.sample_denoiser(mixture, rng).mode_token for _ in range(8000)]
    share = {m: modes.count(m) / len(modes) for m in ul2.MODE_TOKENS}
    assert share["[S2S]"] == pytest.approx(0.5, abs=0.02)
    assert share["[NLU]"] == pytest.approx(0.25, abs=0.02)
    assert share["[NLG]"] == pytest.approx(0.25, abs=0.02)


def test_ul2_preset_weighs_the_seven_denoisers_equally():
    rates = ul2.make_mixture("ul2").as_dict()
    assert len(rates) == 7 and all(r == pytest.approx(1 / 7) for r in rates.values())


def test_explicit_rates_replace_the_preset_and_accept_groups():
    rates = ul2.make_mixture("ul2r", {"S": 1.0, "r_span3_rate15": 1.0}).as_dict()
    assert rates == {"r_span3_rate15": 0.5, "s_prefix_lm": 0.5}


@pytest.mark.parametrize("preset,rates,named", [("t5", None, "t5"), ("ul2r", {"Q": 1.0}, "Q"),
                                                ("ul2r", {"S": -1.0, "R": 2.0}, "rates")])
def test_bad_mixture_settings_fail_naming_the_value(preset, rates, named):
    with pytest.raises(ValueError, match=named):
        ul2.make_mixture(preset, rates)


def test_the_objective_imports_without_tensorflow():
    code = "import sys, ul2_lm.ul2; assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
