"""benchmarks/pet_step.py runs end to end on the tiny model (no timing is asserted)."""

import importlib.util
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "pet_step.py"


def _load():
    spec = importlib.util.spec_from_file_location("pet_step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_reports_every_method_and_the_ratios(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    # main() prints the summary, appends the row and returns run()'s figures.
    r = _load().main(["--size=tiny", "--batch=2", "--seq_len=16", "--prompt_length=4",
                      "--rank=2", "--runs=1", "--warmup=0", f"--results_md={results}"])
    for name in ("fmt", "lora", "prompt"):
        assert r["step_s"][name] > 0
        assert r["opt_state_bytes"][name] > 0
        assert math.isfinite(r["loss"][name])
    assert r["trainable"]["fmt"] == r["params"]
    assert 0 < r["trainable"]["prompt"] == 4 * 128  # P x d_model
    assert 0 < r["trainable"]["lora"] < r["trainable"]["fmt"]
    assert r["positions"] == {"fmt": 16, "lora": 16, "prompt": 20}  # the prompt in front
    for name in ("lora", "prompt"):
        for key in (f"{name}_fmt_time_ratio", f"{name}_fmt_opt_state_ratio"):
            assert r[key] > 0
        assert isinstance(r[f"{name}_time_pass"], bool)
        assert isinstance(r[f"{name}_opt_state_pass"], bool)

    out = capsys.readouterr().out
    assert "lora   / fmt" in out and "prompt / fmt" in out
    row = results.read_text()
    assert row.startswith("| ") and "`python benchmarks/pet_step.py --size=tiny" in row
    assert "--results_md" not in row


def test_in_budget_prompt_runs_the_same_positions_and_unfactored_state_follows_parameters(tmp_path):
    tiny = ["--size=tiny", "--batch=2", "--seq_len=16", "--prompt_length=4", "--rank=2",
            "--runs=1", "--warmup=0"]
    r = _load().main(tiny + ["--prompt_in_budget", "--unfactored"])
    assert r["positions"] == {"fmt": 16, "lora": 16, "prompt": 16}
    # Full second moments: one float32 per trainable parameter (plus Adafactor's step count).
    for name in ("fmt", "lora", "prompt"):
        assert 4 * r["trainable"][name] <= r["opt_state_bytes"][name] < 4 * r["trainable"][name] + 1024


def test_benchmark_loads_without_tensorflow_or_seqio():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('bench', {str(SCRIPT)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'seqio'))\n"
        "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
