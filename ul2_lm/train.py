r"""Trains a UL2 language model: `python -m ul2_lm.train --config=configs/tiny_ul2.py --workdir=DIR`.

Everything a run leaves is in DIR: orbax checkpoints (checkpoints/), TensorBoard summaries
(tensorboard/) and the run record (record.json). Running the same command again resumes from the
newest complete checkpoint and ends bitwise identical to a run that never stopped.

Any config value can be overridden: `--config.train.num_steps=200`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from etils import epath
from flax import nnx
from ml_collections import config_flags

import petuning
from ul2_lm import (checkpointing, config as config_lib, evaluate as evaluate_lib,
                   finetune as finetune_lib, flops, hardware, logging_utils, model as model_lib,
                   model_sizes, optim, partitioning, paths, record as record_lib, steps,
                   train_state)

log = logging_utils.log


def train_batches(config: ml_collections.ConfigDict, state: dict | None = None):
    """This host's endless training batches; `state` (from `.state()`) resumes exactly."""
    kwargs = dict(global_batch_size=config.train.global_batch_size,
                  shard_index=jax.process_index(), num_shards=jax.process_count(), state=state)
    if config.data.task == "synthetic":
        from ul2_lm import synthetic

        return synthetic.Batches(config, split="train", **kwargs)
    from ul2_lm.data import pipeline  # seqio and TensorFlow load here, not at import.

    return pipeline.make_train_iterator(config.data, **kwargs)


def all_hosts(value: Any) -> list[Any]:
    """Every process's `value` (small, JSON-able), in process order, on every process.

    Checkpoint metadata is written by process 0 alone, but each host reads its own shard of the
    data, so each host's iterator position must reach the checkpoint.
    """
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    encoded = json.dumps(value).encode()
    if len(encoded) > _MAX_STATE_BYTES:
        raise ValueError(f"data iterator state of {len(encoded)} bytes exceeds {_MAX_STATE_BYTES}")
    buffer = np.zeros(_MAX_STATE_BYTES, np.uint8)
    buffer[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    gathered = multihost_utils.process_allgather(buffer)
    return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in np.asarray(gathered)]


_MAX_STATE_BYTES = 4096


def validate_data(config: ml_collections.ConfigDict) -> None:
    if config.data.task == "synthetic":
        return
    from ul2_lm.data import pipeline

    pipeline.validate_data_config(config.data)


@dataclasses.dataclass
class Setup:
    """A run's model, optimiser and layout, built (abstractly) from its config."""

    config: ml_collections.ConfigDict
    model_config: model_lib.ModelConfig
    num_steps: int
    mesh: Any
    rules: tuple
    tx: Any
    schedule: Any
    layout: train_state.Layout
    make_model: Any
    trainable: Any
    finetune: finetune_lib.Finetune | None  # None: pretraining from scratch

    def plain_model(self) -> nnx.Module:
        return model_lib.Transformer(self.model_config, rngs=nnx.Rngs(params=self.config.train.seed))


def build(config: ml_collections.ConfigDict) -> Setup:
    """Checks the config (and, for finetuning, its method, base and data) and works out the
    run's shapes and shardings; allocates and compiles nothing."""
    # Every check that can fail on bad input runs before anything is built or compiled.
    config_lib.validate(config, num_devices=jax.device_count())
    validate_data(config)
    model_config = model_sizes.resolve(config.model)
    ft = (finetune_lib.prepare(config, model_config) if finetune_lib.is_finetuning(config)
          else None)
    num_steps = ft.num_steps if ft else config.train.num_steps
    labels, overrides = ft.optimizer_groups() if ft else (None, None)
    tx, schedule = train_state.optimizer(config, model_config, num_steps, param_labels=labels,
                                         group_overrides=overrides)
    mesh = partitioning.make_mesh(config.mesh.axes)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    setup = Setup(config=config, model_config=model_config, num_steps=num_steps, mesh=mesh,
                  rules=rules, tx=tx, schedule=schedule, layout=None, make_model=None,
                  trainable=ft.trainable if ft else nnx.Param, finetune=ft)
    setup.make_model = ft.make_model if ft else setup.plain_model
    setup.layout = train_state.make_layout(setup.make_model, tx, mesh, rules, setup.trainable)
    return setup


def _new_record(setup: Setup) -> dict[str, Any]:
    config, ft = setup.config, setup.finetune
    counts = model_sizes.count_params(setup.model_config)
    model = {"size": config.model.size, "num_params": counts["total"],
             "num_embedding_params": counts["embedding"],
             "num_non_embedding_params": counts["non_embedding"]}
    if ft is None:
        return record_lib.new_record(
            kind="pretrain", task=config.data.task, method="pretrain",
            config=config_lib.to_dict(config), model=model,
            data={"pretrain_tokens": 0, "finetune_examples": None, "seed": config.data.seed})
    report = petuning.trainable_report(nnx.eval_shape(setup.make_model), setup.trainable)
    log.info("%s", petuning.summary(report, ft.kind))
    subset_seed = config.data.finetune.subset_seed
    fields = ft.record_fields(setup.layout, report)
    # The base's config hash is part of this run's identity: a retrained base is another base.
    base = dict(fields.pop("base"), config_hash=record_lib.hash_of(ft.base.record))
    return record_lib.new_record(
        kind="finetune", task=config.data.task, method=ft.kind, config=config_lib.to_dict(config),
        model=model, pet=fields.pop("pet"), base=base, extra=fields,
        data={"pretrain_tokens": ft.base.pretrain_tokens, "finetune_examples": ft.num_examples,
              "seed": config.data.seed if subset_seed is None else subset_seed,
              "data_seed": config.data.seed})


def restore_run(setup: Setup, ckpt: checkpointing.CheckpointManager, step: int | None = None):
    """(state, frozen, metadata) of a run's checkpoint `step` (None: the newest readable)."""
    state, metadata = ckpt.restore(setup.layout.abstract_state, step=step)
    frozen = {}
    if setup.finetune is not None:
        frozen = setup.finetune.frozen_for_resume(setup.layout, metadata,
                                                  ckpt.directory / str(ckpt.restored_step))
    return state, frozen, metadata


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir` to its last step; returns its record.

    Pretraining (config.finetune.method None) starts from a random model. Finetuning starts
    from the base run config.finetune names, trains what its method trains, keeps the
    checkpoint with the lowest dev loss and, at the end, evaluates that checkpoint as
    config.evaluation says (ul2_lm/evaluate.py).
    """
    logging_utils.setup_console()
    workdir = paths.as_path(workdir)
    setup = build(config)
    model_config, mesh, rules = setup.model_config, setup.mesh, setup.rules
    num_steps, tx, schedule, layout, ft = (setup.num_steps, setup.tx, setup.schedule,
                                           setup.layout, setup.finetune)
    ckpt = checkpointing.CheckpointManager(workdir / "checkpoints", config.checkpoint)

    counts = model_sizes.count_params(model_config)
    record = record_lib.read(workdir)
    restored_step, data_state, base_metadata = ckpt.latest_step(), None, None
    if restored_step is not None:
        state, frozen, metadata = restore_run(setup, ckpt)
        data_state = metadata["data_state"][jax.process_index()]
        base_metadata = metadata.get("base")
        if ft is not None and base_metadata is not None:
            base_metadata = {**base_metadata, "workdir": str(ft.base.workdir)}
        restored_step = int(state.step)
        log.info("resumed from step %d in %s", restored_step, ckpt.directory)
        if record is not None:
            record = record_lib.truncate_to_step(record, restored_step)
    else:
        if ft is not None:
            state, frozen, base_fingerprint = ft.initial_state(tx, layout, mesh, rules)
            base_metadata = ft.checkpoint_metadata(base_fingerprint)
            log.info("finetuning (%s) from %s step %d", ft.kind, ft.base.workdir, ft.base.step)
        else:
            state, frozen = train_state.create(setup.make_model, tx, layout, mesh, rules)
        restored_step = 0
    if record is None or restored_step == 0:
        record = _new_record(setup)

    train_step = jax.jit(
        steps.make_train_step(layout.graphdef, tx, seed=config.train.seed,
                              num_microbatches=config.train.num_microbatches,
                              z_loss=config.train.z_loss,
                              dropout=model_config.dropout_rate > 0 or _has_dropout(ft)),
        in_shardings=(layout.state_shardings, layout.frozen_shardings, None),
        out_shardings=(layout.state_shardings, None),
        donate_argnums=(0,))
    eval_step = jax.jit(steps.make_eval_step(layout.graphdef))

    global_batch = config.train.global_batch_size
    tokens_per_step = global_batch * config.data.seq_len
    flops_per_step = flops.training_flops_per_token(model_config, config.data.seq_len) * tokens_per_step
    peak, peak_source = hardware.peak_flops_per_device()
    writer = logging_utils.MetricWriter(workdir / "tensorboard")
    progress = logging_utils.Progress(restored_step, num_steps)
    log.info("model %s: %s parameters (%s non-embedding); mesh %s; MFU relative to the %s",
             config.model.size, f"{counts['total']:,}", f"{counts['non_embedding']:,}",
             dict(mesh.shape), peak_source)

    eval_every = ft.eval_every_steps if ft else config.train.eval_every_steps
    patience = ft and config.finetune.early_stopping_evals
    stopping = dict(min_delta=config.finetune.early_stopping_min_delta or 0.0,
                    min_steps=config.finetune.early_stopping_min_steps or 0)
    # A run resumed after it decided to stop (its history says so) trains no further.
    stopped_at = (restored_step if patience and stops_early(record, patience, **stopping)
                  else None)

    batches = train_batches(config, data_state)
    _keep_vocabulary(batches, workdir)

    def save(step: int, metrics: dict[str, float] | None) -> None:
        metadata = {"data_state": all_hosts(batches.state())}
        if base_metadata is not None:
            metadata["base"] = base_metadata
        ckpt.save(step, state, metrics=metrics, metadata=metadata)

    def check_finite(step: int, finite) -> None:
        try:
            optim.check_finite(finite, step, config.train.nan_policy, ckpt.latest_step())
        except optim.NonFiniteError as e:
            ckpt.wait_until_finished()
            record.update(status="failed", failure_reason=str(e))
            if jax.process_index() == 0:
                record_lib.write(workdir, record)
            raise

    last_eval: dict[str, float] | None = None
    dev_batches: list | None = None
    pending: tuple[int, jax.Array] | None = None  # (step, its `finite` flag), checked a step late
    window_start, window_steps = time.perf_counter(), 0
    # The data iterator's prefetch thread stops with the loop, however the loop ends.
    with partitioning.activate(mesh, rules), contextlib.closing(batches):
        for step in range(restored_step + 1, (stopped_at or num_steps) + 1):
            host_batch = next(batches)
            batch = partitioning.host_batch_to_global(host_batch, mesh, rules, global_batch)
            state, metrics = train_step(state, frozen, batch)
            if step == restored_step + 1:
                # Throughput is measured from the first compiled step on.
                jax.block_until_ready(state)
                window_start = time.perf_counter()
            else:
                window_steps += 1
            # The guard already dropped a non-finite update, so no saved state is ever bad; the
            # previous step's flag is read while this one runs, keeping the device busy.
            if pending is not None:
                check_finite(*pending)
            pending = (step, metrics["finite"])

            is_eval = step % eval_every == 0 or step == num_steps
            is_log = step % config.train.log_every_steps == 0 or step == num_steps
            if is_log or is_eval:
                metrics = jax.device_get(metrics)
            if is_log and window_steps:
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_steps * tokens_per_step / elapsed
                mfu = tokens_per_s * flops_per_step / tokens_per_step / (peak * jax.device_count())
                scalars = {"loss": float(metrics["loss"]), "learning_rate": float(schedule(step - 1)),
                           "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tokens_per_s,
                           "mfu": mfu, "skipped_steps": int(state.skipped_steps)}
                writer.scalars(step, scalars, prefix="train/")
                log.info("%s loss %.4f lr %.2e %s tok/s MFU %.1f%%", progress.mark(step),
                         scalars["loss"], scalars["learning_rate"], f"{tokens_per_s:,.0f}", 100 * mfu)
                window_start, window_steps = time.perf_counter(), 0
            if is_eval:
                if dev_batches is None:  # read once: the same fixed batches at every evaluation
                    dev_batches = list(evaluate_lib.eval_batches(config, config.data.eval_split))
                last_eval = evaluate_lib.loss_metrics(eval_step, state.params, frozen, config,
                                                      mesh, rules, split=config.data.eval_split,
                                                      batches=dev_batches)
                writer.scalars(step, last_eval, prefix="dev/")
                log.info("step %d dev loss %.4f perplexity %.2f", step, last_eval["loss"],
                         last_eval["perplexity"])
                record["eval_history"].append({"step": step, "tokens_seen": step * tokens_per_step,
                                               "split": "dev", **last_eval})
                record_lib.update_best(record)
                if patience and stops_early(record, patience, **stopping):
                    stopped_at = step
                    log.info("step %d: stopping early, dev loss has not improved in %d "
                             "evaluations (best %.4f at step %d)", step, patience,
                             record["best"]["value"], record["best"]["step"])
                window_start, window_steps = time.perf_counter(), 0
            new_best = is_eval and record["best"] is not None and record["best"]["step"] == step
            if step % config.checkpoint.every_steps == 0 or step in (num_steps, stopped_at) or (
                    ft is not None and new_best):
                # A finetuning run saves at every evaluation that lowers the dev loss, so that
                # the checkpoint with the lowest dev loss is there to keep.
                check_finite(*pending)
                record.update(steps=step, tokens_seen=step * tokens_per_step)
                if ft is None:
                    record["data"]["pretrain_tokens"] = step * tokens_per_step
                # The record is written before the checkpoint: after a kill, what the newest
                # checkpoint covers is always in the record.
                if jax.process_index() == 0:
                    record_lib.write(workdir, record)
                save(step, {"dev_loss": last_eval["loss"]} if is_eval and last_eval else None)
            if step == stopped_at:
                break

    ckpt.wait_until_finished()
    record["final"] = {"dev_loss": last_eval["loss"] if last_eval else None,
                       "dev_perplexity": last_eval["perplexity"] if last_eval else None,
                       "skipped_steps": int(state.skipped_steps), "stopped_early_at": stopped_at}
    if ft is not None:
        _evaluate_best(setup, ckpt, state, frozen, eval_step, record)
    record["status"] = "finished"
    if jax.process_index() == 0:
        record_lib.write(workdir, record)
    writer.close()
    ckpt.close()
    log.info("finished %d steps; record in %s", stopped_at or num_steps,
             record_lib.path_in(workdir))
    return record


def stops_early(record: dict[str, Any], patience: int, min_delta: float = 0.0,
                min_steps: int = 0) -> bool:
    """Whether the dev loss has not improved (fallen below its best by more than `min_delta`)
    in the last `patience` evaluations and the last `min_steps` steps. A function of the record
    alone, so a resumed run decides as the uninterrupted one did."""
    evals = [e for e in record["eval_history"] if e["split"] == "dev"]
    best, best_step, since = math.inf, None, 0
    for e in evals:
        # A non-finite loss (null in a record read back) never counts as an improvement.
        if e["loss"] is not None and e["loss"] < best - min_delta:
            best, best_step, since = e["loss"], e["step"], 0
        else:
            since += 1
    if best_step is None:
        return len(evals) >= patience and evals[-1]["step"] >= min_steps
    return since >= patience and evals[-1]["step"] - best_step >= min_steps


VOCAB_FILE = "vocab.model"


def _keep_vocabulary(batches, workdir: epath.Path) -> None:
    """Copies the run's SentencePiece model into its workdir (a finetuning run of another task
    names it with data.vocab.path), unless it is there already."""
    source = getattr(getattr(batches, "vocabulary", None), "sentencepiece_model_file", None)
    target = workdir / VOCAB_FILE
    if source and not target.exists() and jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        epath.Path(source).copy(tmp, overwrite=True)
        tmp.rename(target)


def _has_dropout(ft: finetune_lib.Finetune | None) -> bool:
    return ft is not None and getattr(ft.method, "dropout_rate", 0.0) > 0


def _evaluate_best(setup: Setup, ckpt, state, frozen, eval_step, record: dict[str, Any]) -> None:
    """Evaluates the finetuning run's best checkpoint (lowest dev loss) into `record`.

    `state` is the run's live end state: when it is the best step it is evaluated as it is;
    otherwise only the best step's parameters are read back (not its optimiser state).
    """
    best = ckpt.best_step() or ckpt.latest_step()
    if best == int(state.step):
        params = state.params
    else:
        ckpt.wait_until_finished()
        params, _ = checkpointing.restore_subtree(ckpt.directory, "params",
                                                  setup.layout.abstract_params, step=best)
    log.info("evaluating the best checkpoint: step %d", best)
    results = _evaluate_params(setup, params, frozen, eval_step)
    record["final"].update(results.pop("final"), best_step=best)
    record.update(results)
    ft = setup.finetune
    record["checkpoint"].update(
        disk_bytes=paths.tree_bytes(ckpt.directory / str(best)),
        base_disk_bytes=paths.tree_bytes(ft.base.checkpoints / str(ft.base.step)))
    record["checkpoint"]["disk_ratio_to_base"] = (record["checkpoint"]["disk_bytes"]
                                                  / max(record["checkpoint"]["base_disk_bytes"], 1))


def _evaluate_params(setup: Setup, params, frozen, eval_step) -> dict[str, Any]:
    ft, layout = setup.finetune, setup.layout
    models = {"finetuned": nnx.merge(layout.graphdef, params, frozen)}
    if setup.config.evaluation.few_shot:
        base_graphdef = nnx.split(nnx.eval_shape(setup.plain_model))[0]
        base_params = ft.load_base_params(layout.abstract_params) if ft.kind == "fmt" else frozen
        models["base"] = nnx.merge(base_graphdef, base_params)
    return evaluate_lib.final_evaluation(config=setup.config, models=models, eval_step=eval_step,
                                         params=params, frozen=frozen, mesh=setup.mesh,
                                         rules=setup.rules)


def evaluate_run(workdir: str | os.PathLike, *, step: int | None = None,
                 evaluation: dict[str, Any] | None = None,
                 write_record: bool = False) -> dict[str, Any]:
    """Re-evaluates the run in `workdir` from its record's config and its checkpoint `step`
    (default: the best by dev loss, else the newest). `evaluation` overrides keys of
    config.evaluation. Finetuning runs get `final_evaluation`'s measurements; pretraining runs
    loss and perplexity on config.evaluation.splits."""
    logging_utils.setup_console()
    workdir = paths.as_path(workdir)
    record = record_lib.read(workdir)
    if record is None:
        raise FileNotFoundError(f"{record_lib.path_in(workdir)}: no run record; is {workdir} a "
                                "run's --workdir?")
    config = ml_collections.ConfigDict(record["config"])
    for key, value in (evaluation or {}).items():
        config.evaluation[key] = value
    setup = build(config)
    if not checkpointing.committed_steps(workdir / "checkpoints"):
        raise FileNotFoundError(f"{workdir / 'checkpoints'}: the run has no checkpoint to evaluate")
    with checkpointing.CheckpointManager(workdir / "checkpoints", config.checkpoint) as ckpt:
        step = step if step is not None else (ckpt.best_step() or ckpt.latest_step())
        state, frozen, _ = restore_run(setup, ckpt, step)
    eval_step = jax.jit(steps.make_eval_step(setup.layout.graphdef))
    if setup.finetune is not None:
        results = _evaluate_params(setup, state.params, frozen, eval_step)
    else:
        with partitioning.activate(setup.mesh, setup.rules):
            results = {"final": {
                f"{split}_{k}": v for split in config.evaluation.splits
                for k, v in evaluate_lib.loss_metrics(eval_step, state.params, frozen, config,
                                                      setup.mesh, setup.rules, split=split).items()}}
    results = {"step": int(step), **results}
    if write_record and jax.process_index() == 0:
        record.setdefault("evaluations", []).append(results)
        record_lib.write(workdir, record)
    return results


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags; defined only when run as a program, so importing this module
    (from a config file, a test, another tool) never defines them twice."""
    config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and the run record.")
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0, for multi-process runs off TPU (TPU pods detect it).")
    flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def initialize_distributed() -> None:
    """Joins a multi-process job: explicit flags, or auto-detection on TPU pods and SLURM."""
    if FLAGS.coordinator_address or FLAGS.num_processes:
        # CPU processes need a collectives backend to talk to each other; accelerators ignore it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    elif "SLURM_JOB_ID" in os.environ or os.environ.get("TPU_WORKER_HOSTNAMES"):
        jax.distributed.initialize()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    # Orbax and JAX log every checkpoint step at INFO through absl; the run's own log says enough.
    absl_logging.set_verbosity(absl_logging.WARNING)
    initialize_distributed()
    run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    from ul2_lm import cli

    define_flags()
    flags.mark_flags_as_required(["config"])
    cli.run(main, "ul2_lm.train", user_errors=(config_lib.ConfigError,))
