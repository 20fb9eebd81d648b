r"""Trains a UL2 language model: `python -m ul2_lm.train --config=configs/tiny_ul2.py --workdir=DIR`.

Everything a run leaves is in DIR: orbax checkpoints (checkpoints/), TensorBoard summaries
(tensorboard/) and the run record (record.json). Running the same command again resumes from the
newest complete checkpoint and ends bitwise identical to a run that never stopped.

Any config value can be overridden: `--config.train.num_steps=200`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from ul2_lm import (checkpointing, config as config_lib, flops, hardware, logging_utils,
                   model as model_lib, model_sizes, optim, partitioning, record as record_lib,
                   steps, train_state)

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


def eval_batches(config: ml_collections.ConfigDict, split: str):
    """This host's part of the fixed evaluation batches of `split`."""
    kwargs = dict(global_batch_size=config.train.global_batch_size,
                  shard_index=jax.process_index(), num_shards=jax.process_count(),
                  num_batches=config.data.num_eval_batches)
    if config.data.task == "synthetic":
        from ul2_lm import synthetic

        return synthetic.Batches(config, split=split, **kwargs)
    from ul2_lm.data import pipeline

    return pipeline.make_eval_iterator(config.data, split=split, **kwargs)


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


def evaluate(eval_step, params, frozen, config, mesh, rules, *, split: str) -> dict[str, float]:
    """Token-level loss and perplexity over the config's evaluation batches of `split`."""
    nll, weight = 0.0, 0.0
    for host_batch in eval_batches(config, split):
        batch = partitioning.host_batch_to_global(host_batch, mesh, rules,
                                                  config.train.global_batch_size)
        out = eval_step(params, frozen, batch)
        nll += float(out["nll_sum"])
        weight += float(out["weight_sum"])
    loss = nll / max(weight, 1.0)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 80.0))), "target_tokens": weight}


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir` to config.train.num_steps; returns its record."""
    logging_utils.setup_console()
    workdir = Path(workdir)
    # Every check that can fail on bad input runs before anything is built or compiled.
    config_lib.validate(config, num_devices=jax.device_count())
    validate_data(config)
    model_config = model_sizes.resolve(config.model)

    mesh = partitioning.make_mesh(config.mesh.axes)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    num_steps = config.train.num_steps
    tx, schedule = train_state.optimizer(config, model_config)

    def make_model():
        from flax import nnx

        return model_lib.Transformer(model_config, rngs=nnx.Rngs(params=config.train.seed))

    layout = train_state.make_layout(make_model, tx, mesh, rules)
    ckpt = checkpointing.CheckpointManager(workdir / "checkpoints", config.checkpoint)

    counts = model_sizes.count_params(model_config)
    record = record_lib.read(workdir)
    restored_step, data_state = ckpt.latest_step(), None
    if restored_step is not None:
        state, metadata = ckpt.restore(layout.abstract_state, step=None)
        data_state = metadata["data_state"][jax.process_index()]
        frozen = {}
        restored_step = int(state.step)
        log.info("resumed from step %d in %s", restored_step, ckpt.directory)
        if record is not None:
            record = record_lib.truncate_to_step(record, restored_step)
    else:
        state, frozen = train_state.create(make_model, tx, layout, mesh, rules)
        restored_step = 0
    if record is None or restored_step == 0:
        record = record_lib.new_record(
            kind="pretrain", task=config.data.task, method="pretrain",
            config=config_lib.to_dict(config),
            model={"size": config.model.size, "num_params": counts["total"],
                   "num_embedding_params": counts["embedding"],
                   "num_non_embedding_params": counts["non_embedding"]},
            data={"pretrain_tokens": 0, "finetune_examples": None, "seed": config.data.seed})

    train_step = jax.jit(
        steps.make_train_step(layout.graphdef, tx, seed=config.train.seed,
                              num_microbatches=config.train.num_microbatches,
                              z_loss=config.train.z_loss,
                              dropout=model_config.dropout_rate > 0),
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

    batches = train_batches(config, data_state)

    def save(step: int, metrics: dict[str, float] | None) -> None:
        ckpt.save(step, state, metrics=metrics,
                  metadata={"data_state": all_hosts(batches.state())})

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
    pending: tuple[int, jax.Array] | None = None  # (step, its `finite` flag), checked a step late
    window_start, window_steps = time.perf_counter(), 0
    with partitioning.activate(mesh, rules):
        for step in range(restored_step + 1, num_steps + 1):
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

            is_eval = step % config.train.eval_every_steps == 0 or step == num_steps
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
                last_eval = evaluate(eval_step, state.params, frozen, config, mesh, rules,
                                     split=config.data.eval_split)
                writer.scalars(step, last_eval, prefix="dev/")
                log.info("step %d dev loss %.4f perplexity %.2f", step, last_eval["loss"],
                         last_eval["perplexity"])
                record["eval_history"].append({"step": step, "tokens_seen": step * tokens_per_step,
                                               "split": "dev", **last_eval})
                record_lib.update_best(record)
                window_start, window_steps = time.perf_counter(), 0
            if step % config.checkpoint.every_steps == 0 or step == num_steps:
                check_finite(*pending)
                record.update(steps=step, tokens_seen=step * tokens_per_step)
                record["data"]["pretrain_tokens"] = step * tokens_per_step
                # The record is written before the checkpoint: after a kill, what the newest
                # checkpoint covers is always in the record.
                if jax.process_index() == 0:
                    record_lib.write(workdir, record)
                save(step, {"dev_loss": last_eval["loss"]} if is_eval and last_eval else None)

    ckpt.wait_until_finished()
    record["final"] = {"dev_loss": last_eval["loss"] if last_eval else None,
                       "dev_perplexity": last_eval["perplexity"] if last_eval else None,
                       "skipped_steps": int(state.skipped_steps)}
    record["status"] = "finished"
    if jax.process_index() == 0:
        record_lib.write(workdir, record)
    writer.close()
    log.info("finished %d steps; record in %s", num_steps, record_lib.path_in(workdir))
    return record


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
    define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main)
