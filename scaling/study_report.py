"""A study's fit and REPORT.md: the finished runs fitted by scaling.fit, the report written.

The fit reads the records of the runs the study plans (not whatever else lies under runs/). A
run that finished without a finite value of the fitted target (a diverged run under
train.nan_policy='skip' records its losses as null) is listed with the failed runs, with its
reason, and left out; the rest is fitted. A report is only ever replaced by one from a fit: when
nothing can be fitted (no usable run, or no law fitted) the fit goes to a staging directory
that is thrown away, an existing REPORT.md and fit/ are kept, and `NothingToFit` says why.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scaling.grid import Study, law_names
from scaling.planning import plan, pretrain_config
from scaling.runspec import RunSpec
from ul2_lm import paths
from ul2_lm.record import RECORD_NAME

REPORT_FILE = "REPORT.md"
FIT_DIR = "fit"
_STAGING = ".fit.new"


class NothingToFit(RuntimeError):
    """No run can be fitted (or no law fitted); the existing report, if any, is kept."""


def _model_params(study: Study, size: str) -> int:
    from ul2_lm import model_sizes

    c = pretrain_config(study, size)
    return model_sizes.count_params(model_sizes.resolve(c.model))["total"]


def _tokens_at(study: Study, step: int) -> float:
    c = pretrain_config(study, study.anchor_size)
    return float(step * c.train.global_batch_size * c.data.seq_len)


def fit_settings(study: Study) -> dict[str, Any]:
    """scaling.fit settings of the study: its laws, held-out values and anchor."""
    from scaling import fit as fit_lib

    held = dict(study.config.heldout)
    parts = []
    for key, value in held.items():
        if value is None:
            continue
        column = {"model_size": "model_params", "pretrain_step": "pretrain_tokens",
                  "finetune_examples": "finetune_examples", "pet_size": "pet_size"}[key]
        if value not in ("max", "min"):
            value = {"model_size": lambda v: _model_params(study, v),
                     "pretrain_step": lambda v: _tokens_at(study, v)}.get(key, float)(value)
            value = f"{float(value):.10g}"
        parts.append(f"{column}={value}")
    fit = study.config.fit
    anchor = (f"model_params={_model_params(study, study.anchor_size)},"
              f"pretrain_tokens={_tokens_at(study, study.pretrain_steps):.10g}")
    # Every sweep passes through the anchor: the anchor size's last checkpoint and each
    # method's default PET size.
    anchor = {m: anchor + (f",pet_size={study.default_pet[m]}" if m in study.default_pet else "")
              for m in study.methods}
    curve_law = fit.get("curve_law")
    return {**fit_lib.DEFAULTS, "law": ",".join(law_names(fit.laws)), "preset": fit.preset,
            "heldout": ",".join(parts) or "none", "bootstrap": int(fit.bootstrap),
            "seed": int(fit.get("seed", 0)), "target": fit.get("target", "test_loss"),
            "anchor": anchor, "curve_law": None if curve_law is None else ",".join(
                law_names(curve_law)), "keep_going": True}


def fit_and_report(study: Study, workdir: Path, status: Mapping[str, Any],
                   specs: Sequence[RunSpec] | None = None, log=print) -> Path:
    """Fits the study's finished finetuning runs (scaling.fit) and writes REPORT.md; returns
    its path. `specs`: the planned runs (default: planned again). NothingToFit when nothing
    can be fitted: then an existing report is kept (and one saying why is written when there
    is none)."""
    from scaling import fit as fit_lib, records

    workdir = Path(workdir)
    specs = plan(study, str(workdir)) if specs is None else specs
    settings = fit_settings(study)
    target = settings["target"]
    by_path = {str(Path(s.workdir) / RECORD_NAME): s.run_id for s in specs
               if s.kind == "finetune"}
    report = workdir / REPORT_FILE
    try:
        collection = records.collect_records(list(by_path), target, skip_unreadable=True,
                                             where=f"among the {len(by_path)} planned")
    except records.NoFinishedRuns as e:
        _unusable(e.skipped, by_path, log)
        raise _nothing(study, report, f"no finished finetuning run with a finite {target} "
                       f"among the {len(by_path)} planned", e.skipped, by_path) from None
    log(collection.skip_report())
    # Runs that finished without a usable target are failed runs as far as the fit goes.
    report_status = {**status, **_unusable(collection.skipped, by_path, log)}
    # Paths relative to the study: the report does not change when the directory moves.
    skipped = [(os.path.relpath(path, workdir), reason) for path, reason in collection.skipped]
    staging = workdir / _STAGING
    shutil.rmtree(staging, ignore_errors=True)
    out = staging / FIT_DIR  # figures are linked as fit/figures/..., as after the swap below
    try:
        doc = fit_lib.run(settings, collection.table, out, skipped)
        if not doc["results"]:
            raise _nothing(study, report, "no law could be fitted: " + "; ".join(
                f"{f.get('method')} {f.get('law')}: {f['reason']}"
                for f in doc.get("not_fitted", [])[:5]), [], by_path)
        text = _report(study, doc, report_status, collection, out)
        final, previous = workdir / FIT_DIR, workdir / ".fit.previous"
        shutil.rmtree(previous, ignore_errors=True)
        if final.exists():
            final.rename(previous)
        out.rename(final)
        paths.write_text_atomic(report, text)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _unusable(skipped, by_path: Mapping[str, str], log) -> dict[str, dict[str, Any]]:
    """status entries for finished runs that have nothing to fit ('no finite ...')."""
    out = {}
    for path, reason in skipped:
        if reason.startswith("no finite") and path in by_path:
            out[by_path[path]] = {"status": "failed", "reason": reason}
            log(f"{by_path[path]}: left out of the fit: {reason}")
    return out


def _nothing(study: Study, report: Path, why: str, skipped, by_path) -> NothingToFit:
    """The NothingToFit to raise; writes a report saying why only where there is none."""
    if report.exists():
        return NothingToFit(f"nothing to fit: {why}; {report} from an earlier fit is kept")
    lines = [f"# Study {study.name}", "", f"Nothing to fit yet: {why}.", ""]
    lines += [f"- `{by_path.get(path, path)}`: {reason}" for path, reason in skipped]
    paths.write_text_atomic(report, "\n".join(lines) + "\n")
    return NothingToFit(f"nothing to fit: {why}; {report} says which runs and why")


def _predict(params: Mapping[str, float], x: float, df: float) -> float:
    return params["A_m"] * x ** -params["alpha_m"] * df ** -params["beta"] + params["E"]


def _uncertified(result: Mapping[str, Any]) -> str | None:
    """Why the multiplicative model-size fit of one method is not certified (None if it is)."""
    fits = [("joint", result["joint"]), ("model-size", result["factors"]["model_size"]["fit"])]
    reasons = [f"{name} fit: {f.get('reason') or 'not certified'}" for name, f in fits
               if not f.get("certified", True)]
    return "; ".join(reasons) or None


def recommendation(study: Study, doc: Mapping[str, Any]) -> list[str]:
    """The method with the lowest predicted loss, by finetuning-data budget, for the anchor
    model (multiplicative law, model-size factor). A range that rests on an uncertified fit, or
    lies outside the finetuning sizes the study ran, says so on its own line."""
    results = {r["method"]: r for r in doc["results"]
               if r["law"] == "multiplicative" and "model_size" in r["factors"]
               and {"A_m", "alpha_m", "beta", "E"} <= set(r["parameters"])}
    fits = {m: r["parameters"] for m, r in results.items()}
    if len(fits) < 2:
        return ["Fewer than two methods have a multiplicative model-size fit: no comparison."]
    x = _model_params(study, study.anchor_size)
    sizes = sorted({n for ns in study.data_sizes.values() for n in ns})
    grid = sorted({int(round(v)) for v in
                   [10 ** (i / 4) for i in range(int(4 * math.log10(max(1, sizes[0] / 4))),
                                                 int(4 * math.log10(sizes[-1] * 10)) + 1)]})
    best = [(n, min(fits, key=lambda m: _predict(fits[m], x, n))) for n in grid]
    # Every range compares every method's law: one uncertified fit weakens them all.
    uncertified = {m: why for m in sorted(results) if (why := _uncertified(results[m]))}
    lines, start = [], 0
    for i in range(1, len(best) + 1):
        if i == len(best) or best[i][1] != best[start][1]:
            lo, hi = best[start][0], best[i - 1][0]
            method = best[start][1]
            warnings = []
            if uncertified:
                warnings.append("**not certified**: " + "; ".join(
                    f"{m}'s {why}" for m, why in uncertified.items())
                    + ": do not rely on this range")
            if hi < sizes[0] or lo > sizes[-1]:
                warnings.append(f"extrapolated: the study ran {sizes[0]:,}-{sizes[-1]:,} "
                                "examples")
            elif lo < sizes[0] or hi > sizes[-1]:
                warnings.append(f"extrapolated outside the {sizes[0]:,}-{sizes[-1]:,} "
                                "examples the study ran")
            lines.append(f"- {lo:,} to {hi:,} finetuning examples: **{method}** "
                         f"(predicted test loss {_predict(fits[method], x, lo):.3f} "
                         f"to {_predict(fits[method], x, hi):.3f})"
                         + (" -- " + "; ".join(warnings) if warnings else ""))
            start = i
    return lines


def _findings(study: Study, doc: Mapping[str, Any], table) -> list[str]:
    """The paper's findings, tested on this study's fits, and the study's premises."""
    from scaling import findings

    columns = [c for c in table.names if c.startswith("zero_shot.") and c.endswith(".loss")]
    zero = findings.zero_shot(table, columns[0]) if columns else {}
    zs_task = columns[0].split(".")[1] if columns else None
    measured = findings.measured_extremes(table, doc["settings"]["target"])
    lines = ["## Findings", "",
             "The paper's headline findings (reference: Zhang et al. 2024, section 6), each "
             "tested on this study's multiplicative fits, bootstrapped "
             f"{int(study.config.fit.bootstrap)} times, and (iv) and (v) also on the runs "
             "themselves (matched runs, bootstrapped over the pairs):", ""]
    comparisons = doc.get("comparisons", {}).get(study.config.task)
    if comparisons is None:
        lines += ["No multiplicative fit of this task: (i)-(iii) cannot be tested.", ""]
    lines += findings.section(findings.verdicts(comparisons or {}, zero, zs_task, measured))
    lines += ["", "## Does the study measure what the paper's does?", "",
              "The paper's factors presume that a larger model, and more pretraining, make a "
              "better base for finetuning. Tested on this study's runs:", ""]
    lines += findings.premise_lines(findings.premises(table, doc["settings"]["target"]))
    return lines


def _report(study: Study, doc, status, collection, out: Path) -> str:
    failed = {k: v for k, v in sorted(status.items()) if v["status"] == "failed"}
    figures = sorted(p.relative_to(out.parent) for p in (out / "figures").glob("*.png"))
    summary = (out / "summary.md").read_text()
    parts = [
        f"# Study `{study.name}`: task `{study.config.task}`",
        "",
        f"Model sizes {', '.join(study.sizes)} (anchor {study.anchor_size}); pretraining "
        f"checkpoints at steps {', '.join(map(str, study.checkpoints))}; methods "
        f"{', '.join(study.methods)}; finetuning examples "
        + "; ".join(f"{m}: {', '.join(map(str, ns))}" for m, ns in study.data_sizes.items())
        + "; PET sizes " + "; ".join(f"{m}: {', '.join(map(str, v))}"
                                     for m, v in study.pet_sizes.items())
        + f"; seeds {', '.join(map(str, study.seeds))}.",
        "",
        f"{len(collection.table)} finished finetuning runs were fitted. "
        + (f"{len(failed)} run(s) failed and are left out of the fit:" if failed
           else "No run failed."),
    ]
    parts += [f"- `{k}`: {v['reason']}" for k, v in failed.items()]
    for f in doc.get("not_fitted", []):
        parts.append(f"- not fitted: {f['method']} ({f['law']} law): {f['reason']}")
    parts += [""] + _findings(study, doc, collection.table)
    parts += ["", "## Which method for which data budget", "",
              f"For the {study.anchor_size} model, by the multiplicative joint laws fitted "
              "per method (model-size factor):", ""]
    parts += recommendation(study, doc)
    parts += ["", "## Figures", ""]
    parts += [f"![{p.stem}]({p})" for p in figures]
    parts += ["", "## Fits", "", summary]
    return "\n".join(parts) + "\n"
