"""One run of a study, as the study runner hands it to an executor.

A `RunSpec` is everything needed to start a run anywhere: its id (also its directory under the
study's runs/), the full config as JSON-able data, and the ids of the runs it waits for (a
finetuning run waits for its base). The command that starts it is the trainer's own:

    python -m ul2_lm.train --config=configs/from_json.py:RUN_DIR/run_config.json --workdir=RUN_DIR

so a run started by hand, by `scaling.study` or on a pod worker is the same run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG_LOADER = "configs/from_json.py"
CONFIG_FILE = "run_config.json"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A run of a study.

    run_id: unique within the study, '/'-separated (e.g. 'pretrain/tiny_s' or
      'finetune/lora/tiny_s/pt300/pet4/n200/s0'); the run's workdir is `runs/<run_id>`.
    kind: 'pretrain' or 'finetune'.
    config: the full ul2_lm config as plain data (ul2_lm.config.to_dict), with
      finetune.base_workdir already pointing at the base run's workdir.
    workdir: where the run writes (a local path, or gs://... on TPU pods).
    depends_on: run ids that must have finished before this one starts.
    train_flops: estimated training FLOPs (planning and accelerator-hour estimates).

    `config_hash` is the run's identity: a finished run is reused only while its record
    carries this hash (and, for a finetuning run, its base's; scaling/execution.py).
    """

    run_id: str
    kind: str
    config: Mapping[str, Any]
    workdir: str
    depends_on: tuple[str, ...] = ()
    train_flops: float = 0.0

    @functools.cached_property
    def config_hash(self) -> str:
        """The hash of `config` that the run's record will carry (its identity)."""
        from ul2_lm import record as record_lib  # etils only: no JAX

        return record_lib.config_hash(self.config)

    @property
    def config_path(self) -> str:
        return join(self.workdir, CONFIG_FILE)

    def command(self, python: str = "python", repo: str | os.PathLike | None = None,
                extra: Sequence[str] = ()) -> list[str]:
        """The argv that runs it (relative to `repo`, default: this checkout)."""
        loader = CONFIG_LOADER if repo is None else join(str(repo), CONFIG_LOADER)
        return [python, "-m", "ul2_lm.train", f"--config={loader}:{self.config_path}",
                f"--workdir={self.workdir}", *extra]

    def shell_command(self, **kwargs) -> str:
        return shlex.join(self.command(**kwargs))

    def config_json(self) -> str:
        return json.dumps(self.config, indent=1, sort_keys=True)

    def write_config(self) -> str:
        """Writes run_config.json into the workdir (local or gs://, atomically); returns its
        path."""
        from ul2_lm import paths  # etils only: no JAX

        paths.write_text_atomic(self.config_path, self.config_json() + "\n")
        return self.config_path


def join(base: str, *parts: str) -> str:
    """Path join that keeps gs:// URLs intact."""
    if base.startswith("gs://"):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a run ended: ok, or failed with a reason (the exception or the process's last
    error line)."""

    run_id: str
    ok: bool
    reason: str | None = None
    seconds: float = 0.0
