"""The run record: one JSON file per run, next to its checkpoints, that `scaling` reads.

The record is rewritten atomically (write a temporary file, then rename), so a reader or a kill
never sees half a file. On resume the trainer reloads it and drops what was measured after the
checkpoint it resumes from: those steps run again and are measured again.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from etils import epath

from ul2_lm import paths

RECORD_VERSION = 1
RECORD_NAME = "record.json"


def path_in(workdir: str | os.PathLike) -> epath.Path:
    return paths.as_path(workdir) / RECORD_NAME


def new_record(*, kind: str, task: str, method: str, config: Mapping[str, Any],
               model: Mapping[str, Any], data: Mapping[str, Any],
               pet: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A fresh record for a run that is about to start."""
    return {
        "record_version": RECORD_VERSION,
        "status": "running",
        "failure_reason": None,
        "kind": kind,
        "task": task,
        "method": method,
        "config": dict(config),
        "model": dict(model),
        "pet": None if pet is None else dict(pet),
        "data": dict(data),
        "steps": 0,
        "tokens_seen": 0,
        "eval_history": [],
        "best": None,
        "final": {},
    }


def _json_safe(x: Any) -> Any:
    # JSON has no NaN/Infinity; a diverged metric is recorded as null, not as invalid JSON.
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if hasattr(x, "item") and getattr(x, "shape", None) == ():
        return _json_safe(x.item())
    return x


def write(workdir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Atomically replaces the record file in `workdir`."""
    paths.write_text_atomic(path_in(workdir),
                            json.dumps(_json_safe(record), indent=1, allow_nan=False))


def read(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The record in `workdir`, or None when there is none."""
    target = path_in(workdir)
    if not target.exists():
        return None
    record = json.loads(target.read_text())
    version = record.get("record_version")
    if version != RECORD_VERSION:
        raise ValueError(f"{target}: record_version {version!r} is not {RECORD_VERSION}; "
                         "this record was written by another version of ul2_lm")
    return record


def update_best(record: dict[str, Any], split: str = "dev", metric: str = "loss") -> None:
    """Sets record['best'] to the evaluation of `split` with the lowest `metric` so far."""
    evals = [e for e in record["eval_history"]
             if e["split"] == split and e.get(metric) is not None and math.isfinite(e[metric])]
    best = min(evals, key=lambda e: e[metric], default=None)
    record["best"] = None if best is None else {
        "step": best["step"], "metric": f"{split}_{metric}", "value": best[metric]}


def truncate_to_step(record: dict[str, Any], step: int) -> dict[str, Any]:
    """Drops measurements taken after `step` (they are repeated after resuming from it)."""
    record["eval_history"] = [e for e in record["eval_history"] if e["step"] <= step]
    update_best(record)
    record["steps"] = min(record.get("steps", 0), step)
    record["status"] = "running"
    record["failure_reason"] = None
    record["final"] = {}
    return record
