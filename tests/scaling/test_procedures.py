"""The paper's procedure on planted Table 4 laws: recovery, intervals, held-out errors."""

import numpy as np
import pytest

from scaling import bootstrap, critical, heldout, laws, planted, procedures, records
from scaling.table import Table


@pytest.fixture(scope="module")
def prompt_fit():
    tab = records.select(planted.paper_table("en-de", ["prompt"], noise=0.005, rng=7),
                         method="prompt")
    plan = procedures.plan(tab, "multiplicative")
    result = procedures.run(plan)
    draws = bootstrap.bootstrap_procedure(plan, n_draws=200, seed=0)
    return plan, result, draws


def test_planted_exponents_and_floor_lie_in_their_bootstrap_intervals(prompt_fit):
    plan, result, draws = prompt_fit
    truth = planted.consistent("en-de", "prompt")
    assert result.certified
    assert draws.certified.mean() > 0.95
    for name in ("alpha_m", "alpha_p", "alpha_t", "beta", "E"):
        lo, hi = draws.interval(name, level=0.99)
        assert lo <= truth[name] <= hi, (name, lo, hi, truth[name])
        assert lo <= result.parameters()[name] <= hi


def test_table4_flags_an_estimate_outside_its_interval_and_only_then(prompt_fit):
    from scaling import report

    plan, result, draws = prompt_fit
    intervals = draws.summary(0.99)["intervals"]
    clean = report.table4({("en-de", "prompt"): result}, {("en-de", "prompt"): intervals})
    assert "†" not in clean and f"[{report.fmt(intervals['beta'][0])}," in clean
    beta = result.parameters()["beta"]
    moved = dict(intervals, beta=[beta * 1.5, beta * 2.0])
    flagged = report.table4({("en-de", "prompt"): result}, {("en-de", "prompt"): moved})
    beta_row = next(line for line in flagged.splitlines() if line.startswith("| beta"))
    assert beta_row.endswith("† |") and flagged.count("†") == 2  # The cell and the footnote.
    assert "outside its bootstrap interval" in flagged


def test_heldout_error_is_of_the_papers_order(prompt_fit):
    _, result, _ = prompt_fit
    for factor, ff in result.factors.items():
        # Table 6 reports 0.002-0.026 with noise of this size.
        assert 1e-3 < ff.heldout_errors["delta"] < 3e-2, factor
        assert ff.heldout_errors["n"] > 0
        assert ff.heldout_errors["rmse"] >= ff.heldout_errors["delta"]


def test_paper_split_holds_out_the_interior_pretraining_checkpoint(prompt_fit):
    plan, _, _ = prompt_fit
    tokens = plan.table["pretrain_tokens"]
    held = tokens[plan.held_rows["pretrain_data"]]
    fitted = tokens[plan.fit_rows["pretrain_data"]]
    assert 209e9 in held and 209e9 not in fitted
    assert fitted.max() > 209e9 > fitted.min()  # interior: points on both sides are fitted


def test_stage_two_keeps_the_shared_beta_and_e(prompt_fit):
    _, result, _ = prompt_fit
    for ff in result.factors.values():
        assert ff.fit.law.fixed["beta"] == result.joint.params["beta"]
        assert ff.fit.law.fixed["e"] == result.joint.params["e"]


def test_closed_form_gamma_from_rounded_table4():
    fmt, prompt, lora = (planted.TABLE4[("en-de", m)] for m in ("fmt", "prompt", "lora"))

    def m(p):
        return {"A": p["A_m"], "alpha": p["alpha_m"], "beta": p["beta"]}

    assert critical.closed_form(m(fmt), m(prompt))["gamma"] == pytest.approx(-1.21, abs=5e-3)
    # FMT vs LoRA: (0.36 - 0.52) / (0.15 - 0.081) = -2.32 from the rounded values.
    assert critical.closed_form(m(fmt), m(lora))["gamma"] == pytest.approx(-2.32, abs=5e-3)
    assert critical.closed_form(m(prompt), m(lora))["gamma"] == pytest.approx(1.33, abs=5e-3)


def _relative_width(draws, factor, x, df):
    lo, hi = bootstrap.prediction_band(draws, factor, np.atleast_1d(x), np.atleast_1d(df))
    return (hi - lo) / ((hi + lo) / 2)


def test_prediction_band_holds_the_fit_and_widens_beyond_the_data(prompt_fit):
    plan, result, draws = prompt_fit
    tab = plan.table
    for f, ff in result.factors.items():
        col = procedures.FACTORS[f]
        rows = plan.fit_rows[f]
        x, df = tab[col][rows], tab["finetune_examples"][rows]
        pred = ff.fit.predict({"x": x, "df": df})
        lo, hi = bootstrap.prediction_band(draws, f, x, df)
        assert np.all((lo <= pred) & (pred <= hi)), f
        assert np.all(hi > lo), f
        inside = _relative_width(draws, f, x, df).max()
        # Beyond the largest finetuning set, and (model size) beyond the largest model.
        assert _relative_width(draws, f, x.max(), 30 * df.max())[0] > inside, f
        if f == "model_size":
            assert _relative_width(draws, f, 16 * x.max(), df.max())[0] > inside


def _coverage(n_datasets, n_draws, level):
    law = laws.get("multiplicative")
    truth = dict(a=np.log(1.2e5), alpha=0.52, beta=0.15, e=np.log(0.75))
    x, df = (m.ravel() for m in np.meshgrid([1e9, 2e9, 4e9, 8e9, 16e9],
                                            np.r_[1e5, np.arange(5e5, 4.6e6, 5e5)],
                                            indexing="ij"))
    clean = np.exp(law.log_loss(np.array([truth[n] for n in law.names]),
                                {"x": np.log(x), "df": np.log(df)}))
    hits = {k: 0 for k in ("alpha", "beta", "E")}
    for i in range(n_datasets):
        y = clean + np.random.default_rng(100 + i).normal(0, 0.005, clean.size)
        d = bootstrap.bootstrap_fit(law, {"x": x, "df": df}, y, procedures.PAPER,
                                    n_draws=n_draws, seed=i)
        for k, v in (("alpha", truth["alpha"]), ("beta", truth["beta"]),
                     ("E", np.exp(truth["e"]))):
            lo, hi = d.interval(k, level)
            hits[k] += lo <= v <= hi
    return {k: h / n_datasets for k, h in hits.items()}


def test_intervals_cover_the_planted_values_about_nominally():
    rates = _coverage(n_datasets=12, n_draws=120, level=0.9)
    for k, rate in rates.items():
        assert rate >= 0.6, (k, rates)


@pytest.mark.slow
def test_interval_coverage_study():
    rates = _coverage(n_datasets=100, n_draws=400, level=0.9)
    for k, rate in rates.items():
        assert 0.8 <= rate <= 0.98, (k, rates)


def test_bootstrap_is_reproducible_from_its_seed(prompt_fit):
    plan, _, draws = prompt_fit
    again = bootstrap.bootstrap_procedure(plan, n_draws=20, seed=0)
    other = bootstrap.bootstrap_procedure(plan, n_draws=20, seed=1)
    assert np.allclose(again.values["beta"], draws.values["beta"][:20], rtol=1e-6)
    assert not np.allclose(other.values["beta"], again.values["beta"])


def test_chinchilla_preset_fits_any_two_columns_of_a_table():
    rng = np.random.default_rng(0)
    n = np.exp(rng.uniform(np.log(7e7), np.log(1.6e10), 120))
    d = n * np.exp(rng.uniform(np.log(5), np.log(100), 120))
    loss = 1.82 + 482 * n ** -0.35 + 2085 * d ** -0.37
    loss = loss * np.exp(rng.normal(0, 0.01, n.size))
    tab = Table({"params": n, "tokens": d, "loss": loss})
    res = procedures.fit_columns(tab, "additive", {"x": "params", "df": "tokens"}, "loss",
                                 procedures.CHINCHILLA)
    assert res.certified, res.reason
    assert abs(res.params["alpha"] - 0.35) < 0.1 and abs(res.params["beta"] - 0.37) < 0.1


def test_heldout_value_not_in_the_data_is_an_error():
    tab = records.select(planted.paper_table("en-de", ["fmt"], noise=0.0), method="fmt")
    with pytest.raises(ValueError, match="held-out value 2e\\+11 for 'pretrain_tokens' is not"):
        procedures.plan(tab, "multiplicative", heldout_spec={"pretrain_tokens": [200e9]})
    assert heldout.parse("pretrain_tokens=209e9,model_params=max") == {
        "pretrain_tokens": [209e9], "model_params": ["max"]}


def _fmt_table(**kw):
    return records.select(planted.paper_table("en-de", ["fmt"], noise=0.0, **kw), method="fmt")


def test_paper_split_needs_its_values_only_for_swept_factors_and_says_what_to_do():
    tab = _fmt_table()
    tokens = tab["pretrain_tokens"]
    without_209b = tab.where(~np.isclose(tokens, 209e9))
    with pytest.raises(ValueError, match="not in the data.*--heldout=largest"):
        procedures.plan(without_209b, "multiplicative")
    # A model-size study alone never needs the 209B checkpoint.
    only_models = tab.where(tokens == tokens.max())
    p = procedures.plan(only_models, "multiplicative")
    assert p.factors == ["model_size"] and "pretrain_tokens" not in p.heldout


def test_an_explicit_anchor_overrides_the_inferred_sweeps():
    tab = _fmt_table()
    # Extra seeds of the 2B model make it the most frequent setting: the inferred anchor then
    # has no pretraining-data sweep.
    extra = tab.where(tab["model_params"] == 2e9)
    extra = Table({k: extra[k] if k != "seed" else extra[k] + 1 for k in extra.names})
    skewed = tab.concat(extra)
    assert "pretrain_data" not in procedures.sweeps(skewed)
    fixed = procedures.sweeps(skewed, {"model_params": 1e9})
    assert set(fixed) == {"model_size", "pretrain_data"}
    assert np.all(skewed["model_params"][fixed["pretrain_data"]] == 1e9)
    with pytest.raises(ValueError, match="anchor 3e\\+09 for 'model_params' is not in the data"):
        procedures.sweeps(skewed, {"model_params": 3e9})


def test_per_curve_fits_fit_each_configuration_once():
    tab = _fmt_table()
    curves = procedures.fit_curves(tab, "single")
    settings = {(m, t) for m, t in zip(tab["model_params"], tab["pretrain_tokens"])}
    assert len(curves) == len(settings)
    assert all(c["held"].sum() == 1 for c in curves)  # the largest Df of each curve
