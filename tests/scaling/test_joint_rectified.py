"""joint_rectified: the rectified law's small-data phase, shared by the model sizes of a family.

L(X, Df) = A X^-alpha / (D_l + Df^beta) + E X^-alpha_e.
"""

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from scaling import fitting, heldout, laws, procedures

LAW = laws.get("joint_rectified")
RAW = fitting.FitConfig(name="test", residual="raw")
DATA = Path(__file__).parents[2].parent / "shared" / "data" / "finetune-scaling"

# Close to what the law fits on the real GPT-2-like families: a pre-power phase over the first
# few hundred examples (D_l^(1/beta) ~ 1e5) and floors that rise slowly with model size.
TRUTH = dict(a=np.log(1.5e4), alpha=0.2, dl=np.log(80.0), beta=0.38, e=np.log(0.07),
             alpha_e=-0.15)
SIZES = np.array([1.2e8, 3.5e8, 7.7e8, 1.5e9])
DF = 200.0 * 2.0 ** np.arange(14)


def _grid():
    x, df = np.meshgrid(SIZES, DF, indexing="ij")
    return {"x": x.ravel(), "df": df.ravel()}


def _loss(law, params, inputs):
    theta = np.array([params[n] for n in law.names])
    return np.exp(law.log_loss(theta, {k: np.log(v) for k, v in inputs.items()}))


@pytest.mark.parametrize("noise, tol", [(1e-6, dict(exponent=2e-3, log=2e-2)),
                                        (3e-3, dict(exponent=0.015, log=0.2))])
def test_planted_parameters_are_recovered_and_certified(noise, tol):
    inputs = _grid()
    clean = _loss(LAW, TRUTH, inputs)
    y = clean + noise * np.random.default_rng(0).standard_normal(clean.size)
    res = fitting.fit(LAW, inputs, y, RAW)
    assert res.certified, res.reason
    for k, v in TRUTH.items():
        # The coefficients trade off against their exponents (e against alpha_e, a against
        # alpha, by log X ~ 20); their tolerance is relative to that.
        t = tol["log"] if k in ("a", "e", "dl") else tol["exponent"]
        assert abs(res.params[k] - v) < t, (k, res.params[k], v)
    # Predictions are good to the noise at every point, the pre-power phase included.
    assert np.max(np.abs(res.predict(inputs) - clean)) < 5 * noise + 1e-6


def test_at_one_model_size_it_is_the_rectified_law():
    rng = np.random.default_rng(1)
    df = np.log(DF)
    rectified = laws.get("rectified")
    for _ in range(20):
        p = dict(a=rng.uniform(0, 12), alpha=rng.uniform(-0.2, 1), dl=rng.uniform(-2, 10),
                 beta=rng.uniform(0.05, 1), e=rng.uniform(-10, 2), alpha_e=rng.uniform(-.5, .5))
        x = np.log(rng.uniform(1e7, 1e11))
        joint = LAW.log_loss(np.array([p[n] for n in LAW.names]), {"x": np.full(df.size, x),
                                                                  "df": df})
        per_model = rectified.log_loss(
            np.array([p["a"] - p["alpha"] * x, p["dl"], p["beta"], p["e"] - p["alpha_e"] * x]),
            {"df": df})
        assert np.allclose(joint, per_model, rtol=0, atol=1e-12)


def test_a_rectified_fit_of_one_size_recovers_its_coefficient_and_floor():
    x = SIZES[2]
    y = _loss(LAW, TRUTH, {"x": np.full(DF.size, x), "df": DF})
    res = fitting.fit("rectified", {"df": DF}, y, RAW)
    assert res.certified, res.reason
    expect = dict(b=TRUTH["a"] - TRUTH["alpha"] * np.log(x), dl=TRUTH["dl"], beta=TRUTH["beta"],
                  e=TRUTH["e"] - TRUTH["alpha_e"] * np.log(x))
    for k, v in expect.items():
        assert res.params[k] == pytest.approx(v, abs=2e-3), k


def test_without_pre_learned_data_and_size_dependent_floor_it_is_the_multiplicative_law():
    inputs = {k: np.log(v) for k, v in _grid().items()}
    p = dict(TRUTH, dl=-np.inf, alpha_e=0.0)
    joint = LAW.log_loss(np.array([p[n] for n in LAW.names]), inputs)
    mult = laws.get("multiplicative")
    assert np.allclose(joint, mult.log_loss(np.array([p[n] for n in mult.names]), inputs),
                       rtol=0, atol=1e-12)


# --- real curves (Lin et al. 2024's released measurements) ---------------------------------

HELD = 2  # the largest finetuning sizes are held out


def _families(name):
    """Curves of each family with at least 3 distinct sizes (sizes within 2% are one)."""
    with open(DATA / f"{name}.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    cols = [j for j, h in enumerate(header) if h.isdigit() and int(h) > 0]
    df = np.array([float(header[j]) for j in cols])
    fams = {}
    for r in rows:
        fams.setdefault(r[-1], []).append((float(r[-2]), np.array([float(r[j]) for j in cols])))
    out = {}
    for fam, curves in fams.items():
        logs = np.sort(np.log([s for s, _ in curves]))
        if 1 + np.sum(np.diff(logs) > np.log(1.02)) >= 3:
            out[fam] = (np.repeat([s for s, _ in curves], df.size), np.tile(df, len(curves)),
                        np.concatenate([c for _, c in curves]), len(curves))
    return out


@pytest.fixture(scope="module")
def real_fits():
    if not DATA.is_dir():
        pytest.skip(f"real finetuning-scaling data not found at {DATA}")
    out = []
    for name in ("flan", "gigaword"):
        for fam, (x, df, y, models) in _families(name).items():
            held = df >= np.unique(df)[-HELD]
            small = df <= np.unique(df)[2]
            row = {"data": name, "family": fam, "models": models}
            for law in ("multiplicative", "joint_rectified"):
                res = fitting.fit(law, {"x": x[~held], "df": df[~held]}, y[~held],
                                  procedures.PAPER)
                row[law] = res
                row[law + "_heldout"] = np.abs(res.predict({"x": x[held], "df": df[held]})
                                               - y[held])
                row[law + "_small"] = heldout.errors(
                    res.predict({"x": x[small], "df": df[small]}), y[small])["delta"]
            out.append(row)
    return out


def test_real_fits_end_at_a_minimum_or_on_a_bound_they_name(real_fits):
    assert len({r["data"] for r in real_fits}) == 2 and len(real_fits) >= 8
    for row in real_fits:
        res = row["joint_rectified"]
        assert np.all(res.theta >= res.law.lower) and np.all(res.theta <= res.law.upper)
        assert res.certified or res.reason.startswith("parameter(s) at bounds"), \
            (row["data"], row["family"], res.reason)
        assert not any(f"{k} at" in (res.reason or "") for k in ("alpha", "beta")), res.reason
    assert np.mean([r["joint_rectified"].certified for r in real_fits]) >= 0.75


def test_real_heldout_error_is_finite_and_below_the_multiplicative_laws(real_fits):
    for name in ("flan", "gigaword"):
        rows = [r for r in real_fits if r["data"] == name]
        ours = np.concatenate([r["joint_rectified_heldout"] for r in rows])
        mult = np.concatenate([r["multiplicative_heldout"] for r in rows])
        assert ours.size == mult.size == HELD * sum(r["models"] for r in rows)
        assert np.all(np.isfinite(ours)) and math.isfinite(ours.mean())
        assert ours.mean() < mult.mean(), (name, ours.mean(), mult.mean())
        better = [r["joint_rectified_heldout"].mean() <= r["multiplicative_heldout"].mean()
                  for r in rows]
        assert np.mean(better) > 0.5, (name, better)


def test_real_small_data_phase_is_fitted_better_than_by_the_multiplicative_law(real_fits):
    ours = np.array([r["joint_rectified_small"] for r in real_fits])
    mult = np.array([r["multiplicative_small"] for r in real_fits])
    assert np.mean(ours < mult) > 0.5 and ours.mean() < mult.mean(), (ours, mult)
