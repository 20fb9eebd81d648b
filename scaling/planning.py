"""The runs of a study: each grid point's full config, its identity, FLOPs and command.

`plan` turns a checked `Study` (scaling/grid.py) into `RunSpec`s, pretraining runs first and
each finetuning run after its base; `describe_plan` is what `--plan` prints. A spec's
`config_hash` is the hash its run's record will carry (ul2_lm.record.config_hash), which is
how a resumed study knows which finished runs it can reuse (scaling/execution.py).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import ml_collections

from scaling.grid import (PET_KNOB, Point, Study, StudyError, apply_overrides,
                          load_run_config)
from scaling.runspec import RunSpec, join


def pretrain_config(study: Study, size: str) -> ml_collections.ConfigDict:
    c = load_run_config(study.config.pretrain.config, "pretrain.config")
    apply_overrides(c, {f"model.{k}": v for k, v in study.sizes[size].items()},
                    f"pretrain.sizes.{size}")
    apply_overrides(c, dict(study.config.pretrain.get("overrides", {})), "pretrain.overrides")
    c.train.num_steps = study.pretrain_steps
    if size == study.anchor_size:
        # Every checkpoint the grid finetunes from is kept (the other sizes need the last only).
        every = math.gcd(*study.checkpoints)
        c.checkpoint.every_steps = every
        c.checkpoint.keep_last = study.pretrain_steps // every + 1
    return c


def finetune_config(study: Study, p: Point, base_workdir: str,
                    loaded: dict[str, ml_collections.ConfigDict] | None = None
                    ) -> ml_collections.ConfigDict:
    """The run config of grid point `p`. `loaded` caches the method config files by method
    (a paper grid has hundreds of points per method); each point gets its own copy."""
    loaded = {} if loaded is None else loaded
    if p.method not in loaded:
        loaded[p.method] = load_run_config(study.config.finetune.configs[p.method],
                                           f"finetune.configs.{p.method}")
    c = copy.deepcopy(loaded[p.method])
    apply_overrides(c, {f"model.{k}": v for k, v in study.sizes[p.size].items()},
                    f"pretrain.sizes.{p.size}")
    apply_overrides(c, dict(study.config.finetune.get("overrides", {})), "finetune.overrides")
    c.data.task = study.config.task
    c.finetune.base_workdir = base_workdir
    c.finetune.base_step = p.pretrain_step
    c.data.finetune.num_examples = p.examples
    c.data.finetune.subset_seed = p.seed
    if c.data.vocab.kind == "sentencepiece_file":
        c.data.vocab.path = join(base_workdir, "vocab.model")  # every run keeps its vocabulary
    c.train.seed = p.seed
    if p.pet_size is not None:
        apply_overrides(c, {PET_KNOB[p.method][0]: p.pet_size}, "finetune.pet_sizes")
    return c


def train_flops(config: ml_collections.ConfigDict, num_steps: int | None = None) -> float:
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
        c = pretrain_config(study, size)
        specs.append(RunSpec(run_id=f"pretrain/{size}", kind="pretrain",
                             config=config_lib.to_dict(c),
                             workdir=join(runs_dir, "pretrain", size),
                             train_flops=train_flops(c)))
    loaded = {}
    for p in study.points():
        base_id = f"pretrain/{p.size}"
        c = finetune_config(study, p, join(runs_dir, base_id), loaded)
        specs.append(RunSpec(run_id=p.run_id, kind="finetune", config=config_lib.to_dict(c),
                             workdir=join(runs_dir, p.run_id), depends_on=(base_id,),
                             train_flops=train_flops(c)))
    return specs


def validate_runs(specs: Sequence[RunSpec], num_devices: int | None = None) -> None:
    """Every run's config passes the trainer's checks (keys, types, shapes), before any runs."""
    from ul2_lm import config as config_lib

    for spec in specs:
        try:
            config_lib.validate(ml_collections.ConfigDict(spec.config), num_devices=num_devices)
        except config_lib.ConfigError as e:
            raise StudyError("runs", f"run {spec.run_id}: {e}") from None


def manifest(study: Study, specs: Sequence[RunSpec]) -> dict[str, Any]:
    """study.json: the study config and every planned run, with the config hash its record
    will carry."""
    return {"study": study.config.to_dict(), "runs": [
        {"run_id": s.run_id, "kind": s.kind, "workdir": s.workdir,
         "depends_on": list(s.depends_on), "train_flops": s.train_flops,
         "config_hash": s.config_hash} for s in specs]}


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
    if any(s.kind == "finetune" and s.config["finetune"].get("early_stopping_evals")
           for s in specs):
        lines.append("  (runs that stop early on dev loss use a fraction of their planned "
                     "FLOPs: these are upper bounds)")
    lines += ["", "| run | FLOPs | command |", "|---|---|---|"]
    lines += [f"| {s.run_id} | {s.train_flops:.3g} | `{s.shell_command()}` |" for s in specs]
    return "\n".join(lines)
