r"""A whole scaling study in one command: pretrain -> finetune grid -> fit -> report.

    python -m scaling.study --config=configs/studies/tiny.py --workdir=DIR
    python -m scaling.study --config=configs/studies/paper_wmt14_ende.py --workdir=gs://B/S --plan

The study config (configs/studies/*.py) names the pretraining runs (one per model size, keeping
intermediate checkpoints as the pretraining-data factor), the finetuning grid (methods x
finetuning-data sizes x PET sizes x seeds, over the three factors of the paper: model size,
pretraining data, PET size), the held-out values and the fit. The runner plans every run,
hands them to an executor (scaling/executors.py: local sequential by default, local parallel,
or TPU slices through gcloud), fits the laws to what finished and writes DIR/REPORT.md.

DIR holds: study.json (the study config and the planned runs), runs/<run_id>/ (each run's own
workdir: checkpoints, record.json, run_config.json), status.json (how each run ended), fit/
(`python -m scaling.fit` output: table.csv, fit.json, summary.md, figures/) and REPORT.md.

Run the same command again after a kill: finished runs are skipped, unfinished ones resume
from their checkpoints, and the report comes out as from an uninterrupted study. Failed runs
(NaN, bad data) are recorded with their reason and left out of the fit, which says so;
--retry_failed runs them again. --plan prints the run list, the count, an estimate of
accelerator hours and the commands, and runs nothing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from scaling.runspec import Outcome, RunSpec, join

METHODS = ("fmt", "lora", "prompt")
PET_KNOB = {"lora": ("finetune.lora.rank", "r"), "prompt": ("finetune.prompt.length", "p")}


class StudyError(ValueError):
    """A study config that cannot work, named by its dotted key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"study.{key}: {message}")


# --- configs -----------------------------------------------------------------------------------


def load_module(path: str | os.PathLike):
    """A config file (configs/*.py) as a module; relative paths from the repository."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parents[1] / path
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_study_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config()` of a config file (configs/*.py)."""
    module = load_module(path)
    return module.get_config(arg) if arg is not None else module.get_config()


def _apply(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str,
           prefix: str = "") -> None:
    """Sets `overrides` (nested like the config: {'train': {'num_steps': 40}}, or dotted keys)
    on `config`; a key the config does not have is an error naming it."""
    for key, value in dict(overrides).items():
        node, parts = config, key.split(".")
        for part in parts[:-1]:
            if part not in node:
                raise StudyError(where, f"{prefix}{key}: no section {part!r} in the run config")
            node = node[part]
        leaf = parts[-1]
        if leaf not in node:
            raise StudyError(where, f"{prefix}{key}: the run config has no key {leaf!r}")
        if isinstance(node[leaf], ml_collections.ConfigDict) and hasattr(value, "items") \
                and len(node[leaf]):
            _apply(node[leaf], value, where, f"{prefix}{key}.")
        else:
            node[leaf] = value.to_dict() if hasattr(value, "to_dict") else value


@dataclasses.dataclass(frozen=True)
class Point:
    """One finetuning run of the grid."""

    method: str
    size: str
    pretrain_step: int
    pet_size: int | None
    examples: int
    seed: int

    @property
    def run_id(self) -> str:
        pet = "full" if self.pet_size is None else f"{PET_KNOB[self.method][1]}{self.pet_size}"
        return (f"finetune/{self.method}/{self.size}/step{self.pretrain_step}/{pet}/"
                f"n{self.examples}/seed{self.seed}")


@dataclasses.dataclass
class Study:
    """A parsed, checked study config."""

    config: ml_collections.ConfigDict
    sizes: dict[str, dict[str, Any]]
    anchor_size: str
    pretrain_steps: int
    checkpoints: tuple[int, ...]
    methods: tuple[str, ...]
    data_sizes: dict[str, tuple[int, ...]]
    pet_sizes: dict[str, tuple[int, ...]]
    default_pet: dict[str, int]
    seeds: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.config.name

    def points(self) -> list[Point]:
        """The grid: every factor swept around the anchor (the anchor size's final checkpoint
        and the default PET size), each crossed with every data size and seed; no repeats."""
        out: dict[str, Point] = {}
        final = self.pretrain_steps

        def add(method, size, step, pet):
            for n in self.data_sizes[method]:
                for seed in self.seeds:
                    p = Point(method, size, step, pet, n, seed)
                    out.setdefault(p.run_id, p)

        for method in self.methods:
            pet = self.default_pet.get(method)
            for size in self.sizes:  # model-size factor
                add(method, size, final, pet)
            for step in self.checkpoints:  # pretraining-data factor
                add(method, self.anchor_size, step, pet)
            for value in self.pet_sizes.get(method, ()):  # PET-size factor
                add(method, self.anchor_size, final, value)
        return list(out.values())


def parse(config: ml_collections.ConfigDict) -> Study:
    """Checks a study config; every problem is a StudyError naming its key."""
    for key in ("name", "task", "pretrain", "finetune", "heldout", "fit"):
        if key not in config:
            raise StudyError(key, "missing")
    pre, ft = config.pretrain, config.finetune
    sizes = {name: dict(v) for name, v in dict(pre.sizes).items()}
    if not sizes:
        raise StudyError("pretrain.sizes", "names no model size")
    anchor = pre.anchor_size
    if anchor not in sizes:
        raise StudyError("pretrain.anchor_size", f"{anchor!r} is not one of {sorted(sizes)}")
    steps = int(pre.num_steps)
    checkpoints = tuple(sorted({int(s) for s in pre.checkpoints} | {steps}))
    for s in checkpoints:
        if not 0 < s <= steps:
            raise StudyError("pretrain.checkpoints", f"step {s} is not in 1..{steps} "
                             "(pretrain.num_steps)")
    methods = tuple(ft.methods)
    for m in methods:
        if m not in METHODS:
            raise StudyError("finetune.methods", f"unknown method {m!r}; methods: {list(METHODS)}")
        if m not in ft.configs:
            raise StudyError("finetune.configs", f"no config file for method {m!r}")
    data = ft.data_sizes
    data_sizes = {m: tuple(int(n) for n in (data[m] if isinstance(data, Mapping) or hasattr(
        data, "keys") else data)) for m in methods}
    for m, ns in data_sizes.items():
        if not ns or min(ns) < 1:
            raise StudyError("finetune.data_sizes", f"{m}: needs positive sizes, got {ns}")
    pet_sizes = {m: tuple(int(v) for v in dict(ft.pet_sizes).get(m, ())) for m in methods
                 if m in PET_KNOB}
    default_pet = {}
    for m in methods:
        if m in PET_KNOB:
            base = load_config_file(ft.configs[m])
            _apply(base, dict(ft.get("overrides", {})), "finetune.overrides")
            default_pet[m] = int(_get(base, PET_KNOB[m][0]))
    study = Study(config=config, sizes=sizes, anchor_size=anchor, pretrain_steps=steps,
                  checkpoints=checkpoints, methods=methods, data_sizes=data_sizes,
                  pet_sizes=pet_sizes, default_pet=default_pet, seeds=tuple(int(s) for s in ft.seeds))
    _check_heldout(study)
    return study


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _check_heldout(study: Study) -> None:
    """Held-out values must be values of the grid."""
    held = dict(study.config.heldout)
    grids = {
        "model_size": list(study.sizes),
        "pretrain_step": list(study.checkpoints),
        "finetune_examples": sorted({n for ns in study.data_sizes.values() for n in ns}),
        "pet_size": sorted({v for m in study.pet_sizes for v in
                            study.pet_sizes[m] + (study.default_pet[m],)}),
    }
    for key, value in held.items():
        if key not in grids:
            raise StudyError(f"heldout.{key}", f"unknown factor; one of {sorted(grids)}")
        if value in (None, "max", "min"):
            continue
        if value not in grids[key]:
            raise StudyError(f"heldout.{key}", f"{value!r} is not in the grid {grids[key]}")


# --- planning ----------------------------------------------------------------------------------


def _pretrain_config(study: Study, size: str) -> ml_collections.ConfigDict:
    c = load_config_file(study.config.pretrain.config)
    _apply(c, {f"model.{k}": v for k, v in study.sizes[size].items()}, f"pretrain.sizes.{size}")
    _apply(c, dict(study.config.pretrain.get("overrides", {})), "pretrain.overrides")
    c.train.num_steps = study.pretrain_steps
    if size == study.anchor_size:
        # Every checkpoint the grid finetunes from is kept (the other sizes need the last only).
        every = math.gcd(*study.checkpoints)
        c.checkpoint.every_steps = every
        c.checkpoint.keep_last = study.pretrain_steps // every + 1
    return c


def _finetune_config(study: Study, p: Point, base_workdir: str,
                     loaded: dict[str, ml_collections.ConfigDict] | None = None
                     ) -> ml_collections.ConfigDict:
    """The run config of grid point `p`. `loaded` caches the method config files by method
    (a paper grid has hundreds of points per method); each point gets its own copy."""
    loaded = {} if loaded is None else loaded
    if p.method not in loaded:
        loaded[p.method] = load_config_file(study.config.finetune.configs[p.method])
    c = copy.deepcopy(loaded[p.method])
    _apply(c, {f"model.{k}": v for k, v in study.sizes[p.size].items()}, f"pretrain.sizes.{p.size}")
    _apply(c, dict(study.config.finetune.get("overrides", {})), "finetune.overrides")
    c.data.task = study.config.task
    c.finetune.base_workdir = base_workdir
    c.finetune.base_step = p.pretrain_step
    c.data.finetune.num_examples = p.examples
    c.data.finetune.subset_seed = p.seed
    if c.data.vocab.kind == "sentencepiece_file":
        c.data.vocab.path = join(base_workdir, "vocab.model")  # every run keeps its vocabulary
    c.train.seed = p.seed
    if p.pet_size is not None:
        _apply(c, {PET_KNOB[p.method][0]: p.pet_size}, "finetune.pet_sizes")
    return c


def _train_flops(config: ml_collections.ConfigDict, num_steps: int | None = None) -> float:
    from ul2_lm import flops, model_sizes

    model_config = model_sizes.resolve(config.model)
    steps = num_steps or config.train.num_steps
    epochs, examples = config.finetune.num_epochs, config.data.finetune.num_examples
    if config.finetune.method and epochs and examples and not config.data.pack:
        # The paper's budget: the step limit or the epoch limit, whichever comes first.
        steps = min(steps, max(1, math.ceil(epochs * examples / config.train.global_batch_size)))
    tokens = steps * config.train.global_batch_size * config.data.seq_len
    return float(flops.training_flops_per_token(model_config, config.data.seq_len) * tokens)


def plan(study: Study, workdir: str) -> list[RunSpec]:
    """Every run of the study, pretraining first, each finetuning run after its base."""
    from ul2_lm import config as config_lib

    runs_dir = join(workdir, "runs")
    specs = []
    for size in study.sizes:
        c = _pretrain_config(study, size)
        specs.append(RunSpec(run_id=f"pretrain/{size}", kind="pretrain",
                             config=config_lib.to_dict(c),
                             workdir=join(runs_dir, "pretrain", size),
                             train_flops=_train_flops(c)))
    loaded = {}
    for p in study.points():
        base_id = f"pretrain/{p.size}"
        c = _finetune_config(study, p, join(runs_dir, base_id), loaded)
        specs.append(RunSpec(run_id=p.run_id, kind="finetune", config=config_lib.to_dict(c),
                             workdir=join(runs_dir, p.run_id), depends_on=(base_id,),
                             train_flops=_train_flops(c)))
    return specs


def validate_runs(specs: Sequence[RunSpec], num_devices: int | None = None) -> None:
    """Every run's config passes the trainer's checks (keys, types, shapes), before any runs."""
    from ul2_lm import config as config_lib

    for spec in specs:
        try:
            config_lib.validate(ml_collections.ConfigDict(spec.config), num_devices=num_devices)
        except config_lib.ConfigError as e:
            raise StudyError("runs", f"run {spec.run_id}: {e}") from None


def describe_plan(study: Study, specs: Sequence[RunSpec], *, peak_flops: float = 275e12,
                  mfu: float = 0.4) -> str:
    """The run list, the count, accelerator hours from the FLOP formula, and the commands."""
    lines = [f"study {study.name!r}: {len(specs)} runs "
             f"({sum(s.kind == 'pretrain' for s in specs)} pretraining, "
             f"{sum(s.kind == 'finetune' for s in specs)} finetuning)"]
    by_kind: dict[str, float] = {}
    for s in specs:
        key = s.kind if s.kind == "pretrain" else f"finetune {s.config['finetune']['method']}"
        by_kind[key] = by_kind.get(key, 0.0) + s.train_flops

    def hours(flops: float) -> float:
        return flops / (peak_flops * mfu) / 3600

    total = sum(by_kind.values())
    lines.append(f"training FLOPs: {total:.3g} in all; accelerator-hours at {mfu:.0%} MFU of "
                 f"{peak_flops / 1e12:g} TFLOP/s per chip: {hours(total):,.1f}")
    for key, value in by_kind.items():
        lines.append(f"  {key}: {value:.3g} FLOPs ({hours(value):,.1f} chip-hours)")
    lines += ["", "| run | FLOPs | command |", "|---|---|---|"]
    lines += [f"| {s.run_id} | {s.train_flops:.3g} | `{s.shell_command()}` |" for s in specs]
    return "\n".join(lines)


# --- running -----------------------------------------------------------------------------------

STATUS_FILE = "status.json"


def _write_json(path: Path, value) -> None:
    from ul2_lm import paths

    paths.write_text_atomic(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def _read_record(spec: RunSpec) -> dict[str, Any] | None:
    """The run's record, or None when it has none or it cannot be read (then it counts as not
    started: it runs, and resumes from its own checkpoints)."""
    from ul2_lm import record as record_lib

    try:
        return record_lib.read(spec.workdir)
    except Exception as e:  # noqa: BLE001 (half-written, another version, a bucket unreachable)
        logging.getLogger("scaling.study").warning("cannot read the record of %s (%s: %s); it "
                                                   "counts as not started", spec.run_id,
                                                   type(e).__name__, e)
        return None


def run_status(spec: RunSpec) -> str | None:
    """'finished', 'failed', 'running' (unfinished) or None (never started), from its record."""
    record = _read_record(spec)
    return None if record is None else record.get("status")


class Progress:
    """'runs done / total, ETA' lines, the ETA from the FLOPs of what is left."""

    def __init__(self, total: int, to_run: Sequence[RunSpec]):
        self.total, self.done = total, total - len(to_run)
        self.flops_left = {s.run_id: s.train_flops for s in to_run}
        self.start, self.flops_done = time.perf_counter(), 0.0
        self.failed = 0

    def found_finished(self, run_id: str) -> None:
        """A run to run turned out finished (its record arrived from a bucket): no work left."""
        if self.flops_left.pop(run_id, None) is not None:
            self.done += 1

    def finished(self, outcome: Outcome) -> str:
        flops = self.flops_left.pop(outcome.run_id, 0.0)
        self.done += 1
        self.failed += not outcome.ok
        self.flops_done += flops
        elapsed = time.perf_counter() - self.start
        left = sum(self.flops_left.values())
        eta = elapsed / self.flops_done * left if self.flops_done else float("nan")
        status = "done" if outcome.ok else f"FAILED ({outcome.reason})"
        eta_text = "" if math.isnan(eta) else f", ETA {int(eta // 60)}m{int(eta % 60):02d}s"
        return (f"[{self.done}/{self.total} runs{eta_text}] {outcome.run_id}: {status} in "
                f"{outcome.seconds:.0f}s" + (f"; {self.failed} failed so far" if self.failed else ""))


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


def _record_failure(spec: RunSpec, reason: str) -> None:
    """Marks a run failed in its record (writing one when the run never got that far)."""
    from ul2_lm import record as record_lib

    record = _read_record(spec)
    if record is None:
        record = record_lib.new_record(kind=spec.kind, task=spec.config["data"]["task"],
                                       method=spec.config["finetune"]["method"] or "pretrain",
                                       config=spec.config, model={}, data={})
    if record.get("status") != "failed" or not record.get("failure_reason"):
        record.update(status="failed", failure_reason=reason)
        record_lib.write(spec.workdir, record)


@contextlib.contextmanager
def _study_lock(directory: Path):
    """One runner per study directory at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another scaling.study process is running in {directory}") from None
        yield


def execute(study: Study, specs: Sequence[RunSpec], workdir: Path, executor, *,
            retry_failed: bool = False, log=print) -> dict[str, Any]:
    """Runs what is not finished yet; returns status.json's content (how each run ended, from
    its record: a run finished some other way than through this study counts as finished)."""
    from scaling.executors import DRY_RUN_REASON as dry_run_reason

    records = {s.run_id: _read_record(s) for s in specs}
    before = {rid: r and r.get("status") for rid, r in records.items()}
    status = {rid: {"status": before[rid], "reason": r.get("failure_reason")}
              for rid, r in records.items() if before[rid] in ("finished", "failed")}
    # Failures of an earlier invocation stay failures (their dependents fail without starting).
    failed_before = {rid: Outcome(rid, ok=False, reason=r.get("failure_reason"))
                     for rid, r in records.items() if before[rid] == "failed" and not retry_failed}
    to_run = [s for s in specs if before[s.run_id] != "finished" and s.run_id not in failed_before]
    progress = Progress(len(specs), to_run)
    log(f"study {study.name!r}: {len(specs)} runs, "
        f"{sum(v == 'finished' for v in before.values())} finished, "
        f"{sum(v == 'failed' for v in before.values())} failed before, "
        f"{sum(v == 'running' for v in before.values())} to resume; {len(to_run)} to run")

    def skip(spec: RunSpec):
        if spec.run_id in failed_before:
            return failed_before[spec.run_id]
        if before[spec.run_id] == "finished":
            return True
        # An executor may have brought the record home since (gcloud: from the bucket).
        if run_status(spec) == "finished":
            progress.found_finished(spec.run_id)
            status[spec.run_id] = {"status": "finished", "reason": None}
            return True
        return False

    def done(outcome: Outcome) -> None:
        if outcome.reason == dry_run_reason:
            log(f"{outcome.run_id}: {outcome.reason}")
            return
        if not outcome.ok:
            _record_failure(by_id[outcome.run_id], outcome.reason or "unknown failure")
        status[outcome.run_id] = {"status": "finished" if outcome.ok else "failed",
                                  "reason": outcome.reason}
        _write_json(workdir / STATUS_FILE, status)
        log(progress.finished(outcome))

    by_id = {s.run_id: s for s in specs}
    executor.run(specs, done, skip=skip)
    _write_json(workdir / STATUS_FILE, status)
    return status


# --- fitting and the report ----------------------------------------------------------------------


def _model_params(study: Study, size: str) -> int:
    from ul2_lm import model_sizes

    c = _pretrain_config(study, size)
    return model_sizes.count_params(model_sizes.resolve(c.model))["total"]


def _tokens_at(study: Study, step: int) -> float:
    c = _pretrain_config(study, study.anchor_size)
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
    return {**fit_lib.DEFAULTS, "law": ",".join(fit.laws), "preset": fit.preset,
            "heldout": ",".join(parts) or "none", "bootstrap": int(fit.bootstrap),
            "seed": int(fit.get("seed", 0)), "target": fit.get("target", "test_loss"),
            "anchor": anchor, "curve_law": fit.get("curve_law"), "keep_going": True}


def fit_and_report(study: Study, workdir: Path, status: Mapping[str, Any], log=print
                   ) -> Path:
    """Fits the finished runs (scaling.fit) and writes REPORT.md; returns its path."""
    from scaling import fit as fit_lib, records

    out = workdir / "fit"
    try:
        collection = records.collect(workdir / "runs")
    except (ValueError, FileNotFoundError) as e:
        report = workdir / "REPORT.md"
        report.write_text(f"# Study {study.name}\n\nNothing to fit yet: {e}\n")
        return report
    settings = fit_settings(study)
    log(collection.skip_report())
    # Paths relative to the study: the report does not change when the directory moves.
    skipped = [(os.path.relpath(path, workdir), reason) for path, reason in collection.skipped]
    doc = fit_lib.run(settings, collection.table, out, skipped)
    report = workdir / "REPORT.md"
    report.write_text(_report(study, doc, status, collection, out))
    return report


def _predict(params: Mapping[str, float], x: float, df: float) -> float:
    return params["A_m"] * x ** -params["alpha_m"] * df ** -params["beta"] + params["E"]


def recommendation(study: Study, doc: Mapping[str, Any]) -> list[str]:
    """The method with the lowest predicted loss, by finetuning-data budget, for the anchor
    model (multiplicative law, model-size factor)."""
    fits = {r["method"]: r["parameters"] for r in doc["results"]
            if r["law"] == "multiplicative" and {"A_m", "alpha_m", "beta", "E"} <= set(r["parameters"])}
    if len(fits) < 2:
        return ["Fewer than two methods have a multiplicative model-size fit: no comparison."]
    x = _model_params(study, study.anchor_size)
    sizes = sorted({n for ns in study.data_sizes.values() for n in ns})
    grid = sorted({int(round(v)) for v in
                   [10 ** (i / 4) for i in range(int(4 * math.log10(max(1, sizes[0] / 4))),
                                                 int(4 * math.log10(sizes[-1] * 10)) + 1)]})
    best = [(n, min(fits, key=lambda m: _predict(fits[m], x, n))) for n in grid]
    lines, start = [], 0
    for i in range(1, len(best) + 1):
        if i == len(best) or best[i][1] != best[start][1]:
            lo, hi = best[start][0], best[i - 1][0]
            lines.append(f"- {lo:,} to {hi:,} finetuning examples: **{best[start][1]}** "
                         f"(predicted test loss {_predict(fits[best[start][1]], x, lo):.3f} "
                         f"to {_predict(fits[best[start][1]], x, hi):.3f})")
            start = i
    uncertified = sorted(r["method"] for r in doc["results"]
                         if r["law"] == "multiplicative" and r["method"] in fits
                         and not r.get("certified", True))
    if uncertified:
        lines.append(f"- Caution: the fit of {', '.join(uncertified)} is not certified (see "
                     "Certificates below: a parameter at its bound or a search that did not "
                     "settle), so its predictions, and the ranges above, are less reliable.")
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
    parts += ["", "## Which method for which data budget", "",
              f"For the {study.anchor_size} model, by the multiplicative joint laws fitted "
              "per method (model-size factor):", ""]
    parts += recommendation(study, doc)
    parts += ["", "## Figures", ""]
    parts += [f"![{p.stem}]({p})" for p in figures]
    parts += ["", "## Fits", "", summary]
    return "\n".join(parts) + "\n"


# --- the command line ----------------------------------------------------------------------------


def main(argv=None) -> int:
    from absl import app, flags
    from absl import logging as absl_logging

    del argv
    FLAGS = flags.FLAGS
    # Orbax and JAX log every checkpoint step at INFO through absl; the study's own lines say enough.
    absl_logging.set_verbosity(absl_logging.WARNING)
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    study = parse(FLAGS.config)
    workdir = FLAGS.workdir
    specs = plan(study, workdir)
    if FLAGS.plan:
        validate_runs(specs)
        print(describe_plan(study, specs, peak_flops=FLAGS.peak_tflops * 1e12, mfu=FLAGS.mfu))
        return 0
    from ul2_lm import paths

    if paths.is_remote(workdir):
        raise app.UsageError(
            f"--workdir={workdir}: a study's own directory (its lock, status, records and "
            "report) must be local; the runs go to a bucket with --executor=gcloud "
            "--bucket=gs://...")
    from scaling import executors

    if FLAGS.executor != "local":
        enable_compilation_cache_for_children()
    options = {
        "local": {"runner": in_process_runner},
        "parallel": {"num_workers": FLAGS.workers},
        "local_pod": {"num_processes": FLAGS.processes, "num_workers": FLAGS.workers},
        "gcloud": {"project": FLAGS.gcloud_project, "zone": FLAGS.gcloud_zone,
                   "accelerator_type": FLAGS.accelerator_type,
                   "runtime_version": FLAGS.runtime_version, "bucket": FLAGS.bucket,
                   "name_prefix": FLAGS.name_prefix, "dry_run": FLAGS.dry_run,
                   "runs_per_slice": FLAGS.runs_per_slice, "max_slices": FLAGS.max_slices,
                   "remote_python": FLAGS.remote_python},
    }[FLAGS.executor]
    executor = executors.make_executor(FLAGS.executor, **options)
    if hasattr(executor, "validate"):
        executor.validate()  # a malformed zone or slice type: before any run starts
    local = Path(workdir)
    with _study_lock(local):
        validate_runs(specs)
        _write_json(local / "study.json", {
            "study": study.config.to_dict(), "runs": [
                {"run_id": s.run_id, "kind": s.kind, "workdir": s.workdir,
                 "depends_on": list(s.depends_on), "train_flops": s.train_flops}
                for s in specs]})
        status = execute(study, specs, local, executor, retry_failed=FLAGS.retry_failed,
                         log=lambda m: print(m, file=sys.stderr, flush=True))
        if getattr(executor, "dry_run", False):
            print("dry run: nothing ran, nothing to fit")
            return 0
        report = fit_and_report(study, local, status,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"report: {report}")
    return 0


def define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "A study config (configs/studies/*.py).",
                                    lock_config=False)
    flags.DEFINE_string("workdir", None, "The study's directory.")
    flags.DEFINE_bool("plan", False, "Print the run list, count, accelerator hours and commands; "
                      "run nothing.")
    flags.DEFINE_enum("executor", "local", ["local", "parallel", "local_pod", "gcloud"],
                      "Where runs run: this process, N local processes, multi-process jobs on "
                      "this machine (as on a pod), or TPU VM slices through gcloud.")
    flags.DEFINE_integer("workers", 2, "Runs at once (parallel, local_pod).")
    flags.DEFINE_integer("processes", 2, "Processes per run (local_pod).")
    flags.DEFINE_string("gcloud_project", None, "gcloud: the project.")
    flags.DEFINE_string("gcloud_zone", None, "gcloud: the zone, e.g. us-central2-b.")
    flags.DEFINE_string("accelerator_type", None, "gcloud: the slice type, e.g. v4-32.")
    flags.DEFINE_string("runtime_version", "tpu-ubuntu2204-base", "gcloud: the TPU VM image.")
    flags.DEFINE_string("bucket", None, "gcloud: the bucket for code, configs and workdirs.")
    flags.DEFINE_string("name_prefix", "ul2lm", "gcloud: prefix of the slice names.")
    flags.DEFINE_bool("dry_run", False, "gcloud: print the commands, issue nothing.")
    flags.DEFINE_integer("runs_per_slice", 1, "gcloud: runs sharing one slice, one after another.")
    flags.DEFINE_integer("max_slices", 1, "gcloud: slices that exist at once.")
    flags.DEFINE_string("remote_python", "python3", "gcloud: the workers' Python (3.11 or newer, "
                        "as setup.py requires; name another interpreter where the image's "
                        "python3 is older).")
    flags.DEFINE_bool("retry_failed", False, "Run failed runs again.")
    flags.DEFINE_float("peak_tflops", 275.0, "Peak bf16 TFLOP/s per chip for --plan "
                       "(TPU v4: 275).")
    flags.DEFINE_float("mfu", 0.4, "Model-FLOP utilisation assumed by --plan.")


if __name__ == "__main__":
    from absl import app, flags

    define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main)
