"""A real multi-process run: two CPU processes with two fake devices each, as on a pod slice.

The processes find each other through jax.distributed (gloo collectives on CPU), each loads only
its own half of every batch, and together they write one checkpoint that a single process can
read and that a rerun of the same command resumes from.
"""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np

from ul2_lm import record as record_lib
from tests.ul2_lm.test_train import final_params, small_run_config

REPO = Path(__file__).resolve().parents[2]

CONFIG = textwrap.dedent("""
    from tests.ul2_lm.test_train import small_run_config

    def get_config():
        c = small_run_config(num_steps=4)
        c.checkpoint.async_save = True
        return c
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir: Path, config_file: Path, *extra: str) -> list[str]:
    """Starts both processes the way the pod executor starts its workers; returns their logs."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "ul2_lm.train", f"--config={config_file}", f"--workdir={workdir}",
         f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
         *extra], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return logs


def test_two_processes_train_checkpoint_and_resume(tmp_path):
    config_file = tmp_path / "config.py"
    config_file.write_text(CONFIG)
    workdir = tmp_path / "run"

    launch(workdir, config_file)
    record = record_lib.read(workdir)
    assert record["status"] == "finished" and record["steps"] == 4

    # One consistent checkpoint: this single process (eight devices) reads what two wrote.
    config = small_run_config(num_steps=4)
    params = final_params(workdir, config)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))

    logs = launch(workdir, config_file, "--config.train.num_steps=6")
    assert any("resumed from step 4" in log for log in logs)
    assert record_lib.read(workdir)["steps"] == 6
