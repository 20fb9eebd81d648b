"""PoolExecutor: runs in long-lived workers, the worker limit and dependencies, each run's output
in its log, failures (an exception, a dying worker) with their reasons, and Ctrl-C."""

import os
import time

import pytest

from scaling.pool import PoolExecutor
from scaling.runspec import RunSpec


def fake_runner(spec: RunSpec) -> None:
    """A stand-in for the trainer, run inside a worker: notes its start and end with the
    worker's pid, prints, sleeps, and fails as its config says."""
    config = spec.config

    def note(what):
        with open(config["events"], "a") as f:
            f.write(f"{what} {config['name']} {os.getpid()}\n")

    note("start")
    with open(config["pid_file"], "w") as f:
        f.write(str(os.getpid()))
    print("training", config["name"], flush=True)
    time.sleep(config.get("sleep", 0))
    if "error" in config:
        raise ValueError(config["error"])
    if "crash" in config:
        print("Fatal: the worker dies here", flush=True)
        os._exit(config["crash"])
    note("end")


def specs_of(tmp_path, runs):
    events = tmp_path / "events.txt"
    return [RunSpec(run_id=name, kind="pretrain", workdir=str(tmp_path / name),
                    depends_on=tuple(deps),
                    config=dict(name=name, events=str(events),
                                pid_file=str(tmp_path / f"{name}.pid"), **extra))
            for name, deps, extra in runs], events


def run(tmp_path, runs, workers=2):
    specs, events = specs_of(tmp_path, runs)
    outcomes = []
    PoolExecutor(workers, runner=fake_runner).run(specs, outcomes.append)
    return {o.run_id: o for o in outcomes}, events.read_text().splitlines()


def test_runs_share_workers_within_the_limit_and_wait_for_their_dependencies(tmp_path):
    got, events = run(tmp_path, [
        ("a", (), {"sleep": 0.5}), ("b", (), {"sleep": 0.2}), ("c", (), {"sleep": 0.2}),
        ("d", ("a",), {}), ("e", (), {})])
    assert sorted(got) == ["a", "b", "c", "d", "e"] and all(o.ok for o in got.values()), got
    running = peak = 0
    for line in events:
        running += 1 if line.startswith("start") else -1
        peak = max(peak, running)
    assert peak == 2
    assert len({line.split()[2] for line in events}) == 2  # five runs, two processes
    order = [line.split()[:2] for line in events]
    assert order.index(["start", "d"]) > order.index(["end", "a"])
    log = (tmp_path / "a" / "train.log").read_text()
    assert log.startswith("# ") and "training a" in log
    assert (tmp_path / "a" / "run_config.json").exists()


def test_a_failing_run_is_reported_and_its_worker_goes_on(tmp_path):
    got, events = run(tmp_path, [
        ("bad", (), {"error": "learning rate must be positive"}), ("child", ("bad",), {}),
        ("after", (), {})], workers=1)
    assert got["bad"].reason == "ValueError: learning rate must be positive"
    assert got["child"].reason == ("dependency bad failed: ValueError: learning rate must be "
                                   "positive")
    assert not (tmp_path / "child").exists()
    assert got["after"].ok
    assert "Traceback" in (tmp_path / "bad" / "train.log").read_text()
    assert len({line.split()[2] for line in events}) == 1  # the same worker ran both


def test_a_dying_worker_fails_its_run_and_is_replaced(tmp_path):
    got, events = run(tmp_path, [("crash", (), {"crash": 3}), ("next", (), {})], workers=1)
    assert got["crash"].reason == "worker process died: Fatal: the worker dies here (exit code 3)"
    assert got["next"].ok
    assert len({line.split()[2] for line in events}) == 2


def test_interrupt_terminates_the_workers(tmp_path):
    specs, _ = specs_of(tmp_path, [("fast", (), {}), ("slow", (), {"sleep": 60})])

    def done(outcome):
        deadline = time.monotonic() + 30
        while not (tmp_path / "slow.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        PoolExecutor(2, runner=fake_runner).run(specs, done)
    assert time.monotonic() - start < 40
    pid = int((tmp_path / "slow.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_worker_killed_between_runs_is_replaced_before_the_next_run(tmp_path):
    specs, events = specs_of(tmp_path, [("a", (), {}), ("b", ("a",), {})])
    outcomes = []

    def done(outcome):
        outcomes.append(outcome)
        if outcome.run_id == "a":  # the idle worker dies (the OOM killer, a user's kill -9)
            os.kill(int((tmp_path / "a.pid").read_text()), 9)
            time.sleep(0.5)

    PoolExecutor(1, runner=fake_runner).run(specs, done)
    assert [o.ok for o in outcomes] == [True, True], outcomes
    pids = [line.split()[2] for line in events.read_text().splitlines()]
    assert pids[0] != pids[-1]  # b ran in a new worker
