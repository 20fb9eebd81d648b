"""Held-out splits by factor values, and the errors reported on them.

A split names, per column, the values whose runs are left out of the fit: 'max', 'min', or a
number (matched to the nearest value in the data within a relative tolerance, so 209e9 finds a
checkpoint at 208.98e9 tokens). Interior values are allowed. The paper's starred values
(Table 1b) are the preset `paper(task)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from scaling import table as table_lib

Spec = Mapping[str, Sequence[float | str]]

MATCH_RTOL = 0.02


def paper(task: str) -> dict[str, list[float | str]]:
    """The paper's starred values: the largest model, PET size and finetuning set, and
    pretraining tokens 209B (En-De and MLSum) or 167B (En-Zh), both interior checkpoints."""
    tokens = 167e9 if "zh" in task.lower() else 209e9
    return {table_lib.MODEL_PARAMS: ["max"], table_lib.PRETRAIN_TOKENS: [tokens],
            table_lib.PET_SIZE: ["max"], table_lib.FINETUNE_EXAMPLES: ["max"]}


def largest() -> dict[str, list[float | str]]:
    """The largest value of every factor."""
    return {c: ["max"] for c in (table_lib.MODEL_PARAMS, table_lib.PRETRAIN_TOKENS,
                                 table_lib.PET_SIZE, table_lib.FINETUNE_EXAMPLES)}


def parse(text: str) -> dict[str, list[float | str]]:
    """'model_params=max,pretrain_tokens=209e9' -> spec ('none' -> empty)."""
    spec: dict[str, list[float | str]] = {}
    if text.strip().lower() in ("", "none"):
        return spec
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"held-out spec {text!r}: expected column=value, got {part!r}")
        col, val = (s.strip() for s in part.split("=", 1))
        spec.setdefault(col, []).append(val if val in ("max", "min") else float(val))
    return spec


def resolve(values: np.ndarray, wanted: Sequence[float | str], column: str,
            what: str = "held-out value") -> list[float]:
    """Data values meant by `wanted` among `values` (NaN ignored); errors if one is absent."""
    finite = np.unique(values[np.isfinite(values)])
    out = []
    for w in wanted:
        if finite.size == 0:
            raise ValueError(f"{what} {w!r} for {column!r}: the column has no values")
        if w == "max":
            out.append(float(finite.max()))
        elif w == "min":
            out.append(float(finite.min()))
        else:
            w = float(w)
            near = finite[np.argmin(np.abs(finite - w))]
            if abs(near - w) > MATCH_RTOL * abs(w):
                raise ValueError(f"{what} {w:g} for {column!r} is not in the data "
                                 f"(values: {', '.join(f'{v:g}' for v in finite)})")
            out.append(float(near))
    return out


def mask(tab: table_lib.Table, spec: Spec, columns: Sequence[str] | None = None) -> np.ndarray:
    """True for rows held out by `spec` (restricted to `columns` when given)."""
    held = np.zeros(len(tab), bool)
    for col, wanted in spec.items():
        if columns is not None and col not in columns:
            continue
        if col not in tab:
            raise ValueError(f"held-out column {col!r} is not in the table ({list(tab.names)})")
        vals = tab[col]
        if not np.any(np.isfinite(vals)):
            continue
        for v in resolve(vals, wanted, col):
            held |= np.isclose(vals, v, rtol=1e-12, atol=0.0)
    return held


def errors(pred: np.ndarray, obs: np.ndarray) -> dict[str, float]:
    """Mean absolute deviation (the paper's Delta), RMSE and mean relative error."""
    pred, obs = np.asarray(pred, float), np.asarray(obs, float)
    if pred.size == 0:
        return {"delta": math.nan, "rmse": math.nan, "relative": math.nan, "n": 0}
    d = pred - obs
    return {"delta": float(np.mean(np.abs(d))), "rmse": float(np.sqrt(np.mean(d ** 2))),
            "relative": float(np.mean(np.abs(d) / np.abs(obs))), "n": int(pred.size)}
