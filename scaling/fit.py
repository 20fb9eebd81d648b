"""Fit scaling laws to a study's runs or a table: `python -m scaling.fit --runs=DIR --out=OUT`.

Collects DIR/**/record.json (skipping unfinished and failed runs, and saying so), or reads a
table (--table), runs the paper's two-stage procedure for every task and method
(multiplicative and additive laws by default) and, with --curve_law, laws of Df alone per
curve; reports held-out errors, fitted parameters (with bootstrap intervals when
--bootstrap > 0) and critical finetuning sizes between methods, and writes into OUT:

  table.csv    the tidy table (OUT alone is enough to refit: --from=OUT)
  fit.json     settings, fit configuration, parameters, intervals (parameters, held-out errors,
               predicted losses at held-out points and on a small grid, critical sizes),
               errors, certificates, what was not fitted and why
  summary.md   Tables 2 and 4 of the paper's layout, per-curve fits, certificates, critical
               sizes; numbers from fits that are not certified are marked
  figures/     loss vs finetuning data per factor (bootstrap bands when --bootstrap > 0),
               per-curve fits, residuals, critical sizes
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from scaling import (bootstrap, critical, findings, fitting, heldout, laws, plots, procedures,
                     records, report)
from scaling import table as table_lib
from scaling.table import FINETUNE_EXAMPLES, MODEL_PARAMS, Table

DEFAULTS = {"task": None, "method": None, "factor": None, "law": "multiplicative,additive",
            "curve_law": None, "preset": "paper", "residual": None, "heldout": "paper",
            "target": "test_loss", "bootstrap": 0, "seed": 0, "level": 0.95, "plots": True,
            "anchor": None, "keep_going": False, "where": None}

TABLES = """tables (--table=CSV; --format=auto reads a table as wide when two or more column
names are numbers):
  tidy: one row per measured point. Columns finetune_examples, test_loss (or --target) and
  model_params or model (an id); optional task (default: the file's name), method (default
  finetune), pretrain_tokens, pet_size, seed; other columns are kept.
      task,method,model_params,pretrain_tokens,finetune_examples,test_loss
      en-de,fmt,1e9,262e9,1000,2.31
  wide: one row per model, as public benchmarks publish them. The model id in column `model`
  (else the first column), the parameter count in `model_params` or `size`, one loss column
  per finetuning-set size named by the size (0 = the base model, used by laws finite at
  Df = 0: rectified); empty cells are not measured; other columns (family) are kept.
      config name,0,200,400,size,family
      gpt2,3.1,2.9,2.8,124439808,GPT2
Models are curves by id: two models of equal size are fitted apart (--curve_law).

examples:
  python -m scaling.fit --table=flan.csv --out=OUT --law=none --curve_law=single,rectified
  python -m scaling.fit --table=flan.csv --out=OUT --where=family=GPT2 --law=multiplicative
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scaling.fit", description=__doc__.split("\n")[0],
                                epilog=TABLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--runs", help="directory searched for run records (record.json)")
    src.add_argument("--table", help="a CSV table of points, tidy or wide (below)")
    src.add_argument("--from", dest="from_", help="a previous OUT: refit its table.csv")
    p.add_argument("--format", choices=table_lib.LAYOUTS, default="auto",
                   help="layout of --table (default auto: wide when column names are sizes)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--task", help="comma-separated tasks (default: all)")
    p.add_argument("--method", help="comma-separated methods (default: all)")
    p.add_argument("--where", help="only rows with these values: column=value,... (values of "
                   "one column are alternatives), e.g. family=GPT2 or model=gpt2,model=gpt2-xl")
    p.add_argument("--factor", help="comma-separated factors among "
                   f"{','.join(procedures.FACTORS)} (default: all with two or more values)")
    p.add_argument("--law", help="comma-separated joint laws of (x, df) fitted by the "
                   "two-stage procedure (default multiplicative,additive; 'none' for none)")
    p.add_argument("--curve_law", "--curve-law", help="also fit laws of Df alone per curve, "
                   "e.g. single,rectified")
    p.add_argument("--preset", choices=sorted(procedures.PRESETS), help="fit recipe")
    p.add_argument("--residual", choices=("raw", "log"), help="override the preset's residual")
    p.add_argument("--heldout", help="'paper' (starred values), 'largest', 'none', or "
                   "column=value,... e.g. pretrain_tokens=209e9,model_params=max; per-curve "
                   "fits hold out the finetune_examples values only")
    p.add_argument("--anchor", help="the setting all sweeps share, overriding the inferred "
                   "(most frequent) one: column=value,... over model_params, pretrain_tokens, "
                   "pet_size, e.g. model_params=1e9,pretrain_tokens=max")
    p.add_argument("--target", help="loss column to fit (default test_loss)")
    p.add_argument("--bootstrap", type=int, help="bootstrap draws (0 = none)")
    p.add_argument("--seed", type=int, help="bootstrap seed")
    p.add_argument("--level", type=float, help="interval level (default 0.95)")
    p.add_argument("--keep_going", "--keep-going", action="store_true", default=None,
                   help="fit what can be fitted; list the rest with the reason")
    p.add_argument("--no_plots", "--no-plots", dest="plots", action="store_false",
                   default=None)
    return p


def _split(s: str | None) -> list[str] | None:
    return None if s in (None, "") else [v.strip() for v in s.split(",") if v.strip()]


_SPEC_COLUMNS = (MODEL_PARAMS, table_lib.PRETRAIN_TOKENS, table_lib.PET_SIZE, FINETUNE_EXAMPLES)


def _spec(flag: str, text: str) -> dict:
    try:
        spec = heldout.parse(text)
    except ValueError as e:
        raise ValueError(f"--{flag}: {e}") from None
    unknown = [c for c in spec if c not in _SPEC_COLUMNS]
    if unknown:
        raise ValueError(f"--{flag}: unknown column(s) {unknown}; columns: "
                         f"{', '.join(_SPEC_COLUMNS)}")
    return spec


def _anchor(text: str | None) -> dict | None:
    if not text:
        return None
    spec = _spec("anchor", text)
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
    return _spec("heldout", text)


def _where(tab: Table, text: str | None) -> Table:
    """The rows --where selects: each named column holds one of the values given for it."""
    if not text:
        return tab
    wanted: dict[str, list[str]] = {}
    for part in text.split(","):
        col, eq, value = (s.strip() for s in part.partition("="))
        if not eq or not col:
            raise ValueError(f"--where={text}: expected column=value, got {part!r}")
        wanted.setdefault(col, []).append(value)
    mask = np.ones(len(tab), bool)
    for col, values in wanted.items():
        if col not in tab:
            raise ValueError(f"--where: the table has no column {col!r}; columns: "
                             f"{', '.join(tab.names)}")
        have = tab[col]
        if have.dtype.kind == "f":
            try:
                values = [float(v) for v in values]
            except ValueError:
                raise ValueError(f"--where: column {col!r} holds numbers; got {values}") from None
        absent = [v for v in values if not np.any(have == v)]
        if absent:
            shown = sorted(set(have.tolist()), key=str)[:12]
            raise ValueError(f"--where: column {col!r} has no value {absent}; it has "
                             f"{', '.join(map(str, shown))}" + (", ..." if len(set(have)) > 12
                                                                 else ""))
        mask &= np.isin(have, values)
    if not mask.any():
        raise ValueError(f"--where={text}: no row has all of these values")
    return tab.where(mask)


def _laws(settings) -> tuple[list[str], list[str]]:
    """The joint and per-curve law names, checked against the inputs each kind needs."""
    joint = [n for n in _split(settings["law"]) or [] if n != "none"]
    per_curve = _split(settings["curve_law"]) or []
    for flag, names, inputs, kind in (("law", joint, ("x", "df"), "a joint law of (x, df)"),
                                      ("curve_law", per_curve, ("df",), "a law of df alone")):
        for name in names:
            try:
                law = laws.get(name)
            except KeyError as e:
                raise ValueError(f"--{flag}: {e.args[0]}") from None
            if tuple(law.inputs) != inputs:
                fits = sorted(n for n, v in laws.LAWS.items() if tuple(v.inputs) == inputs)
                raise ValueError(f"--{flag}={name}: {name!r} is a law of {law.inputs}; --{flag}"
                                 f" takes {kind}: {', '.join(fits)}")
    if not joint and not per_curve:
        raise ValueError("no law to fit: --law names none and --curve_law is not given")
    return joint, per_curve


def run(settings: dict[str, Any], tab: Table, out: Path, skipped: list) -> dict[str, Any]:
    """Fits everything `settings` asks for on `tab`; writes OUT; returns the fit.json dict.

    With settings['keep_going'], a fit that cannot be made (too few points, a held-out value
    missing from a curve) is listed under 'not_fitted' with its reason; otherwise it raises.
    """
    if len(tab) == 0:
        raise ValueError("the table has no rows: nothing to fit")
    config = procedures.preset(settings["preset"], settings["residual"])
    law_names, curve_names = _laws(settings)
    spec = _heldout_spec(settings["heldout"])
    anchor = settings["anchor"]
    for method_anchor in (anchor.values() if isinstance(anchor, dict) else [anchor]):
        _anchor(method_anchor)
    if settings["target"] not in tab:
        raise ValueError(f"--target: the table has no column {settings['target']!r}; "
                         f"columns: {list(tab.names)}")
    tab = records.select(tab, task=_split(settings["task"]), method=_split(settings["method"]))
    tab = _where(tab, settings["where"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    tab.to_csv(out / "table.csv")
    factors = _split(settings["factor"])
    results: dict[tuple[str, str, str], procedures.ProcedureResult] = {}
    plans: dict[tuple[str, str, str], procedures.Plan] = {}
    draws: dict[tuple[str, str, str], bootstrap.Draws] = {}
    out_results = []
    not_fitted: list[dict[str, str]] = []
    notes: list[str] = []
    for task in dict.fromkeys(tab["task"]):
        for method in dict.fromkeys(tab["method"][tab["task"] == task]):
            sub = records.select(tab, task=task, method=method)
            for law in law_names:
                key = (task, method, law)
                try:
                    p = procedures.plan(sub, law, target=settings["target"], factors=factors,
                                        heldout_spec=spec,
                                        anchor=_anchor(_for_method(settings["anchor"],
                                                                   method)))
                    print(f"fitting {task} {method} {law} ({len(p.table)} points)",
                          file=sys.stderr)
                    r = procedures.run(p, config)
                except ValueError as e:
                    _not_fitted(settings, not_fitted, f"{task} {method} {law}", e,
                                task=task, method=method, law=law)
                    continue
                if p.left_out:
                    notes.append(f"{task} {method} {law}: {p.left_out}")
                results[key], plans[key] = r, p
                entry = r.to_json()
                entry["left_out"] = p.left_out
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
                    shown = _drawable(p)
                    plots.factor_fits(r, shown, str(out / "figures" / f"fits_{stem}.png"), band)
                    plots.residuals(r, shown, str(out / "figures" / f"residuals_{stem}.png"))
    crit = _critical(results, plans, draws, settings, out)
    curves = _curves(tab, settings, config, out, curve_names, spec, not_fitted, notes)
    doc = {"settings": settings, "config": config.to_json(),
           "skipped": [{"path": p, "reason": r} for p, r in skipped],
           "results": out_results, "not_fitted": not_fitted, "notes": notes, "critical": crit,
           "curves": curves,
           # What the paper's findings test, with bootstrap intervals (scaling/findings.py).
           "comparisons": findings.comparisons(results, draws, plans, settings["level"])}
    (out / "fit.json").write_text(dumps(fitting._jsonable(doc)) + "\n")
    (out / "summary.md").write_text(_summary(results, draws, crit, curves, skipped, settings,
                                             config, not_fitted, notes))
    return doc


def _drawable(p: procedures.Plan) -> procedures.Plan:
    """The plan without its Df = 0 rows, which a law finite there fits (joint_rectified) but
    a figure's logarithmic Df axis cannot show."""
    keep = p.table[FINETUNE_EXAMPLES] > 0
    if keep.all():
        return p
    index = np.cumsum(keep) - 1

    def moved(rows):
        return index[rows[keep[rows]]]

    return dataclasses.replace(p, table=p.table.where(keep),
                               fit_rows={f: moved(r) for f, r in p.fit_rows.items()},
                               held_rows={f: moved(r) for f, r in p.held_rows.items()})


def _not_fitted(settings, not_fitted, what: str, error: ValueError, **where) -> None:
    """Without --keep_going a fit that cannot be made stops the command; with it, the fit is
    listed with its reason."""
    if not settings.get("keep_going"):
        raise ValueError(f"{what}: {error} (--keep_going fits the rest)") from None
    print(f"not fitted: {what}: {error}", file=sys.stderr)
    not_fitted.append({**where, "reason": str(error)})


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
                                         "df_search_range": [1.0, 1e12],
                                         "certified": r1.certified and r2.certified}
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


def _curves(tab, settings, config, out, names, spec, not_fitted, notes) -> list[dict[str, Any]]:
    """Per-curve fits of the laws of Df alone; one row per curve (keyed by model id where the
    table has one), with each law's fit, parameters and errors."""
    if not names:
        return []
    rows = []
    for task in dict.fromkeys(tab["task"]):
        for method in dict.fromkeys(tab["method"][tab["task"] == task]):
            sub = records.select(tab, task=task, method=method)
            panels = []
            zero_left = dict.fromkeys(names, 0)  # curves whose Df = 0 point a law left out
            for idx in procedures.curves(sub):
                curve = sub.where(idx)
                name = procedures.curve_name(curve)
                entry = {"task": task, "method": method, "name": name,
                         **{k: curve[k][0] for k in ("model_params", "pretrain_tokens",
                                                     "pet_size")}}
                if table_lib.MODEL in curve:
                    entry["model"] = name
                fits = []
                for n in names:
                    try:
                        f = procedures.fit_curve(curve, n, target=settings["target"],
                                                 config=config, heldout_spec=spec)
                    except ValueError as e:
                        _not_fitted(settings, not_fitted, f"{task} {method} {n}", e,
                                    task=task, method=method, law=n, curve=name)
                        continue
                    zero_left[n] += f["left_out"] is not None
                    entry[n] = {"fit": f["fit"].to_json(),
                                "parameters": laws.natural(f["fit"].params),
                                "fit_errors": f["fit_errors"],
                                "heldout_errors": f["heldout_errors"]}
                    fits.append((n, f))
                if not fits:
                    continue
                rows.append(entry)
                # The figure's axis is logarithmic: Df = 0 points are fitted but not drawn.
                base = fits[0][1]
                shown = base["df"] > 0
                panels.append({"title": name, "df": base["df"][shown],
                               "loss": base["loss"][shown], "held": base["held"][shown],
                               "fits": [(n, f["fit"]) for n, f in fits]})
            notes += [f"{task} {method} {n}: Df = 0 points of {k} curve(s) left out: law {n!r} "
                      "is infinite there" for n, k in zero_left.items() if k]
            if settings["plots"] and panels:
                stem = f"{task}_{method}".replace("/", "-")
                plots.curves(panels, str(out / "figures" / f"curves_{stem}.png"),
                             f"{task} {method}: laws of Df alone per curve")
    return rows


def _summary(results, draws, crit, curves, skipped, settings, config, not_fitted=(),
             notes=()) -> str:
    parts = ["# Scaling-law fits", "",
             f"Preset `{config.name}` (Huber delta {config.delta:g} summed, residuals on "
             f"{'raw' if config.residual == 'raw' else 'log'} loss), target `{settings['target']}`,"
             f" held out: `{settings['heldout']}`.", ""]
    parts += [f"Runs: {len(skipped)} skipped." if skipped else "Runs: none skipped.", ""]
    for p, r in skipped:
        parts.append(f"- skipped `{p}`: {r}")
    for f in not_fitted:
        where = f" curve {f['curve']}" if "curve" in f else ""
        parts.append(f"- not fitted: {f['task']} {f['method']} {f['law']}{where}: "
                     f"{f['reason']}")
    parts += [f"- {n}" for n in notes]
    parts.append("")
    if results:
        parts += ["", "## Held-out errors (paper Table 2 layout: Delta_e / Delta_h)", "",
                  report.table2(results), ""]
    for law in dict.fromkeys(k[2] for k in results):
        sel = {(k[0], k[1]): v for k, v in results.items() if k[2] == law}
        iv = {(k[0], k[1]): draws[k].summary(settings["level"])["intervals"]
              for k in draws if k[2] == law}
        parts += [f"## Fitted parameters, {law} law (paper Table 4 layout)"
                  + (f", {settings['level']:.0%} bootstrap intervals" if iv else ""), "",
                  report.table4(sel, iv), ""]
    if results:
        parts += ["## Certificates", "", report.certification(results), ""]
    if crit:
        parts += ["## Critical finetuning sizes (model-size factor)", ""]
        for name, entry in crit.items():
            cells = ", ".join(f"X={c['x']:.3g}: " + (f"{c['df']:.3g} ({c['status']})"
                                                    if c["crossings"] else c["status"])
                              for c in entry["curve"])
            mark = "" if entry["certified"] else f" {report.UNCERTIFIED}"
            parts.append(f"- {name}{mark}: {cells}")
            if "closed_form" in entry:
                cf = entry["closed_form"]
                parts.append(f"  - equal-gap closed form: H = {report.fmt(cf['H'])}, "
                             f"gamma = {report.fmt(cf['gamma'])}")
        if any(not e["certified"] for e in crit.values()):
            parts += ["", report.UNCERTIFIED_NOTE]
        parts.append("")
    if curves:
        parts += ["## Per-curve fits of Df alone (Delta_e / Delta_h)", ""]
        for n in _split(settings["curve_law"]) or []:
            if any(n in c for c in curves):
                parts += [f"### {n} law", "", report.curves_table(curves, n), ""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(parts))


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
            tab = table_lib.load(prev / "table.csv", layout="tidy", target=settings["target"])
        elif args.table:
            settings = {**DEFAULTS, **given}
            tab = table_lib.load(args.table, layout=args.format, target=settings["target"])
        else:
            settings = {**DEFAULTS, **given}
            col = records.collect(args.runs)
            print(col.skip_report(), file=sys.stderr)
            tab, skipped = col.table, col.skipped
        doc = run(settings, tab, Path(args.out), skipped)
    except (ValueError, KeyError, OSError, csv.Error) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        if isinstance(e, OSError) and e.filename is not None:
            msg = f"{e.filename}: {e.strerror}"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/fit.json, summary.md, table.csv, figures/", file=sys.stderr)
    if not doc["results"] and not doc["curves"]:
        print(f"error: nothing was fitted ({len(doc['not_fitted'])} fit(s) failed; see "
              f"{args.out}/summary.md)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
