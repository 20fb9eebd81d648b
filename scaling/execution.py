"""Running a study's planned runs: which to reuse, which to run, and how each one ended.

A run is reused only when its record says it finished *and* carries the config hash of the
run the study plans now (ul2_lm.record.config_hash; a version-1 record is judged by the hash of
the config it stores) *and*, for a finetuning run, the base it was trained from is the base the
study plans (the record's base.config_hash, and the base itself reused). Any other run with a
record is run again from a clean workdir: its old workdir is moved to
DIR/stale/<run_id>.<first 8 hex digits of its old hash> (outside runs/, so neither the study nor
`scaling.fit --runs=DIR/runs` reads it), never resumed. Unfinished runs of the planned config
resume from their checkpoints; failed ones stay failed unless retried.

`execute` hands the runs to an executor (scaling/executors.py) and returns status.json's
content; its first line says how many runs are reused and why the others run.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from scaling.grid import Study
from scaling.runspec import Outcome, RunSpec
from ul2_lm import paths, record as record_lib

STATUS_FILE = "status.json"
STALE_DIR = "stale"

# What the study does with a planned run, from its record.
REUSE = "reused"                  # finished, same config and base: not run
NEW = "new"                       # no record: runs
CONFIG_CHANGED = "config changed"  # a record of another config: moved aside, runs clean
BASE_CHANGED = "base changed"     # trained from another base, or its base runs again: likewise
RESUME = "to resume"              # unfinished, same config: resumes from its checkpoints
FAILED = "failed before"          # failed, same config, not retried: stays failed
RETRY = "to retry"                # failed, same config, --retry_failed: resumes
UNREADABLE = "unreadable record"  # a corrupt record: fails, naming the file
STALE = (CONFIG_CHANGED, BASE_CHANGED)
RUNS = (NEW, CONFIG_CHANGED, BASE_CHANGED, RESUME, RETRY)


class StudyBusy(RuntimeError):
    """Another runner holds the study directory."""


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the study does with one planned run, and the record it decided from."""

    action: str
    record: record_lib.RunRecord | None = None
    reason: str | None = None  # UNREADABLE: the error; FAILED: the recorded failure

    @property
    def old_hash(self) -> str | None:
        return None if self.record is None else self.record.config_hash


def read_decision_record(spec: RunSpec) -> record_lib.RunRecord | Decision | None:
    """The run's typed record, None when it has none, or an UNREADABLE decision."""
    try:
        return record_lib.load(spec.workdir)
    except record_lib.RecordError as e:
        return Decision(UNREADABLE, reason=str(e))


def decide(spec: RunSpec, record: record_lib.RunRecord | None,
           planned: Mapping[str, RunSpec], decided: Mapping[str, Decision], *,
           retry_failed: bool = False) -> Decision:
    """The reuse rule (module docstring) for one run, given the decisions of the runs it
    depends on (`decided`, by run id) and the planned specs by run id."""
    if record is None:
        return Decision(NEW)
    if record.config_hash != spec.config_hash:
        return Decision(CONFIG_CHANGED, record)
    for dep in spec.depends_on:
        recorded = record.base.config_hash if record.base is not None else None
        if recorded is not None and recorded != planned[dep].config_hash:
            return Decision(BASE_CHANGED, record)
        if dep in decided and decided[dep].action in (NEW,) + STALE:
            return Decision(BASE_CHANGED, record)
    if record.status == "finished":
        return Decision(REUSE, record)
    if record.status == "failed":
        if retry_failed:
            return Decision(RETRY, record)
        return Decision(FAILED, record, record.failure_reason or "no reason recorded")
    return Decision(RESUME, record)


def decide_all(specs: Sequence[RunSpec],
               records: Mapping[str, record_lib.RunRecord | Decision | None], *,
               retry_failed: bool = False) -> dict[str, Decision]:
    """Every run's decision, in plan order (each run after the runs it depends on)."""
    planned = {s.run_id: s for s in specs}
    decided: dict[str, Decision] = {}
    for spec in specs:
        record = records.get(spec.run_id)
        decided[spec.run_id] = (record if isinstance(record, Decision) else
                                decide(spec, record, planned, decided,
                                       retry_failed=retry_failed))
    return decided


def summary_line(name: str, decisions: Mapping[str, Decision]) -> str:
    """'study 'x': 46 runs: 30 reused, 10 config changed, 6 new; 16 to run'."""
    counts = collections.Counter(d.action for d in decisions.values())
    order = (REUSE, CONFIG_CHANGED, BASE_CHANGED, NEW, RESUME, RETRY, FAILED, UNREADABLE)
    parts = [f"{counts[a]} {a}" for a in order if counts[a] or a == REUSE]
    to_run = sum(counts[a] for a in RUNS)
    return f"study {name!r}: {len(decisions)} runs: {', '.join(parts)}; {to_run} to run"


def move_aside(spec: RunSpec, decision: Decision, study_dir: Path) -> Path:
    """Moves a stale run's workdir to DIR/stale/<run_id>.<old hash, 8 digits>[-k]; returns
    where it went."""
    if paths.is_remote(spec.workdir):
        raise ValueError(f"run {spec.run_id}: its workdir {spec.workdir} holds a run of another "
                         "config; a study moves only local workdirs aside")
    stem = study_dir / STALE_DIR / f"{spec.run_id}.{(decision.old_hash or 'unknown')[:8]}"
    target, k = stem, 1
    while target.exists():
        k += 1
        target = stem.with_name(f"{stem.name}-{k}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(spec.workdir, target)
    return target


# --- records and status ---------------------------------------------------------------------------


def write_json(path: Path, value) -> None:
    paths.write_text_atomic(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def _read_record(spec: RunSpec) -> dict[str, Any] | None:
    """The run's record as a dict, or None when it has none or it cannot be read."""
    try:
        return record_lib.read(spec.workdir)
    except Exception as e:  # noqa: BLE001 (half-written, another version, a bucket unreachable)
        logging.getLogger("scaling.study").warning("cannot read the record of %s (%s: %s)",
                                                   spec.run_id, type(e).__name__, e)
        return None


def run_status(spec: RunSpec) -> str | None:
    """'finished', 'failed', 'running' (unfinished) or None (never started), from its record."""
    record = _read_record(spec)
    return None if record is None else record.get("status")


def record_failure(spec: RunSpec, reason: str) -> None:
    """Marks a run failed in its record (writing one when the run never got that far)."""
    record = _read_record(spec)
    if record is None:
        record = record_lib.new_record(kind=spec.kind, task=spec.config["data"]["task"],
                                       method=spec.config["finetune"]["method"] or "pretrain",
                                       config=spec.config, model={}, data={})
    if record.get("status") != "failed" or not record.get("failure_reason"):
        record.update(status="failed", failure_reason=reason)
        record_lib.write(spec.workdir, record)


def _groups(spec: RunSpec) -> tuple[str, ...]:
    """Groups of runs expected to take alike, the closest first: pretraining runs, then runs of
    any kind; finetuning runs by method and data size, then by method, then all finetuning
    runs. (A finetuning run's time follows its data size more than its planned FLOPs: early
    stopping ends a run of a few examples after a few dozen steps, one of a hundred after
    hundreds.)"""
    if spec.kind != "finetune":
        return (spec.kind, "all")  # before any pretraining run ends, any run's rate will do
    method = spec.config["finetune"]["method"]
    examples = (spec.config.get("data", {}).get("finetune", {}) or {}).get("num_examples")
    return (f"finetune {method} n{examples}", f"finetune {method}", "finetune")


class Progress:
    """'runs done / total, ETA' lines.

    A finetuning run that stops early uses a fraction of its planned FLOPs, a fraction that
    differs between methods and data sizes. So the ETA counts the planned FLOPs left in each run
    at the seconds per planned FLOP of the closest group with finished runs (finetuning: the
    same method and data size, else the same method, else any finetuning run; no ETA before
    the first finetuning run ends). Wall time over the summed run durations scales it for runs
    that share the machine (parallel executors)."""

    def __init__(self, total: int, to_run: Sequence[RunSpec]):
        self.total, self.done = total, total - len(to_run)
        self.left = {s.run_id: (_groups(s), s.train_flops) for s in to_run}
        self.start = time.perf_counter()
        self.by_group: dict[str, list[float]] = {}  # group -> [seconds, planned FLOPs] done
        self.failed = 0

    def settled(self, run_id: str, ok: bool = True) -> None:
        """A run to run turned out finished, or failed, before it started (its record arrived
        from a bucket): no work left."""
        if self.left.pop(run_id, None) is not None:
            self.done += 1
            self.failed += not ok

    def _rate(self, groups: Sequence[str]) -> float:
        """Seconds per planned FLOP of the first of `groups` with finished runs."""
        for g in groups:
            if g in self.by_group:
                seconds, flops = self.by_group[g]
                return seconds / max(flops, 1.0)
        return math.nan

    def eta(self) -> float:
        seconds = self.by_group.get("all", [0.0])[0]  # summed durations of the finished runs
        if not seconds:
            return math.nan
        work = sum(flops * self._rate(groups) for groups, flops in self.left.values())
        return work * (time.perf_counter() - self.start) / seconds

    def finished(self, outcome: Outcome) -> str:
        groups, flops = self.left.pop(outcome.run_id, ((), 0.0))
        self.done += 1
        self.failed += not outcome.ok
        if groups and outcome.ok:
            for group in {*groups, "all"}:
                done = self.by_group.setdefault(group, [0.0, 0.0])
                done[0] += outcome.seconds
                done[1] += flops
        eta = self.eta()
        status = "done" if outcome.ok else f"FAILED ({outcome.reason})"
        eta_text = "" if math.isnan(eta) else f", ETA {int(eta // 60)}m{int(eta % 60):02d}s"
        return (f"[{self.done}/{self.total} runs{eta_text}] {outcome.run_id}: {status} in "
                f"{outcome.seconds:.0f}s" + (f"; {self.failed} failed so far" if self.failed else ""))


# --- runners ----------------------------------------------------------------------------------------


def enable_compilation_cache() -> None:
    """Keeps compiled programs on disk ($UL2_LM_CACHE/jax): the runs of a grid share a handful
    of shapes, so all but the first run of each shape skip compiling."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(_cache_dir() / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def enable_compilation_cache_for_children() -> None:
    """The same compilation cache for runs started as processes (through the environment)."""
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_cache_dir() / "jax"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def _cache_dir() -> Path:
    return Path(os.environ.get("UL2_LM_CACHE") or Path.home() / ".cache" / "ul2_lm")


def in_process_runner(spec: RunSpec) -> None:
    """Runs one training run in this process, with the compilation cache on."""
    from scaling import executors

    enable_compilation_cache()
    executors.train_in_process(spec)


@contextlib.contextmanager
def study_lock(directory: Path):
    """One runner per study directory at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyBusy(f"another scaling.study process is running in {directory}") from None
        yield


# --- executing ----------------------------------------------------------------------------------------


def execute(study: Study, specs: Sequence[RunSpec], workdir: Path, executor, *,
            retry_failed: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs what the reuse rule (module docstring) says to run; returns status.json's content
    (how each run ended, from its record: a run finished some other way than through this
    study counts as finished)."""
    from scaling.executors import DRY_RUN_REASON as dry_run_reason

    by_id = {s.run_id: s for s in specs}
    decisions = decide_all(specs, {s.run_id: read_decision_record(s) for s in specs},
                           retry_failed=retry_failed)
    log(summary_line(study.name, decisions))
    dry_run = getattr(executor, "dry_run", False)
    for spec in specs:
        decision = decisions[spec.run_id]
        if decision.action in STALE and not dry_run:
            where = move_aside(spec, decision, workdir)
            log(f"{spec.run_id}: {decision.action}; its old run moved to "
                f"{os.path.relpath(where, workdir)}")
    status = {rid: {"status": "finished", "reason": None} for rid, d in decisions.items()
              if d.action == REUSE}
    status.update({rid: {"status": "failed", "reason": d.reason} for rid, d in decisions.items()
                   if d.action in (FAILED, UNREADABLE)})
    to_run = [s for s in specs if decisions[s.run_id].action in RUNS]
    progress = Progress(len(specs), to_run)

    def skip(spec: RunSpec):
        decision = decisions[spec.run_id]
        if decision.action == REUSE:
            return True
        if decision.action in (FAILED, UNREADABLE):
            return Outcome(spec.run_id, ok=False, reason=decision.reason)
        # An executor may have brought a record home since (gcloud: from the bucket).
        record = read_decision_record(spec)
        if record == decision.record:
            return False  # nothing new: run it
        if isinstance(record, Decision):
            return failed(spec, record.reason)
        now = decide(spec, record, by_id, decisions, retry_failed=retry_failed)
        if now.action == REUSE:
            decisions[spec.run_id] = now
            progress.settled(spec.run_id)
            status[spec.run_id] = {"status": "finished", "reason": None}
            return True
        if now.action in STALE:
            # Not here before the executor ran: it holds a run of another config or base
            # where the run would go, which this study cannot move aside itself.
            where = getattr(executor, "remote_workdir", lambda s: s.workdir)(spec)
            return failed(spec, f"{now.action}: {where} holds a run of another config or base "
                                f"(config hash {now.old_hash[:8]}, planned "
                                f"{spec.config_hash[:8]}); move it aside and run the study again")
        return False

    def failed(spec: RunSpec, reason: str) -> Outcome:
        progress.settled(spec.run_id, ok=False)
        status[spec.run_id] = {"status": "failed", "reason": reason}
        return Outcome(spec.run_id, ok=False, reason=reason)

    def done(outcome: Outcome) -> None:
        if outcome.reason == dry_run_reason:
            log(f"{outcome.run_id}: {outcome.reason}")
            return
        if not outcome.ok:
            record_failure(by_id[outcome.run_id], outcome.reason or "unknown failure")
        status[outcome.run_id] = {"status": "finished" if outcome.ok else "failed",
                                  "reason": outcome.reason}
        write_json(workdir / STATUS_FILE, status)
        log(progress.finished(outcome))

    executor.run(specs, done, skip=skip)
    write_json(workdir / STATUS_FILE, status)
    return status
