"""The trainer: what a run leaves behind, exact resume, the NaN guard, mesh independence."""

import functools
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.ul2_lm.killable_run import run_driver
from ul2_lm import (checkpointing, config as config_lib, losses, model as model_lib, model_sizes,
                    optim, partitioning, record as record_lib, steps, synthetic, train,
                    train_state)

REPO = Path(__file__).resolve().parents[2]


def small_run_config(num_steps=6, task="synthetic"):
    """Six steps of the tiny model; `task` 'ul2_embedded_ende' goes through seqio and UL2."""
    c = config_lib.default_config()
    c.model.size = "tiny"
    c.data.task = task
    c.data.seq_len = 32
    c.data.vocab.size = 64
    if task != "synthetic":
        c.data.seq_len = 64
        c.data.vocab.size = 512
        c.data.vocab.sample_documents = 2000
    c.data.num_eval_batches = 2
    c.train.num_steps = num_steps
    c.train.global_batch_size = 8
    c.train.eval_every_steps = 3
    c.train.log_every_steps = 1
    c.optim.warmup_steps = 2
    c.checkpoint.every_steps = 2
    return c


def final_params(workdir, config):
    """The parameters of the newest checkpoint in `workdir`, as numpy arrays."""
    model_config = model_sizes.resolve(config.model)
    mesh = partitioning.make_mesh(config.mesh.axes)
    tx, _ = train_state.optimizer(config, model_config)
    layout = train_state.make_layout(
        lambda: model_lib.Transformer(model_config, rngs=nnx.Rngs(0)), tx, mesh,
        config.mesh.rules)
    manager = checkpointing.CheckpointManager(Path(workdir) / "checkpoints", config.checkpoint)
    state, _ = manager.restore(layout.abstract_state)
    return jax.tree.map(np.asarray, jax.device_get(state.params))


def assert_trees_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = small_run_config()
    record = train.run(config, workdir)
    return workdir, config, record


def test_a_run_leaves_checkpoints_summaries_and_a_record(finished_run):
    workdir, config, record = finished_run
    on_disk = record_lib.read(workdir)
    assert on_disk["status"] == "finished"
    assert on_disk["steps"] == 6
    assert on_disk["tokens_seen"] == 6 * 8 * 32
    assert on_disk["model"]["num_params"] == model_sizes.count_params(
        model_sizes.resolve(config.model))["total"]
    assert [e["step"] for e in on_disk["eval_history"]] == [3, 6]
    assert all(np.isfinite(e["loss"]) for e in on_disk["eval_history"])
    best = min(on_disk["eval_history"], key=lambda e: e["loss"])
    assert on_disk["best"] == {"step": best["step"], "metric": "dev_loss", "value": best["loss"]}
    assert on_disk["config"]["train"]["num_steps"] == 6
    assert any((workdir / "tensorboard").iterdir())
    assert (workdir / "checkpoints" / "6").is_dir()


def test_loss_falls_on_learnable_data(tmp_path):
    config = small_run_config(num_steps=40)
    config.optim.warmup_steps = 5
    config.checkpoint.every_steps = 40
    config.train.eval_every_steps = 20
    record = train.run(config, tmp_path)
    first, last = record["eval_history"][0]["loss"], record["eval_history"][-1]["loss"]
    assert last < first


@pytest.mark.parametrize("kill_after_save", [4])
def test_resume_after_sigkill_during_a_save_is_bitwise_exact(tmp_path, kill_after_save):
    # The reference is the same command run uninterrupted, in a process of its own like the
    # others (a test process has other libraries loaded and other state).
    config = small_run_config(task="ul2_embedded_ende")
    reference_dir = tmp_path / "uninterrupted"
    uninterrupted = run_driver(reference_dir, config)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    workdir = tmp_path / "killed"
    killed = run_driver(workdir, config, kill_after_save)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = record_lib.read(workdir)
    assert before["status"] == "running"
    resumed = run_driver(workdir, config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    assert_trees_bitwise_equal(final_params(workdir, config), final_params(reference_dir, config))
    after = record_lib.read(workdir)
    assert after["status"] == "finished"
    # Nothing the record held at the restored checkpoint is lost, and nothing is duplicated.
    steps_seen = [e["step"] for e in after["eval_history"]]
    assert steps_seen == [3, 6]
    for old in before["eval_history"]:
        assert old in after["eval_history"]
    assert after["best"]["step"] in steps_seen


def poison_step_3(monkeypatch):
    """Makes the loss of the batch at step 3 NaN (synthetic tokens are never 1)."""
    magic = 1
    real_loss = losses.weighted_cross_entropy

    def loss_with_poison(logits, targets, weights, z_loss=0.0):
        nll, z, w = real_loss(logits, targets, weights, z_loss)
        return jnp.where(targets[0, 0] == magic, jnp.nan, nll), z, w

    real_batch = synthetic.example_batch

    def poisoned(seed, split, index, *args):
        batch = real_batch(seed, split, index, *args)
        if (split, index) == ("train", 2):
            batch["decoder_target_tokens"][:, 0] = magic
        return batch

    monkeypatch.setattr(losses, "weighted_cross_entropy", loss_with_poison)
    monkeypatch.setattr(synthetic, "example_batch", poisoned)


def test_nan_stop_names_the_step_and_saves_nothing_bad(tmp_path, monkeypatch):
    poison_step_3(monkeypatch)
    with pytest.raises(optim.NonFiniteError, match="step 3"):
        train.run(small_run_config(), tmp_path)
    record = record_lib.read(tmp_path)
    assert record["status"] == "failed" and "step 3" in record["failure_reason"]
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [2]


def test_nan_skip_drops_the_update_and_goes_on(tmp_path, monkeypatch):
    poison_step_3(monkeypatch)
    config = small_run_config()
    config.train.nan_policy = "skip"
    record = train.run(config, tmp_path)
    assert record["status"] == "finished"
    assert record["final"]["skipped_steps"] == 1
    params = final_params(tmp_path, config)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@functools.cache
def losses_on_mesh(axes, num_steps=3, num_microbatches=1):
    config = small_run_config()
    config.train.num_microbatches = num_microbatches
    model_config = model_sizes.resolve(config.model)
    devices = jax.devices()[: int(np.prod([s for _, s in axes]))]
    mesh = partitioning.make_mesh(axes, devices=devices)
    rules = partitioning.DEFAULT_RULES
    tx, _ = train_state.optimizer(config, model_config, num_steps)
    make = lambda: model_lib.Transformer(model_config, rngs=nnx.Rngs(0))
    layout = train_state.make_layout(make, tx, mesh, rules)
    state, frozen = train_state.create(make, tx, layout, mesh, rules)
    step = jax.jit(steps.make_train_step(layout.graphdef, tx, seed=0,
                                         num_microbatches=num_microbatches),
                   in_shardings=(layout.state_shardings, layout.frozen_shardings, None),
                   out_shardings=(layout.state_shardings, None))
    out = []
    with partitioning.activate(mesh, rules):
        for i, host_batch in enumerate(synthetic.Batches(config, split="train", shard_index=0,
                                                         num_shards=1, global_batch_size=8)):
            if i == num_steps:
                break
            batch = partitioning.host_batch_to_global(host_batch, mesh, rules, 8)
            state, metrics = step(state, frozen, batch)
            out.append(float(metrics["loss"]))
    return np.array(out), state


@pytest.mark.parametrize("axes", [
    (("data", 8), ("fsdp", 1), ("tensor", 1)),
    (("data", 2), ("fsdp", 1), ("tensor", 4)),
    (("data", 1), ("fsdp", 8), ("tensor", 1)),
    (("data", 2), ("fsdp", 2), ("tensor", 2)),
], ids=["8x1", "2x4", "1x8", "2x2x2"])
def test_the_mesh_does_not_change_the_losses(axes):
    reference, _ = losses_on_mesh((("data", 1), ("fsdp", 1), ("tensor", 1)))
    sharded, state = losses_on_mesh(axes)
    np.testing.assert_allclose(sharded, reference, rtol=2e-5)


def test_microbatches_give_the_big_batch_result():
    one, state_one = losses_on_mesh((("data", 1), ("fsdp", 1), ("tensor", 1)))
    four, state_four = losses_on_mesh((("data", 1), ("fsdp", 1), ("tensor", 1)), num_microbatches=4)
    np.testing.assert_allclose(four, one, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state_one.params), jax.tree.leaves(state_four.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_a_checkpoint_of_another_model_shape_is_refused_and_left_intact(finished_run, tmp_path):
    import shutil

    reference_dir, config, _ = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(reference_dir, workdir)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    other = small_run_config()
    other.model.num_layers = 3
    with pytest.raises(checkpointing.IncompatibleCheckpointError) as info:
        train.run(other, workdir)
    assert str(workdir / "checkpoints") in str(info.value)
    after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert after == before


def test_the_trainer_runs_where_tensorflow_and_seqio_are_missing(tmp_path):
    # Accelerator hosts may have neither: blocked imports raise ImportError, as if uninstalled.
    code = textwrap.dedent("""
        import sys
        sys.modules["tensorflow"] = None
        sys.modules["seqio"] = None
        from ul2_lm import decoding, plan, train
        from tests.ul2_lm.test_train import small_run_config
        record = train.run(small_run_config(num_steps=2), sys.argv[1])
        assert record["status"] == "finished", record
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
