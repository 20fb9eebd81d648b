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
    def predict1(rows, x, df):
        return 10.0 * np.broadcast_to(df, (len(rows), np.shape(df)[-1])) ** -0.5 + 1.0

    def predict2(rows, x, df):
        level = predict1(rows, x, 10.0 ** (np.asarray(rows)[:, None] + 2.0))
        return np.broadcast_to(level, (len(rows), np.shape(df)[-1]))

    band = critical.draws_curve(predict1, predict2, [1.0], (1.0, 1e12), [0, 1, 2], level=0.5)
    assert band["draws"] == 3 and band["fraction_crossing"] == [1.0]
    assert band["median"][0] == pytest.approx(1e3, rel=1e-6)
    assert 1e2 < band["lower"][0] < band["upper"][0] < 1e4


def _two_term_draws(n, rng):
    """Per draw: loss_i(u) = a_i exp(-b_i u) + e_i, i = 1, 2 (fixed X), random parameters."""
    p = {k: rng.uniform(lo, hi, n) for k, (lo, hi) in dict(
        a1=(0.5, 5), b1=(0.05, 0.6), e1=(0.5, 1.0), a2=(0.5, 5), b2=(0.05, 0.6),
        e2=(0.5, 1.0)).items()}
    return p


def _loss(p, i):
    def loss(rows, u):
        a, b, e = (p[f"{k}{i}"][rows][:, None] for k in "abe")
        return a * np.exp(-b * u) + e
    return loss


def test_vectorised_first_crossings_match_the_bracketed_scalar_search():
    p = _two_term_draws(300, np.random.default_rng(0))
    # Draw 0 crosses twice inside one grid cell (u = r and r + 0.01, the grid spacing is
    # 0.07): only a search that looks at stationary points between grid nodes sees it.
    u = np.linspace(0.0, np.log(1e12), 401)
    r = np.array([u[100] + 0.02, u[100] + 0.03])
    p["a1"][0], p["b1"][0], p["e1"][0], p["b2"][0] = 2.0, 0.5, 1.0, 0.2
    (p["a2"][0], p["e2"][0]) = np.linalg.solve(np.c_[np.exp(-0.2 * r), np.ones(2)],
                                               2.0 * np.exp(-0.5 * r) + 1.0)
    rows = np.arange(300)
    l1, l2 = _loss(p, 1), _loss(p, 2)
    got = critical.first_crossings(l1, l2, rows, (1.0, 1e12))
    assert got[0] == pytest.approx(np.exp(r[0]), rel=1e-9)
    want = []
    for b in rows:
        cs = critical.crossings(lambda v: l1(rows[b:b + 1], v)[0],
                                lambda v: l2(rows[b:b + 1], v)[0], (1.0, 1e12))
        want.append(cs[0].df if cs else np.nan)
    want = np.array(want)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert 50 < np.isnan(want).sum() < 250  # both kinds of draw are exercised
    ok = ~np.isnan(want)
    assert np.allclose(got[ok], want[ok], rtol=1e-9)
