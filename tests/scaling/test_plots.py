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


def test_a_wide_band_does_not_flatten_the_data_and_labels_read_as_counts(fmt_fit, monkeypatch):
    plan, result = fmt_fit
    saved = _figure(monkeypatch)

    def huge_band(factor, x, df):  # an interval from few configurations: far wider than the data
        pred = result.factors[factor].fit.predict({"x": x, "df": df})
        return pred - 100.0, pred + 100.0

    plots.factor_fits(result, plan, "unused.png", huge_band)
    (fig,) = saved
    y = plan.table[plan.target]
    for ax, f in zip(fig.axes, result.factors):
        rows = np.concatenate([plan.fit_rows[f], plan.held_rows[f]])
        low, high = ax.get_ylim()
        assert low <= y[rows].min() and y[rows].max() <= high
        assert high - low < 2 * (y[rows].max() - y[rows].min()) + 1.0
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert all(label[-1] in "KMB" for label in labels), labels
    assert plots._label("model_size", 254_272) == "254K"
    assert plots._label("model_size", 1.2185e9) == "1.22B" and plots._label("pet_size", 16) == "16"
    plt.close(fig)
