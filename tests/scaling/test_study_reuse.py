"""Run identity: a study reuses exactly the finished runs whose effective config (and base) is
the one it plans now, and runs the others from a clean workdir. Decided on records written
here, without training."""

import json
from pathlib import Path

import pytest

from scaling import execution, executors, study as study_lib
from tests.scaling.test_study import REPO, micro_study
from ul2_lm import record as record_lib


def planned(config, workdir="/study"):
    s = study_lib.parse(config)
    return s, study_lib.plan(s, str(workdir))


def finished_record(spec, specs, *, config=None, status="finished", base_hash=None):
    """The record a finished run of `spec` leaves (as a dict, as on disk)."""
    by_id = {s.run_id: s for s in specs}
    base = None
    if spec.depends_on:
        b = by_id[spec.depends_on[0]]
        base = {"workdir": b.workdir, "step": 8, "pretrain_tokens": 4096,
                "config_hash": base_hash or b.config_hash}
    r = record_lib.new_record(
        kind=spec.kind, task="t", method=spec.config["finetune"]["method"] or "pretrain",
        config=spec.config if config is None else config, base=base,
        model={"size": "x", "num_params": 1000},
        data={"pretrain_tokens": 4096, "finetune_examples": 16, "seed": 0})
    r.update(status=status, final={"dev_loss": 2.0, "test_loss": 2.1})
    return r


def typed(record):
    return record_lib.RunRecord.from_json(record, "test")


def decisions_for(specs, records, **kw):
    return execution.decide_all(specs, {rid: typed(r) for rid, r in records.items()}, **kw)


def actions(decisions):
    return {rid: d.action for rid, d in decisions.items()}


@pytest.fixture(scope="module")
def before():
    """The micro study as planned and finished once."""
    s, specs = planned(micro_study())
    return s, specs, {x.run_id: finished_record(x, specs) for x in specs}


def test_an_unchanged_study_reuses_every_run(before):
    s, specs, records = before
    _, again = planned(micro_study())
    decisions = decisions_for(again, records)
    assert set(actions(decisions).values()) == {execution.REUSE}
    assert execution.summary_line("micro", decisions) == (
        f"study 'micro': {len(specs)} runs: {len(specs)} reused; 0 to run")


def decided_after(records, section):
    """The decisions on `records` once `section`.overrides sets optim.warmup_steps=2."""
    changed = micro_study()
    changed[section].overrides["optim"] = {"warmup_steps": 2}
    _, again = planned(changed)
    return actions(decisions_for(again, records))


def test_changed_finetune_overrides_rerun_the_finetuning_runs_only(before):
    s, specs, records = before
    decided = decided_after(records, "finetune")
    assert {rid for rid, a in decided.items() if a == execution.REUSE} == {"pretrain/a",
                                                                          "pretrain/b"}
    assert {a for rid, a in decided.items() if rid.startswith("finetune/")} == {
        execution.CONFIG_CHANGED}


def test_a_changed_method_config_reruns_exactly_that_methods_runs(before, tmp_path):
    s, specs, records = before
    lora = tmp_path / "lora_dropout.py"
    lora.write_text("from scaling.study import load_config_file\n\n\ndef get_config():\n"
                    f"    c = load_config_file({str(REPO / 'configs/tiny_lora.py')!r})\n"
                    "    c.finetune.lora.dropout_rate = 0.1\n    return c\n")
    changed = micro_study()
    changed.finetune.configs["lora"] = str(lora)
    _, again = planned(changed)
    decisions = decisions_for(again, records)
    rerun = {rid for rid, d in decisions.items() if d.action != execution.REUSE}
    assert rerun == {x.run_id for x in specs if x.run_id.startswith("finetune/lora/")}
    assert {decisions[rid].action for rid in rerun} == {execution.CONFIG_CHANGED}
    n = len(rerun)
    assert execution.summary_line("micro", decisions) == (
        f"study 'micro': {len(specs)} runs: {len(specs) - n} reused, {n} config changed; "
        f"{n} to run")


def test_a_rerun_base_reruns_its_finetuning_runs(before):
    s, specs, records = before
    decided = decided_after(records, "pretrain")
    assert decided["pretrain/a"] == decided["pretrain/b"] == execution.CONFIG_CHANGED
    # The finetuning configs did not change; their bases did.
    assert {a for rid, a in decided.items() if rid.startswith("finetune/")} == {
        execution.BASE_CHANGED}


def test_a_finetuning_run_trained_from_another_base_is_rerun(before):
    s, specs, records = before
    victim = next(x for x in specs if x.run_id.startswith("finetune/fmt/a/"))
    records = dict(records)
    records[victim.run_id] = finished_record(victim, specs, base_hash="0" * 64)
    decided = actions(decisions_for(specs, records))
    assert {rid for rid, a in decided.items() if a != execution.REUSE} == {victim.run_id}
    assert decided[victim.run_id] == execution.BASE_CHANGED


def test_a_version_1_record_is_judged_by_the_config_it_stores(before):
    s, specs, records = before
    victim, kept = specs[3], specs[4]

    def v1(record):
        old = json.loads(json.dumps({k: v for k, v in record.items() if k != "config_hash"}))
        old["record_version"] = 1
        old.get("base", {}).pop("config_hash", None)
        return old

    records = dict(records)
    records[kept.run_id] = v1(records[kept.run_id])
    other = json.loads(json.dumps(victim.config))
    other["train"]["num_steps"] += 1
    records[victim.run_id] = v1(finished_record(victim, specs, config=other))
    decided = actions(decisions_for(specs, records))
    assert decided[kept.run_id] == execution.REUSE
    assert decided[victim.run_id] == execution.CONFIG_CHANGED


def test_unfinished_and_failed_runs_of_the_planned_config(before):
    s, specs, records = before
    records = dict(records)
    running, failed = specs[2], specs[3]
    records[running.run_id] = finished_record(running, specs, status="running")
    records[failed.run_id] = dict(finished_record(failed, specs, status="failed"),
                                  failure_reason="loss became NaN at step 3")
    decisions = decisions_for(specs, records)
    assert decisions[running.run_id].action == execution.RESUME
    assert decisions[failed.run_id].action == execution.FAILED
    assert decisions[failed.run_id].reason == "loss became NaN at step 3"
    retried = decisions_for(specs, records, retry_failed=True)
    assert retried[failed.run_id].action == execution.RETRY


def write_records(specs, records):
    for x in specs:
        if x.run_id in records:
            record_lib.write(x.workdir, records[x.run_id])


def fake_runner(specs, ran):
    """Trains nothing: records the run and leaves the record of a finished run."""
    def run(spec):
        assert not (Path(spec.workdir) / "checkpoints").exists(), "a rerun must start clean"
        ran.append(spec.run_id)
        record_lib.write(spec.workdir, finished_record(spec, specs))
    return run


def test_a_study_reruns_changed_runs_in_clean_workdirs_and_keeps_the_old_ones_aside(tmp_path):
    s, specs = planned(micro_study(), tmp_path)
    write_records(specs, {x.run_id: finished_record(x, specs) for x in specs})
    for x in specs:
        (Path(x.workdir) / "checkpoints" / "4").mkdir(parents=True)
    changed = micro_study()
    changed.finetune.overrides["optim"] = {"warmup_steps": 2}
    s2, again = planned(changed, tmp_path)
    ran, lines = [], []
    status = study_lib.execute(s2, again, tmp_path,
                               executors.SequentialExecutor(fake_runner(again, ran)),
                               log=lines.append)
    finetuning = [x for x in again if x.kind == "finetune"]
    assert ran == [x.run_id for x in finetuning]
    assert lines[0] == (f"study 'micro': {len(again)} runs: 2 reused, {len(finetuning)} config "
                        f"changed; {len(finetuning)} to run")
    assert all(v["status"] == "finished" for v in status.values())
    old = {x.run_id: x for x in specs}
    for x in finetuning:
        aside = tmp_path / "stale" / f"{x.run_id}.{old[x.run_id].config_hash[:8]}"
        assert record_lib.load(aside).config_hash == old[x.run_id].config_hash
        assert (aside / "checkpoints" / "4").is_dir()
        assert record_lib.load(x.workdir).config_hash == x.config_hash
    # The fit reads runs/ only: the old runs are not in it.
    assert not list((tmp_path / "runs").rglob("*.stale*"))
    # Running it again reuses everything.
    ran.clear()
    study_lib.execute(s2, again, tmp_path, executors.SequentialExecutor(fake_runner(again, ran)),
                      log=lines.append)
    assert ran == []


def test_a_corrupt_record_fails_its_run_naming_the_file(tmp_path):
    s, specs = planned(micro_study(), tmp_path)
    write_records(specs, {x.run_id: finished_record(x, specs) for x in specs[1:]})
    corrupt = Path(specs[0].workdir) / "record.json"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_text('{"record_version": 2, "sta')
    ran = []
    status = study_lib.execute(s, specs, tmp_path,
                               executors.SequentialExecutor(fake_runner(specs, ran)),
                               log=lambda m: None)
    assert ran == []
    assert status[specs[0].run_id]["status"] == "failed"
    assert f"{corrupt}: not valid JSON" in status[specs[0].run_id]["reason"]
    assert corrupt.read_text() == '{"record_version": 2, "sta'  # left for the user to look at


def test_a_record_the_executor_brings_home_counts_as_finished_only_with_the_planned_config(
        tmp_path):
    """The gcloud executor syncs the bucket's records before it asks what to skip: a run that
    finished on a slice while the study was away is not run again, and counts as finished;
    one of another config is not reused, and since its remote workdir cannot be moved aside
    from here, it fails saying so."""
    s, specs = planned(micro_study(), tmp_path)
    away, stale = specs[0], specs[1]
    other = json.loads(json.dumps(stale.config))
    other["train"]["num_steps"] += 1
    ran, lines = [], []

    class Syncing(executors.SequentialExecutor):
        def run(self, specs, done, skip=None):
            record_lib.write(away.workdir, finished_record(away, specs))
            record_lib.write(stale.workdir, finished_record(stale, specs, config=other))
            super().run(specs, done, skip)

    status = study_lib.execute(s, specs, tmp_path,
                               Syncing(lambda spec: ran.append(spec.run_id)), log=lines.append)
    assert away.run_id not in ran and stale.run_id not in ran
    assert status[away.run_id] == {"status": "finished", "reason": None}
    assert status[stale.run_id]["status"] == "failed"
    assert "holds a run of another config" in status[stale.run_id]["reason"]
    # Its finetuning runs fail with it; every other run ran.
    dependents = {x.run_id for x in specs if x.depends_on == (stale.run_id,)}
    assert set(ran) == {x.run_id for x in specs} - {away.run_id, stale.run_id} - dependents
    assert lines[-1].startswith(f"[{len(specs)}/{len(specs)} runs")


def test_a_report_is_not_replaced_when_no_law_can_be_fitted(tmp_path):
    """One finished finetuning run is too few for any law: the fit goes nowhere and the
    earlier report and fit/ stay as they were."""
    s, specs = planned(micro_study(), tmp_path)
    lone = next(x for x in specs if x.kind == "finetune")
    write_records(specs, {lone.run_id: finished_record(lone, specs)})
    (tmp_path / "REPORT.md").write_text("the good report\n")
    (tmp_path / "fit").mkdir()
    (tmp_path / "fit" / "fit.json").write_text("{}\n")
    with pytest.raises(study_lib.NothingToFit, match="no law could be fitted.*from an earlier "
                       "fit is kept"):
        study_lib.fit_and_report(s, tmp_path, {}, specs, log=lambda m: None)
    assert (tmp_path / "REPORT.md").read_text() == "the good report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["REPORT.md", "fit", "runs"]
    assert [p.name for p in (tmp_path / "fit").iterdir()] == ["fit.json"]


def test_progress_counts_runs_left_at_their_groups_rate(monkeypatch):
    from scaling import execution
    from scaling.runspec import Outcome, RunSpec

    clock = [0.0]
    monkeypatch.setattr(execution.time, "perf_counter", lambda: clock[0])

    def spec(run_id, kind, method=None, flops=1e12):
        return RunSpec(run_id=run_id, kind=kind, config={"finetune": {"method": method}},
                       workdir=f"/tmp/{run_id}", train_flops=flops)

    specs = [spec("pretrain/a", "pretrain", flops=1e9), spec("ft/fmt/1", "finetune", "fmt"),
             spec("ft/fmt/2", "finetune", "fmt", flops=3e12),
             spec("ft/lora/1", "finetune", "lora")]
    progress = execution.Progress(len(specs), specs)
    clock[0] = 10.0
    line = progress.finished(Outcome("pretrain/a", ok=True, seconds=10.0))
    # Finetuning runs stop early: pretraining's rate says nothing of them, so no ETA yet.
    assert line.startswith("[1/4 runs] pretrain/a: done")
    clock[0] = 14.0
    progress.finished(Outcome("ft/fmt/1", ok=True, seconds=4.0))
    # fmt's run left: 3x the planned FLOPs of the one that took 4 s; lora has no finished run:
    # its planned FLOPs at the rate of the finetuning runs so far (4 s for 1e12 FLOPs), the
    # whole scaled by wall time over summed run time (14 s / 14 s).
    assert progress.eta() == pytest.approx(12.0 + 4.0)


def test_progress_rates_finetuning_runs_by_their_data_size(monkeypatch):
    from scaling import execution
    from scaling.runspec import Outcome, RunSpec

    clock = [0.0]
    monkeypatch.setattr(execution.time, "perf_counter", lambda: clock[0])

    def spec(run_id, examples, method="fmt"):
        # The same planned FLOPs (one step budget) whatever the data size, as in a study.
        return RunSpec(run_id=run_id, kind="finetune", workdir=f"/tmp/{run_id}", train_flops=1e12,
                       config={"finetune": {"method": method},
                               "data": {"finetune": {"num_examples": examples}}})

    specs = [spec("n1/a", 1), spec("n100/a", 100), spec("n1/b", 1), spec("n100/b", 100),
             spec("lora/n100", 100, "lora")]
    progress = execution.Progress(len(specs), specs)
    clock[0] = 2.0
    progress.finished(Outcome("n1/a", ok=True, seconds=2.0))
    # Nothing of 100 examples has ended: fmt's rate (2 s a run) stands in for it.
    assert progress.eta() == pytest.approx(3 * 2.0 + 2.0)
    clock[0] = 22.0
    progress.finished(Outcome("n100/a", ok=True, seconds=20.0))
    # Each run left at the rate of its data size; lora's at all finetuning runs' (22 s / 2).
    assert progress.eta() == pytest.approx(2.0 + 20.0 + 11.0)
