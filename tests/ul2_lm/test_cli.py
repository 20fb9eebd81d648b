"""The command lines: a user's mistake (an override of a key the config lacks, a value the
config refuses, Ctrl-C) is one line on stderr and a non-zero exit, never a traceback."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ul2_lm import cli

REPO = Path(__file__).resolve().parents[2]


def python(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("override, message", [
    ("--config.train.bogus=1", "ul2_lm.train: --config.train.bogus=1: config.train has no key "
                               "'bogus'"),
    ("--config.optim.nope.deeper=2", "ul2_lm.train: --config.optim.nope.deeper=2: config.optim "
                                     "has no key 'nope'"),
    ("--config.train.num_steps=-1", "ul2_lm.train: config.train.num_steps: must be > 0, got -1"),
    ("--config.train.num_steps=abc", "ul2_lm.train: flag --config.train.num_steps=abc: invalid "
                                     "literal for int() with base 10: 'abc'"),
])
def test_a_bad_override_is_one_line_and_nothing_is_written(tmp_path, override, message):
    workdir = tmp_path / "run"
    out = python("-m", "ul2_lm.train", "--config=configs/tiny_ul2.py", override,
                 f"--workdir={workdir}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [message]
    assert not workdir.exists()


def test_ctrl_c_is_one_line_and_exit_status_130():
    script = textwrap.dedent("""
        from ul2_lm import cli

        def main(argv):
            raise KeyboardInterrupt

        cli.run(main, "prog")
    """)
    out = python("-c", script)
    assert out.returncode == 130
    assert out.stderr.strip().splitlines() == ["prog: interrupted"]


def test_the_override_message_names_the_flag_and_the_missing_key():
    argv = ["prog", "--config=c.py", "--config.data.vocab.sise=3"]
    assert cli.override_message(argv, KeyError("'sise'")) == (
        "--config.data.vocab.sise=3: config.data.vocab has no key 'sise'")
    assert cli.override_message(argv, KeyError("'other'")) == "no config key 'other'"
