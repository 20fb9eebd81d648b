"""The study runner: the grid it plans, its checks, and a miniature study end to end (killed,
resumed, failed runs, the report)."""

import json
import shutil
from pathlib import Path

import pytest

from scaling import executors, records, study as study_lib

REPO = Path(__file__).resolve().parents[2]


def micro_study(**changes):
    """Two very small model sizes, LoRA and FMT, three data sizes: about two minutes on CPU."""
    s = study_lib.load_config_file(REPO / "configs/studies/tiny.py")
    s.name = "micro"
    small = dict(size="tiny", num_layers=1, d_model=32, num_heads=1, mlp_dim=64)
    s.pretrain.sizes = {"a": small, "b": dict(small, num_layers=2, d_model=64, num_heads=2)}
    s.pretrain.anchor_size = "b"
    s.pretrain.num_steps = 8
    s.pretrain.checkpoints = (4,)
    data = {"seq_len": 64, "vocab": {"size": 512, "sample_documents": 2000},
            "num_eval_batches": 1}
    s.pretrain.overrides = {"data": data, "train": {"eval_every_steps": 4, "log_every_steps": 4,
                                                    "global_batch_size": 8},
                            "optim": {"warmup_steps": 1}}
    s.finetune.methods = ("fmt", "lora")
    s.finetune.data_sizes = (16, 32, 64)
    s.finetune.pet_sizes = {"lora": (2, 4)}
    s.finetune.seeds = (0,)
    s.finetune.overrides = {
        "data": data,
        "train": {"num_steps": 4, "global_batch_size": 8, "eval_every_steps": 2,
                  "log_every_steps": 2},
        "finetune": {"num_epochs": None},
        "checkpoint": {"every_steps": 2},
        "optim": {"warmup_steps": 1},
        "evaluation": {"num_generate_examples": 0, "zero_shot_tasks": (), "few_shot": ()},
    }
    s.heldout = dict(finetune_examples="max")
    s.fit = dict(laws=("multiplicative", "additive"), preset="paper", bootstrap=0, seed=0)
    for key, value in changes.items():
        section, name = key.split("__")
        s[section][name] = value
    return s


def test_the_grid_sweeps_each_factor_around_the_anchor():
    s = study_lib.parse(micro_study())
    specs = study_lib.plan(s, "/study")
    ids = [x.run_id for x in specs]
    assert len(ids) == len(set(ids))
    assert ids[:2] == ["pretrain/a", "pretrain/b"]
    points = s.points()
    # model size: 2 sizes x 3 data sizes, per method; pretraining data: one more checkpoint of
    # the anchor; PET size: one more LoRA rank (4 is LoRA's default, already in the grid).
    assert len([p for p in points if p.method == "fmt"]) == 2 * 3 + 3
    assert len([p for p in points if p.method == "lora"]) == 2 * 3 + 3 + 3
    for spec in specs[2:]:
        base = spec.depends_on[0]
        assert spec.config["finetune"]["base_workdir"] == f"/study/runs/{base}"
        assert spec.workdir == f"/study/runs/{spec.run_id}"
        assert ids.index(base) < ids.index(spec.run_id)
    anchor = next(x for x in specs if x.run_id == "pretrain/b").config["checkpoint"]
    assert anchor["every_steps"] == 4 and anchor["keep_last"] >= 2


@pytest.mark.parametrize("changes, key", [
    (dict(heldout=dict(finetune_examples=48)), "heldout.finetune_examples"),
    (dict(heldout=dict(model_size="c")), "heldout.model_size"),
    (dict(heldout=dict(pretrain_step=5)), "heldout.pretrain_step"),
])
def test_a_held_out_value_outside_the_grid_is_named(changes, key):
    s = micro_study()
    for section, value in changes.items():
        s[section] = value
    with pytest.raises(study_lib.StudyError, match=f"study.{key}"):
        study_lib.parse(s)


def test_an_unknown_method_is_named():
    with pytest.raises(study_lib.StudyError, match="study.finetune.methods.*'adapter'"):
        study_lib.parse(micro_study(finetune__methods=("fmt", "adapter")))


def test_a_bad_override_is_named_before_any_run():
    s = micro_study()
    s.finetune.overrides = {"train": {"num_stepz": 3}}
    with pytest.raises(study_lib.StudyError, match="num_stepz"):
        study_lib.plan(study_lib.parse(s), "/study")


@pytest.mark.parametrize("fit, key", [
    (dict(laws=("multiplicative", "cubic")), "fit.laws: unknown law 'cubic'"),
    (dict(laws=()), "fit.laws: a list of law names"),
    (dict(curve_law="single,quartic"), "fit.curve_law: unknown law 'quartic'"),
    (dict(preset="papr"), "fit.preset: unknown preset 'papr'"),
    (dict(bootstrap=-1), "fit.bootstrap: a whole number >= 0, got -1"),
    (dict(target="seed"), "fit.target: 'seed' is not a measurement"),
    (dict(law=("multiplicative",)), "fit.law: unknown setting"),
])
def test_a_bad_fit_setting_is_named_before_any_run(fit, key):
    s = micro_study()
    s.fit.update(fit)
    with pytest.raises(study_lib.StudyError, match=f"study.{key}"):
        study_lib.parse(s)


# (ConfigDict itself refuses keys with dots, so "..", "../up" and ".hidden" never get this far.)
@pytest.mark.parametrize("name", ["/tmp/elsewhere", "a/b", "a\\b", "", "-x", "a b"])
def test_a_size_name_that_is_not_a_plain_name_is_refused(name):
    s = micro_study()
    s.pretrain.sizes = {"b": dict(s.pretrain.sizes["b"]), name: dict(s.pretrain.sizes["a"])}
    with pytest.raises(study_lib.StudyError, match="study.pretrain.sizes: size name"):
        study_lib.parse(s)


@pytest.mark.parametrize("name", ["paper_wmt14_ende", "paper_wmt19_enzh", "paper_mlsum"])
def test_planning_a_paper_study_lists_runs_hours_and_commands(name, capsys):
    s = study_lib.parse(study_lib.load_config_file(REPO / f"configs/studies/{name}.py"))
    specs = study_lib.plan(s, "gs://bucket/study")
    study_lib.validate_runs(specs, num_devices=64)
    text = study_lib.describe_plan(s, specs)
    assert f"{len(specs)} runs" in text and "accelerator-hours" in text
    sizes = {x.config["model"]["size"] for x in specs}
    assert sizes == {"1b", "2b", "4b", "8b", "16b"}
    lora = [x for x in specs if x.run_id.startswith("finetune/lora/1b/")]
    assert {x.config["finetune"]["lora"]["rank"] for x in lora} == {4, 8, 16, 32, 48, 64, 128}
    assert {x.config["data"]["finetune"]["subset_seed"] for x in lora} == {0, 1, 2}
    first = next(x for x in specs if x.kind == "finetune")
    assert (f"python -m ul2_lm.train --config=configs/from_json.py:{first.workdir}/"
            f"run_config.json --workdir={first.workdir}") in text
    assert first.config["data"]["vocab"]["path"] == f"{first.config['finetune']['base_workdir']}/vocab.model"


def run_study(config, workdir, runner=study_lib.in_process_runner, retry_failed=False):
    s = study_lib.parse(config)
    specs = study_lib.plan(s, str(workdir))
    status = study_lib.execute(s, specs, Path(workdir),
                               executors.SequentialExecutor(runner), retry_failed=retry_failed,
                               log=lambda m: None)
    return study_lib.fit_and_report(s, Path(workdir), status, specs, log=lambda m: None), status


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    report, status = run_study(micro_study(), workdir)
    return workdir, report, status


def test_a_study_runs_fits_and_reports(finished_study):
    workdir, report, status = finished_study
    assert all(v["status"] == "finished" for v in status.values())
    text = report.read_text()
    assert "## Which method for which data budget" in text
    assert "| fmt |" in text or "fmt" in text
    fit = json.loads((workdir / "fit" / "fit.json").read_text())
    assert {r["method"] for r in fit["results"]} == {"fmt", "lora"}
    assert {r["law"] for r in fit["results"]} == {"multiplicative", "additive"}
    assert list((workdir / "fit" / "figures").glob("fits_*.png"))
    # Self-describing: the results directory alone refits.
    from scaling import fit as fit_lib

    assert fit_lib.main(["--from", str(workdir / "fit"), "--out", str(workdir / "refit"),
                         "--no_plots"]) == 0


def test_running_a_finished_study_again_redoes_nothing(finished_study):
    workdir, report, _ = finished_study
    before = report.read_text()

    def must_not_run(spec):
        raise AssertionError(f"{spec.run_id} ran again")

    again, status = run_study(micro_study(), workdir, runner=must_not_run)
    assert again.read_text() == before


def test_a_failed_run_is_recorded_and_left_out_of_the_fit(finished_study, tmp_path):
    source, _, _ = finished_study
    workdir = tmp_path / "study"
    shutil.copytree(source, workdir)
    victim = "finetune/lora/b/step8/r2/n32/seed0"
    shutil.rmtree(workdir / "runs" / victim)

    def failing(spec):
        if spec.run_id == victim:
            raise ValueError("bad data: the shard is empty")
        study_lib.in_process_runner(spec)

    report, status = run_study(micro_study(), workdir, runner=failing)
    assert status[victim] == {"status": "failed", "reason": "ValueError: bad data: the shard is empty"}
    record = json.loads((workdir / "runs" / victim / "record.json").read_text())
    assert record["status"] == "failed"
    text = report.read_text()
    assert victim in text and "left out of the fit" in text
    collection = records.collect(workdir / "runs")
    assert any(victim in path for path, _ in collection.skipped)


def diverge(run_dir):
    """As a run under train.nan_policy='skip' that diverged leaves its record: finished, with
    null losses."""
    from ul2_lm import record as record_lib

    record = record_lib.read(run_dir)
    record["final"].update(dev_loss=None, test_loss=None, test_perplexity=None)
    record_lib.write(run_dir, record)


def test_a_run_without_a_finite_loss_is_left_out_and_the_rest_is_reported(finished_study,
                                                                         tmp_path):
    source, report, _ = finished_study
    workdir = tmp_path / "study"
    shutil.copytree(source, workdir)
    victim = "finetune/lora/b/step8/r2/n32/seed0"
    diverge(workdir / "runs" / victim)

    def must_not_run(spec):
        raise AssertionError(f"{spec.run_id} ran again")

    again, status = run_study(micro_study(), workdir, runner=must_not_run)
    text = again.read_text()
    assert text != report.read_text()
    assert f"- `{victim}`: no finite loss: final.dev_loss is null" in text
    assert "1 run(s) failed and are left out of the fit" in text
    assert "## Which method for which data budget" in text and "## Fits" in text
    fitted = (workdir / "fit" / "table.csv").read_text().splitlines()[1:]
    before = (source / "fit" / "table.csv").read_text().splitlines()[1:]
    assert len(fitted) == len(before) - 1 and not any(victim in row for row in fitted)


def test_a_good_report_is_kept_when_nothing_can_be_fitted(finished_study, tmp_path):
    source, report, _ = finished_study
    workdir = tmp_path / "study"
    shutil.copytree(source, workdir)
    for path in (workdir / "runs" / "finetune").rglob("record.json"):
        diverge(path.parent)
    with pytest.raises(study_lib.NothingToFit, match="no finished finetuning run with a finite "
                       "test_loss among the 21 planned.*from an earlier fit is kept"):
        run_study(micro_study(), workdir)
    assert (workdir / "REPORT.md").read_text() == report.read_text()
    assert ((workdir / "fit" / "fit.json").read_text()
            == (source / "fit" / "fit.json").read_text())

    # From the command line: one line, a non-zero exit, no traceback.
    config = tmp_path / "micro.py"
    config.write_text("from tests.scaling.test_study import micro_study\n\n\n"
                      "def get_config():\n    return micro_study()\n")
    out = study_cli(f"--config={config}", f"--workdir={workdir}")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("scaling.study: nothing to fit: ")
    assert (workdir / "REPORT.md").read_text() == report.read_text()


def test_a_killed_study_resumes_to_the_same_report(finished_study, tmp_path):
    from ul2_lm import record as record_lib

    source, report, _ = finished_study
    workdir = tmp_path / "study"
    shutil.copytree(source, workdir)
    # As after a kill: one run stopped after its first checkpoint (its record covers it), one
    # never started, and no fit or report yet.
    stopped = workdir / "runs" / "finetune/lora/b/step8/r4/n64/seed0"
    shutil.rmtree(stopped / "checkpoints" / "4")
    record_lib.write(stopped, record_lib.truncate_to_step(record_lib.read(stopped), 2))
    shutil.rmtree(workdir / "runs" / "finetune/fmt/a/step8/full/n16/seed0")
    shutil.rmtree(workdir / "fit")
    (workdir / "REPORT.md").unlink()
    ran = []

    def runner(spec):
        ran.append(spec.run_id)
        study_lib.in_process_runner(spec)

    again, status = run_study(micro_study(), workdir, runner=runner)
    assert sorted(ran) == ["finetune/fmt/a/step8/full/n16/seed0",
                           "finetune/lora/b/step8/r4/n64/seed0"]
    assert again.read_text() == report.read_text()


def study_cli(*args, timeout=300):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "scaling.study", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_the_gcloud_executor_dry_run_prints_its_commands_and_runs_nothing(tmp_path):
    out = study_cli("--config=configs/studies/demo.py", f"--workdir={tmp_path}",
                    "--executor=gcloud", "--dry_run", "--gcloud_project=my-project",
                    "--gcloud_zone=us-central2-b", "--accelerator_type=v4-8",
                    "--bucket=my-bucket")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "gcloud compute tpus tpu-vm create" in text and "--accelerator-type=v4-8" in text
    assert "tpu-vm delete" in text and "--worker=all" in text
    # Records already on the bucket come home before anything is decided; runs write there.
    sync = r"gsutil -m -q rsync -r -x '^(?!(.*/)?record\.json$).*' gs://my-bucket/runs "
    assert sync + f"{tmp_path}/runs" in text
    assert "--workdir=gs://my-bucket/runs/pretrain/xs" in text
    assert not list((tmp_path / "runs").rglob("record.json"))
    assert json.loads((tmp_path / "status.json").read_text()) == {}


def test_plan_refuses_an_unknown_law_in_one_line_before_anything_runs(tmp_path):
    config = tmp_path / "bad_law.py"
    config.write_text("from scaling.study import load_config_file\n\n\ndef get_config():\n"
                      "    s = load_config_file('configs/studies/demo.py')\n"
                      "    s.fit.laws = ('multiplicative', 'cubic')\n    return s\n")
    for mode in (["--plan"], []):
        out = study_cli(f"--config={config}", f"--workdir={tmp_path / 'study'}", *mode)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "scaling.study: study.fit.laws: unknown law 'cubic'; laws: ['additive', ")
        assert not (tmp_path / "study").exists()


def test_a_study_directory_on_a_bucket_is_refused_with_the_way_to_put_runs_there():
    out = study_cli("--config=configs/studies/demo.py", "--workdir=gs://my-bucket/demo")
    assert out.returncode != 0
    assert "--workdir=gs://my-bucket/demo" in out.stderr and "--bucket=gs://" in out.stderr


def test_a_malformed_zone_stops_the_study_before_any_run(tmp_path):
    out = study_cli("--config=configs/studies/demo.py", f"--workdir={tmp_path}",
                    "--executor=gcloud", "--gcloud_project=my-project",
                    "--gcloud_zone=moon base 1", "--accelerator_type=v4-8", "--bucket=b")
    assert out.returncode != 0
    assert "moon base 1" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_the_recommendation_picks_the_lower_law_and_warns_of_an_uncertified_fit():
    config = study_lib.load_config_file(REPO / "configs/studies/demo.py")
    config.finetune.data_sizes = (2, 10, 50, 200)  # the ranges below start under the grid
    study = study_lib.parse(config)
    law = {"A_m": 10.0, "alpha_m": 0.2, "beta": 0.1}

    def result(method, floor, certified):
        fit = {"certified": certified, "reason": None if certified else "alpha_m at a bound"}
        return {"method": method, "law": "multiplicative", "certified": certified,
                "parameters": {**law, "E": floor}, "joint": {"certified": True},
                "factors": {"model_size": {"fit": fit}}}

    doc = {"results": [result("fmt", 2.0, True), result("lora", 1.5, True)]}
    lines = study_lib.recommendation(study, doc)
    assert len(lines) == 1 and "**lora**" in lines[0]  # lower everywhere: one range
    assert "not certified" not in lines[0]
    doc["results"][1] = result("lora", 1.5, False)
    lines = study_lib.recommendation(study, doc)
    # The warning stands on the line of the range that rests on the uncertified fit.
    assert len(lines) == 1 and "**lora**" in lines[0]
    assert "**not certified**: lora's model-size fit: alpha_m at a bound" in lines[0]
    # A range won by a certified method over an uncertified rival carries the warning too.
    doc["results"] = [result("fmt", 2.0, False), result("lora", 1.5, True)]
    lines = study_lib.recommendation(study, doc)
    assert "**lora**" in lines[0] and "fmt's model-size fit" in lines[0]
    # A law below the other only at budgets the study never ran says it is extrapolated.
    doc["results"] = [result("fmt", 2.0, True),
                      {**result("lora", 2.0, True), "parameters": {**law, "A_m": 1e4,
                                                                   "beta": 1.5, "E": 2.0}}]
    lines = study_lib.recommendation(study, doc)
    assert "**lora**" in lines[-1] and "extrapolated" in lines[-1]
    assert "**fmt**" in lines[0] and "extrapolated outside" in lines[0]  # from grid/4 on
    assert len(lines) == 2
