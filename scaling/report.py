"""Markdown tables in the paper's layouts (Table 2: multiplicative vs additive errors;
Table 4: fitted parameters), and the fit summary."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from scaling import procedures

FACTOR_LABELS = {"model_size": "LLM model size", "pretrain_data": "Pretraining data size",
                 "pet_size": "PET parameter size"}
LAW_LABELS = {"multiplicative": "Multi.", "additive": "Add."}
PARAM_ORDER = ("A_m", "alpha_m", "A_p", "alpha_p", "A_t", "alpha_t", "B", "E", "beta")
# Marks a number that comes from a fit that is not certified, in every table.
UNCERTIFIED = "✗"
UNCERTIFIED_NOTE = (f"{UNCERTIFIED} from a fit that is not certified (a parameter at its bound, "
                    "or a search that did not settle; see its certificate): less reliable.")


def fmt(v: Any, digits: int = 3) -> str:
    """A number with `digits` significant figures; '-' for missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    s = f"{float(v):.{digits}g}"
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m[1] == "-" else "") + m[2], s)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines)
    if any(UNCERTIFIED in c for r in rows for c in r):
        text += "\n\n" + UNCERTIFIED_NOTE
    return text


def _mark(cell: str, certified: bool) -> str:
    return cell if certified else f"{cell} {UNCERTIFIED}"


def table2(results: Mapping[tuple[str, str, str], procedures.ProcedureResult]) -> str:
    """Delta_e / Delta_h per factor and law (rows: multiplicative, additive, then any other
    law) and task/method (columns)."""
    cols = sorted({(t, m) for t, m, _ in results}, key=lambda k: (k[0], _method_rank(k[1])))
    order = list(LAW_LABELS)
    laws = sorted(dict.fromkeys(k[2] for k in results),
                  key=lambda law: order.index(law) if law in order else len(order))
    rows = []
    for factor in procedures.FACTORS:
        for law in laws:
            cells = []
            for t, m in cols:
                r = results.get((t, m, law))
                ff = r.factors.get(factor) if r else None
                cells.append("-" if ff is None else _mark(
                    f"{fmt(ff.fit_errors['delta'])}/{fmt(ff.heldout_errors['delta'])}",
                    ff.fit.certified and r.joint.certified))
            if any(c != "-" for c in cells):
                rows.append([FACTOR_LABELS[factor], LAW_LABELS.get(law, law)] + cells)
    return _table(["factor", "law"] + [f"{t} {m}" for t, m in cols], rows)


def table4(results: Mapping[tuple[str, str], procedures.ProcedureResult],
           intervals: Mapping[tuple[str, str], Mapping[str, Sequence[float]]] | None = None
           ) -> str:
    """Fitted parameters (rows) per task/method (columns); bootstrap intervals if given."""
    cols = sorted(results, key=lambda k: (k[0], _method_rank(k[1])))
    params = {c: results[c].parameters() for c in cols}
    certified = {c: results[c].certified_parameters() for c in cols}
    names = [n for n in PARAM_ORDER if any(n in p for p in params.values())]
    names += sorted({n for p in params.values() for n in p} - set(names))
    rows, outside = [], False
    for n in names:
        cells = []
        for c in cols:
            v = params[c].get(n)
            cell = fmt(v) if v is None else _mark(fmt(v), certified[c][n])
            iv = (intervals or {}).get(c, {}).get(n)
            if v is not None and iv is not None:
                cell += f" [{fmt(iv[0])}, {fmt(iv[1])}]"
                if not iv[0] <= v <= iv[1]:  # NaN bounds compare False too: flagged.
                    cell += " †"
                    outside = True
            cells.append(cell)
        rows.append([n] + cells)
    text = _table(["param"] + [f"{t} {m}" for t, m in cols], rows)
    if outside:
        text += ("\n\n† The estimate lies outside its bootstrap interval: the refits of resampled "
                 "data differ systematically from the fit of all of it (few configurations, or "
                 "draws that end at a parameter bound), so that interval says little; more "
                 "configurations or seeds narrow it.")
    return text


def curves_table(rows: Sequence[Mapping[str, Any]], law: str) -> str:
    """Per-curve fits of one law of Df alone: parameters, Delta_e / Delta_h and the reason a
    fit is not certified, per curve.

    Each row: task, method, name (the curve), and under `law` the fit's JSON, its natural
    parameters and its errors.
    """
    fitted = [r for r in rows if law in r]
    names = list(dict.fromkeys(n for r in fitted for n in r[law]["parameters"]))
    body = []
    for r in fitted:
        f = r[law]
        ok = f["fit"]["certified"]
        body.append([r["task"], r["method"], r["name"]]
                    + [_mark(fmt(f["parameters"].get(n)), ok) for n in names]
                    + [_mark(f"{fmt(f['fit_errors']['delta'])}/"
                             f"{fmt(f['heldout_errors']['delta'])}", ok),
                       "yes" if ok else f["fit"]["failure_reason"]])
    return _table(["task", "method", "curve"] + names + ["Δe/Δh", "certified"], body)


def certification(results: Mapping[Any, procedures.ProcedureResult]) -> str:
    rows = []
    for key, r in results.items():
        fits = [("joint (shared " + ",".join(r.joint.law.shared) + ")", r.joint)]
        fits += [(f, ff.fit) for f, ff in r.factors.items()]
        for name, f in fits:
            rows.append([" ".join(map(str, key)), name, "yes" if f.certified else "**no**",
                         f.reason or _dropped(f), fmt(f.objective, 4)])
    return _table(["fit", "stage", "certified", "reason", "objective (summed Huber)"], rows)


def _dropped(fit) -> str:
    names = fit.checks.get("dropped", [])
    if not names:
        return ""
    return ("fitted without " + ", ".join(names) + ": at its lower bound, its term vanishes "
            "(the data show none)")


def _method_rank(m: str) -> int:
    order = {"fmt": 0, "prompt": 1, "lora": 2}
    return order.get(m, 3)
