"""Finetuning runs end to end: FMT, LoRA and prompt tuning from a pretrained base, what they
save and record, exact resume, re-evaluation, and bad input."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.ul2_lm.killable_run import run_driver
from ul2_lm import checkpointing, config as config_lib, record as record_lib, train
from ul2_lm.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def data_settings(c):
    # A small vocabulary trained on a small sample: seconds, and shared by base and finetuning.
    c.data.vocab.size = 512
    c.data.vocab.sample_documents = 2000
    c.data.num_eval_batches = 1
    return c


def base_config():
    c = data_settings(config_lib.default_config())
    c.model.size = "tiny"
    c.data.task = "ul2_embedded_ende"
    c.data.seq_len = 64
    c.train.num_steps = 4
    c.train.global_batch_size = 8
    c.train.eval_every_steps = 4
    c.optim.warmup_steps = 1
    c.checkpoint.every_steps = 2
    return c


def finetune_config(method, base_workdir, **changes):
    c = data_settings(config_lib.finetuning(method))
    c.model.size = "tiny"
    c.finetune.base_workdir = str(base_workdir)
    c.finetune.prompt.length = 8
    c.data.task = "ft_embedded_xen_xde"
    c.data.seq_len = 64
    c.data.finetune.num_examples = 64
    c.train.num_steps = 4
    c.train.global_batch_size = 8
    c.train.eval_every_steps = 2
    c.train.log_every_steps = 2
    c.optim.warmup_steps = 1
    c.checkpoint.every_steps = 4
    c.evaluation.num_generate_examples = 4
    c.evaluation.max_new_tokens = 6
    c.evaluation.decode_batch_size = 8
    for key, value in changes.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("base")
    train.run(base_config(), workdir)
    return workdir


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    out = {}
    for method in ("fmt", "lora", "prompt"):
        workdir = tmp_path_factory.mktemp(method)
        config = finetune_config(method, base)
        if method == "lora":
            config.evaluation.zero_shot_tasks = ("ft_embedded_xsc_xde",)
            config.evaluation.few_shot = (1,)
        out[method] = (workdir, config, train.run(config, workdir))
    return out


def stored_paths(step_dir):
    """The array paths a checkpoint step holds ('params/...', 'opt_state/...')."""
    import orbax.checkpoint as ocp

    meta = ocp.PyTreeCheckpointer().metadata(step_dir / "state").item_metadata
    return set(checkpointing._flat_metadata(  # pylint: disable=protected-access
        meta.tree if hasattr(meta, "tree") else meta))


@pytest.mark.parametrize("method", ["fmt", "lora", "prompt"])
def test_a_finetuning_run_records_what_the_scaling_fits_need(runs, base, method):
    workdir, config, record = runs[method]
    on_disk = record_lib.read(workdir)
    assert on_disk == json.loads(json.dumps(on_disk))
    assert on_disk["status"] == "finished" and on_disk["kind"] == "finetune"
    assert on_disk["method"] == method
    base_record = record_lib.read(base)
    assert on_disk["data"]["pretrain_tokens"] == base_record["data"]["pretrain_tokens"] == 4 * 8 * 64
    assert on_disk["data"]["finetune_examples"] == 64
    assert on_disk["pet"] == (None if method == "fmt" else
                              {"kind": method, "size": {"lora": 4, "prompt": 8}[method],
                               "num_trainable_params": on_disk["trainable"]["count"]})
    final = on_disk["final"]
    for key in ("dev_loss", "test_loss", "test_perplexity", "bleu", "chrf"):
        assert np.isfinite(final[key]), key
    assert final["test_perplexity"] == pytest.approx(np.exp(final["test_loss"]))
    # The best checkpoint is the one with the lowest dev loss, and `final` measures it.
    dev = {e["step"]: e["loss"] for e in on_disk["eval_history"] if e["split"] == "dev"}
    assert sorted(dev) == [2, 4]
    assert final["best_step"] == min(dev, key=dev.get)
    assert final["dev_loss"] == pytest.approx(dev[final["best_step"]], rel=1e-6)
    assert on_disk["generation"]["num_examples"] == 4
    assert "bleurt" in on_disk["generation"]["skipped"]  # no checkpoint given: skipped, said why
    # The scaling package reads it as one row.
    from scaling import records

    row, reason = records.parse(on_disk, str(workdir / "record.json"))
    assert reason is None and row["method"] == method and row["finetune_examples"] == 64


def test_pet_checkpoints_hold_only_the_trainable_parameters(runs):
    ratios = {}
    for method, (workdir, _, record) in runs.items():
        step_dir = workdir / "checkpoints" / str(record["final"]["best_step"])
        stored = stored_paths(step_dir)
        params = {p for p in stored if p.startswith("params/")}
        if method != "fmt":  # no optimiser statistics of a frozen weight either
            assert not any("kernel" in p or "embedding" in p for p in stored)
        if method == "lora":
            assert params and all(p.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for p in params)
        elif method == "prompt":
            assert params == {"params/prompt"}
        else:
            assert "params/embedding" in params
        ratios[method] = record["checkpoint"]["state_ratio_to_fmt"]
        metadata = json.loads((step_dir / "metadata" / "metadata").read_text())
        assert metadata["base"]["step"] == 4 and metadata["base"]["fingerprint"]
    assert ratios["fmt"] == pytest.approx(1.0, rel=1e-4)  # the step counters aside
    assert ratios["lora"] < 0.2 and ratios["prompt"] < 0.01


def test_reevaluating_a_pet_checkpoint_on_its_base_reproduces_the_run_exactly(runs):
    for method in ("lora", "prompt"):
        workdir, _, record = runs[method]
        best = record["final"]["best_step"]
        again = train.evaluate_run(workdir, evaluation={"splits": ("validation", "test"),
                                                         "few_shot": ()})
        assert again["step"] == best
        # Exactly the same numbers: the same arrays, the same compiled computation.
        assert again["final"]["dev_loss"] == record["final"]["dev_loss"]
        assert again["final"]["test_loss"] == record["final"]["test_loss"]
        assert again["final"]["bleu"] == record["final"]["bleu"]


def test_zero_shot_and_few_shot_results_are_recorded(runs):
    _, _, record = runs["lora"]
    zero = record["zero_shot"]["ft_embedded_xsc_xde"]
    assert np.isfinite(zero["loss"]) and "bleu" in zero
    assert set(record["few_shot"]["1"]) == {"finetuned", "base"}
    assert "few_shot.1.base.bleu" in record["final"]


def test_the_evaluate_command_reevaluates_a_run_on_any_split(runs):
    workdir, _, record = runs["lora"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "ul2_lm.evaluate", f"--workdir={workdir}", "--splits=train",
         "--num_generate_examples=0", "--write_record"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout)
    assert np.isfinite(results["final"]["train_loss"])
    assert record_lib.read(workdir)["evaluations"][-1]["final"] == results["final"]


def test_a_killed_lora_run_resumes_bitwise_exactly(base, tmp_path):
    config = finetune_config("lora", base, checkpoint__every_steps=2, train__num_steps=6)
    config.evaluation.num_generate_examples = 0
    reference = tmp_path / "uninterrupted"
    assert run_driver(reference, config).returncode == 0
    workdir = tmp_path / "killed"
    killed = run_driver(workdir, config, kill_after_save=4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_driver(workdir, config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    a, b = record_lib.read(reference), record_lib.read(workdir)
    assert [e["loss"] for e in a["eval_history"]] == [e["loss"] for e in b["eval_history"]]
    assert a["final"]["test_loss"] == b["final"]["test_loss"]
    params_a = _restored_params(reference, config)
    params_b = _restored_params(workdir, config)
    for u, v in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(u, v)


def _restored_params(workdir, config):
    setup = train.build(config)
    manager = checkpointing.CheckpointManager(Path(workdir) / "checkpoints", config.checkpoint)
    state, _ = manager.restore(setup.layout.abstract_state, step=6)
    return jax.tree.map(np.asarray, jax.device_get(state.params))


# --- bad input: one clear message naming the value, before anything is built ----------------


def _snapshot(directory):
    return {p: p.read_bytes() for p in Path(directory).rglob("*") if p.is_file()}


@pytest.mark.parametrize("changes, key, words", [
    ({"lora_rank": 0}, "finetune.lora.rank", "> 0"),
    ({"lora_rank": 4096}, "finetune.lora.rank", "exceeds"),
    ({"lora_targets": "nothing_like_this"}, "finetune.lora.targets", "matches no projection"),
    ({"method": "prompt", "prompt_length": 500}, "finetune.prompt.length", "max_seq_len"),
    ({"method": "prompt", "pack": True}, "data.pack", "pack=False"),
    ({"num_examples": 10_000_000}, "data.finetune.num_examples", "has 1000000"),
    ({"model_size": "small"}, "model.", "base run"),
])
def test_bad_finetuning_configs_name_the_key(base, tmp_path, changes, key, words):
    config = finetune_config(changes.get("method", "lora"), base)
    if "lora_rank" in changes:
        config.finetune.lora.rank = changes["lora_rank"]
    if "lora_targets" in changes:
        config.finetune.lora.targets = changes["lora_targets"]
    if "prompt_length" in changes:
        config.finetune.prompt.length = changes["prompt_length"]
    if "pack" in changes:
        config.data.pack = changes["pack"]
    if "num_examples" in changes:
        config.data.finetune.num_examples = changes["num_examples"]
    if "model_size" in changes:
        config.model.size = changes["model_size"]
    before = _snapshot(base)
    with pytest.raises(ConfigError) as info:
        train.run(config, tmp_path / "run")
    assert f"config.{key}" in str(info.value) and words in str(info.value), str(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert _snapshot(base) == before


def test_a_missing_base_names_the_command_that_produces_it(tmp_path):
    config = finetune_config("lora", tmp_path / "no_base_here")
    with pytest.raises(ConfigError) as info:
        train.run(config, tmp_path / "run")
    message = str(info.value)
    assert "config.finetune.base_workdir" in message
    assert f"python -m ul2_lm.train --config=configs/tiny_ul2.py --workdir={tmp_path / 'no_base_here'}" in message


def test_a_pet_checkpoint_on_another_base_is_refused_and_left_intact(base, runs, tmp_path):
    import shutil

    other_base = tmp_path / "other_base"
    shutil.copytree(base, other_base)
    # The same shapes, other weights: a base retrained in place.
    config = base_config()
    config.train.seed = 1
    shutil.rmtree(other_base / "checkpoints")
    train.run(config, other_base)
    workdir = tmp_path / "lora"
    shutil.copytree(runs["lora"][0], workdir)
    before = _snapshot(workdir)
    # Pointed at another base directory, whose weights differ.
    with pytest.raises(checkpointing.IncompatibleCheckpointError, match="another base"):
        train.run(finetune_config("lora", other_base), workdir)
    assert _snapshot(workdir) == before
    # The same base directory, retrained: the fingerprint differs.
    moved = tmp_path / "moved"
    base_copy = Path(runs["lora"][1].finetune.base_workdir)
    shutil.move(str(base_copy), moved)
    try:
        shutil.move(str(other_base), base_copy)
        with pytest.raises(checkpointing.IncompatibleCheckpointError, match="another base"):
            train.evaluate_run(workdir)
    finally:
        shutil.move(str(base_copy), other_base)
        shutil.move(str(moved), base_copy)
    assert _snapshot(workdir) == before


def test_a_run_leaves_no_data_thread_behind(base, tmp_path):
    """Runs of a study share one process: each must stop its prefetch threads when it ends."""
    import threading

    def data_threads():
        return {t for t in threading.enumerate() if t.name.endswith("(_fill)") and t.is_alive()}

    before = data_threads()
    train.run(finetune_config("lora", base, train__num_steps=2), tmp_path / "run")
    assert data_threads() - before == set()


def test_epoch_budget_stops_at_the_earlier_of_steps_and_epochs(base, tmp_path):
    config = finetune_config("lora", base, train__num_steps=100)
    config.finetune.num_epochs = 0.5  # 32 of the 64 examples at batch 8: 4 steps
    setup = train.build(config)
    assert setup.num_steps == 4
    config.finetune.num_epochs = 1000
    assert train.build(config).num_steps == 100


@pytest.mark.parametrize("content, words", [
    ("", "is empty"),
    ("an input\ta target\nonly one column\n", ":2: expected 2 tab-separated columns"),
])
def test_a_bad_pairs_file_is_named_before_anything_is_built(base, tmp_path, content, words):
    path = tmp_path / "pairs.tsv"
    path.write_text(content)
    config = finetune_config("lora", base)
    config.data.task = "ft_files"
    config.data.finetune.files = str(path)
    config.data.finetune.num_examples = None
    with pytest.raises(ValueError) as info:
        train.run(config, tmp_path / "run")
    assert str(path) in str(info.value) and words in str(info.value), str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["fmt", "lora"])
def test_a_finetuning_run_is_refused_as_a_base(runs, method, tmp_path):
    """FMT checkpoints hold a whole model, but it is not a pretraining run: its steps are not
    pretraining tokens, so the scaling fits would be wrong."""
    finetuned = runs[method][0]
    config = finetune_config("lora", finetuned)
    with pytest.raises(ConfigError, match=f"finetune.base_workdir.*is a {method} finetuning run"):
        train.build(config)


def test_stops_early_reads_only_the_dev_history():
    def record(*losses):
        # Test-split evaluations, however low, take no part in the decision.
        return {"eval_history": [e for i, v in enumerate(losses) for e in (
            {"step": i, "split": "dev", "loss": v}, {"step": i, "split": "test", "loss": 0.1})]}
    assert not train.stops_early(record(3.0, 2.9, 2.8), patience=2)
    assert train.stops_early(record(3.0, 2.9, 2.95, 2.91), patience=2)
    assert not train.stops_early(record(3.0, 2.9, 2.95, 2.89), patience=2)
    assert train.stops_early(record(3.0, 2.9, 2.89, 2.88), patience=2, min_delta=0.05)
    assert train.stops_early(record(3.0, float("nan"), float("nan")), patience=2)
    assert train.stops_early(record(3.0, None, None), patience=2)  # NaN as a record stores it
    assert not train.stops_early(record(3.0, 2.9), patience=2)
    # Not before min_steps steps without improvement (the evaluations here are one step apart).
    assert not train.stops_early(record(3.0, 2.9, 2.95, 2.91), patience=2, min_steps=3)
    assert train.stops_early(record(3.0, 2.9, 2.95, 2.91, 2.92), patience=2, min_steps=3)


def test_early_stopping_keeps_the_best_step_and_a_rerun_trains_no_further(base, tmp_path):
    config = finetune_config("lora", base, train__num_steps=40)
    config.data.finetune.num_examples = 8  # one step per epoch at batch 8
    config.finetune.eval_every_epochs = 1
    config.finetune.early_stopping_evals = 2
    config.finetune.early_stopping_min_delta = 10.0  # no evaluation counts as an improvement
    config.evaluation.num_generate_examples = 0
    config.evaluation.zero_shot_tasks = ("ft_embedded_xsc_xde",)  # measured by loss alone
    assert train.build(config).finetune.eval_every_steps == 1
    first = train.run(config, tmp_path)
    assert np.isfinite(first["final"]["zero_shot.ft_embedded_xsc_xde.loss"])
    assert "bleu" not in first["zero_shot"]["ft_embedded_xsc_xde"]
    dev = [e for e in first["eval_history"] if e["split"] == "dev"]
    assert [e["step"] for e in dev] == [1, 2, 3]
    assert first["steps"] == 3 and first["final"]["stopped_early_at"] == 3
    best = min(dev, key=lambda e: e["loss"])["step"]
    assert first["final"]["best_step"] == best
    # Saved: the evaluations that lowered the dev loss, and the step the run stopped at.
    lowered = [e["step"] for i, e in enumerate(dev)
               if all(e["loss"] < d["loss"] for d in dev[:i])]
    saved = checkpointing.committed_steps(tmp_path / "checkpoints")
    assert best in saved and set(saved) <= set(lowered) | {3}
    again = train.run(config, tmp_path)  # resumes at the stopping step: nothing left to train
    assert again["steps"] == 3 and again["final"]["test_loss"] == first["final"]["test_loss"]


def test_evaluation_every_epochs_counts_the_finetuning_data(base):
    config = finetune_config("lora", base, train__num_steps=40)
    config.finetune.eval_every_epochs = 0.5  # 32 of the 64 examples at batch 8
    assert train.build(config).finetune.eval_every_steps == 4
    config.finetune.eval_every_epochs = 0.01
    assert train.build(config).finetune.eval_every_steps == 1
    config.finetune.eval_min_steps = 3  # a floor for tiny datasets; longer epochs unaffected
    assert train.build(config).finetune.eval_every_steps == 3
    config.finetune.eval_every_epochs = 0.5
    assert train.build(config).finetune.eval_every_steps == 4


def test_evaluation_batches_are_built_once_per_split_and_shared_across_subsets(base):
    from ul2_lm import evaluate

    config = finetune_config("lora", base)
    evaluate._EVAL_CACHE.clear()
    first = evaluate.eval_batches(config, "test", num_batches=2)
    config.data.finetune.num_examples = 16  # another subset: the same test batches
    config.data.finetune.subset_seed = 3
    assert evaluate.eval_batches(config, "test", num_batches=2) is first
    config.data.seq_len = 48  # another layout: built anew
    other = evaluate.eval_batches(config, "test", num_batches=2)
    assert other is not first and other[0]["decoder_target_tokens"].shape[1] == 48
    evaluate._EVAL_CACHE.clear()
    config.data.seq_len = 64
    fresh = evaluate.eval_batches(config, "test", num_batches=2)
    for a, b in zip(first, fresh):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
