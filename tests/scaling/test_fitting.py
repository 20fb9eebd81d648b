"""The fit: planted laws are recovered, every fit is certified, and the known trap is caught."""

import math

import numpy as np
import pytest
import scipy.optimize

from scaling import fitting, laws, procedures

RAW = fitting.FitConfig(name="test", residual="raw")


def _grid(*axes):
    mesh = np.meshgrid(*axes, indexing="ij")
    return [m.ravel() for m in mesh]


def _planted(law, params, inputs, noise, seed=0, relative=False):
    theta = np.array([params[n] for n in law.names])
    logs = {k: (v if k == "group" else np.log(v)) for k, v in inputs.items()}
    clean = np.exp(law.log_loss(theta, logs))
    eps = np.random.default_rng(seed).normal(0, noise, clean.size)
    return clean * np.exp(eps) if relative else clean + eps


CASES = {
    "single": ("single", dict(a=np.log(50.0), beta=0.3, e=np.log(1.0)),
               lambda: {"df": np.geomspace(1e3, 1e6, 12)}),
    "multiplicative": ("multiplicative", dict(a=np.log(1.2e5), alpha=0.52, beta=0.15,
                                              e=np.log(0.75)),
                       lambda: dict(zip(("x", "df"), _grid([1e9, 2e9, 4e9, 8e9, 16e9],
                                                           np.geomspace(1e5, 4.5e6, 8))))),
    "additive": ("additive", dict(a=np.log(400.0), alpha=0.34, b=np.log(410.0), beta=0.28,
                                  e=np.log(1.7)),
                 lambda: dict(zip(("x", "df"), _grid(np.geomspace(7e7, 1.6e10, 8),
                                                     np.geomspace(5e9, 5e11, 8))))),
    # Ill-conditioned: E near 0, a tiny exponent (PET size), a negative exponent.
    "E near 0": ("multiplicative", dict(a=np.log(2.9), alpha=0.1, beta=0.025, e=np.log(1e-3)),
                 lambda: dict(zip(("x", "df"), _grid([1e9, 2e9, 4e9, 8e9, 16e9],
                                                     np.geomspace(8e3, 1e5, 8))))),
    "tiny alpha": ("multiplicative", dict(a=np.log(1.0), alpha=0.0027, beta=0.051,
                                          e=np.log(0.62)),
                   lambda: dict(zip(("x", "df"), _grid([50, 100, 150, 200, 300, 400],
                                                       np.geomspace(8e3, 1e5, 8))))),
    "negative alpha": ("multiplicative", dict(a=np.log(1.4), alpha=-0.0017, beta=0.081,
                                              e=np.log(0.62)),
                       lambda: dict(zip(("x", "df"), _grid([4, 8, 16, 32, 48, 64],
                                                           np.geomspace(8e3, 1e5, 8))))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_planted_law_is_recovered_and_certified(case):
    name, params, make_inputs = CASES[case]
    law = laws.get(name)
    inputs = make_inputs()
    y = _planted(law, params, inputs, noise=1e-6, relative=True)
    res = fitting.fit(law, inputs, y, RAW)
    assert res.certified, res.reason
    for k, v in params.items():
        # Exponents to an absolute, log-coefficients to a relative accuracy.
        tol = 2e-3 if k in ("alpha", "beta") else 2e-2 * max(1.0, abs(v))
        assert abs(res.params[k] - v) < tol, (k, res.params[k], v)


def test_rectified_law_is_recovered_on_its_pre_power_phase():
    law = laws.get("rectified")
    # Lin et al.'s curves: D_l comparable to D^beta over the first sizes (the pre-power phase).
    params = dict(b=np.log(300.0), dl=np.log(20.0), beta=0.7, e=np.log(0.9))
    inputs = {"df": 200.0 * 2.0 ** np.arange(0, 14)}
    y = _planted(law, params, inputs, noise=1e-6, relative=True)
    res = fitting.fit(law, inputs, y, RAW)
    assert res.certified, res.reason
    assert np.max(np.abs(res.predict(inputs) / y - 1)) < 1e-4
    for k, v in params.items():
        tol = 5e-3 if k == "beta" else 2e-2 * max(1.0, abs(v))
        assert abs(res.params[k] - v) < tol, (k, res.params[k], v)


def test_a_vanishing_floor_is_fitted_at_its_bound_and_certified_as_dropped():
    # A power law with no floor at all: the best E is 0, on the boundary of the log-space
    # parametrisation, where L-BFGS alone would crawl along the flat direction e -> -inf. The
    # fit reaches the bound and is certified as the law without a floor.
    df = np.geomspace(200, 4e5, 12)
    y = 9.0 * df ** -0.12 * np.exp(np.random.default_rng(0).normal(0, 2e-3, df.size))
    res = fitting.fit("single", {"df": df}, y, RAW)
    assert res.certified, res.reason
    assert res.checks["dropped"] == ["e"]
    assert res.params["e"] == laws.get("single").lower[2]
    assert abs(res.params["beta"] - 0.12) < 0.01


def test_a_coefficient_at_its_lower_bound_that_still_matters_fails_certification():
    # A floor forced up to 2.5 (the truth is 1): on its bound, and far from negligible.
    law = laws.get("single").with_bounds(e=(math.log(2.5), 5.0))
    df = np.geomspace(200, 4e5, 12)
    y = 1.0 + 9.0 * df ** -0.3
    res = fitting.fit(law, {"df": df}, y, RAW)
    assert not res.certified
    assert "e at its lower bound" in res.reason
    assert "dropped" not in res.checks


def test_tied_law_shares_beta_and_e_across_groups():
    base = laws.get("multiplicative")
    law = laws.tie(base, ["m", "p"])
    assert law.names == ("a[m]", "a[p]", "alpha[m]", "alpha[p]", "beta", "e")
    x_m, df_m = _grid([1e9, 2e9, 4e9, 8e9], np.geomspace(1e5, 4e6, 6))
    x_p, df_p = _grid([84e9, 126e9, 167e9, 283e9], np.geomspace(1e5, 4e6, 6))
    truth = {"a[m]": np.log(1.2e5), "alpha[m]": 0.52, "a[p]": np.log(630.0), "alpha[p]": 0.21,
             "beta": 0.15, "e": np.log(0.75)}
    inputs = {"x": np.r_[x_m, x_p], "df": np.r_[df_m, df_p],
              "group": np.r_[np.zeros(x_m.size, int), np.ones(x_p.size, int)]}
    y = _planted(law, truth, inputs, noise=1e-6, relative=True)
    res = fitting.fit(law, inputs, y, RAW)
    assert res.certified, res.reason
    for k in ("alpha[m]", "alpha[p]", "beta"):
        assert abs(res.params[k] - truth[k]) < 2e-3


def test_variable_projection_agrees_with_lbfgs_optimum():
    name, params, make_inputs = CASES["multiplicative"]
    law = laws.get(name)
    inputs = make_inputs()
    y = _planted(law, params, inputs, noise=0.005, seed=3)
    res = fitting.fit(law, inputs, y, RAW)
    data = fitting.prepare(law, inputs, y)
    # At the optimum's exponents, the convex inner problem gives the same A and E ...
    theta, value = fitting.variable_projection(law, data, RAW, [[res.params["alpha"],
                                                                  res.params["beta"]]])
    assert np.allclose(theta[0], res.theta, rtol=1e-5, atol=1e-6)
    assert value[0] == pytest.approx(res.objective, rel=1e-7)
    # ... and no nearby exponents do better once A and E are re-solved.
    grid = np.array(_grid(res.params["alpha"] + np.linspace(-0.02, 0.02, 9),
                          res.params["beta"] + np.linspace(-0.01, 0.01, 9))).T
    _, values = fitting.variable_projection(law, data, RAW, grid)
    assert values.min() >= res.objective * (1 - 1e-7)


def test_huber_terms_are_summed_and_stopping_ignores_scale():
    name, params, make_inputs = CASES["single"]
    law = laws.get(name)
    inputs = make_inputs()
    y = _planted(law, params, inputs, noise=0.003, seed=1)
    once = fitting.fit(law, inputs, y, RAW)
    twice = fitting.fit(law, {k: np.r_[v, v] for k, v in inputs.items()}, np.r_[y, y], RAW)
    assert twice.objective == pytest.approx(2 * once.objective, rel=1e-6)
    assert np.allclose(twice.theta, once.theta, atol=1e-5)


def _chinchilla_data(seed=1, n=250):
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(np.log(7e7), np.log(1.6e10), n))
    D = N * np.exp(rng.uniform(np.log(5), np.log(100), n))
    law = laws.get("additive")
    # The planted law is Besiroglu et al.'s refit of Chinchilla's data.
    truth = dict(a=np.log(482.0), alpha=0.3478, b=np.log(2085.4), beta=0.3658, e=np.log(1.8172))
    y = _planted(law, truth, {"x": N, "df": D}, noise=0.02, seed=seed, relative=True)
    return law, {"x": N, "df": D}, y


def test_mean_huber_trap_from_hoffmann_parameters_is_caught():
    law, inputs, y = _chinchilla_data()
    cfg = procedures.CHINCHILLA
    obj = fitting.Objective(law, fitting.prepare(law, inputs, y), cfg)
    n = y.size

    def mean_objective(t):  # the mistake: averaging the Huber terms
        v, g = obj.value_grad(t[None], np.zeros(1, int))
        return v[0] / n, g[0] / n

    hoffmann = np.array([np.log(406.4), 0.34, np.log(410.7), 0.28, np.log(1.69)])
    trap = scipy.optimize.minimize(mean_objective, hoffmann, jac=True, method="L-BFGS-B")
    assert trap.success  # scipy reports convergence ...
    assert np.max(np.abs(trap.x - hoffmann)) < 0.1  # ... barely away from where it started
    ok, reason, checks = fitting.certify(law, inputs, y, trap.x, cfg)
    assert not ok and "not a minimum" in reason
    good = fitting.fit(law, inputs, y, cfg)
    assert good.certified, good.reason
    assert good.objective < trap.fun * n


def test_parameter_pinned_at_a_bound_fails_certification():
    law = laws.get("single").with_bounds(beta=(0.5, 3.0))  # the truth (0.3) is excluded
    name, params, make_inputs = CASES["single"]
    inputs = make_inputs()
    y = _planted(laws.get("single"), params, inputs, noise=1e-4)
    res = fitting.fit(law, inputs, y, RAW)
    assert not res.certified
    assert "beta at its lower bound 0.5" in res.reason


def test_certification_rejects_a_point_that_is_not_a_minimum():
    name, params, make_inputs = CASES["multiplicative"]
    law = laws.get(name)
    inputs = make_inputs()
    y = _planted(law, params, inputs, noise=0.005)
    res = fitting.fit(law, inputs, y, RAW)
    ok, _, _ = fitting.certify(law, inputs, y, res.theta, RAW)
    assert ok
    moved = res.theta + np.array([0.0, 0.0, 0.01, 0.0])
    ok, reason, _ = fitting.certify(law, inputs, y, moved, RAW)
    assert not ok and "not a minimum" in reason


BAD_INPUTS = [
    ("NaN loss", lambda x, d, y: (x, d, np.where(np.arange(y.size) == 3, np.nan, y)),
     "loss has non-finite values"),
    ("infinite loss", lambda x, d, y: (x, d, np.where(np.arange(y.size) == 2, np.inf, y)),
     "loss has non-finite values"),
    ("zero size", lambda x, d, y: (np.where(np.arange(x.size) == 0, 0.0, x), d, y),
     "input 'x' must be positive"),
    ("negative examples", lambda x, d, y: (x, -d, y), "input 'df' must be positive"),
    ("too few points", lambda x, d, y: (x[:3], d[:3], y[:3]), "only 3 points"),
    ("one factor value", lambda x, d, y: (np.full_like(x, 1e9), d, y),
     "input 'x' has one distinct value"),
    ("length mismatch", lambda x, d, y: (x[:-1], d, y), "input 'x' has"),
]


@pytest.mark.parametrize("case,mangle,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_error(case, mangle, message):
    _, params, make_inputs = CASES["multiplicative"]
    inputs = make_inputs()
    law = laws.get("multiplicative")
    y = _planted(law, params, inputs, noise=0.0)
    x, d, yy = mangle(inputs["x"], inputs["df"], y)
    with pytest.raises(ValueError, match=message):
        fitting.fit(law, {"x": x, "df": d}, yy, RAW)
