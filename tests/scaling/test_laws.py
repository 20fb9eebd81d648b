"""Laws are one log-space function each; adding one is one decorated function."""

import numpy as np
import pytest

from scaling import fitting, laws


def test_builtin_laws_match_their_formulas():
    x, df = np.array([1e9, 4e9]), np.array([1e5, 2e6])
    logs = {"x": np.log(x), "df": np.log(df)}
    A, alpha, B, beta, E = 1.2e5, 0.52, 3.0, 0.15, 0.75
    mult = laws.get("multiplicative").log_loss(np.array([np.log(A), alpha, beta, np.log(E)]),
                                               logs)
    assert np.allclose(np.exp(mult), A * x ** -alpha * df ** -beta + E, rtol=1e-12)
    add = laws.get("additive").log_loss(np.array([np.log(A), alpha, np.log(B), beta,
                                                  np.log(E)]), logs)
    assert np.allclose(np.exp(add), A * x ** -alpha + B * df ** -beta + E, rtol=1e-12)
    dl = 200.0
    rect = laws.get("rectified").log_loss(np.array([np.log(B), np.log(dl), beta, np.log(E)]),
                                          {"df": np.log(df)})
    assert np.allclose(np.exp(rect), B / (dl + df ** beta) + E, rtol=1e-12)


def test_logsumexp_is_stable_and_handles_minus_infinity():
    big = laws.logsumexp(np.array([1000.0]), np.array([1000.0]))
    assert np.allclose(big, 1000 + np.log(2))
    assert np.all(np.isneginf(laws.logsumexp(np.array([-np.inf]), np.array([-np.inf]))))
    three = laws.logsumexp(np.array([0.0]), np.array([-np.inf]), np.array([0.0]))
    assert np.allclose(three, np.log(2))


def test_a_user_law_is_one_registered_function_and_fits():
    name = "test_shifted_power"
    laws.LAWS.pop(name, None)

    @laws.register(name, inputs=("df",), linear=("a", "e"),
                   params={"a": (-30, 60), "beta": (0.0, 3.0), "e": (-20, 5)},
                   grid={"beta": (0.05, 1.5)})
    def shifted(p, x):
        return laws.logsumexp(p.a - p.beta * laws.logsumexp(x.df, np.log(100.0)), p.e)

    try:
        df = np.geomspace(10, 1e6, 15)
        y = 30 * (df + 100) ** -0.4 + 0.5
        res = fitting.fit(name, {"df": df}, y)
        assert res.certified, res.reason
        assert res.params["beta"] == pytest.approx(0.4, abs=1e-3)
    finally:
        laws.LAWS.pop(name, None)


def test_a_false_linearity_claim_is_rejected_at_registration():
    with pytest.raises(ValueError, match="not a linear combination"):
        @laws.register("test_false_linear", inputs=("df",), linear=("a",),
                       params={"a": (-5, 5), "beta": (0, 2)})
        def bad(p, x):
            return 2 * p.a - p.beta * x.df
    assert "test_false_linear" not in laws.LAWS


def test_unknown_law_and_fixed_parameter_errors_name_them():
    with pytest.raises(KeyError, match="unknown law 'quartic'"):
        laws.get("quartic")
    with pytest.raises(ValueError, match="no free parameter"):
        laws.get("single").with_fixed(gamma=1.0)


def test_natural_units_exponentiate_log_coefficients_only():
    nat = laws.natural({"a[m]": np.log(5.0), "alpha[m]": 0.3, "e": 0.0, "dl": np.log(7.0)})
    assert nat == pytest.approx({"A[m]": 5.0, "alpha[m]": 0.3, "E": 1.0, "D_l": 7.0})
