"""Fitting presets and the paper's two-stage procedure.

Presets:
- PAPER: Huber delta 1e-3 on raw-loss residuals, L-BFGS, best of a grid of starts (here a
  variable-projection grid), A/B/E in log space.
- CHINCHILLA: Hoffmann et al.'s recipe: Huber delta 1e-3 on log-loss residuals, starts
  alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}.

The paper's procedure on one task and method: beta and E (the law's `shared` parameters) are
first fitted jointly on the model-size and pretraining-data sweeps, each with its own A and
alpha; then they are held fixed while A and alpha are refitted per factor, PET size included.
Runs at held-out values are left out of both stages.

Sweeps: the anchor is the (model, pretraining tokens, PET size) setting all sweeps share; by
default the most frequent one, or given explicitly (`anchor=`, the CLI's --anchor) when that
guess is wrong, e.g. when one sweep has more seeds. The model-size sweep holds the anchor's PET
size and each model's fully pretrained checkpoint; the pretraining-data sweep holds the anchor's
model and PET size; the PET-size sweep holds the anchor's model and pretraining tokens.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from scaling import fitting, heldout, laws as laws_lib
from scaling.table import (FINETUNE_EXAMPLES, MODEL, MODEL_PARAMS, PET_SIZE, PRETRAIN_TOKENS,
                           Table, configuration_ids, describe_rows, row_labels)

PAPER = fitting.FitConfig(name="paper", delta=1e-3, residual="raw", grid_points=2000, top_k=4)
CHINCHILLA = fitting.FitConfig(
    name="chinchilla", delta=1e-3, residual="log", grid_points=2000, top_k=6,
    start_grid={"alpha": (0.0, 0.5, 1.0, 1.5, 2.0), "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
                "e": (-1.0, -0.5, 0.0, 0.5, 1.0), "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
                "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)})
PRESETS = {"paper": PAPER, "chinchilla": CHINCHILLA}

FACTORS = {"model_size": MODEL_PARAMS, "pretrain_data": PRETRAIN_TOKENS, "pet_size": PET_SIZE}
SHORT = {"model_size": "m", "pretrain_data": "p", "pet_size": "t"}
JOINT = ("model_size", "pretrain_data")


def preset(name: str, residual: str | None = None, **overrides: Any) -> fitting.FitConfig:
    """A preset by name, optionally with another residual ('raw'/'log') or other settings."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}") from None
    if residual is not None:
        overrides["residual"] = residual
    return dataclasses.replace(cfg, **overrides)


def _same(a: np.ndarray, b: float) -> np.ndarray:
    return (np.isnan(a) & np.isnan(b)) | (a == b)


ANCHOR_COLUMNS = (MODEL_PARAMS, PRETRAIN_TOKENS, PET_SIZE)


def sweeps(tab: Table, anchor: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """Row indices of each factor's sweep (factors with at least two values only).

    `anchor` gives the shared setting by column (model_params, pretrain_tokens, pet_size;
    values matched like held-out values); columns it leaves out are inferred. Models are told
    apart by their id (the `model` column) where the table has one, else by size; a table
    without pretraining tokens counts every model as fully pretrained.
    """
    if len(tab) == 0:
        return {}
    m, p, t = tab[MODEL_PARAMS], tab[PRETRAIN_TOKENS], tab[PET_SIZE]
    ids = tab[MODEL] if MODEL in tab else m
    pk, tk = np.where(np.isnan(p), -1.0, p), np.where(np.isnan(t), -1.0, t)
    keys = [(ids[i], pk[i], tk[i]) for i in range(len(tab))]
    am, ap, at = Counter(keys).most_common(1)[0][0]
    for col, value in (anchor or {}).items():
        if col not in ANCHOR_COLUMNS:
            raise ValueError(f"anchor column {col!r} is not one of {list(ANCHOR_COLUMNS)}")
        (v,) = heldout.resolve(tab[col], [value], col, what="anchor")
        if col == MODEL_PARAMS:
            am = Counter(k for k, size in zip(keys, m) if size == v).most_common(1)[0][0][0]
        elif col == PRETRAIN_TOKENS:
            ap = v
        else:
            at = v
    ap, at = (np.nan if v == -1.0 else v for v in (ap, at))
    full = np.zeros(len(tab), bool)
    for model in dict.fromkeys(ids.tolist()):
        rows = ids == model
        top = np.nanmax(p[rows]) if np.any(np.isfinite(p[rows])) else np.nan
        full[rows] = np.isnan(top) | (p[rows] == top)
    masks = {"model_size": _same(t, at) & full,
             "pretrain_data": _same(t, at) & (ids == am),
             "pet_size": (ids == am) & _same(p, ap) & np.isfinite(t)}
    out = {}
    for factor, mask in masks.items():
        col = tab[FACTORS[factor]][mask]
        if np.unique(col[np.isfinite(col)]).size >= 2:
            out[factor] = np.flatnonzero(mask)
    return out


@dataclasses.dataclass
class Plan:
    """What the procedure fits for one task and method: rows, splits, laws."""

    table: Table
    target: str
    law: laws_lib.Law
    factors: list[str]
    fit_rows: dict[str, np.ndarray]
    held_rows: dict[str, np.ndarray]
    joint: list[str]
    heldout: dict[str, list]
    left_out: str | None = None  # rows of the table left out, and why


def _undefined_at_zero(tab: Table, law: laws_lib.Law) -> tuple[Table, str | None]:
    """`tab` without its Df = 0 rows (the base model's loss) when `law` is infinite there,
    and a note saying how many were left out."""
    zero = tab[FINETUNE_EXAMPLES] == 0
    if not zero.any() or fitting.accepts_zero(law, "df"):
        return tab, None
    return tab.where(~zero), (f"{int(zero.sum())} point(s) at Df = 0 left out: law "
                              f"{law.name!r} is infinite there")


def plan(tab: Table, law: laws_lib.Law | str = "multiplicative", *, target: str = "test_loss",
         heldout_spec: heldout.Spec | None = None, factors: Sequence[str] | None = None,
         anchor: Mapping[str, float] | None = None) -> Plan:
    """Splits one task/method table into the procedure's fit and held-out rows.

    `heldout_spec` None holds out the paper's starred values (`heldout.paper`); `anchor`
    overrides the inferred shared setting of the sweeps (see `sweeps`).
    """
    law = laws_lib.get(law) if isinstance(law, str) else law
    if tuple(law.inputs) != ("x", "df"):
        raise ValueError(f"the two-stage procedure needs a law of (x, df); {law.name!r} has "
                         f"inputs {law.inputs}")
    for col in ("task", "method"):
        vals = set(tab[col])
        if len(vals) > 1:
            raise ValueError(f"plan() takes one {col} at a time; the table has {sorted(vals)}")
    y = tab[target]
    bad = np.flatnonzero(~np.isfinite(y))
    if bad.size:
        raise ValueError(f"target {target!r} is NaN or infinite for {describe_rows(tab, bad)}")
    tab, left_out = _undefined_at_zero(tab, law)
    sw = sweeps(tab, anchor)
    if factors is not None:
        unknown = set(factors) - set(FACTORS)
        if unknown:
            raise ValueError(f"unknown factor(s) {sorted(unknown)}; factors: {list(FACTORS)}")
        missing = [f for f in factors if f not in sw]
        if missing:
            raise ValueError(f"factor(s) {missing} have fewer than two values in the data of "
                             f"{tab['task'][0]}/{tab['method'][0]}")
        sw = {f: sw[f] for f in factors}
    if not sw:
        raise ValueError(f"no factor has two or more values for {tab['task'][0]}/"
                         f"{tab['method'][0]}: nothing to fit a joint law to")
    spec = heldout.paper(str(tab["task"][0])) if heldout_spec is None else dict(heldout_spec)
    fit_rows, held_rows, resolved = {}, {}, {}
    for f, rows in sw.items():
        # Only the swept factor and Df are held out per sweep: a starred value of a factor
        # that is not swept here (the paper's 209B tokens in a model-size study) is no error.
        columns = (FACTORS[f], FINETUNE_EXAMPLES)
        sub = tab.where(rows)
        try:
            held = heldout.mask(sub, spec, columns=columns)
            resolved.update({c: heldout.resolve(sub[c], spec[c], c) for c in columns
                             if c in spec and c not in resolved})
        except ValueError as e:
            if heldout_spec is not None:
                raise
            raise ValueError(f"{e}; the default held-out split is the paper's starred values "
                             "(Table 1b): for another grid use the 'largest' split (CLI "
                             "--heldout=largest) or name values (--heldout=column=value,...)"
                             ) from None
        fit_rows[f], held_rows[f] = rows[~held], rows[held]
    joint = [f for f in JOINT if f in sw] or list(sw)
    return Plan(table=tab, target=target, law=law, factors=list(sw), fit_rows=fit_rows,
                held_rows=held_rows, joint=joint, heldout=resolved, left_out=left_out)


def _inputs(p: Plan, factor: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": p.table[FACTORS[factor]][rows], "df": p.table[FINETUNE_EXAMPLES][rows]}


def stage_one(p: Plan) -> tuple[laws_lib.Law, fitting.Data, np.ndarray]:
    """The tied law, its data and the table rows of its points."""
    law = laws_lib.tie(p.law, p.joint, p.law.shared)
    rows = np.concatenate([p.fit_rows[f] for f in p.joint])
    group = np.concatenate([np.full(p.fit_rows[f].size, i) for i, f in enumerate(p.joint)])
    xs = np.concatenate([_inputs(p, f, p.fit_rows[f])["x"] for f in p.joint])
    data = fitting.prepare(law, {"x": xs, "df": p.table[FINETUNE_EXAMPLES][rows],
                                 "group": group}, p.table[p.target][rows],
                           labels=row_labels(p.table, rows))
    return law, data, rows


@dataclasses.dataclass
class FactorFit:
    """Stage-two fit of one factor and its errors on fitted and held-out points."""

    factor: str
    fit: fitting.FitResult
    fit_errors: dict[str, float]
    heldout_errors: dict[str, float]


@dataclasses.dataclass
class ProcedureResult:
    """The paper's procedure on one task and method."""

    task: str
    method: str
    law: str
    target: str
    config: fitting.FitConfig
    heldout: dict[str, list]
    joint: fitting.FitResult
    factors: dict[str, FactorFit]

    @property
    def certified(self) -> bool:
        return self.joint.certified and all(f.fit.certified for f in self.factors.values())

    def parameters(self) -> dict[str, float]:
        """Table 4 layout: A_m, alpha_m, A_p, alpha_p, A_t, alpha_t, ..., E, beta."""
        return {name: v for name, v, _ in self._parameters()}

    def certified_parameters(self) -> dict[str, bool]:
        """Per parameter of `parameters()`: whether the fits it comes from are certified (a
        factor's A and alpha rest on the joint fit's shared parameters too)."""
        return {name: ok for name, _, ok in self._parameters()}

    def _parameters(self) -> list[tuple[str, float, bool]]:
        out = []
        for factor in FACTORS:
            if factor not in self.factors:
                continue
            fit = self.factors[factor].fit
            ok = fit.certified and self.joint.certified
            for name, v in laws_lib.natural(fit.params).items():
                if name not in fit.law.fixed and name.lower() not in fit.law.fixed:
                    out.append((f"{name}_{SHORT[factor]}", v, ok))
        shared = laws_lib.natural({k: v for k, v in self.joint.params.items()
                                   if k in self.joint.law.shared})
        out += [(name, v, self.joint.certified) for name, v in shared.items()]
        return out

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "method": self.method, "law": self.law,
                "target": self.target, "heldout": self.heldout,
                "certified": self.certified, "parameters": self.parameters(),
                "joint": self.joint.to_json(),
                "factors": {f: {"fit": ff.fit.to_json(), "fit_errors": ff.fit_errors,
                                "heldout_errors": ff.heldout_errors}
                            for f, ff in self.factors.items()}}


def run(p: Plan, config: fitting.FitConfig = PAPER) -> ProcedureResult:
    """Runs both stages once, certified, with errors on fitted and held-out rows."""
    law1, data1, _ = stage_one(p)
    joint = fitting.fit_data(law1, data1, config)
    shared = {k: joint.params[k] for k in p.law.shared}
    results = {}
    for f in p.factors:
        law2 = p.law.with_fixed(**shared)
        rows = p.fit_rows[f]
        data2 = fitting.prepare(law2, _inputs(p, f, rows), p.table[p.target][rows],
                                labels=row_labels(p.table, rows))
        res = fitting.fit_data(law2, data2, config)
        held = p.held_rows[f]
        results[f] = FactorFit(
            factor=f, fit=res,
            fit_errors=heldout.errors(res.predict(_inputs(p, f, rows)), p.table[p.target][rows]),
            heldout_errors=heldout.errors(res.predict(_inputs(p, f, held)),
                                          p.table[p.target][held]))
    return ProcedureResult(task=str(p.table["task"][0]), method=str(p.table["method"][0]),
                           law=p.law.name, target=p.target, config=config, heldout=p.heldout,
                           joint=joint, factors=results)


@dataclasses.dataclass
class BatchResult:
    """Both stages for B weightings of the table rows (bootstrap draws)."""

    joint: fitting.Batch
    factors: dict[str, fitting.Batch]
    laws: dict[str, laws_lib.Law]             # stage-two law per factor (shared params fixed)
    shared: dict[str, np.ndarray]             # [B] per shared parameter
    heldout_delta: dict[str, np.ndarray]      # [B] weighted mean absolute deviation
    fit_delta: dict[str, np.ndarray]

    @property
    def certified(self) -> np.ndarray:
        ok = self.joint.certified.copy()
        for b in self.factors.values():
            ok &= b.certified
        return ok


def run_batch(p: Plan, weights: np.ndarray, config: fitting.FitConfig = PAPER) -> BatchResult:
    """Both stages for each row of weights [B, len(table)], vectorised across rows."""
    weights = np.atleast_2d(weights)
    law1, data1, rows1 = stage_one(p)
    joint = fitting.fit_batch(law1, data1, weights[:, rows1], config)
    names = list(law1.names)
    shared = {k: joint.theta[:, names.index(k)] for k in p.law.shared}
    law2 = p.law.with_fixed(**{k: 0.0 for k in p.law.shared})
    law2 = dataclasses.replace(law2, fixed={k: v for k, v in law2.fixed.items()
                                            if k not in p.law.shared})
    factors, laws, hd, fd = {}, {}, {}, {}
    y = p.table[p.target]
    for f in p.factors:
        rows = p.fit_rows[f]
        data2 = fitting.prepare(law2, _inputs(p, f, rows), y[rows], check_identifiable=False)
        res = fitting.fit_batch(law2, data2, weights[:, rows], config, fixed_rows=shared)
        factors[f], laws[f] = res, law2
        for rr, store in ((p.held_rows[f], hd), (rows, fd)):
            inp = {k: np.log(v) for k, v in _inputs(p, f, rr).items()}
            lw = dataclasses.replace(law2, fixed={k: v[:, None] for k, v in shared.items()})
            pred = np.exp(lw.log_loss(res.theta, inp)) if rr.size else np.zeros((len(res.theta), 0))
            w = weights[:, rr]
            with np.errstate(invalid="ignore", divide="ignore"):
                store[f] = np.sum(w * np.abs(pred - y[rr]), axis=1) / np.sum(w, axis=1)
    return BatchResult(joint=joint, factors=factors, laws=laws, shared=shared,
                       heldout_delta=hd, fit_delta=fd)


def curves(tab: Table) -> list[np.ndarray]:
    """Row indices of each curve: the runs of one model (by id where the table has a `model`
    column, so equal-size models stay apart), pretraining tokens and PET size."""
    key = [tab[MODEL]] if MODEL in tab else []
    ids = configuration_ids(key + [tab[MODEL_PARAMS], tab[PRETRAIN_TOKENS], tab[PET_SIZE]])
    return [np.flatnonzero(ids == c) for c in range(ids.max() + 1 if ids.size else 0)]


def curve_name(tab: Table) -> str:
    """A curve's name in messages and titles: its model id, else its size and tokens."""
    if MODEL in tab:
        return str(tab[MODEL][0])
    parts = [f"{tab[MODEL_PARAMS][0]:.4g} params"]
    for col, unit in ((PRETRAIN_TOKENS, "tokens"), (PET_SIZE, "PET size")):
        if np.isfinite(tab[col][0]):
            parts.append(f"{tab[col][0]:.4g} {unit}")
    return ", ".join(parts)


def fit_curve(tab: Table, law: laws_lib.Law | str = "single", *, target: str = "test_loss",
              config: fitting.FitConfig = PAPER,
              heldout_spec: heldout.Spec | None = None) -> dict[str, Any]:
    """Fits a law of Df alone to one curve's rows, holding out its largest Df (or the
    finetune_examples values of `heldout_spec`; its other columns do not apply to a curve).

    Df = 0 rows (the base model) take part when the law is finite there (rectified).
    Errors name the curve.
    """
    law = laws_lib.get(law) if isinstance(law, str) else law
    if tuple(law.inputs) != ("df",):
        raise ValueError(f"a per-curve fit needs a law of df alone; {law.name!r} has inputs "
                         f"{law.inputs}")
    name = curve_name(tab)
    spec = {FINETUNE_EXAMPLES: ["max"]} if heldout_spec is None else \
        {k: v for k, v in heldout_spec.items() if k == FINETUNE_EXAMPLES}
    tab, left_out = _undefined_at_zero(tab, law)
    try:
        held = heldout.mask(tab, spec)
        fitted = tab.where(~held)
        data = fitting.prepare(law, {"df": fitted[FINETUNE_EXAMPLES]}, fitted[target],
                               labels=row_labels(fitted, np.arange(len(fitted))))
    except ValueError as e:
        raise ValueError(f"curve {name}: {e}") from None
    res = fitting.fit_data(law, data, config)
    out = {"model_params": tab[MODEL_PARAMS][0], "pretrain_tokens": tab[PRETRAIN_TOKENS][0],
           "pet_size": tab[PET_SIZE][0], "name": name, "left_out": left_out,
           "df": tab[FINETUNE_EXAMPLES], "loss": tab[target], "held": held, "fit": res,
           "fit_errors": heldout.errors(res.predict({"df": fitted[FINETUNE_EXAMPLES]}),
                                        fitted[target]),
           "heldout_errors": heldout.errors(res.predict({"df": tab[FINETUNE_EXAMPLES][held]}),
                                            tab[target][held])}
    if MODEL in tab:
        out["model"] = str(tab[MODEL][0])
    return out


def fit_curves(tab: Table, law: laws_lib.Law | str = "single", *, target: str = "test_loss",
               config: fitting.FitConfig = PAPER,
               heldout_spec: heldout.Spec | None = None) -> list[dict[str, Any]]:
    """`fit_curve` on every curve of the table (see `curves`)."""
    return [fit_curve(tab.where(rows), law, target=target, config=config,
                      heldout_spec=heldout_spec) for rows in curves(tab)]


def fit_columns(tab: Table, law: laws_lib.Law | str, columns: Mapping[str, str], target: str,
                config: fitting.FitConfig = PAPER) -> fitting.FitResult:
    """Fits `law` with its inputs read from named columns, e.g. Chinchilla's
    fit_columns(t, 'additive', {'x': 'params', 'df': 'tokens'}, 'loss', CHINCHILLA)."""
    law = laws_lib.get(law) if isinstance(law, str) else law
    return fitting.fit(law, {k: tab[c] for k, c in columns.items()}, tab[target], config)
