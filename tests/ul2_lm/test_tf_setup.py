"""TensorFlow stays quiet on a CPU user's console: its CUDA probing noise is dropped, anything
else its native code prints is passed on."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ul2_lm.data import tf_setup

REPO = Path(__file__).resolve().parents[2]

NOISE = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
         "I0000 00:00:1.0 1 cudart_stub.cc:31] Could not find cuda drivers on your machine\n"
         "E0000 00:00:1.0 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n")


def test_probing_noise_is_dropped_and_the_rest_passed_on(capfd):
    with tf_setup._filtered_native_stderr():
        os.write(2, (NOISE + "W0000 protobuf: gencode version mismatch\n").encode())
    err = capfd.readouterr().err
    assert err == "W0000 protobuf: gencode version mismatch\n"


def test_everything_is_passed_on_when_the_import_fails(capfd):
    with pytest.raises(ImportError):
        with tf_setup._filtered_native_stderr():
            os.write(2, NOISE.encode())
            raise ImportError("libcudart.so: cannot open shared object file")
    assert capfd.readouterr().err == NOISE


def test_importing_the_data_modules_prints_nothing():
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    out = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices(); from ul2_lm.data import tasks"],
        env=dict(env, PYTHONPATH=str(REPO)), cwd=REPO, capture_output=True, text=True,
        timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr == ""
