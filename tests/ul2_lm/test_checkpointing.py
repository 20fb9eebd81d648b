"""Checkpoints: exact round trips into given shardings, retention, clear refusals, and resume
that survives a corrupt newest step or a save killed half-way."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ul2_lm import checkpointing, optim
from ul2_lm.train_state import TrainState

REPO = Path(__file__).resolve().parents[2]


def optim_config():
    return ml_collections.ConfigDict(dict(peak_learning_rate=0.01, final_learning_rate=0.001,
                                          warmup_steps=0))


def make_state(step=0, seed=0, width=8):
    """A small train state with Adafactor state for two parameter groups."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"layer": {"kernel": jax.random.normal(k1, (16, width)),
                        "scale": jnp.array([1.0, -0.0, 2.5])},
              "prompt": jax.random.normal(k2, (4, width))}
    tx, _ = optim.make_optimizer(optim_config(), 100,
                                 param_labels=optim.labels_by_path([("^prompt", "prompt")]),
                                 group_overrides={"prompt": {"multiply_by_parameter_scale": False}})
    opt_state = tx.init(params)
    # One real update, so the optimiser state is not all zeros.
    grads = jax.tree.map(lambda p: jnp.cos(p), params)
    _, opt_state = tx.update(grads, opt_state, params)
    return TrainState(step=jnp.int32(step), params=params, opt_state=opt_state,
                      skipped_steps=jnp.int32(1))


def abstract_of(state, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(x)),
                        state)


def replicated(x):
    return NamedSharding(jax.make_mesh((len(jax.devices()),), ("data",)), PartitionSpec())


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def manager(directory, **settings):
    settings.setdefault("keep_last", 2)
    settings.setdefault("keep_best", 1)
    settings.setdefault("async_save", False)
    return checkpointing.CheckpointManager(directory, **settings)


def save_steps(directory, steps, **settings):
    with manager(directory, **settings) as m:
        for step in steps:
            m.save(step, make_state(step, seed=step), metadata={"batches_read": step * 10})


@pytest.fixture
def warnings_seen(caplog):
    """Records the checkpoint module's warnings, whatever the ul2_lm logger's set-up."""
    checkpointing.log.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    yield caplog
    checkpointing.log.removeHandler(caplog.handler)


# --- Round trips -----------------------------------------------------------------------------

@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_saved_state_restores_bitwise_into_the_requested_shardings(tmp_path, async_save):
    mesh = jax.make_mesh((8,), ("data",))
    by_rows = NamedSharding(mesh, PartitionSpec("data"))
    saved_sharding = lambda x: by_rows if x.ndim and x.shape[0] % 8 == 0 else replicated(x)
    state = jax.tree.map(lambda x: jax.device_put(x, saved_sharding(x)), make_state(7))
    metadata = {"batches_read": 70, "seed": 3, "config": {"d_model": 8}}
    with manager(tmp_path, async_save=async_save) as m:
        m.save(7, state, metadata=metadata)
        m.wait_until_finished()

    # A fresh manager (a new process, say) restores into a different layout: 2 x 4 devices.
    mesh2 = jax.make_mesh((2, 4), ("data", "tensor"))
    wanted = lambda x: NamedSharding(mesh2, PartitionSpec(None, "tensor") if x.ndim == 2
                                     else PartitionSpec())
    restored_manager = manager(tmp_path)
    assert restored_manager.latest_step() == 7
    restored, restored_metadata = restored_manager.restore(abstract_of(state, wanted))
    assert_bitwise_equal(restored, state)
    assert type(restored) is TrainState
    assert restored_metadata == metadata
    for x in jax.tree.leaves(restored):
        assert x.sharding.is_equivalent_to(wanted(x), x.ndim)
    assert restored_manager.restored_step == 7


def test_an_empty_directory_has_no_step_to_resume(tmp_path):
    m = manager(tmp_path / "new")
    assert m.latest_step() is None
    with pytest.raises(checkpointing.CheckpointError, match="no committed checkpoint"):
        m.restore(abstract_of(make_state(), replicated))


# --- Retention -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["min", "max"])
def test_the_last_n_and_the_best_checkpoint_are_kept(tmp_path, mode):
    losses = {2: 3.0, 4: 1.0, 6: 2.0, 8: 2.5, 10: 2.8}  # step 4 is the best by a distance
    sign = 1 if mode == "min" else -1
    with manager(tmp_path, keep_last=2, keep_best=1, best_mode=mode) as m:
        for step in range(1, 11):
            metrics = {"dev_loss": sign * losses[step]} if step in losses else None
            m.save(step, make_state(step, seed=step), metrics=metrics)
        assert m.all_steps() == [4, 9, 10]
    reopened = manager(tmp_path, keep_last=2, keep_best=1, best_mode=mode)
    assert reopened.best_step() == 4
    state, _ = reopened.restore_best(abstract_of(make_state(), replicated))
    assert_bitwise_equal(state, make_state(4, seed=4))
    # The best step stays however many newer steps arrive.
    for step in range(11, 14):
        reopened.save(step, make_state(step, seed=step))
    assert reopened.all_steps() == [4, 12, 13]


def test_without_keep_best_only_the_last_n_remain(tmp_path):
    with manager(tmp_path, keep_last=3, keep_best=0) as m:
        for step in range(1, 7):
            m.save(step, make_state(step), metrics={"dev_loss": float(step)})
        assert m.all_steps() == [4, 5, 6]


# --- Refusals --------------------------------------------------------------------------------

def test_a_state_with_nan_is_never_saved(tmp_path):
    state = make_state(1)
    poisoned = state.params["prompt"].at[1, 2].set(jnp.nan)
    bad = state.replace(params={**state.params, "prompt": poisoned})
    m = manager(tmp_path)
    with pytest.raises(checkpointing.NonFiniteStateError, match="'params/prompt'"):
        m.save(1, bad)
    m.wait_until_finished()
    assert m.all_steps() == [] and not any(tmp_path.iterdir())


def test_a_checkpoint_of_another_config_is_refused_naming_the_parameter(tmp_path):
    save_steps(tmp_path, [1, 2])
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    m = manager(tmp_path)
    wider = abstract_of(make_state(width=12), replicated)
    with pytest.raises(checkpointing.IncompatibleCheckpointError) as error:
        m.restore(wider)
    message = str(error.value)
    assert "'params/layer/kernel'" in message and "(16, 8)" in message and "(16, 12)" in message
    assert str(tmp_path / "2") in message

    state = make_state()
    missing = abstract_of(state.replace(params={**state.params, "lora": jnp.zeros((2, 2))}),
                          replicated)
    with pytest.raises(checkpointing.IncompatibleCheckpointError, match="'params/lora'.*missing"):
        m.restore(missing)
    # Refusing touched nothing on disk.
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


# --- Resume after damage ---------------------------------------------------------------------

def largest_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def delete_data(step_dir):
    largest_file(step_dir).unlink()


def truncate_data(step_dir):
    path = largest_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def truncate_tree_metadata(step_dir):
    path = step_dir / "state" / "_METADATA"
    path.write_text(path.read_text()[:40])


@pytest.mark.parametrize("damage", [delete_data, truncate_data, truncate_tree_metadata])
def test_a_corrupt_newest_step_falls_back_to_the_previous_one(tmp_path, warnings_seen, damage):
    save_steps(tmp_path, [1, 2, 3], keep_last=3)
    damage(tmp_path / "3")
    m = manager(tmp_path, keep_last=3)
    state, metadata = m.restore(abstract_of(make_state(), replicated))
    assert_bitwise_equal(state, make_state(2, seed=2))
    assert metadata == {"batches_read": 20} and m.restored_step == 2
    warned = [r.getMessage() for r in warnings_seen.records]
    assert any("step 3" in w and "falling back" in w for w in warned), warned
    assert (tmp_path / "3").is_dir()  # the fallback deletes nothing

    # Naming the damaged step explicitly is an error, not a silent fallback.
    with pytest.raises(checkpointing.CheckpointError, match=str(tmp_path / "3")):
        m.restore(abstract_of(make_state(), replicated), step=3)

    # The resumed run saves step 3 again; the damaged copy is moved aside, not deleted.
    m.save(3, make_state(33, seed=33))
    m.wait_until_finished()
    assert (tmp_path / "3.corrupt").is_dir()
    state, _ = manager(tmp_path, keep_last=3).restore(abstract_of(make_state(), replicated))
    assert_bitwise_equal(state, make_state(33, seed=33))


def test_a_damaged_metrics_file_does_not_stop_a_resume(tmp_path, warnings_seen):
    with manager(tmp_path, keep_last=3) as m:
        for step in (1, 2, 3):
            m.save(step, make_state(step, seed=step), metrics={"dev_loss": 4.0 - step})
    (tmp_path / "3" / "metrics" / "metrics").write_text("{trunc")
    m = manager(tmp_path, keep_last=3)
    assert m.best_step() == 2  # step 3 now counts as saved without metrics
    state, _ = m.restore(abstract_of(make_state(), replicated))
    assert_bitwise_equal(state, make_state(3, seed=3))
    assert any("step 3" in r.getMessage() for r in warnings_seen.records)


def test_when_no_step_is_readable_the_error_lists_why(tmp_path, warnings_seen):
    save_steps(tmp_path, [1, 2])
    delete_data(tmp_path / "1")
    delete_data(tmp_path / "2")
    with pytest.raises(checkpointing.CheckpointError, match="(?s)step 2: .*step 1: "):
        manager(tmp_path).restore(abstract_of(make_state(), replicated))


def test_an_uncommitted_save_directory_is_ignored(tmp_path):
    save_steps(tmp_path, [1, 2])
    leftover = tmp_path / "3.orbax-checkpoint-tmp"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "_METADATA").write_text("{not json")
    m = manager(tmp_path)
    assert m.all_steps() == [1, 2] and m.latest_step() == 2
    state, _ = m.restore(abstract_of(make_state(), replicated))
    assert_bitwise_equal(state, make_state(2, seed=2))
    m.save(3, make_state(3, seed=3))
    state, _ = m.restore(abstract_of(make_state(), replicated))
    assert_bitwise_equal(state, make_state(3, seed=3))


KILLED_MID_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp
    from ul2_lm import checkpointing

    def state(step):
        # 16 MiB of incompressible values: the write takes far longer than the kill.
        return {"step": jnp.int32(step),
                "w": jax.random.normal(jax.random.key(step), (4 * 2**20,))}

    m = checkpointing.CheckpointManager(sys.argv[1], keep_last=2, keep_best=0, async_save=True)
    m.save(1, state(1), metadata={"step": 1})
    m.wait_until_finished()
    m.save(2, state(2), metadata={"step": 2})  # returns while the write goes on in the background
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_save_killed_midway_leaves_the_previous_step_to_resume_from(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    started = time.monotonic()
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert time.monotonic() - started < 60
    assert not (tmp_path / "2").exists(), "the save finished before the kill; nothing was tested"

    m = checkpointing.CheckpointManager(tmp_path, keep_last=2, keep_best=0, async_save=False)
    assert m.latest_step() == 1
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(None)),
                "w": jax.ShapeDtypeStruct((4 * 2**20,), jnp.float32, sharding=replicated(None))}
    state, metadata = m.restore(abstract)
    assert int(state["step"]) == 1 and metadata == {"step": 1}
    np.testing.assert_array_equal(np.asarray(state["w"]),
                                  np.asarray(jax.random.normal(jax.random.key(1), (4 * 2**20,))))
    # The resumed run can save the step that was lost.
    m.save(2, {"step": jnp.int32(2), "w": jnp.zeros((4 * 2**20,))}, metadata={"step": 2})
    assert m.latest_step() == 2


def test_a_step_still_being_written_is_not_committed(tmp_path):
    """A finetuning run reads its base's steps without a manager: a save in flight (orbax's
    temporary directory) must not count as a step it could read."""
    save_steps(tmp_path, [1, 2])
    in_flight = tmp_path / "3.orbax-checkpoint-tmp-1234"
    shutil.copytree(tmp_path / "2", in_flight)
    assert checkpointing.committed_steps(tmp_path) == [1, 2]
    assert checkpointing.committed_steps(tmp_path / "missing") == []
