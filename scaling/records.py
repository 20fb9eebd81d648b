"""Collecting run records (DIR/**/record.json) into the tidy table.

Records are read through their schema (ul2_lm/record.py). Runs that are still running, have
failed, or finished without a finite loss (a diverged run under nan_policy='skip') are skipped
and counted with the reason; a record of an unknown schema version, or one missing a field the
table needs, is an error naming the file and the field, never a silently dropped run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from scaling import table as table_lib
from ul2_lm import record as record_lib
from ul2_lm.record import RECORD_NAME

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


class NoFinishedRuns(ValueError):
    """Not one record can be fitted; `skipped` says why for each."""

    def __init__(self, message: str, skipped: list[tuple[str, str]]):
        super().__init__(message)
        self.skipped = skipped


def collect(runs_dir: str | os.PathLike, target: str | None = None) -> Collection:
    """Reads every record under runs_dir into a Collection (see `collect_records`)."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"runs directory {str(root)!r} does not exist")
    paths = sorted(root.rglob(RECORD_NAME))
    if not paths:
        raise ValueError(f"no run records ({RECORD_NAME}) under {str(root)!r}")
    return collect_records(paths, target, where=f"under {str(root)!r}")


def collect_records(paths: Iterable[str | os.PathLike], target: str | None = None, *,
                    where: str = "", skip_unreadable: bool = False) -> Collection:
    """The records at `paths` (record.json files; a missing one is skipped as not started) as
    a Collection. With `target`, a finished run whose final.<target> is missing or not finite
    is skipped with that reason. A corrupt record is a ValueError naming it, or with
    `skip_unreadable` skipped with that reason. NoFinishedRuns when none is left to fit."""
    rows, skipped = [], []
    for path in paths:
        try:
            record = record_lib.load(path)
        except record_lib.RecordError as e:
            if not skip_unreadable:
                raise ValueError(str(e)) from None
            skipped.append((str(path), f"unreadable: {e}"))
            continue
        if record is None:
            skipped.append((str(path), "not started: no record"))
            continue
        row, reason = _row(record, str(path), target)
        if reason is not None:
            skipped.append((str(path), reason))
        else:
            rows.append(row)
    if not rows:
        raise NoFinishedRuns(f"no finished finetuning runs {where or 'in the records given'} "
                             f"({len(skipped)} skipped: "
                             + "; ".join(f"{p}: {r}" for p, r in skipped[:5]) + ")", skipped)
    metrics = sorted({k for r in rows for k in r["metrics"]})
    cols: dict[str, list[Any]] = {k: [] for k in table_lib.CORE + tuple(metrics) + ("run",)}
    for r in rows:
        for k in table_lib.CORE:
            cols[k].append(r[k])
        for k in metrics:
            cols[k].append(r["metrics"].get(k, math.nan))
        cols["run"].append(r["run"])
    return Collection(table=table_lib.Table(cols), skipped=skipped)


def parse(rec: Any, where: str, target: str | None = None
          ) -> tuple[dict[str, Any] | None, str | None]:
    """One record (parsed JSON) -> (row, None), or (None, reason to skip). Raises ValueError
    naming `where` and the field on a record that does not fit the schema."""
    try:
        record = record_lib.RunRecord.from_json(rec, where)
    except record_lib.RecordError as e:
        raise ValueError(str(e)) from None
    return _row(record, where, target)


def _row(rec: record_lib.RunRecord, where: str, target: str | None
         ) -> tuple[dict[str, Any] | None, str | None]:
    if rec.status == "running":
        return None, "unfinished: status is 'running'"
    if rec.status == "failed":
        return None, f"failed: {rec.failure_reason or 'no reason recorded'}"
    if rec.kind != "finetune":
        return None, f"not a finetuning run: kind is {rec.kind!r}"
    losses = ("dev_loss", "test_loss")
    if all(rec.final_metric(k) is None for k in losses):
        return None, ("no finite loss: final." + " and final.".join(
            f"{k} is {_shown(rec.final, k)}" for k in losses)
            + " (a diverged run records its non-finite losses as null)")
    if target is not None and rec.final_metric(target) is None:
        return None, (f"no finite {target}: final.{target} is {_shown(rec.final, target)} "
                      "(a diverged run records its non-finite losses as null)")
    row = {
        "task": rec.task,
        "method": rec.method,
        "model_params": _number(rec.model.num_params, "model.num_params", where),
        "pretrain_tokens": _number(rec.data.pretrain_tokens, "data.pretrain_tokens", where),
        "pet_size": math.nan if rec.pet is None else _number(rec.pet.size, "pet.size", where),
        "finetune_examples": _number(rec.data.finetune_examples, "data.finetune_examples",
                                     where),
        "seed": _number(rec.data.seed, "data.seed", where),
        "dev_loss": _or_nan(rec.final_metric("dev_loss")),
        "test_loss": _or_nan(rec.final_metric("test_loss")),
        "run": str(Path(where).parent),
        "metrics": {k: float(v) for k, v in rec.final.items()
                    if k not in _NOT_METRICS and isinstance(v, (int, float))
                    and not isinstance(v, bool)},
    }
    return row, None


def _shown(final: dict[str, Any], key: str) -> str:
    return "missing" if key not in final else json.dumps(final[key])


def _number(value: float | None, name: str, where: str) -> float:
    if value is None:
        raise ValueError(f"{where}: missing field {name!r}")
    return float(value)


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


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
