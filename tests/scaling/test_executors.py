"""Executors: dependency order, failures and their reasons, skipping, local processes, the
commands a TPU study issues, and a real two-process run started the way a pod starts it."""

import json
import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from scaling import executors
from scaling.executors import (GcloudTPUExecutor, LocalPodExecutor, ParallelExecutor,
                               SequentialExecutor, error_summary, make_executor)
from scaling.runspec import Outcome, RunSpec


def spec(run_id, workdir, depends_on=(), **config):
    return RunSpec(run_id=run_id, kind="pretrain", config=config, workdir=str(workdir),
                   depends_on=tuple(depends_on))


def collect():
    outcomes = []
    return outcomes, outcomes.append


def by_id(outcomes):
    return {o.run_id: o for o in outcomes}


# --- Bookkeeping shared by all executors ------------------------------------------------------


def test_plan_errors_are_named_before_anything_runs(tmp_path):
    calls = []
    ex = SequentialExecutor(calls.append)
    with pytest.raises(ValueError, match="'b' depends on 'zzz'"):
        ex.run([spec("a", tmp_path / "a"), spec("b", tmp_path / "b", ["zzz"])], print)
    with pytest.raises(ValueError, match="'a' appears twice"):
        ex.run([spec("a", tmp_path / "a"), spec("a", tmp_path / "a2")], print)
    # A dependency listed after its dependent is out of order, not silently reordered.
    with pytest.raises(ValueError, match="'b' depends on 'a'"):
        ex.run([spec("b", tmp_path / "b", ["a"]), spec("a", tmp_path / "a")], print)
    assert calls == []


def test_error_summary_picks_the_error_line():
    traceback = textwrap.dedent("""\
        12:00:01 step 3/4 loss 7.8
        Traceback (most recent call last):
          File "/x/train.py", line 3, in run
            raise ConfigError("train.num_steps", "must be > 0")
        ul2_lm.config.ConfigError: config.train.num_steps: must be > 0, got -1
        """)
    assert error_summary(traceback) == \
        "ul2_lm.config.ConfigError: config.train.num_steps: must be > 0, got -1"
    assert error_summary("FATAL Flags parsing error: Unknown command line flag 'bogus'\n"
                         "Pass --helpshort or --helpfull to see help on flags.\n") == (
        "FATAL Flags parsing error: Unknown command line flag 'bogus' | "
        "Pass --helpshort or --helpfull to see help on flags.")
    gcloud = ("Using ssh batch size of 1.\n"
              "ERROR: (gcloud.compute.tpus.tpu-vm.create) INVALID_ARGUMENT: Invalid zone\n"
              "- '@type': type.googleapis.com/google.rpc.BadRequest\n")
    assert error_summary(gcloud) == ("ERROR: (gcloud.compute.tpus.tpu-vm.create) "
                                     "INVALID_ARGUMENT: Invalid zone | "
                                     "- '@type': type.googleapis.com/google.rpc.BadRequest")
    # Log lines after the exception are not part of it; no error line: the last line.
    assert error_summary("KeyboardInterrupt\nI0102 12:00:00.1 x.cc:1] shutting down\n") == \
        "KeyboardInterrupt"
    assert error_summary("starting\n  out of disk  \n\n") == "out of disk"
    assert error_summary("\n \n") == ""


def test_make_executor_by_name():
    assert isinstance(make_executor("local", runner=print), SequentialExecutor)
    assert isinstance(make_executor("parallel", num_workers=2), ParallelExecutor)
    assert isinstance(make_executor("local_pod", num_processes=2), LocalPodExecutor)
    gcloud = make_executor("gcloud", project="my-project", zone="us-central2-b",
                           accelerator_type="v4-8", runtime_version="tpu-ubuntu2204-base",
                           bucket="b", name_prefix="s")
    assert isinstance(gcloud, GcloudTPUExecutor) and gcloud.dry_run
    with pytest.raises(ValueError, match="unknown executor 'slurm'"):
        make_executor("slurm")


# --- Sequential ------------------------------------------------------------------------------


def test_sequential_runs_in_dependency_order_and_writes_configs(tmp_path):
    order = []
    specs = [spec("pre/a", tmp_path / "a", lr=1), spec("ft/a", tmp_path / "fa", ["pre/a"]),
             spec("pre/b", tmp_path / "b")]
    outcomes, done = collect()
    SequentialExecutor(lambda s: order.append(s.run_id)).run(specs, done)
    assert order == ["pre/a", "ft/a", "pre/b"]
    assert [o.run_id for o in outcomes] == order and all(o.ok for o in outcomes)
    assert json.loads((tmp_path / "a" / "run_config.json").read_text()) == {"lr": 1}


def test_sequential_failure_fails_dependents_without_starting_them(tmp_path):
    started = []

    def runner(s):
        started.append(s.run_id)
        if s.run_id == "a":
            raise ValueError("loss became NaN at step 3")

    specs = [spec("a", tmp_path / "a"), spec("b", tmp_path / "b", ["a"]),
             spec("c", tmp_path / "c", ["b"]), spec("d", tmp_path / "d")]
    outcomes, done = collect()
    SequentialExecutor(runner).run(specs, done)
    assert started == ["a", "d"]
    got = by_id(outcomes)
    assert got["a"].reason == "ValueError: loss became NaN at step 3" and not got["a"].ok
    assert got["b"].reason == "dependency a failed: ValueError: loss became NaN at step 3"
    assert got["c"].reason.startswith("dependency b failed: dependency a failed: ValueError")
    assert got["d"].ok and len(outcomes) == 4


def test_sequential_skip_counts_as_finished(tmp_path):
    started = []
    specs = [spec("a", tmp_path / "a"), spec("b", tmp_path / "b", ["a"])]
    outcomes, done = collect()
    SequentialExecutor(lambda s: started.append(s.run_id)).run(
        specs, done, skip=lambda s: s.run_id == "a")
    assert started == ["b"]
    assert outcomes == [Outcome("b", ok=True, seconds=outcomes[0].seconds)]


def test_sequential_keyboard_interrupt_propagates(tmp_path):
    def runner(s):
        raise KeyboardInterrupt

    outcomes, done = collect()
    with pytest.raises(KeyboardInterrupt):
        SequentialExecutor(runner).run([spec("a", tmp_path / "a")], done)
    assert outcomes == []


# --- Parallel processes ----------------------------------------------------------------------

# A stand-in for the trainer: reads its run_config.json, notes when it starts and ends, sleeps,
# and fails as told.
FAKE_RUN = textwrap.dedent("""
    import json, os, sys, time
    config = json.load(open(sys.argv[1]))
    def note(what):
        with open(config["events"], "a") as f:
            f.write(f"{what} {config['name']}\\n")
    note("start")
    with open(config["pid_file"], "w") as f:
        f.write(str(os.getpid()))
    print("training", config["name"], flush=True)
    time.sleep(config.get("sleep", 0))
    if "error" in config:
        raise ValueError(config["error"])
    if "exit" in config:
        print("giving up quietly", flush=True)
        sys.exit(config["exit"])
    note("end")
""")


class FakeParallel(ParallelExecutor):
    def command(self, s):
        return [self.python, "-c", FAKE_RUN, s.config_path]


def fake_specs(tmp_path, runs):
    """runs: (name, depends_on, extra config) -> RunSpecs running FAKE_RUN."""
    events = tmp_path / "events.txt"
    return [spec(name, tmp_path / name, deps, name=name, events=str(events),
                 pid_file=str(tmp_path / f"{name}.pid"), **extra)
            for name, deps, extra in runs], events


def max_concurrency(events):
    running = peak = 0
    for line in events.read_text().splitlines():
        running += 1 if line.startswith("start") else -1
        peak = max(peak, running)
    return peak


def test_parallel_respects_the_worker_limit_and_dependencies(tmp_path):
    specs, events = fake_specs(tmp_path, [
        ("a", (), {"sleep": 0.5}), ("b", (), {"sleep": 0.3}), ("c", (), {"sleep": 0.3}),
        ("d", ("a",), {}), ("e", (), {"sleep": 0.3})])
    outcomes, done = collect()
    FakeParallel(2).run(specs, done)
    assert sorted(o.run_id for o in outcomes) == ["a", "b", "c", "d", "e"]
    assert all(o.ok for o in outcomes), outcomes
    assert max_concurrency(events) == 2
    lines = events.read_text().splitlines()
    assert lines.index("start d") > lines.index("end a")
    log = (tmp_path / "a" / "train.log").read_text()
    assert "training a" in log and log.startswith("# ")  # Header naming the command, then output.


def test_parallel_failure_reason_comes_from_the_log(tmp_path):
    specs, _ = fake_specs(tmp_path, [
        ("bad", (), {"error": "learning rate must be positive"}), ("child", ("bad",), {}),
        ("quiet", (), {"exit": 3}), ("fine", (), {})])
    outcomes, done = collect()
    FakeParallel(3).run(specs, done)
    got = by_id(outcomes)
    assert got["bad"].reason == "ValueError: learning rate must be positive (exit code 1)"
    assert got["child"].reason == ("dependency bad failed: ValueError: learning rate must be "
                                   "positive (exit code 1)")
    assert not (tmp_path / "child" / "train.log").exists()  # Never started.
    assert got["quiet"].reason == "giving up quietly (exit code 3)"
    assert got["fine"].ok
    assert "Traceback" in (tmp_path / "bad" / "train.log").read_text()


def test_parallel_interrupt_terminates_children(tmp_path):
    specs, _ = fake_specs(tmp_path, [("fast", (), {}), ("slow", (), {"sleep": 60})])

    def done(outcome):
        # As if the user pressed ^C while the slow run is running: wait until it has started
        # (on a loaded machine the fast one can finish before the slow one's process is up).
        deadline = time.monotonic() + 20
        while not (tmp_path / "slow.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        FakeParallel(2).run(specs, done)
    assert time.monotonic() - start < 30
    pid = int((tmp_path / "slow.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_parallel_env_and_slot_env_reach_the_child(tmp_path):
    script = "import os; print('env', os.environ['STUDY_X'], os.environ['SLOT'])"

    class EnvParallel(ParallelExecutor):
        def command(self, s):
            return [self.python, "-c", script]

    outcomes, done = collect()
    EnvParallel(1, env={"STUDY_X": "1"}, slot_env=lambda i: {"SLOT": str(i)}).run(
        [spec("a", tmp_path / "a")], done)
    assert outcomes[0].ok
    assert "env 1 0" in (tmp_path / "a" / "train.log").read_text()


POD_WORKER = textwrap.dedent("""
    import os, pathlib, sys, time
    workdir = pathlib.Path(next(a for a in sys.argv if a.startswith("--workdir=")).split("=", 1)[1])
    pid_file = workdir / "process0.pid"
    if "--process_id=1" in sys.argv:
        # Fail only once process 0 is up, so the test can check that it was stopped.
        deadline = time.monotonic() + 20
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise RuntimeError("gloo: connection refused")
    pid_file.write_text(str(os.getpid()))
    time.sleep(60)  # Process 0 would wait for its peer forever.
""")


class FakePod(LocalPodExecutor):
    def processes(self, s):
        procs = super().processes(s)
        for p in procs:
            p.argv = [self.python, "-c", POD_WORKER, *p.argv[1:]]
        return procs


def test_pod_job_fails_as_one_when_a_process_fails(tmp_path):
    outcomes, done = collect()
    start = time.monotonic()
    FakePod(num_processes=2).run([spec("a", tmp_path / "a")], done)
    assert time.monotonic() - start < 30  # Process 0 was stopped, not waited for.
    assert outcomes[0].reason == "process 1: RuntimeError: gloo: connection refused (exit code 1)"
    pid0 = int((tmp_path / "a" / "process0.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid0, 0)
    assert (tmp_path / "a" / "train.process1.log").exists()


def test_parallel_runs_the_trainer_command(tmp_path):
    s = spec("a", tmp_path / "a")
    assert ParallelExecutor(1, python="py").command(s) == [
        "py", "-m", "ul2_lm.train",
        f"--config={executors.REPO}/configs/from_json.py:{tmp_path}/a/run_config.json",
        f"--workdir={tmp_path}/a"]


# --- Cloud TPU commands ----------------------------------------------------------------------

SLICE = dict(project="my-project", zone="us-central2-b", accelerator_type="v4-32",
             runtime_version="tpu-ubuntu2204-base", bucket="gs://my-bucket/study",
             name_prefix="ul2")


class FakeGcloud:
    """Records what it is asked to run; `fail(argv)` returns (returncode, stderr) or None.
    `gsutil cat` of a record answers with a finished record naming the URL it was read from."""

    def __init__(self, fail=lambda argv: None):
        self.calls = []
        self.inputs = []
        self.fail = fail

    def __call__(self, argv, input=None, capture_output=False, text=False):
        self.calls.append(argv)
        self.inputs.append(input)
        failure = self.fail(argv)
        code, stderr = failure if failure else (0, "")
        stdout = ""
        if argv[:3] == ["gsutil", "-q", "cat"] and not code:
            stdout = json.dumps({"status": "finished", "read_from": argv[3]})
        return subprocess.CompletedProcess(argv, code, stdout, stderr)


def study(tmp_path):
    pre = RunSpec("pretrain/tiny", "pretrain", {"train": {"num_steps": 4}},
                  str(tmp_path / "runs" / "pretrain" / "tiny"))
    ft = RunSpec("finetune/lora/tiny", "finetune",
                 {"finetune": {"method": "lora", "base_workdir": pre.workdir}},
                 "gs://other-bucket/ft", depends_on=(pre.run_id,))
    return [pre, ft]


def expected_commands(archive, local_runs, fetch_records=True):
    setup = ("set -e && rm -rf ~/ul2_lm && mkdir -p ~/ul2_lm && cd ~/ul2_lm && "
             "gsutil -q cp gs://my-bucket/study/code/src.tar.gz /tmp/ul2_lm-src.tar.gz && "
             "tar -xzf /tmp/ul2_lm-src.tar.gz && "
             "python3 -m pip install -q -c constraints.txt -e '.[tpu,data,eval]'")
    pre_dir = "gs://my-bucket/study/runs/pretrain/tiny"
    run_pre = ("cd ~/ul2_lm && mkdir -p /tmp/ul2_lm_runs/pretrain/tiny && "
               f"gsutil -q cp {pre_dir}/run_config.json "
               "/tmp/ul2_lm_runs/pretrain/tiny/run_config.json && "
               "python3 -m ul2_lm.train "
               "--config=configs/from_json.py:/tmp/ul2_lm_runs/pretrain/tiny/run_config.json "
               f"--workdir={pre_dir}")
    run_ft = ("cd ~/ul2_lm && mkdir -p /tmp/ul2_lm_runs/finetune/lora/tiny && "
              "gsutil -q cp gs://other-bucket/ft/run_config.json "
              "/tmp/ul2_lm_runs/finetune/lora/tiny/run_config.json && "
              "python3 -m ul2_lm.train "
              "--config=configs/from_json.py:/tmp/ul2_lm_runs/finetune/lora/tiny/run_config.json"
              " --workdir=gs://other-bucket/ft")
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    zone, project = "--zone=us-central2-b", "--project=my-project"

    def slice_commands(name, config_url, run, fetch):
        return [
            ["gsutil", "cp", "-", config_url],
            [*tpu, "create", name, zone, "--accelerator-type=v4-32",
             "--version=tpu-ubuntu2204-base", project],
            [*tpu, "ssh", name, zone, project, "--worker=all", f"--command={setup}"],
            [*tpu, "ssh", name, zone, project, "--worker=all", f"--command={run}"],
            *([["gsutil", "-q", "cat", fetch]] if fetch else []),
            [*tpu, "delete", name, zone, project, "--quiet"],
        ]

    # Records already in the bucket come home first; a run's record right after it (only the
    # pretraining run has a local workdir: the finetuning run's is on another bucket).
    sync = ["gsutil", "-m", "-q", "rsync", "-r", "-x", r"^(?!(.*/)?record\.json$).*",
            "gs://my-bucket/study/runs", str(local_runs)]
    return ([sync, ["gsutil", "cp", str(archive), "gs://my-bucket/study/code/src.tar.gz"]]
            + slice_commands("ul2-" + executors.hashlib.sha1(b"pretrain/tiny").hexdigest()[:8],
                             f"{pre_dir}/run_config.json", run_pre,
                             fetch_records and f"{pre_dir}/record.json")
            + slice_commands(
                "ul2-" + executors.hashlib.sha1(b"finetune/lora/tiny").hexdigest()[:8],
                "gs://other-bucket/ft/run_config.json", run_ft, None))


def test_gcloud_dry_run_issues_the_exact_commands(tmp_path, capsys):
    archive = tmp_path / "src.tar.gz"
    ex = GcloudTPUExecutor(**SLICE, repo_archive=archive, runner=FakeGcloud())
    outcomes, done = collect()
    ex.run(study(tmp_path), done)
    assert ex.issued == expected_commands(archive, tmp_path / "runs", fetch_records=False)
    assert ex.runner.calls == []  # A dry run runs nothing.
    assert [(o.ok, o.reason) for o in outcomes] == [(True, executors.DRY_RUN_REASON)] * 2
    printed = capsys.readouterr().out
    assert "+ gcloud compute tpus tpu-vm delete ul2-" in printed
    assert printed.count("\n") == len(ex.issued)


def test_gcloud_uploads_configs_with_bases_on_the_bucket(tmp_path):
    runner = FakeGcloud()
    ex = GcloudTPUExecutor(**SLICE, repo_archive=tmp_path / "src.tar.gz", runner=runner,
                           dry_run=False)
    outcomes, done = collect()
    ex.run(study(tmp_path), done)
    assert runner.calls == ex.issued == expected_commands(tmp_path / "src.tar.gz",
                                                          tmp_path / "runs")
    configs = [json.loads(i) for i in runner.inputs if i is not None]
    assert configs == [{"train": {"num_steps": 4}},
                       {"finetune": {"method": "lora",
                                     "base_workdir": "gs://my-bucket/study/runs/pretrain/tiny"}}]
    assert all(o.ok for o in outcomes)
    # The pretraining run's record came home into its local workdir, where the study reads it.
    record = json.loads((tmp_path / "runs" / "pretrain" / "tiny" / "record.json").read_text())
    assert record == {"status": "finished",
                      "read_from": "gs://my-bucket/study/runs/pretrain/tiny/record.json"}


def test_gcloud_resumed_study_skips_runs_whose_bucket_record_is_finished(tmp_path):
    """A study stopped after its pretraining run finished on a slice, but before the laptop
    heard of it: the bucket's record comes home first, and that run is not started again."""
    from scaling.study import run_status

    class Bucket(FakeGcloud):
        def __call__(self, argv, **kwargs):
            if argv[3:4] == ["rsync"]:  # What the bucket holds: the finished pretraining run.
                home = Path(argv[-1]) / "pretrain" / "tiny"
                home.mkdir(parents=True)
                (home / "record.json").write_text(json.dumps(
                    {"record_version": 1, "status": "finished"}))
            return super().__call__(argv, **kwargs)

    runner = Bucket()
    ex = GcloudTPUExecutor(**SLICE, repo_archive=tmp_path / "src.tar.gz", runner=runner,
                           dry_run=False)
    outcomes, done = collect()
    local = lambda spec: not spec.workdir.startswith("gs://")  # noqa: E731 (no network here)
    ex.run(study(tmp_path), done, skip=lambda spec: local(spec) and run_status(spec) == "finished")
    created = [argv[5] for argv in runner.calls if argv[4:5] == ["create"]]
    assert created == ["ul2-" + executors.hashlib.sha1(b"finetune/lora/tiny").hexdigest()[:8]]
    assert all(o.ok for o in outcomes)


def test_gcloud_run_whose_record_cannot_be_fetched_fails_with_the_reason(tmp_path):
    runner = FakeGcloud(lambda argv: (1, "CommandException: No URLs matched\n")
                        if argv[:3] == ["gsutil", "-q", "cat"] else None)
    ex = GcloudTPUExecutor(**SLICE, repo_archive=tmp_path / "src.tar.gz", runner=runner,
                           dry_run=False)
    outcomes, done = collect()
    ex.run(study(tmp_path), done)
    got = by_id(outcomes)
    assert not got["pretrain/tiny"].ok
    assert got["pretrain/tiny"].reason.startswith(
        "finished on the slice, but fetching its record failed: CommandException: No URLs")
    assert got["finetune/lora/tiny"].reason.startswith("dependency pretrain/tiny failed")
    assert not (tmp_path / "runs" / "pretrain" / "tiny" / "record.json").exists()


def test_gcloud_deletes_the_slice_when_the_run_fails(tmp_path):
    def fail(argv):
        if argv[4:5] == ["ssh"] and "ul2_lm.train" in argv[-1]:
            return 1, ("Traceback (most recent call last):\n"
                       "ValueError: config.train.num_steps: must be > 0\n")

    runner = FakeGcloud(fail)
    ex = GcloudTPUExecutor(**SLICE, repo_archive=tmp_path / "src.tar.gz", runner=runner,
                           dry_run=False)
    outcomes, done = collect()
    ex.run(study(tmp_path), done)
    verbs = [argv[4] if argv[0] == "gcloud" else "gsutil" for argv in runner.calls]
    # Sync records, upload code and config; one slice; no second slice.
    assert verbs == ["gsutil", "gsutil", "gsutil", "create", "ssh", "ssh", "delete"]
    got = by_id(outcomes)
    assert got["pretrain/tiny"].reason == ("ValueError: config.train.num_steps: must be > 0 "
                                           "(exit code 1)")
    assert got["finetune/lora/tiny"].reason.startswith("dependency pretrain/tiny failed: "
                                                       "ValueError")
    assert ex.undeleted == []


def test_gcloud_rejection_surfaces_in_the_reason(tmp_path):
    message = ("ERROR: (gcloud.compute.tpus.tpu-vm.create) INVALID_ARGUMENT: "
               "Invalid zone us-moon1-a")

    def fail(argv):
        if argv[4:5] == ["create"]:
            return 1, message + "\n"
        if argv[4:5] == ["delete"]:
            return 1, "ERROR: (gcloud.compute.tpus.tpu-vm.delete) NOT_FOUND: tpu not found\n"

    runner = FakeGcloud(fail)
    ex = GcloudTPUExecutor(**dict(SLICE, zone="us-moon1-a"), repo_archive=tmp_path / "a.tgz",
                           runner=runner, dry_run=False)
    outcomes, done = collect()
    ex.run(study(tmp_path)[:1], done)
    assert not outcomes[0].ok and message in outcomes[0].reason
    assert outcomes[0].reason.startswith("creating TPU slice ul2-")
    assert [argv[4] for argv in runner.calls[3:]] == ["create", "delete"]  # Delete anyway.
    assert ex.undeleted == []  # It never existed.


def test_gcloud_failed_delete_is_remembered(tmp_path):
    runner = FakeGcloud(lambda argv: (1, "ERROR: permission denied\n")
                        if argv[4:5] == ["delete"] else None)
    ex = GcloudTPUExecutor(**SLICE, repo_archive=tmp_path / "a.tgz", runner=runner,
                           dry_run=False)
    outcomes, done = collect()
    ex.run(study(tmp_path)[:1], done)
    assert outcomes[0].ok
    assert ex.undeleted == [runner.calls[-1][5]]


@pytest.mark.parametrize("field, value", [
    ("zone", "us-central2"), ("zone", "US-CENTRAL2-B"), ("accelerator_type", "v4_32"),
    ("accelerator_type", "tpu-v4-32"), ("project", "My Project"), ("name_prefix", "UL2_")])
def test_gcloud_validate_rejects_malformed_settings_before_issuing(tmp_path, field, value):
    runner = FakeGcloud()
    ex = GcloudTPUExecutor(**dict(SLICE, **{field: value}), runner=runner, dry_run=False,
                           repo_archive=tmp_path / "a.tgz")
    with pytest.raises(ValueError, match=f"{field} {value!r} is malformed"):
        ex.run(study(tmp_path), print)
    assert ex.issued == [] and runner.calls == []


def test_gcloud_validate_accepts_real_settings():
    for zone, accelerator in [("us-central2-b", "v4-32"), ("europe-west4-a", "v5litepod-16"),
                              ("northamerica-northeast1-a", "v5p-8"), ("us-east5-b", "v6e-256")]:
        GcloudTPUExecutor(**dict(SLICE, zone=zone, accelerator_type=accelerator)).validate()


def test_gcloud_local_base_outside_the_study_is_refused(tmp_path):
    ft = RunSpec("ft", "finetune", {"finetune": {"base_workdir": str(tmp_path / "elsewhere")}},
                 str(tmp_path / "ft"))
    ex = GcloudTPUExecutor(**SLICE, repo_archive=tmp_path / "a.tgz")
    with pytest.raises(ValueError, match="finetune.base_workdir .* is a local path"):
        ex.run([ft], print)
    assert ex.issued == []


def test_gcloud_interrupt_still_deletes_the_slice(tmp_path):
    runs = [spec("r0", "gs://b/r0"), spec("r1", "gs://b/r1"), spec("r2", "gs://b/r2")]
    ex = GcloudTPUExecutor(**SLICE, repo_archive=tmp_path / "a.tgz", runner=FakeGcloud(),
                           dry_run=False, runs_per_slice=2)

    def done(outcome):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ex.run(runs, done)
    verbs = [argv[4] if argv[0] == "gcloud" else "gsutil" for argv in ex.issued]
    assert verbs[-1] == "delete" and verbs.count("create") == 1  # The second slice never came.


def test_gcloud_small_runs_share_a_slice(tmp_path):
    runs = [spec(f"r{i}", f"gs://b/r{i}") for i in range(3)] + [
        spec("r3", "gs://b/r3", ["r0"])]
    ex = GcloudTPUExecutor(**SLICE, repo_archive=tmp_path / "a.tgz", runs_per_slice=3)
    outcomes, done = collect()
    ex.run(runs, done, skip=lambda s: s.run_id == "r1")
    verbs = [argv[4] if argv[0] == "gcloud" else "gsutil" for argv in ex.issued]
    # Code; then r0, r2, r3 on one slice (r1 was finished): configs, create, setup, 3 runs, delete.
    assert verbs == ["gsutil"] * 4 + ["create", "ssh", "ssh", "ssh", "ssh", "delete"]
    assert [o.run_id for o in outcomes] == ["r0", "r2", "r3"] and all(o.ok for o in outcomes)


def test_gcloud_slices_run_concurrently_up_to_max_slices(tmp_path):
    lock = executors.threading.Lock()
    live, peak = [0], [0]

    def runner(argv, **kwargs):
        if argv[4:5] in (["create"], ["delete"]):
            with lock:
                live[0] += 1 if argv[4] == "create" else -1
                peak[0] = max(peak[0], live[0])
        time.sleep(0.01)
        return subprocess.CompletedProcess(argv, 0, "", "")

    runs = [spec(f"r{i}", f"gs://b/r{i}") for i in range(6)]
    ex = GcloudTPUExecutor(**SLICE, repo_archive=tmp_path / "a.tgz", runner=runner,
                           dry_run=False, max_slices=2)
    outcomes, done = collect()
    ex.run(runs, done)
    assert sorted(o.run_id for o in outcomes) == [f"r{i}" for i in range(6)]
    assert peak[0] == 2 and live[0] == 0


def test_source_archive_holds_the_checkout(tmp_path):
    import tarfile

    with tarfile.open(executors.make_source_archive(tmp_path / "src.tar.gz")) as tar:
        names = set(tar.getnames())
    assert {"setup.py", "ul2_lm/train.py", "scaling/executors.py",
            "configs/from_json.py"} <= names
    assert not any(n.startswith((".venv/", "runs/")) for n in names)


# --- A real two-process run ------------------------------------------------------------------


def test_pod_worker_commands():
    s = spec("a", "/w/a")
    assert executors.pod_worker_commands(s, 2, "localhost:1234", python="py", repo=None) == [
        ["py", "-m", "ul2_lm.train", "--config=configs/from_json.py:/w/a/run_config.json",
         "--workdir=/w/a", "--coordinator_address=localhost:1234", "--num_processes=2",
         f"--process_id={i}"] for i in range(2)]


def test_two_processes_train_one_run_like_pod_workers(tmp_path):
    from ul2_lm import config as config_lib
    from ul2_lm import record as record_lib
    from tests.ul2_lm.test_train import small_run_config

    workdir = tmp_path / "pretrain" / "tiny"
    run = RunSpec("pretrain/tiny", "pretrain",
                  config_lib.to_dict(small_run_config(num_steps=4)), str(workdir))
    ex = LocalPodExecutor(num_processes=2, env={
        "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    outcomes, done = collect()
    ex.run([run], done)
    logs = [workdir / "train.log", workdir / "train.process1.log"]
    assert outcomes[0].ok, outcomes[0].reason + "\n" + logs[0].read_text()[-3000:]
    assert all("--num_processes=2" in log.read_text().splitlines()[0] for log in logs)
    record = record_lib.read(workdir)
    assert record["status"] == "finished" and record["steps"] == 4
