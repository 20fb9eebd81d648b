"""The paper's headline findings, tested on a study's fits: each with its evidence and a verdict.

Each finding is a sign (or a bound) on a quantity the fits estimate; the evidence is the
quantity's estimate and its bootstrap interval, and the verdict is

  agrees        the interval lies wholly on the finding's side,
  contradicts   the interval lies wholly on the other side,
  inconclusive  the interval allows both (or there is no interval: no bootstrap, too few runs).

Differences of two parameters of one method use the same draws (paired); differences between
methods pair independent draws by index, as the critical-size bands do. Only certified draws
count, and fewer than MIN_DRAWS of them (or fewer than MIN_PAIRS matched pairs of runs)
conclude nothing. The findings (Zhang et al. 2024, reference/paper.md, section 6):

  (i)   alpha_m > alpha_p: model size helps more than pretraining data (tested as
        alpha_m - max(alpha_p, 0) > 0, so that a model size that does not help cannot agree);
  (ii)  |alpha_t| small against alpha_m: PET size matters little (tested as
        alpha_m / 4 - |alpha_t| > 0);
  (iii) beta_FMT > beta of each PET method: FMT gains most from finetuning data;
  (iv)  a PET method is best at the smallest finetuning-data size and FMT at the largest (the
        critical size lies inside the grid): measured on matched runs at the grid's ends, and
        predicted by the model-size fits for the anchor model;
  (v)   zero-shot transfer to a related task is better after PET than after FMT.

`comparisons` computes the evidence from fitted results and their bootstrap draws (scaling.fit
stores it in fit.json); `zero_shot` computes (v), and `measured_extremes` the measured part of
(iv), from the runs' table; `verdicts` and
`section` turn evidence into the report's lines.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from scaling import bootstrap, critical, table as table_lib
from scaling.report import fmt
from scaling.table import FINETUNE_EXAMPLES, MODEL_PARAMS, PET_SIZE, PRETRAIN_TOKENS, Table

AGREES, CONTRADICTS, INCONCLUSIVE = "agrees", "contradicts", "inconclusive"
LAW = "multiplicative"  # the paper states its findings on the multiplicative law's fits
FMT = "fmt"
ALPHA_T_SHARE = 0.25  # (ii): "small" = |alpha_t| at most this share of alpha_m
MODEL_OVER_DATA = "alpha_m - max(alpha_p, 0)"  # (i) > 0: alpha_m > 0 and alpha_m > alpha_p
MODEL_OVER_PET = "alpha_m / 4 - abs(alpha_t)"  # (ii) > 0: abs(alpha_t) < alpha_m / 4
MIN_DRAWS = 20  # fewer certified draws (or matched pairs, MIN_PAIRS) conclude nothing
MIN_PAIRS = 5


# --- evidence ----------------------------------------------------------------------------------


def _quantity(estimate: float, samples: np.ndarray | None, level: float) -> dict[str, Any]:
    """An estimate with the percentile interval of its bootstrap samples (finite ones)."""
    if samples is None:
        lo = hi = math.nan
        n = 0
    else:
        s = np.asarray(samples, float)
        n = int(np.isfinite(s).sum())
        lo, hi = bootstrap.interval(s, level)
    return {"estimate": float(estimate), "interval": [lo, hi], "draws": n}


def _mean_of_pairs(values: np.ndarray, rng: np.random.Generator, n_draws: int,
                   level: float) -> dict[str, Any]:
    """The mean of per-pair differences, with a bootstrap interval over the pairs."""
    samples = (values[rng.integers(0, values.size, (n_draws, values.size))].mean(axis=1)
               if values.size > 1 else None)
    return {**_quantity(values.mean(), samples, level), "pairs": int(values.size)}


def _paired_rows(d1: bootstrap.Draws, d2: bootstrap.Draws) -> np.ndarray:
    n = min(d1.n, d2.n)
    return np.flatnonzero(d1.certified[:n] & d2.certified[:n])


def comparisons(results: Mapping[tuple[str, str, str], Any],
                draws: Mapping[tuple[str, str, str], bootstrap.Draws],
                plans: Mapping[tuple[str, str, str], Any], level: float = 0.95
                ) -> dict[str, Any]:
    """Per task, the quantities the findings test, from the multiplicative fits.

    results/plans/draws: keyed by (task, method, law) as scaling.fit builds them (draws only
    when bootstrapped). Returns {task: {MODEL_OVER_DATA: {method: q}, MODEL_OVER_PET: {method:
    q}, 'beta_fmt - beta': {method: q}, 'data_extremes': {...}}} with q = {'estimate',
    'interval', 'draws'}.
    """
    out: dict[str, Any] = {}
    for task in dict.fromkeys(k[0] for k in results):
        keys = {k[1]: k for k in results if k[0] == task and k[2] == LAW}
        entry: dict[str, Any] = {MODEL_OVER_DATA: {}, MODEL_OVER_PET: {},
                                 "beta_fmt - beta": {}}
        for method, key in keys.items():
            params = results[key].parameters()
            d = draws.get(key)
            v = d.values if d is not None else None
            ok = d.certified if d is not None else None
            # Both quantities are positive only where model size helps at all (alpha_m > 0).
            if {"alpha_m", "alpha_p"} <= set(params):
                entry[MODEL_OVER_DATA][method] = _quantity(
                    params["alpha_m"] - max(params["alpha_p"], 0.0),
                    None if v is None else (v["alpha_m"] - np.maximum(v["alpha_p"], 0.0))[ok],
                    level)
            if {"alpha_m", "alpha_t"} <= set(params):
                entry[MODEL_OVER_PET][method] = _quantity(
                    ALPHA_T_SHARE * params["alpha_m"] - abs(params["alpha_t"]),
                    None if v is None else (ALPHA_T_SHARE * v["alpha_m"]
                                            - np.abs(v["alpha_t"]))[ok], level)
        if FMT in keys:
            fmt_key = keys[FMT]
            for method, key in keys.items():
                if method == FMT:
                    continue
                b1, b2 = results[fmt_key].parameters()["beta"], results[key].parameters()["beta"]
                samples = None
                if fmt_key in draws and key in draws:
                    rows = _paired_rows(draws[fmt_key], draws[key])
                    samples = draws[fmt_key].values["beta"][rows] - draws[key].values["beta"][rows]
                entry["beta_fmt - beta"][method] = _quantity(b1 - b2, samples, level)
            entry["data_extremes"] = _data_extremes(results, draws, plans, keys, level)
        out[task] = entry
    return out


def _data_extremes(results, draws, plans, keys: Mapping[str, tuple], level: float
                   ) -> dict[str, Any]:
    """Finding (iv): at the anchor model, the FMT-minus-PET loss gap (by the model-size fits)
    at the smallest and the largest finetuning size of the grid, and their first crossing."""
    with_m = {m: k for m, k in keys.items() if "model_size" in results[k].factors}
    if FMT not in with_m or len(with_m) < 2:
        return {}
    fmt_key = with_m[FMT]
    anchor_x = _anchor_size(plans[fmt_key])
    dfs = np.concatenate([plans[k].table[FINETUNE_EXAMPLES] for k in with_m.values()])
    n_min, n_max = float(dfs.min()), float(dfs.max())
    out: dict[str, Any] = {"model_params": anchor_x, "n_min": n_min, "n_max": n_max,
                           "methods": {}}

    def predict(key):
        fit = results[key].factors["model_size"].fit
        return lambda x, df: fit.predict({"x": np.asarray(x, float), "df": np.asarray(df, float)})

    p_fmt = predict(fmt_key)
    for method, key in with_m.items():
        if method == FMT:
            continue
        p_pet = predict(key)
        ends = np.array([n_min, n_max])
        gap = p_fmt(np.full(2, anchor_x), ends) - p_pet(np.full(2, anchor_x), ends)
        gap_samples = rows = None
        if fmt_key in draws and key in draws:
            rows = _paired_rows(draws[fmt_key], draws[key])
            g1 = bootstrap.predictor(draws[fmt_key], "model_size")(rows, anchor_x, ends)
            g2 = bootstrap.predictor(draws[key], "model_size")(rows, anchor_x, ends)
            gap_samples = g1 - g2
        cs = critical.curve(p_fmt, p_pet, [anchor_x], (1.0, 1e12), (n_min, n_max))[0]
        crossing: dict[str, Any] = {"estimate": cs["df"], "status": cs["status"]}
        if rows is not None:
            band = critical.draws_curve(bootstrap.predictor(draws[fmt_key], "model_size"),
                                        bootstrap.predictor(draws[key], "model_size"),
                                        [anchor_x], (1.0, 1e12), rows, level)
            crossing.update(interval=[band["lower"][0], band["upper"][0]],
                            fraction_crossing=band["fraction_crossing"][0])
        out["methods"][method] = {
            "gap_at_min": _quantity(gap[0], None if gap_samples is None else gap_samples[:, 0],
                                    level),
            "gap_at_max": _quantity(gap[1], None if gap_samples is None else gap_samples[:, 1],
                                    level),
            "crossing": crossing}
    return out


def _anchor_size(plan) -> float:
    """The model size every other sweep holds fixed (the largest swept size without them)."""
    for factor in ("pretrain_data", "pet_size"):
        rows = plan.fit_rows.get(factor)
        if rows is not None and rows.size:
            return float(np.median(plan.table[MODEL_PARAMS][rows]))
    rows = np.concatenate([plan.fit_rows["model_size"], plan.held_rows["model_size"]])
    return float(plan.table[MODEL_PARAMS][rows].max())


def _fmt_minus_pet(tab: Table, metric: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per PET method, FMT's `metric` minus the PET method's over matched runs among `rows`
    (same model, pretraining data, finetuning size and seed; the PET method at the size its
    settings share, the most frequent one): positive where PET has the lower value."""
    out: dict[str, np.ndarray] = {}
    methods = tab["method"]
    settings = table_lib.configuration_ids(
        [tab[c] for c in (MODEL_PARAMS, PRETRAIN_TOKENS, FINETUNE_EXAMPLES, "seed")])

    def by_setting(mask):
        values = {}
        for i in np.flatnonzero(mask & rows & np.isfinite(tab[metric])):
            values.setdefault(settings[i], []).append(float(tab[metric][i]))
        return {s: float(np.mean(v)) for s, v in values.items()}

    fmt = by_setting(methods == FMT)
    for method in sorted(set(methods) - {FMT}):
        pet_rows = methods == method
        sizes, counts = np.unique(tab[PET_SIZE][pet_rows], return_counts=True)
        pet = by_setting(pet_rows & (tab[PET_SIZE] == sizes[np.argmax(counts)])) if sizes.size \
            else {}
        common = sorted(set(fmt) & set(pet))
        if common:
            out[method] = np.array([fmt[s] - pet[s] for s in common])
    return out


def zero_shot(tab: Table, metric: str, n_draws: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict[str, Any]:
    """Finding (v): per PET method, the mean over matched runs (same model, pretraining data,
    finetuning size and seed) of FMT's zero-shot loss minus the PET method's (positive: PET
    transfers better), with a bootstrap interval over the matched pairs. {} without the metric."""
    if metric not in tab:
        return {}
    rng = np.random.default_rng(seed)
    return {m: _mean_of_pairs(d, rng, n_draws, level)
            for m, d in _fmt_minus_pet(tab, metric, np.ones(len(tab[metric]), bool)).items()}


def measured_extremes(tab: Table, target: str = "test_loss", n_draws: int = 1000,
                      seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Finding (iv) measured, without a law: at the grid's smallest and largest finetuning
    size, per PET method, the mean over matched runs of FMT's loss minus the PET method's
    (positive: PET better), with a bootstrap interval over the pairs. {} without both."""
    if target not in tab or FINETUNE_EXAMPLES not in tab:
        return {}
    n = tab[FINETUNE_EXAMPLES]
    n_min, n_max = float(np.nanmin(n)), float(np.nanmax(n))
    rng = np.random.default_rng(seed)
    small, large = (_fmt_minus_pet(tab, target, n == v) for v in (n_min, n_max))
    methods = {m: {"gap_at_min": _mean_of_pairs(small[m], rng, n_draws, level),
                   "gap_at_max": _mean_of_pairs(large[m], rng, n_draws, level)}
               for m in sorted(set(small) & set(large))}
    return {"n_min": n_min, "n_max": n_max, "methods": methods} if methods else {}


def _matched_gains(tab: Table, column: str, target: str) -> np.ndarray:
    """Loss at each value of `column` minus the loss at the next larger value, over runs that
    match in every other factor (method, the other sizes, finetuning size, seed)."""
    others = [c for c in (MODEL_PARAMS, PRETRAIN_TOKENS, PET_SIZE, FINETUNE_EXAMPLES, "seed")
              if c != column]
    ids = table_lib.configuration_ids([tab["method"]] + [tab[c] for c in others])
    groups: dict[int, list[tuple[float, float]]] = {}
    y = tab[target]
    for i in np.flatnonzero(np.isfinite(y)):
        groups.setdefault(ids[i], []).append((float(tab[column][i]), float(y[i])))
    gains = []
    for points in groups.values():
        points.sort()
        gains += [a[1] - b[1] for a, b in zip(points, points[1:]) if b[0] > a[0]]
    return np.array(gains)


def premises(tab: Table, target: str = "test_loss", n_draws: int = 1000, seed: int = 0,
             level: float = 0.95) -> dict[str, Any]:
    """What a scaling study presumes of its base models: a larger model, and a later
    pretraining checkpoint, finetune to a lower loss. For each, the mean loss gain over matched
    pairs of runs (next size up; next checkpoint), its bootstrap interval and how many pairs
    gained. {} entries where the study has no such pairs."""
    out: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    for name, column in (("larger model", MODEL_PARAMS), ("later checkpoint", PRETRAIN_TOKENS)):
        gains = _matched_gains(tab, column, target)
        if gains.size:
            out[name] = {**_mean_of_pairs(gains, rng, n_draws, level),
                         "gained": int((gains > 0).sum())}
    return out


def premise_lines(found: Mapping[str, Any]) -> list[str]:
    """One line per premise: holds / fails / unclear, with its evidence."""
    lines = []
    for name, q in found.items():
        v = verdict(q)
        word = {AGREES: "holds", CONTRADICTS: "FAILS", INCONCLUSIVE: "is unclear"}[v]
        lo, hi = q["interval"]
        lines.append(f"- A {name} finetunes better: {word}. Mean test-loss gain over "
                     f"{q['pairs']} matched pairs of runs {fmt(q['estimate'])} (95% interval "
                     f"[{fmt(lo)}, {fmt(hi)}]); {q['gained']} of {q['pairs']} pairs gained."
                     + ("" if v == AGREES else " The study's factors then do not measure what "
                        "the paper's do: pretrain longer, or with larger gaps between sizes."))
    return lines or ["- No matched pairs of runs across model sizes or checkpoints."]


# --- verdicts ------------------------------------------------------------------------------------


def verdict(q: Mapping[str, Any] | None, threshold: float = 0.0, above: bool = True) -> str:
    """`agrees` when the interval lies wholly above `threshold` (below, with above=False),
    `contradicts` when wholly on the other side, else `inconclusive`."""
    if not q or q.get("draws", 0) < MIN_DRAWS or q.get("pairs", MIN_PAIRS) < MIN_PAIRS:
        return INCONCLUSIVE
    lo, hi = q["interval"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE
    if not above:
        lo, hi, threshold = -hi, -lo, -threshold
    if lo > threshold:
        return AGREES
    if hi < threshold:
        return CONTRADICTS
    return INCONCLUSIVE


def combine(verdicts: Sequence[str], *, any_agrees: bool = False) -> str:
    """One verdict from several: a contradiction anywhere contradicts; otherwise all must agree
    (or, with any_agrees, one)."""
    if not verdicts:
        return INCONCLUSIVE
    if CONTRADICTS in verdicts:
        return CONTRADICTS
    agreed = (AGREES in verdicts) if any_agrees else all(v == AGREES for v in verdicts)
    return AGREES if agreed else INCONCLUSIVE


@dataclasses.dataclass(frozen=True)
class Finding:
    key: str            # 'i' ... 'v'
    statement: str
    verdict: str
    evidence: tuple[str, ...]  # one line per quantity


def _q(name: str, q: Mapping[str, Any], v: str) -> str:
    lo, hi = q["interval"]
    iv = (f"95% interval [{fmt(lo)}, {fmt(hi)}] ({q['draws']} draws)" if q["draws"]
          else "no interval (no bootstrap)")
    return f"{name} = {fmt(q['estimate'])}, {iv}: {v}"


def verdicts(evidence: Mapping[str, Any], zero: Mapping[str, Any] | None = None,
             zero_shot_task: str | None = None, measured: Mapping[str, Any] | None = None
             ) -> list[Finding]:
    """The five findings for one task's evidence (`comparisons(...)[task]`), with (v) from
    `zero_shot` and (iv) also from `measured_extremes`."""
    out = []
    qs = evidence.get(MODEL_OVER_DATA, {})
    vs = {m: verdict(q) for m, q in qs.items()}
    out.append(Finding("i", "alpha_m > alpha_p: model size helps more than pretraining data",
                       combine(list(vs.values())),
                       tuple(_q(f"{m}: {MODEL_OVER_DATA}", q, vs[m]) for m, q in qs.items())
                       or ("no method has both a model-size and a pretraining-data fit",)))
    qs = evidence.get(MODEL_OVER_PET, {})
    vs = {m: verdict(q) for m, q in qs.items()}
    out.append(Finding("ii", f"abs(alpha_t) small against alpha_m (at most {ALPHA_T_SHARE:g} of "
                       "it): PET size matters little", combine(list(vs.values())),
                       tuple(_q(f"{m}: {MODEL_OVER_PET}", q, vs[m]) for m, q in qs.items())
                       or ("no PET method has a PET-size and a model-size fit",)))
    qs = evidence.get("beta_fmt - beta", {})
    vs = {m: verdict(q) for m, q in qs.items()}
    out.append(Finding("iii", "beta_FMT > beta of each PET method: FMT gains most from data",
                       combine(list(vs.values())),
                       tuple(_q(f"beta_fmt - beta_{m}", q, vs[m]) for m, q in qs.items())
                       or ("no FMT fit, or no PET fit, to compare",)))
    out.append(_extremes_finding(evidence.get("data_extremes", {}), measured))
    if zero:
        vs = {m: verdict(q) for m, q in zero.items()}
        out.append(Finding(
            "v", f"zero-shot transfer ({zero_shot_task}) is better after PET than after FMT",
            combine(list(vs.values())),
            tuple(_q(f"{m}: FMT's zero-shot loss - {m}'s (mean over {q['pairs']} matched runs)",
                     q, vs[m]) for m, q in zero.items())))
    else:
        out.append(Finding("v", "zero-shot transfer is better after PET than after FMT",
                           INCONCLUSIVE, ("not evaluated by this study",)))
    return out


def _ends(methods: Mapping[str, Any]) -> str:
    """(iv) from the gaps at the grid's ends: some PET method better at the smallest size
    (none clearly worse is not enough), and FMT better than every PET method at the largest."""
    small = [verdict(e["gap_at_min"]) for e in methods.values()]  # FMT - PET > 0: PET better
    large = [verdict(e["gap_at_max"], above=False) for e in methods.values()]
    pet_small = AGREES if AGREES in small else (
        CONTRADICTS if small and all(v == CONTRADICTS for v in small) else INCONCLUSIVE)
    return combine([pet_small, combine(large)])


def _extremes_finding(ext: Mapping[str, Any], measured: Mapping[str, Any] | None = None
                      ) -> Finding:
    """(iv) from the runs themselves (`measured_extremes`) and from the model-size fits at the
    anchor model (`comparisons`): a contradiction by either contradicts; otherwise either
    agreeing agrees."""
    statement = ("a PET method is best at the smallest finetuning-data size and FMT at the "
                 "largest (the critical size lies inside the grid)")
    if not ext and not measured:
        return Finding("iv", statement, INCONCLUSIVE, ("no FMT and PET runs to compare",))
    lines, found = [], []
    if measured:
        found.append(_ends(measured["methods"]))
        lines.append(f"measured: matched runs (same model, pretraining data and seed) at the "
                     f"grid's ends, {measured['n_min']:,.0f} and {measured['n_max']:,.0f} "
                     "examples")
        for m, e in measured["methods"].items():
            for end, key, above in (("n_min", "gap_at_min", True), ("n_max", "gap_at_max", False)):
                q = e[key]
                lines.append(_q(f"{m}: L_fmt - L_{m} at {measured[end]:,.0f} examples (mean over "
                                f"{q['pairs']} matched runs)", q, verdict(q, above=above)))
    if ext:
        found.append(_ends(ext["methods"]))
        lines.append(f"by the model-size fits: anchor model of {ext['model_params']:,.0f} "
                     f"parameters, grid {ext['n_min']:,.0f}-{ext['n_max']:,.0f} examples")
        for m, e in ext["methods"].items():
            lines.append(_q(f"{m}: L_fmt - L_{m} at {ext['n_min']:,.0f} examples",
                            e["gap_at_min"], verdict(e["gap_at_min"])))
            lines.append(_q(f"{m}: L_fmt - L_{m} at {ext['n_max']:,.0f} examples",
                            e["gap_at_max"], verdict(e["gap_at_max"], above=False)))
            c = e["crossing"]
            iv = c.get("interval")
            lines.append(f"{m}: first crossing at {fmt(c['estimate'])} examples ({c['status']})"
                         + (f", 95% interval [{fmt(iv[0])}, {fmt(iv[1])}] over the "
                            f"{c['fraction_crossing']:.0%} of draws that cross" if iv else ""))
    return Finding("iv", statement, combine(found, any_agrees=True), tuple(lines))


def section(findings: Sequence[Finding]) -> list[str]:
    """Markdown lines: a table of verdicts, then the evidence of each finding."""
    lines = ["| finding | verdict |", "|---|---|"]
    lines += [f"| ({f.key}) {f.statement} | **{f.verdict}** |" for f in findings]
    lines += ["", "Evidence (estimate, 95% bootstrap interval, verdict of each quantity; an "
              "interval wholly on the finding's side agrees, wholly on the other side "
              "contradicts, otherwise inconclusive):", ""]
    for f in findings:
        lines.append(f"- ({f.key}) {f.verdict}")
        lines += [f"  - {e}" for e in f.evidence]
    return lines
