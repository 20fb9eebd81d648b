"""The run record: one JSON file per run, next to its checkpoints, that `scaling` reads.

The schema is the dataclasses below (`RunRecord` and its sections); this module is its one
home and imports no JAX, so the trainer writes it and `scaling` reads it through the same
definitions. On disk it is `RunRecord.to_json()`: the trainer holds that dict while it runs
(appending evaluations, setting final metrics) and `write` checks it against the schema before
replacing the file, so no run writes a record that the readers refuse.

Version 2 adds `config_hash` (sha256 of the run's effective config, `config_hash`) and, for
finetuning runs, `base.config_hash` (the base run's). Version-1 records are still read: their
hash is computed from the config they store.

The record is rewritten atomically (write a temporary file, then rename), so a reader or a kill
never sees half a file. On resume the trainer reloads it and drops what was measured after the
checkpoint it resumes from: those steps run again and are measured again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

from etils import epath

from ul2_lm import paths

RECORD_VERSION = 2
READABLE_VERSIONS = (1, 2)
RECORD_NAME = "record.json"
STATUSES = ("running", "finished", "failed")
KINDS = ("pretrain", "finetune")
# Where a finetuning run's base lives is not what the run is: paths under the base's workdir
# are hashed relative to it, so a study directory can move without changing any run's identity
# (the base is identified by its own config hash, which the finetuning record keeps).
BASE_PLACEHOLDER = "{base_workdir}"


class RecordError(ValueError):
    """A record that cannot be read or does not fit the schema; names its path and field."""


# --- the schema ---------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelInfo:
    """The base model: its size name and parameter counts (PET parameters excluded)."""

    size: str | None = None
    num_params: int | None = None
    num_embedding_params: int | None = None
    num_non_embedding_params: int | None = None


@dataclasses.dataclass
class PetInfo:
    """LoRA or prompt tuning: the method, its size (rank or prompt length), what it trains."""

    kind: str
    size: int | None = None
    num_trainable_params: int | None = None


@dataclasses.dataclass
class DataInfo:
    """Pretraining tokens the base model saw, finetuning examples, the finetuning subset's seed
    (`data_seed` orders the data)."""

    pretrain_tokens: int | None = None
    finetune_examples: int | None = None
    seed: int | None = None
    data_seed: int | None = None


@dataclasses.dataclass
class Evaluation:
    """One evaluation: loss in nats per target token."""

    step: int
    split: str
    loss: float | None = None
    tokens_seen: int | None = None
    perplexity: float | None = None


@dataclasses.dataclass
class Best:
    """The best evaluation so far by `metric` (e.g. 'dev_loss')."""

    step: int
    metric: str
    value: float | None = None


@dataclasses.dataclass
class BaseRef:
    """A finetuning run's base: its workdir and step, the tokens it saw, its config hash."""

    workdir: str | None = None
    step: int | None = None
    pretrain_tokens: int | None = None
    model_size: str | None = None
    config_hash: str | None = None


@dataclasses.dataclass
class RunRecord:
    """A run's record (WORKSPACE.md, "The run record").

    `final` holds the final metrics (dev_loss, test_loss, best_step, generation metrics and
    flat copies of transfer metrics); `extra` every other section (a finetuning run's
    trainable, checkpoint, generation, zero_shot, few_shot, evaluations), kept as written.
    """

    kind: str
    task: str
    method: str
    config: dict[str, Any]
    config_hash: str
    model: ModelInfo = dataclasses.field(default_factory=ModelInfo)
    data: DataInfo = dataclasses.field(default_factory=DataInfo)
    pet: PetInfo | None = None
    base: BaseRef | None = None
    status: str = "running"
    failure_reason: str | None = None
    steps: int = 0
    tokens_seen: int = 0
    eval_history: list[Evaluation] = dataclasses.field(default_factory=list)
    best: Best | None = None
    final: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    record_version: int = RECORD_VERSION

    def to_json(self) -> dict[str, Any]:
        """The record as written to record.json (the version-1 layout plus the hashes)."""
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name != "extra"}
        if self.base is None:
            del out["base"]  # pretraining records have no base section
        return {"record_version": out.pop("record_version"), **out, **self.extra}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> RunRecord:
        """Checks `obj` (a parsed record.json) against the schema; errors name `where` and the
        field. A version-1 record gets the hash of the config it stores."""
        if not isinstance(obj, dict):
            raise RecordError(f"{where}: a run record must be a JSON object")
        version = _require(obj, "record_version", where)
        if version not in READABLE_VERSIONS:
            raise RecordError(f"{where}: unknown record_version {version!r}; this reader "
                              f"supports {list(READABLE_VERSIONS)}")
        obj = _upgraded(obj)
        for key in ("status", "kind", "task", "method", "config", "config_hash"):
            _require(obj, key, where)
        if obj["status"] not in STATUSES:
            raise RecordError(f"{where}: field 'status' is {obj['status']!r}; expected "
                              "running, finished or failed")
        if obj["kind"] not in KINDS:
            raise RecordError(f"{where}: field 'kind' is {obj['kind']!r}; expected pretrain or "
                              "finetune")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        record = _build(cls, {k: v for k, v in obj.items() if k in known}, where, "")
        record.extra = {k: v for k, v in obj.items() if k not in known}
        return record

    def final_metric(self, name: str) -> float | None:
        """final[name] as a float, or None when it is missing, null or not finite."""
        value = self.final.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value) if math.isfinite(value) else None


def new_record(*, kind: str, task: str, method: str, config: Mapping[str, Any],
               model: Mapping[str, Any], data: Mapping[str, Any],
               pet: Mapping[str, Any] | None = None, base: Mapping[str, Any] | None = None,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A fresh record for a run that is about to start, as the dict `write` takes. `config` is
    the run's full effective config; its hash is computed here."""
    where = "new record"
    record = RunRecord(
        kind=kind, task=task, method=method, config=dict(config), config_hash=config_hash(config),
        model=_build(ModelInfo, dict(model), where, "model."),
        data=_build(DataInfo, dict(data), where, "data."),
        pet=None if pet is None else _build(PetInfo, dict(pet), where, "pet."),
        base=None if base is None else _build(BaseRef, dict(base), where, "base."),
        extra=dict(extra or {}))
    return record.to_json()


# --- identity -------------------------------------------------------------------------------------


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the config as canonical JSON (sorted keys, no spaces, tuples as lists), with
    paths under finetune.base_workdir written relative to it (BASE_PLACEHOLDER)."""
    plain = _json_safe(config.to_dict() if hasattr(config, "to_dict") else config)
    base = (plain.get("finetune") or {}).get("base_workdir")
    if isinstance(base, str) and base:
        plain = _relative_to(plain, base.rstrip("/"))
    text = json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _relative_to(x: Any, base: str) -> Any:
    if isinstance(x, str) and (x.rstrip("/") == base or x.startswith(base + "/")):
        return BASE_PLACEHOLDER + x.rstrip("/")[len(base):]
    if isinstance(x, dict):
        return {k: _relative_to(v, base) for k, v in x.items()}
    if isinstance(x, list):
        return [_relative_to(v, base) for v in x]
    return x


def hash_of(record: Mapping[str, Any] | None) -> str | None:
    """The config hash a record (as `read` returns it) carries, or None."""
    return None if record is None else record.get("config_hash")


# --- reading and writing --------------------------------------------------------------------------


def path_in(workdir: str | os.PathLike) -> epath.Path:
    return paths.as_path(workdir) / RECORD_NAME


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


def write(workdir: str | os.PathLike, record: Mapping[str, Any] | RunRecord) -> None:
    """Atomically replaces the record file in `workdir`, after checking it against the schema."""
    target = path_in(workdir)
    plain = _json_safe(record.to_json() if isinstance(record, RunRecord) else record)
    RunRecord.from_json(plain, f"{target} (being written)")
    paths.write_text_atomic(target, json.dumps(plain, indent=1, allow_nan=False))


def _parse_file(target: epath.Path) -> Any:
    try:
        return json.loads(target.read_text())
    except json.JSONDecodeError as e:
        raise RecordError(f"{target}: not valid JSON ({e}); the record is corrupt: move the "
                          "run aside or delete the file") from None
    except UnicodeDecodeError as e:
        raise RecordError(f"{target}: not a text file ({e}); the record is corrupt") from None


def read(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The record in `workdir` as a dict (a version-1 record upgraded to version 2), or None
    when there is none. Only its JSON and version are checked (`load` checks the schema); a
    corrupt file or an unknown version is a RecordError naming the path."""
    target = path_in(workdir)
    if not target.exists():
        return None
    record = _parse_file(target)
    if not isinstance(record, dict):
        raise RecordError(f"{target}: a run record must be a JSON object")
    version = record.get("record_version")
    if version not in READABLE_VERSIONS:
        raise RecordError(f"{target}: record_version {version!r} is not one of "
                          f"{list(READABLE_VERSIONS)}; this record was written by another "
                          "version of ul2_lm")
    return _upgraded(record)


def load(path: str | os.PathLike) -> RunRecord | None:
    """The typed record at `path` (a record.json, or a workdir holding one), or None when there
    is none; errors name the path and the field."""
    target = paths.as_path(path)
    if target.name != RECORD_NAME:
        target = target / RECORD_NAME
    if not target.exists():
        return None
    return RunRecord.from_json(_parse_file(target), str(target))


def _upgraded(record: dict[str, Any]) -> dict[str, Any]:
    """A version-1 record in the version-2 layout: its config hash is that of its config."""
    if record.get("record_version") != 1:
        return record
    record = dict(record, record_version=RECORD_VERSION)
    config = record.get("config")
    record.setdefault("config_hash",
                      config_hash(config) if isinstance(config, Mapping) else None)
    return record


# --- building typed values from JSON --------------------------------------------------------------


def _require(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise RecordError(f"{where}: missing field {key!r}")
    return obj[key]


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls, obj: Any, where: str, prefix: str):
    """`cls` (a dataclass above) from its JSON object; unknown keys are ignored."""
    if not isinstance(obj, Mapping):
        raise RecordError(f"{where}: field {prefix.rstrip('.')!r} must be an object, got {obj!r}")
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{where}: missing field '{prefix}{f.name}'")
            continue
        values[f.name] = _value(hints[f.name], obj[f.name], where, prefix + f.name)
    return cls(**values)


def _value(hint, value: Any, where: str, name: str) -> Any:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):  # X | None
        if value is None:
            return None
        hint, = (a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, name + ".")
    if origin is list:
        if not isinstance(value, list):
            raise RecordError(f"{where}: field {name!r} must be a list, got {value!r}")
        return [_value(args[0], v, where, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where}: field {name!r} must be an object, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecordError(f"{where}: field {name!r} must be a number, got {value!r}")
        if hint is int and isinstance(value, float) and value.is_integer():
            return int(value)
        return value if hint is int or isinstance(value, float) else float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RecordError(f"{where}: field {name!r} must be a string, got {value!r}")
        return value
    return value


def _plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


# --- what the trainer does to a record as it runs ---------------------------------------------------


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
