"""Figures draw what they claim: a shaded interval around every fitted curve when given one."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from scaling import planted, plots, procedures, records


@pytest.fixture(scope="module")
def fmt_fit():
    tab = records.select(planted.paper_table("en-de", ["fmt"], noise=0.004, rng=1),
                         method="fmt")
    plan = procedures.plan(tab, "multiplicative")
    return plan, procedures.run(plan)


def _figure(monkeypatch):
    saved = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.append(fig) or path)
    return saved


def test_factor_fits_shade_a_band_around_each_fitted_curve(fmt_fit, monkeypatch):
    plan, result = fmt_fit
    saved = _figure(monkeypatch)
    calls = []

    def band(factor, x, df):
        calls.append((factor, x[0], df.min(), df.max()))
        pred = result.factors[factor].fit.predict({"x": x, "df": df})
        return 0.99 * pred, 1.01 * pred

    plots.factor_fits(result, plan, "unused.png", band)
    plots.factor_fits(result, plan, "unused.png")
    with_band, without = saved
    df = plan.table["finetune_examples"]
    for ax, f in zip(with_band.axes, result.factors):
        col = procedures.FACTORS[f]
        rows = np.concatenate([plan.fit_rows[f], plan.held_rows[f]])
        xs = np.unique(plan.table[col][rows])
        mine = [c for c in calls if c[0] == f]
        assert sorted(c[1] for c in mine) == sorted(xs)  # one band per curve
        assert all(c[2] == df[rows].min() and c[3] == df[rows].max() for c in mine)
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == xs.size
    assert not any(isinstance(c, PolyCollection) for ax in without.axes for c in ax.collections)
    plt.close(with_band)
    plt.close(without)
