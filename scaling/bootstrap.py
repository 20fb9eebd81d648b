"""Bootstrap intervals: resample whole configurations (and their seeds), refit each draw.

A draw picks configurations (all factor values of a run, finetuning size included) with
replacement, then, within each picked configuration, its seed replicates with replacement; it
becomes integer weights on the original rows. Every draw is refitted with the same global search
and certified; intervals use the certified draws and say how many those were. Draws are
vectorised (all weightings share the points), so 1,000 refits cost a few seconds, and are
reproducible from one seed. The draws' predicted losses give intervals of predictions
(`prediction_band`) and, through `predictor`, of critical sizes (`critical.draws_curve`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from scaling import fitting, laws as laws_lib, procedures
from scaling import table as table_lib
from scaling.table import FINETUNE_EXAMPLES, MODEL_PARAMS, PET_SIZE, PRETRAIN_TOKENS, Table

Progress = Callable[[int, int], None]


def cluster_weights(config_ids: np.ndarray, n_draws: int, rng: np.random.Generator
                    ) -> np.ndarray:
    """Integer weights [n_draws, N]: configurations resampled, then seeds within each."""
    config_ids = np.asarray(config_ids)
    configs = np.unique(config_ids)
    J = configs.size
    picks = rng.multinomial(J, np.full(J, 1.0 / J), size=n_draws)      # [B, J]
    W = np.zeros((n_draws, config_ids.size))
    for j, c in enumerate(configs):
        rows = np.flatnonzero(config_ids == c)
        s = rows.size
        if s == 1:
            W[:, rows[0]] = picks[:, j]
        else:
            W[:, rows] = rng.multinomial(picks[:, j] * s, np.full(s, 1.0 / s))
    return W


def table_weights(tab: Table, n_draws: int, seed: int) -> np.ndarray:
    """Cluster-bootstrap weights for a tidy table (configuration = all factors but the seed)."""
    ids = table_lib.configuration_ids([tab[MODEL_PARAMS], tab[PRETRAIN_TOKENS], tab[PET_SIZE],
                             tab[FINETUNE_EXAMPLES]])
    return cluster_weights(ids, n_draws, np.random.default_rng(seed))


def print_progress(done: int, total: int, _start=[None]) -> None:  # noqa: B006
    """A one-line progress display on stderr."""
    if _start[0] is None or done == 0:
        _start[0] = time.time()
    elapsed = time.time() - _start[0]
    left = f", ~{elapsed / done * (total - done):.0f}s left" if done else ""
    end = "\n" if done >= total else ""
    print(f"\r  bootstrap {done}/{total} draws, {elapsed:.1f}s elapsed{left}",
          end=end, file=sys.stderr, flush=True)
    if done >= total:
        _start[0] = None


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite samples (NaN if there are none)."""
    s = np.asarray(samples, float)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return (float("nan"), float("nan"))
    q = (1.0 - level) / 2.0
    lo, hi = np.quantile(s, [q, 1.0 - q])
    return float(lo), float(hi)


@dataclasses.dataclass
class Draws:
    """Bootstrap draws of named quantities; intervals over the certified draws."""

    values: dict[str, np.ndarray]      # name -> [B]
    certified: np.ndarray              # [B] bool
    seed: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.certified.size)

    def interval(self, name: str, level: float = 0.95) -> tuple[float, float]:
        return interval(self.values[name][self.certified], level)

    def summary(self, level: float = 0.95) -> dict[str, Any]:
        return {"draws": self.n, "certified_draws": int(self.certified.sum()), "seed": self.seed,
                "level": level,
                "intervals": {k: list(self.interval(k, level)) for k in self.values}}


def bootstrap_fit(law: laws_lib.Law | str, inputs: Mapping[str, Any], loss: Any,
                  config: fitting.FitConfig | None = None, *, n_draws: int = 1000,
                  seed: int = 0, configurations: np.ndarray | None = None,
                  chunk: int = 250, progress: Progress | None = None) -> Draws:
    """Bootstrap of a single-law fit on arrays. `configurations` groups replicate points
    (default: points with equal inputs are one configuration)."""
    law = laws_lib.get(law) if isinstance(law, str) else law
    config = config or procedures.PAPER
    data = fitting.prepare(law, inputs, loss)
    if configurations is None:
        configurations = table_lib.configuration_ids([np.asarray(inputs[k], float)
                                                      for k in law.inputs])
    W = cluster_weights(configurations, n_draws, np.random.default_rng(seed))
    thetas, ok = [], []
    if progress:
        progress(0, n_draws)
    for b0 in range(0, n_draws, chunk):
        batch = fitting.fit_batch(law, data, W[b0:b0 + chunk], config)
        thetas.append(batch.theta)
        ok.append(batch.certified)
        if progress:
            progress(min(n_draws, b0 + chunk), n_draws)
    theta = np.concatenate(thetas)
    values = {name: theta[:, i] for i, name in enumerate(law.names)}
    values.update({k: v for k, v in laws_lib.natural(values).items() if k not in values})
    return Draws(values=values, certified=np.concatenate(ok), seed=seed,
                 extra={"theta": theta, "law": law})


def bootstrap_procedure(plan: procedures.Plan, config: fitting.FitConfig = procedures.PAPER,
                        *, n_draws: int = 1000, seed: int = 0, chunk: int = 250,
                        progress: Progress | None = None) -> Draws:
    """Bootstrap of the paper's two-stage procedure on one task and method.

    Values: the Table 4 parameters (natural units), and per factor 'delta_e[factor]' and
    'delta_h[factor]'. `extra` keeps per-factor parameter draws for predictions and critical
    sizes ('theta[factor]', 'shared', 'laws').
    """
    W = table_weights(plan.table, n_draws, seed)
    parts = []
    if progress:
        progress(0, n_draws)
    for b0 in range(0, n_draws, chunk):
        parts.append(procedures.run_batch(plan, W[b0:b0 + chunk], config))
        if progress:
            progress(min(n_draws, b0 + chunk), n_draws)
    certified = np.concatenate([p.certified for p in parts])
    values: dict[str, np.ndarray] = {}
    shared = {k: np.concatenate([p.shared[k] for p in parts]) for k in plan.law.shared}
    extra: dict[str, Any] = {"shared": shared, "laws": parts[0].laws}
    for f in plan.factors:
        theta = np.concatenate([p.factors[f].theta for p in parts])
        extra[f"theta[{f}]"] = theta
        names = parts[0].laws[f].names
        nat = laws_lib.natural({n: theta[:, i] for i, n in enumerate(names)})
        for n, v in nat.items():
            values[f"{n}_{procedures.SHORT[f]}"] = np.asarray(v)
        values[f"delta_e[{f}]"] = np.concatenate([p.fit_delta[f] for p in parts])
        values[f"delta_h[{f}]"] = np.concatenate([p.heldout_delta[f] for p in parts])
    values.update({k: np.asarray(v) for k, v in laws_lib.natural(shared).items()})
    return Draws(values=values, certified=certified, seed=seed, extra=extra)


def predictions(draws: Draws, factor: str, x: np.ndarray, df: np.ndarray,
                rows: np.ndarray | None = None) -> np.ndarray:
    """Predicted losses [B, N] of every draw (or of draws `rows`) of a procedure bootstrap at
    (x, df) [N]; x and df may also be [B, N], one row of points per draw."""
    theta = draws.extra[f"theta[{factor}]"]
    shared = draws.extra["shared"]
    if rows is not None:
        theta = theta[rows]
        shared = {k: v[rows] for k, v in shared.items()}
    law = draws.extra["laws"][factor]
    law = dataclasses.replace(law, fixed={**law.fixed, **{k: v[:, None]
                                                          for k, v in shared.items()}})
    logs = {"x": np.log(np.asarray(x, float)), "df": np.log(np.asarray(df, float))}
    return np.exp(law.log_loss(theta, logs))


def prediction_band(draws: Draws, factor: str, x: np.ndarray, df: np.ndarray,
                    level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval [N] of the predicted loss at (x, df) [N] over the certified draws."""
    pred = predictions(draws, factor, x, df, rows=np.flatnonzero(draws.certified))
    q = (1.0 - level) / 2.0
    if pred.shape[0] == 0:
        nan = np.full(np.shape(pred)[1:], np.nan)
        return nan, nan.copy()
    lo, hi = np.nanquantile(pred, [q, 1.0 - q], axis=0)
    return lo, hi


def predictor(draws: Draws, factor: str) -> Callable[[np.ndarray, float, np.ndarray],
                                                       np.ndarray]:
    """predict(rows, x, df) -> losses [len(rows), N] of draws `rows` at one X and Df [N] or
    [len(rows), N] (the form `critical.draws_curve` takes)."""
    def predict(rows, x, df):
        df = np.asarray(df, float)
        return predictions(draws, factor, np.full(df.shape, float(x)), df, rows=rows)
    return predict
