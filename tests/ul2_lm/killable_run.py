"""A training run in a process of its own that SIGKILLs itself right after saving a given step
(the async save of that step still in flight), for the bitwise-resume tests."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from ul2_lm import config as config_lib

REPO = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    import ml_collections
    from ul2_lm import checkpointing, train

    kill_after_save = int(sys.argv[3])
    if kill_after_save:
        original = checkpointing.CheckpointManager.save

        def save_then_die(self, step, *args, **kwargs):
            original(self, step, *args, **kwargs)
            if step == kill_after_save:
                # The async save of this step is still in flight: die without finishing it.
                os.kill(os.getpid(), signal.SIGKILL)

        checkpointing.CheckpointManager.save = save_then_die
    train.run(ml_collections.ConfigDict(json.loads(sys.argv[2])), sys.argv[1])
""")


def run_driver(workdir, config, kill_after_save: int = 0) -> subprocess.CompletedProcess:
    """Trains `config` into `workdir`; with kill_after_save, dies after saving that step. The
    uninterrupted reference runs this way too: a test process has other state loaded."""
    env = dict(os.environ, PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run(
        [sys.executable, "-c", DRIVER, str(workdir), json.dumps(config_lib.to_dict(config)),
         str(kill_after_save)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
