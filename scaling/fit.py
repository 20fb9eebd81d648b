"""Fit scaling laws to a study's runs: `python -m scaling.fit --runs=DIR --out=OUT`.

Collects DIR/**/record.json (skipping unfinished and failed runs, and saying so), builds the
tidy table, runs the paper's two-stage procedure for every task and method (multiplicative and
additive laws), reports held-out errors, fitted parameters (with bootstrap intervals when
--bootstrap > 0) and critical finetuning sizes between methods, and writes into OUT:

  table.csv    the tidy table (OUT alone is enough to refit: --from=OUT)
  fit.json     settings, fit configuration, parameters, intervals (parameters, held-out errors,
               predicted losses at held-out points and on a small grid, critical sizes),
               errors, certificates
  summary.md   Tables 2 and 4 of the paper's layout, certificates, critical sizes
  figures/     loss vs finetuning data per factor (bootstrap bands when --bootstrap > 0),
               residuals, critical sizes

Other inputs: --table=CSV (a tidy table), --from=OUT (refit a previous OUT's table with its
settings; flags given override them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from scaling import (bootstrap, critical, fitting, heldout, laws, plots, procedures, records,
                     report)
from scaling.table import FINETUNE_EXAMPLES, MODEL_PARAMS, Table

DEFAULTS = {"task": None, "method": None, "factor": None, "law": "multiplicative,additive",
            "curve_law": None, "preset": "paper", "residual": None, "heldout": "paper",
            "target": "test_loss", "bootstrap": 0, "seed": 0, "level": 0.95, "plots": True,
            "anchor": None}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scaling.fit", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--runs", help="directory searched for run records (record.json)")
    src.add_argument("--table", help="a tidy table CSV (as written to OUT/table.csv)")
    src.add_argument("--from", dest="from_", help="a previous OUT: refit its table.csv")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--task", help="comma-separated tasks (default: all)")
    p.add_argument("--method", help="comma-separated methods (default: all)")
    p.add_argument("--factor", help="comma-separated factors among "
                   f"{','.join(procedures.FACTORS)} (default: all with two or more values)")
    p.add_argument("--law", help="comma-separated joint laws (default multiplicative,additive)")
    p.add_argument("--curve_law", "--curve-law", help="also fit laws of Df alone per curve, "
                   "e.g. single,rectified")
    p.add_argument("--preset", choices=sorted(procedures.PRESETS), help="fit recipe")
    p.add_argument("--residual", choices=("raw", "log"), help="override the preset's residual")
    p.add_argument("--heldout", help="'paper' (starred values), 'largest', 'none', or "
                   "column=value,... e.g. pretrain_tokens=209e9,model_params=max")
    p.add_argument("--anchor", help="the setting all sweeps share, overriding the inferred "
                   "(most frequent) one: column=value,... over model_params, pretrain_tokens, "
                   "pet_size, e.g. model_params=1e9,pretrain_tokens=max")
    p.add_argument("--target", help="loss column to fit (default test_loss)")
    p.add_argument("--bootstrap", type=int, help="bootstrap draws (0 = none)")
    p.add_argument("--seed", type=int, help="bootstrap seed")
    p.add_argument("--level", type=float, help="interval level (default 0.95)")
    p.add_argument("--no_plots", "--no-plots", dest="plots", action="store_false",
                   default=None)
    return p


def _split(s: str | None) -> list[str] | None:
    return None if s in (None, "") else [v.strip() for v in s.split(",") if v.strip()]


def _anchor(text: str | None) -> dict | None:
    if not text:
        return None
    spec = heldout.parse(text)
    many = [c for c, v in spec.items() if len(v) > 1]
    if many:
        raise ValueError(f"--anchor gives several values for {many}; one per column")
    return {c: v[0] for c, v in spec.items()}


def _for_method(value, method: str):
    """A setting given per method ({method: value}, e.g. a study's anchors) or for all."""
    return value.get(method) if isinstance(value, dict) else value


def _heldout_spec(text: str) -> dict | None:
    if text == "paper":
        return None  # procedures.plan uses heldout.paper(task)
    if text == "largest":
        return heldout.largest()
    return heldout.parse(text)


def run(settings: dict[str, Any], tab: Table, out: Path, skipped: list) -> dict[str, Any]:
    """Fits everything `settings` asks for on `tab`; writes OUT; returns the fit.json dict."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    tab.to_csv(out / "table.csv")
    config = procedures.preset(settings["preset"], settings["residual"])
    tab = records.select(tab, task=_split(settings["task"]), method=_split(settings["method"]))
    law_names = _split(settings["law"]) or []
    for name in law_names + (_split(settings["curve_law"]) or []):
        laws.get(name)
    factors = _split(settings["factor"])
    results: dict[tuple[str, str, str], procedures.ProcedureResult] = {}
    plans: dict[tuple[str, str, str], procedures.Plan] = {}
    draws: dict[tuple[str, str, str], bootstrap.Draws] = {}
    out_results = []
    not_fitted: list[dict[str, str]] = []
    for task in dict.fromkeys(tab["task"]):
        for method in dict.fromkeys(tab["method"][tab["task"] == task]):
            sub = records.select(tab, task=task, method=method)
            for law in law_names:
                key = (task, method, law)
                try:
                    p = procedures.plan(sub, law, target=settings["target"], factors=factors,
                                        heldout_spec=_heldout_spec(settings["heldout"]),
                                        anchor=_anchor(_for_method(settings["anchor"],
                                                                   method)))
                    print(f"fitting {task} {method} {law} ({len(sub)} runs)", file=sys.stderr)
                    r = procedures.run(p, config)
                except ValueError as e:
                    # Too few points for one method or law: fit the others, and say why not.
                    if not settings.get("keep_going"):
                        raise
                    print(f"not fitted: {task} {method} {law}: {e}", file=sys.stderr)
                    not_fitted.append({"task": task, "method": method, "law": law,
                                       "reason": str(e)})
                    continue
                results[key], plans[key] = r, p
                entry = r.to_json()
                if settings["bootstrap"] > 0:
                    d = bootstrap.bootstrap_procedure(p, config, n_draws=settings["bootstrap"],
                                                      seed=settings["seed"],
                                                      progress=bootstrap.print_progress)
                    draws[key] = d
                    entry["bootstrap"] = d.summary(settings["level"])
                    entry["bootstrap"]["predictions"] = _prediction_intervals(
                        r, p, d, settings["level"])
                out_results.append(entry)
                if settings["plots"]:
                    stem = f"{task}_{method}_{law}".replace("/", "-")
                    band = None
                    if key in draws:
                        band = (lambda f, x, df, d=draws[key]:
                                bootstrap.prediction_band(d, f, x, df, settings["level"]))
                    plots.factor_fits(r, p, str(out / "figures" / f"fits_{stem}.png"), band)
                    plots.residuals(r, p, str(out / "figures" / f"residuals_{stem}.png"))
    crit = _critical(results, plans, draws, settings, out)
    curves = _curves(tab, settings, config, out)
    doc = {"settings": settings, "config": config.to_json(),
           "skipped": [{"path": p, "reason": r} for p, r in skipped],
           "results": out_results, "not_fitted": not_fitted, "critical": crit,
           "curves": curves}
    (out / "fit.json").write_text(dumps(fitting._jsonable(doc)) + "\n")
    (out / "summary.md").write_text(_summary(results, draws, crit, curves, skipped, settings,
                                             config, not_fitted))
    return doc


def dumps(obj: Any, indent: str = "") -> str:
    """JSON with one line per flat object or list of scalars (a point, an interval, a band
    row), nested structure indented: long per-point lists stay readable."""
    def flat(v):
        items = v.values() if isinstance(v, dict) else v
        return all(not isinstance(i, (dict, list)) for i in items)

    if not isinstance(obj, (dict, list)) or flat(obj):
        return json.dumps(obj)
    inner = indent + " "
    if isinstance(obj, dict):
        body = [f"{inner}{json.dumps(k)}: {dumps(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(body) + "\n" + indent + "}" if body else "{}"
    body = [inner + dumps(v, inner) for v in obj]
    return "[\n" + ",\n".join(body) + "\n" + indent + "]" if body else "[]"


def _critical(results, plans, draws, settings, out) -> dict[str, Any]:
    """Critical sizes for every pair of methods of a task (model-size factor)."""
    crit: dict[str, Any] = {}
    for task in dict.fromkeys(k[0] for k in results):
        for law in dict.fromkeys(k[2] for k in results):
            keys = [k for k in results if k[0] == task and k[2] == law
                    and "model_size" in results[k].factors]
            curves, bands = {}, {}
            for k1, k2 in itertools.combinations(keys, 2):
                r1, r2 = results[k1], results[k2]
                f1, f2 = r1.factors["model_size"].fit, r2.factors["model_size"].fit
                p1, p2 = plans[k1], plans[k2]
                xs_obs = np.concatenate([p1.table[MODEL_PARAMS], p2.table[MODEL_PARAMS]])
                xs = np.geomspace(xs_obs.min(), 4 * xs_obs.max(), 9)
                overlap = critical.observed_overlap(p1.table[FINETUNE_EXAMPLES],
                                                    p2.table[FINETUNE_EXAMPLES])
                name = f"{k1[1]} vs {k2[1]}"
                c = critical.curve(lambda x, d: f1.predict({"x": x, "df": d}),
                                   lambda x, d: f2.predict({"x": x, "df": d}), xs, (1.0, 1e12),
                                   overlap)
                entry: dict[str, Any] = {"curve": c, "observed_overlap": overlap,
                                         "df_search_range": [1.0, 1e12]}
                if law == "multiplicative":
                    nat1, nat2 = laws.natural(f1.params), laws.natural(f2.params)
                    entry["closed_form"] = critical.closed_form(nat1, nat2)
                if k1 in draws and k2 in draws:
                    # Draw b of each method is an independent resample; pair them by index,
                    # keeping pairs where both refits were certified.
                    d1, d2 = draws[k1], draws[k2]
                    n = min(d1.n, d2.n)
                    both = np.flatnonzero(d1.certified[:n] & d2.certified[:n])
                    entry["bootstrap"] = critical.draws_curve(
                        bootstrap.predictor(d1, "model_size"),
                        bootstrap.predictor(d2, "model_size"), xs, (1.0, 1e12), both,
                        settings["level"])
                    bands[name] = entry["bootstrap"]
                curves[name] = c
                crit[f"{task} {law} {name}"] = entry
            if curves and settings["plots"]:
                plots.critical_sizes(curves, str(out / "figures" / f"critical_{task}_{law}.png"),
                                     f"{task}: critical finetuning size ({law})", bands)
    return crit


def _prediction_intervals(r: procedures.ProcedureResult, p: procedures.Plan,
                          d: bootstrap.Draws, level: float) -> dict[str, Any]:
    """Per factor, bootstrap intervals of the predicted loss at every held-out configuration
    (with its observed mean over seeds) and on a small grid: each X of the sweep at the
    smallest and largest observed Df and at 4x the largest (an extrapolation)."""
    out: dict[str, Any] = {}
    y = p.table[p.target]
    for f, ff in r.factors.items():
        col = procedures.FACTORS[f]
        held = p.held_rows[f]
        rows = np.concatenate([p.fit_rows[f], held])
        xs_all, dfs_all = p.table[col], p.table[FINETUNE_EXAMPLES]
        pts = sorted({(float(xs_all[i]), float(dfs_all[i])) for i in held})
        observed = [float(np.mean(y[held][(xs_all[held] == x) & (dfs_all[held] == df)]))
                    for x, df in pts]
        df_lo, df_hi = float(dfs_all[rows].min()), float(dfs_all[rows].max())
        grid = [(float(x), df) for x in np.unique(xs_all[rows])
                for df in (df_lo, df_hi, 4 * df_hi)]
        entry = {}
        for name, points in (("heldout", pts), ("grid", grid)):
            if not points:
                entry[name] = []
                continue
            x, df = (np.array(v) for v in zip(*points))
            pred = ff.fit.predict({"x": x, "df": df})
            lo, hi = bootstrap.prediction_band(d, f, x, df, level)
            entry[name] = [{"x": x[i], "df": df[i], "predicted": pred[i], "lower": lo[i],
                            "upper": hi[i]} for i in range(x.size)]
            if name == "heldout":
                for e, o in zip(entry[name], observed):
                    e["observed"] = o
        out[f] = entry
    return out


def _curves(tab, settings, config, out) -> list[dict[str, Any]]:
    names = _split(settings["curve_law"])
    if not names:
        return []
    rows = []
    for task in dict.fromkeys(tab["task"]):
        for method in dict.fromkeys(tab["method"][tab["task"] == task]):
            sub = records.select(tab, task=task, method=method)
            fits = {n: procedures.fit_curves(sub, n, target=settings["target"], config=config)
                    for n in names}
            panels = []
            for i, base in enumerate(fits[names[0]]):
                key = {k: base[k] for k in ("model_params", "pretrain_tokens", "pet_size")}
                entry = {"task": task, "method": method, **key}
                for n in names:
                    f = fits[n][i]
                    entry[n] = {"fit": f["fit"].to_json(), "fit_errors": f["fit_errors"],
                                "heldout_errors": f["heldout_errors"]}
                rows.append(entry)
                panels.append({"title": _curve_title(key),
                               "df": base["df"], "loss": base["loss"], "held": base["held"],
                               "fits": [(n, fits[n][i]["fit"]) for n in names]})
            if settings["plots"]:
                stem = f"{task}_{method}".replace("/", "-")
                plots.curves(panels, str(out / "figures" / f"curves_{stem}.png"),
                             f"{task} {method}: laws of Df alone per curve")
    return rows


def _curve_title(key: dict[str, float]) -> str:
    parts = [f"{key['model_params'] / 1e9:.3g}B params", f"{key['pretrain_tokens'] / 1e9:.3g}B tok"]
    if np.isfinite(key["pet_size"]):
        parts.append(f"PET {key['pet_size']:g}")
    return ", ".join(parts)


def _summary(results, draws, crit, curves, skipped, settings, config, not_fitted=()) -> str:
    parts = ["# Scaling-law fits", "",
             f"Preset `{config.name}` (Huber delta {config.delta:g} summed, residuals on "
             f"{'raw' if config.residual == 'raw' else 'log'} loss), target `{settings['target']}`,"
             f" held out: `{settings['heldout']}`.", ""]
    parts += [f"Runs: {len(skipped)} skipped." if skipped else "Runs: none skipped.", ""]
    for p, r in skipped:
        parts.append(f"- skipped `{p}`: {r}")
    for f in not_fitted:
        parts.append(f"- not fitted: {f['task']} {f['method']} {f['law']}: {f['reason']}")
    parts += ["", "## Held-out errors (paper Table 2 layout: Delta_e / Delta_h)", "",
              report.table2(results), ""]
    for law in dict.fromkeys(k[2] for k in results):
        sel = {(k[0], k[1]): v for k, v in results.items() if k[2] == law}
        iv = {(k[0], k[1]): draws[k].summary(settings["level"])["intervals"]
              for k in draws if k[2] == law}
        parts += [f"## Fitted parameters, {law} law (paper Table 4 layout)"
                  + (f", {settings['level']:.0%} bootstrap intervals" if iv else ""), "",
                  report.table4(sel, iv), ""]
    parts += ["## Certificates", "", report.certification(results), ""]
    if crit:
        parts += ["## Critical finetuning sizes (model-size factor)", ""]
        for name, entry in crit.items():
            cells = ", ".join(f"X={c['x']:.3g}: " + (f"{c['df']:.3g} ({c['status']})"
                                                    if c["crossings"] else c["status"])
                              for c in entry["curve"])
            parts.append(f"- {name}: {cells}")
            if "closed_form" in entry:
                cf = entry["closed_form"]
                parts.append(f"  - equal-gap closed form: H = {report.fmt(cf['H'])}, "
                             f"gamma = {cf['gamma']:.3g}")
        parts.append("")
    if curves:
        parts += ["## Per-curve fits of Df alone", ""]
        names = [k for k in curves[0] if isinstance(curves[0][k], dict)]
        rows = [[c["task"], c["method"], report.fmt(c["model_params"]),
                 report.fmt(c["pretrain_tokens"]), report.fmt(c["pet_size"])] +
                [f"{report.fmt(c[n]['fit_errors']['delta'])}/"
                 f"{report.fmt(c[n]['heldout_errors']['delta'])}"
                 + ("" if c[n]["fit"]["certified"] else " (not certified)") for n in names]
                for c in curves]
        parts += [report._table(["task", "method", "model", "tokens", "PET"] +
                                [f"{n} Δe/Δh" for n in names], rows), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
    try:
        skipped: list = []
        if args.from_:
            prev = Path(args.from_)
            saved = json.loads((prev / "fit.json").read_text())
            settings = {**DEFAULTS, **saved.get("settings", {}), **given}
            skipped = [(s["path"], s["reason"]) for s in saved.get("skipped", [])]
            tab = Table.read_csv(prev / "table.csv")
        elif args.table:
            settings = {**DEFAULTS, **given}
            tab = Table.read_csv(args.table)
        else:
            settings = {**DEFAULTS, **given}
            col = records.collect(args.runs)
            print(col.skip_report(), file=sys.stderr)
            tab, skipped = col.table, col.skipped
        run(settings, tab, Path(args.out), skipped)
    except (ValueError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/fit.json, summary.md, table.csv, figures/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
