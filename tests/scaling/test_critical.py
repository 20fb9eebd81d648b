"""Critical finetuning size: bracketed roots, honest labels, and the closed form."""

import math

import numpy as np
import pytest

from scaling import critical


def _law(a, alpha, beta, e):
    return lambda x, df: a * x ** -alpha * df ** -beta + e


def test_both_roots_of_a_two_crossing_difference_are_found():
    l1 = lambda u: 2 * np.exp(-0.5 * u) + 1.0  # noqa: E731
    l2 = lambda u: 1.0 * np.exp(-0.2 * u) + 0.95  # noqa: E731
    cs = critical.crossings(l1, l2, (1.0, 1e12))
    assert len(cs) == 2
    for c in cs:
        assert l1(np.log(c.df)) == pytest.approx(l2(np.log(c.df)), abs=1e-10)
    # Below the first crossing method 2 is better, between them method 1 is.
    assert [c.better_below for c in cs] == [2, 1]


def test_equal_floors_reproduce_the_closed_form():
    p1 = dict(A=1.2e5, alpha=0.52, beta=0.15)
    p2 = dict(A=3.9e3, alpha=0.4, beta=0.051)
    cf = critical.closed_form(p1, p2)
    for x in (1e9, 4e9):
        cs = critical.crossings(lambda u: np.log(_law(p1["A"], p1["alpha"], p1["beta"], 0.0)(
                                    x, np.exp(u))),
                                lambda u: np.log(_law(p2["A"], p2["alpha"], p2["beta"], 0.0)(
                                    x, np.exp(u))), (1e-3, 1e30))
        assert len(cs) == 1
        assert math.log(cs[0].df) == pytest.approx(cf["log_H"] + cf["gamma"] * math.log(x),
                                                   rel=1e-8)


def test_no_crossing_and_extrapolation_are_reported_as_such():
    better = _law(1.0, 0.0, 0.3, 0.5)
    worse = _law(1.0, 0.0, 0.3, 0.6)
    out = critical.curve(better, worse, [1.0, 2.0], (1.0, 1e12), observed=(1e3, 1e5))
    assert all(c["status"] == critical.NO_CROSSING and math.isnan(c["df"]) for c in out)
    l1, l2 = _law(10.0, 0.0, 0.5, 1.0), _law(1.0, 0.0, 0.1, 1.0)
    cs = critical.crossings(lambda u: l1(1.0, np.exp(u)), lambda u: l2(1.0, np.exp(u)),
                            (1.0, 1e12), observed=(1e3, 1e5))
    assert len(cs) == 1 and cs[0].status == critical.EXTRAPOLATED  # at 10^(2.5)
    cs = critical.crossings(lambda u: l1(1.0, np.exp(u)), lambda u: l2(1.0, np.exp(u)),
                            (1.0, 1e12), observed=(1e2, 1e5))
    assert cs[0].status == critical.INTERPOLATED


def test_methods_without_overlapping_sizes_have_no_interpolated_crossing():
    assert critical.observed_overlap([8e3, 1e5], [1e5, 4.5e6]) == (1e5, 1e5)
    assert critical.observed_overlap([8e3, 9e4], [1e5, 4.5e6]) is None


def test_bad_range_is_an_error():
    with pytest.raises(ValueError, match="df_range"):
        critical.crossings(lambda u: u, lambda u: u, (10.0, 1.0))


def test_bootstrap_band_uses_only_the_draws_it_is_given():
    # Draw b's second method is flat at the first one's loss at Df = 10^(b+2): they cross
    # there. Draws 0-2 are given; any other draw would move the band.
    def predict1(b, x, df):
        return 10.0 * df ** -0.5 + 1.0

    def predict2(b, x, df):
        return np.full(df.shape, predict1(b, x, 10.0 ** (b + 2)))

    band = critical.draws_curve(predict1, predict2, [1.0], (1.0, 1e12), [0, 1, 2], level=0.5)
    assert band["draws"] == 3 and band["fraction_crossing"] == [1.0]
    assert band["median"][0] == pytest.approx(1e3, rel=1e-6)
    assert 1e2 < band["lower"][0] < band["upper"][0] < 1e4
