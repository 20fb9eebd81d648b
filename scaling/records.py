"""Collecting run records (DIR/**/record.json) into the tidy table.

Runs that are still running or have failed are skipped and counted with the reason; a record of
an unknown schema version, or one missing a field the table needs, is an error naming the file
and the field, never a silently dropped run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from scaling import table as table_lib

SUPPORTED_VERSIONS = (1,)
RECORD_NAME = "record.json"
# Numeric entries of `final` that are not generation metrics of the run.
_NOT_METRICS = {"dev_loss", "test_loss", "test_perplexity", "dev_perplexity"}


@dataclasses.dataclass
class Collection:
    """The table of finished finetuning runs, and what was skipped and why."""

    table: table_lib.Table
    skipped: list[tuple[str, str]]   # (path, reason)

    def skip_report(self) -> str:
        if not self.skipped:
            return f"collected {len(self.table)} finished finetuning run(s); skipped none"
        counts = Counter(reason.split(":")[0] for _, reason in self.skipped)
        kinds = ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
        lines = [f"collected {len(self.table)} finished finetuning run(s); skipped "
                 f"{len(self.skipped)}: " + kinds]
        lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def collect(runs_dir: str | os.PathLike) -> Collection:
    """Reads every record under runs_dir into a Collection."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"runs directory {str(root)!r} does not exist")
    paths = sorted(root.rglob(RECORD_NAME))
    if not paths:
        raise ValueError(f"no run records ({RECORD_NAME}) under {str(root)!r}")
    rows, skipped = [], []
    for path in paths:
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        row, reason = parse(rec, str(path))
        if reason is not None:
            skipped.append((str(path), reason))
        else:
            rows.append(row)
    if not rows:
        raise ValueError(f"no finished finetuning runs under {str(root)!r} "
                         f"({len(skipped)} skipped: "
                         + "; ".join(f"{p}: {r}" for p, r in skipped[:5]) + ")")
    metrics = sorted({k for r in rows for k in r["metrics"]})
    cols: dict[str, list[Any]] = {k: [] for k in table_lib.CORE + tuple(metrics) + ("run",)}
    for r in rows:
        for k in table_lib.CORE:
            cols[k].append(r[k])
        for k in metrics:
            cols[k].append(r["metrics"].get(k, math.nan))
        cols["run"].append(r["run"])
    return Collection(table=table_lib.Table(cols), skipped=skipped)


def parse(rec: Any, where: str) -> tuple[dict[str, Any] | None, str | None]:
    """One record -> (row, None), or (None, reason to skip). Raises on malformed records."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a run record must be a JSON object")
    version = _field(rec, "record_version", where)
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{where}: unknown record_version {version!r}; this reader supports "
                         f"{list(SUPPORTED_VERSIONS)}")
    status = _field(rec, "status", where)
    if status == "running":
        return None, "unfinished: status is 'running'"
    if status == "failed":
        return None, f"failed: {rec.get('failure_reason') or 'no reason recorded'}"
    if status != "finished":
        raise ValueError(f"{where}: field 'status' is {status!r}; expected running, finished "
                         "or failed")
    if _field(rec, "kind", where) != "finetune":
        return None, f"not a finetuning run: kind is {rec['kind']!r}"
    model = _field(rec, "model", where)
    data = _field(rec, "data", where)
    final = _field(rec, "final", where)
    pet = rec.get("pet")
    row = {
        "task": str(_field(rec, "task", where)),
        "method": str(_field(rec, "method", where)),
        "model_params": _number(model, "num_params", where, "model"),
        "pretrain_tokens": _number(data, "pretrain_tokens", where, "data"),
        "pet_size": math.nan if pet is None else _number(pet, "size", where, "pet"),
        "finetune_examples": _number(data, "finetune_examples", where, "data"),
        "seed": _number(data, "seed", where, "data"),
        "dev_loss": _number(final, "dev_loss", where, "final", required=False),
        "test_loss": _number(final, "test_loss", where, "final", required=False),
        "run": str(Path(where).parent),
        "metrics": {k: float(v) for k, v in final.items()
                    if k not in _NOT_METRICS and isinstance(v, (int, float))
                    and not isinstance(v, bool)},
    }
    if math.isnan(row["dev_loss"]) and math.isnan(row["test_loss"]):
        raise ValueError(f"{where}: field 'final' has neither 'dev_loss' nor 'test_loss'")
    return row, None


def _field(rec, key, where):
    if key not in rec:
        raise ValueError(f"{where}: missing field {key!r}")
    return rec[key]


def _number(obj, key, where, parent, required=True):
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: field {parent!r} must be an object")
    v = obj.get(key)
    if v is None:
        if required:
            raise ValueError(f"{where}: missing field '{parent}.{key}'")
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: field '{parent}.{key}' must be a number, got {v!r}")
    return float(v)


def select(table: table_lib.Table, *, task=None, method=None) -> table_lib.Table:
    """Rows of the given task(s) and method(s) (None = all); errors name unknown values."""
    mask = np.ones(len(table), bool)
    for col, want in (("task", task), ("method", method)):
        if want is None:
            continue
        want = [want] if isinstance(want, str) else list(want)
        have = set(table[col])
        missing = [w for w in want if w not in have]
        if missing:
            raise ValueError(f"{col} {missing} not in the table; it has {sorted(have)}")
        mask &= np.isin(table[col], want)
    return table.where(mask)
