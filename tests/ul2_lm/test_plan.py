"""The memory planner: exact per-device parameter and optimiser bytes, measured activations."""

import subprocess
import sys
from pathlib import Path

from ul2_lm import config as config_lib, model_sizes, plan

REPO = Path(__file__).resolve().parents[2]


def tiny_config(axes):
    c = config_lib.default_config()
    c.data.task = "synthetic"
    c.data.seq_len = 64
    c.data.vocab.size = 256
    c.train.global_batch_size = 8
    c.mesh.axes = axes
    return c


def test_replicated_parameters_cost_their_full_size_on_every_device():
    result = plan.plan(tiny_config((("data", 8), ("fsdp", 1), ("tensor", 1))), compile_step=False)
    num_params = model_sizes.count_params(model_sizes.resolve(tiny_config(()).model))["total"]
    assert result.num_params == num_params
    assert result.param_bytes == 4 * num_params  # float32, whole on each device


def test_fsdp_divides_parameters_and_optimiser_state_across_devices():
    replicated = plan.plan(tiny_config((("data", 8), ("fsdp", 1), ("tensor", 1))), compile_step=False)
    sharded = plan.plan(tiny_config((("data", 1), ("fsdp", 8), ("tensor", 1))), compile_step=False)
    # Only the small norm scales stay whole on every device.
    assert replicated.param_bytes / 8 <= sharded.param_bytes < replicated.param_bytes / 7
    assert sharded.opt_state_bytes < replicated.opt_state_bytes / 4


def test_compiled_step_reports_activation_memory_that_grows_with_the_batch():
    small = plan.plan(tiny_config((("data", 8), ("fsdp", 1), ("tensor", 1))))
    config = tiny_config((("data", 8), ("fsdp", 1), ("tensor", 1)))
    config.train.global_batch_size = 64
    large = plan.plan(config)
    assert small.compiled and small.temp_bytes > 0
    assert large.temp_bytes > small.temp_bytes
    assert "activations + temporaries" in large.table()


def test_a_finetuning_plan_holds_the_frozen_base_and_optimises_only_the_method():
    """No base checkpoint is read; LoRA / prompt tuning keep optimiser state only for their
    own parameters, and hold the whole base on the devices as FMT does."""
    axes = (("data", 8), ("fsdp", 1), ("tensor", 1))
    plans = {}
    for method in ("fmt", "lora", "prompt"):
        c = config_lib.finetuning(method, tiny_config(axes))
        c.data.task = "synthetic"
        c.data.pack = method != "prompt"
        c.finetune.base_workdir = "/nonexistent/base"
        c.finetune.prompt.length = 8
        plans[method] = plan.plan(c, compile_step=method == "lora")
    d_model = model_sizes.resolve(tiny_config(axes).model).d_model
    assert plans["prompt"].param_bytes == plans["fmt"].param_bytes + 4 * 8 * d_model
    assert plans["lora"].param_bytes > plans["fmt"].param_bytes
    # Adafactor on [P, d] (unfactored: P is small), and a few scalar counters.
    assert 4 * 8 * d_model <= plans["prompt"].opt_state_bytes < 4 * 8 * d_model + 256
    assert plans["lora"].opt_state_bytes < plans["fmt"].opt_state_bytes / 2
    assert plans["lora"].compiled and plans["lora"].temp_bytes > 0


def test_cli_plans_a_paper_model_without_compiling():
    out = subprocess.run(
        [sys.executable, "-m", "ul2_lm.plan", "--config=configs/1b_ul2.py", "--devices=16",
         "--mesh=fsdp=16", "--nocompile"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "parameters on 16 devices" in out.stdout
    assert "| parameters |" in out.stdout


def test_cli_rejects_a_bad_mesh_flag():
    out = subprocess.run(
        [sys.executable, "-m", "ul2_lm.plan", "--config=configs/1b_ul2.py", "--mesh=model=4"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "unknown axes ['model']" in out.stderr
