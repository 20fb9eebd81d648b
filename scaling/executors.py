"""Executors: where the runs of a study run.

A study (`scaling.study`) plans `RunSpec`s, pretraining runs first and the finetuning runs that
depend on them after, and hands them to an executor:

    executor.run(specs, done, skip)

Every executor keeps the same promises:

- `specs` come in dependency order: each id in a spec's `depends_on` names an earlier spec
  (anything else is a ValueError before any run starts).
- A run starts only after every run it depends on finished OK. When one of them failed, the run
  is not started; it is reported failed with the reason "dependency <id> failed: <its reason>".
- `done(outcome)` is called exactly once for every run that was not skipped, from the thread that
  called `run`, as the run ends.
- `skip(spec)` is asked once per spec, in order, before any run starts; true means "already
  finished": the run is neither started nor reported, and counts as OK for its dependents.
- KeyboardInterrupt (and any exception raised by `done`) propagates, after the executor has
  stopped what it started: child processes are terminated, TPU slices deleted.

The executors:

- `SequentialExecutor(runner)`: in this process, one run at a time; a run is `runner(spec)`.
- `ParallelExecutor(num_workers)`: on this machine, up to N runs at once; a run is one trainer
  process.
- `PoolExecutor(num_workers)` (scaling/pool.py): on this machine, up to N runs at once in N
  long-lived worker processes, each training one run after another in-process.
- `LocalPodExecutor(num_processes)`: on this machine, as a pod slice would run it; a run is N
  trainer processes joined by jax.distributed.
- `GcloudTPUExecutor(...)`: on Cloud TPU VMs, one slice per run (or per batch of small runs); a
  run is `gcloud compute tpus tpu-vm ssh --worker=all --command=...`.

`make_executor(name, **options)` builds one by name ('local', 'parallel', 'local_pod', 'gcloud').
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from scaling.runspec import CONFIG_LOADER, REPO, Outcome, RunSpec, join
from ul2_lm import paths  # etils only, like ul2_lm.record: this module imports no JAX
from ul2_lm.record import RECORD_NAME

log = logging.getLogger(__name__)

Done = Callable[[Outcome], None]
# True: finished already, nothing to run; an Outcome: already known (a failure of an earlier
# invocation, which fails the runs that depend on it); False: run it.
Skip = Callable[[RunSpec], "bool | Outcome"]

__all__ = [
    "Executor", "SequentialExecutor", "ParallelExecutor", "LocalPodExecutor",
    "GcloudTPUExecutor", "make_executor", "error_summary", "pod_worker_commands",
    "make_source_archive", "train_in_process", "DRY_RUN_REASON",
]


# --- Dependency bookkeeping, shared by every executor ----------------------------------------

_READY = "ready"
_WAIT = "wait"


class _Ledger:
    """What is known about each run of one `Executor.run` call: finished OK, failed, or not yet."""

    def __init__(self, specs: Sequence[RunSpec], skip: Skip | None):
        seen: set[str] = set()
        for spec in specs:
            if spec.run_id in seen:
                raise ValueError(f"run {spec.run_id!r} appears twice in the study")
            for dep in spec.depends_on:
                if dep not in seen:
                    raise ValueError(f"run {spec.run_id!r} depends on {dep!r}, which is not an "
                                     "earlier run of the study (specs must come in dependency "
                                     "order)")
            seen.add(spec.run_id)
        self._outcomes: dict[str, Outcome] = {}
        self.skipped: set[str] = set()
        if skip is not None:
            for spec in specs:
                known = skip(spec)
                if known:
                    self.skipped.add(spec.run_id)
                    self._outcomes[spec.run_id] = (known if isinstance(known, Outcome)
                                                   else Outcome(spec.run_id, ok=True))

    def verdict(self, spec: RunSpec, ignore: frozenset[str] | set[str] = frozenset()):
        """_READY, _WAIT, or the failed Outcome of a run whose dependency failed.

        Dependencies named in `ignore` are not looked at (a slice runs those itself).
        """
        waiting = False
        for dep in spec.depends_on:
            if dep in ignore:
                continue
            outcome = self._outcomes.get(dep)
            if outcome is None:
                waiting = True
            elif not outcome.ok:
                return dependency_failed(spec, dep, outcome.reason)
        return _WAIT if waiting else _READY

    def record(self, outcome: Outcome) -> None:
        self._outcomes[outcome.run_id] = outcome


def dependency_failed(spec: RunSpec, dep: str, reason: str | None) -> Outcome:
    return Outcome(spec.run_id, ok=False, reason=f"dependency {dep} failed: {reason}")


# --- Error lines -----------------------------------------------------------------------------

# A line that states an error: a Python exception ('ValueError: ...', 'jax.errors.X: ...'),
# gcloud's 'ERROR: (gcloud....) ...', absl's 'FATAL Flags parsing error: ...' or a C++ fatal
# log line ('F0102 12:00:00 ... Check failed'), optionally
# behind a '[worker 3]'-style prefix.
_ERROR_LINE = re.compile(
    r"^(?:\[[^\]]*\]\s*)?"
    r"(?:[\w.]*(?:Error|Exception|Interrupt|Exit)(?::|\s*$)|ERROR:|FATAL\b|F\d{4} )")
# Lines after the error line that are no longer part of it: absl log lines ('I0102 12:00:00')
# and the start of another traceback.
_NOT_CONTINUATION = re.compile(r"^(?:[IWEF]\d{4} |Traceback |During handling |The above )")


def error_summary(text: str, max_lines: int = 4, max_chars: int = 600) -> str:
    """The error a log ends with, on one line: the last line that states an error (and the few
    lines continuing it), else the last non-empty line; '' for an empty log."""
    lines = [line.rstrip() for line in text.splitlines()]
    lines = [line for line in lines if line.strip()]
    if not lines:
        return ""
    hits = [i for i, line in enumerate(lines) if _ERROR_LINE.match(line)]
    if not hits:
        summary = lines[-1].strip()
    else:
        picked = [lines[hits[-1]].strip()]
        for line in lines[hits[-1] + 1:hits[-1] + max_lines]:
            if _NOT_CONTINUATION.match(line):
                break
            picked.append(line.strip())
        summary = " | ".join(picked)
    return summary if len(summary) <= max_chars else summary[:max_chars - 3] + "..."


def _exit_description(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


# --- The interface ---------------------------------------------------------------------------


class Executor:
    """Runs the specs of a study, in dependency order, reporting each run's outcome."""

    def run(self, specs: Sequence[RunSpec], done: Done, skip: Skip | None = None) -> None:
        raise NotImplementedError


# --- In this process -------------------------------------------------------------------------


def train_in_process(spec: RunSpec) -> None:
    """Trains `spec` in this process (what `python -m ul2_lm.train` would do with its config)."""
    import ml_collections

    from ul2_lm import train

    train.run(ml_collections.ConfigDict(copy.deepcopy(dict(spec.config))), spec.workdir)


class SequentialExecutor(Executor):
    """One run at a time, in this process: `runner(spec)` runs it and raises if it fails.

    The run's config is written to its workdir first (run_config.json), so the run can be
    restarted by hand with `spec.command()`. An exception becomes a failed Outcome with reason
    "<ExceptionType>: <message>" (its traceback goes to the log); KeyboardInterrupt propagates.
    """

    def __init__(self, runner: Callable[[RunSpec], None] = train_in_process):
        self.runner = runner

    def run(self, specs: Sequence[RunSpec], done: Done, skip: Skip | None = None) -> None:
        ledger = _Ledger(specs, skip)
        for spec in specs:
            if spec.run_id in ledger.skipped:
                continue
            verdict = ledger.verdict(spec)
            if verdict is _READY:
                outcome = self._run_one(spec)
            else:  # Dependencies come earlier, so none is still waiting: one failed.
                outcome = verdict
            ledger.record(outcome)
            done(outcome)

    def _run_one(self, spec: RunSpec) -> Outcome:
        start = time.monotonic()
        try:
            spec.write_config()
            self.runner(spec)
        except Exception as e:  # KeyboardInterrupt and SystemExit are not Exceptions.
            log.warning("run %s failed", spec.run_id, exc_info=True)
            return Outcome(spec.run_id, ok=False, reason=f"{type(e).__name__}: {e}",
                           seconds=time.monotonic() - start)
        return Outcome(spec.run_id, ok=True, seconds=time.monotonic() - start)


# --- Local processes -------------------------------------------------------------------------


@dataclasses.dataclass
class _Process:
    """What to start for (one process of) a run."""

    argv: list[str]
    log: Path
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Job:
    """A started run: its processes, their logs and where this attempt's output begins."""

    spec: RunSpec
    slot: int
    start: float
    procs: list[subprocess.Popen] = dataclasses.field(default_factory=list)
    logs: list[Path] = dataclasses.field(default_factory=list)
    offsets: list[int] = dataclasses.field(default_factory=list)
    files: list[IO[bytes]] = dataclasses.field(default_factory=list)


class ParallelExecutor(Executor):
    """Up to `num_workers` runs at once on this machine, each one trainer subprocess.

    A run's config is written to its workdir (run_config.json) and the run is started as
    `spec.command(python)` (python -m ul2_lm.train --config=configs/from_json.py:... --workdir=...)
    from the caller's working directory with this checkout on PYTHONPATH. Its stdout and stderr
    are appended to `<workdir>/train.log` (`log_name`), behind a header line naming the command.

    The environment is this process's, updated by `env` (e.g. {"JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}) and by `slot_env(slot)`, where slot
    is the worker slot 0..num_workers-1 the run occupies (e.g. lambda i: {"CUDA_VISIBLE_DEVICES":
    str(i)} gives each concurrent run its own GPU).

    A failed run's reason is the error its log ends with and its exit status, e.g.
    "ValueError: bad learning rate (exit code 1)". On KeyboardInterrupt, or any exception from
    `done`, every running child (and its process group) is terminated before the exception
    propagates.
    """

    poll_seconds = 0.05
    terminate_grace_seconds = 5.0

    def __init__(self, num_workers: int, python: str = sys.executable,
                 env: Mapping[str, str] | None = None, log_name: str = "train.log",
                 slot_env: Callable[[int], Mapping[str, str]] | None = None):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.python = python
        self.env = dict(env or {})
        self.log_name = log_name
        self.slot_env = slot_env

    # What a run is. Subclasses change these two.

    def command(self, spec: RunSpec) -> list[str]:
        """The argv of the run's (single) process."""
        return spec.command(python=self.python, repo=REPO)

    def processes(self, spec: RunSpec) -> list[_Process]:
        return [_Process(self.command(spec), Path(spec.workdir) / self.log_name)]

    # Scheduling.

    def run(self, specs: Sequence[RunSpec], done: Done, skip: Skip | None = None) -> None:
        ledger = _Ledger(specs, skip)
        pending = [spec for spec in specs if spec.run_id not in ledger.skipped]
        running: list[_Job] = []
        free_slots = list(range(self.num_workers))
        try:
            while pending or running:
                for spec in list(pending):
                    verdict = ledger.verdict(spec)
                    if verdict is _WAIT or (verdict is _READY and not free_slots):
                        continue
                    pending.remove(spec)
                    if verdict is _READY:
                        slot = free_slots.pop(0)
                        job = self._launch(spec, slot)
                        if isinstance(job, Outcome):
                            free_slots.insert(0, slot)
                            verdict = job
                        else:
                            running.append(job)
                            continue
                    ledger.record(verdict)
                    done(verdict)
                finished = False
                for job in list(running):
                    outcome = self._poll(job)
                    if outcome is None:
                        continue
                    finished = True
                    running.remove(job)
                    free_slots.append(job.slot)
                    free_slots.sort()
                    ledger.record(outcome)
                    done(outcome)
                if running and not finished:
                    time.sleep(self.poll_seconds)
        finally:
            # Normally empty; after an exception, the children must not outlive the study.
            for job in running:
                self._terminate(job)
                self._close(job)

    def _environment(self, slot: int, extra: Mapping[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        if self.slot_env is not None:
            env.update(self.slot_env(slot))
        env.update(extra)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(REPO) if not path else os.pathsep.join([str(REPO), path])
        return env

    def _launch(self, spec: RunSpec, slot: int) -> _Job | Outcome:
        job = _Job(spec, slot, time.monotonic())
        try:
            spec.write_config()
            for process in self.processes(spec):
                process.log.parent.mkdir(parents=True, exist_ok=True)
                f = open(process.log, "ab")
                job.files.append(f)
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                f.write(f"# {stamp} {shlex.join(process.argv)}\n".encode())
                f.flush()
                job.logs.append(process.log)
                job.offsets.append(f.tell())
                job.procs.append(subprocess.Popen(
                    process.argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                    env=self._environment(slot, process.env), start_new_session=True))
        except Exception as e:
            self._terminate(job)
            self._close(job)
            return Outcome(spec.run_id, ok=False, seconds=time.monotonic() - job.start,
                           reason=f"could not start: {type(e).__name__}: {e}")
        return job

    def _poll(self, job: _Job) -> Outcome | None:
        codes = [p.poll() for p in job.procs]
        failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
        if not failed and None in codes:
            return None
        if failed:
            # The others would wait for the failed one forever (collectives): stop them.
            self._terminate(job)
        self._close(job)
        seconds = time.monotonic() - job.start
        if not failed:
            return Outcome(job.spec.run_id, ok=True, seconds=seconds)
        i = failed[0]
        return Outcome(job.spec.run_id, ok=False, reason=self._failure_reason(job, i, codes[i]),
                       seconds=seconds)

    def _failure_reason(self, job: _Job, i: int, returncode: int) -> str:
        with open(job.logs[i], "rb") as f:
            f.seek(job.offsets[i])
            text = f.read().decode(errors="replace")
        summary = error_summary(text) or f"no output (log {job.logs[i]})"
        who = f"process {i}: " if len(job.procs) > 1 else ""
        return f"{who}{summary} ({_exit_description(returncode)})"

    def _terminate(self, job: _Job) -> None:
        """SIGTERM to each live child's process group, SIGKILL after a grace period."""
        live = [p for p in job.procs if p.poll() is None]
        for p in live:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + self.terminate_grace_seconds
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()

    @staticmethod
    def _close(job: _Job) -> None:
        for f in job.files:
            f.close()
        job.files.clear()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the child leads its own group.
    except (ProcessLookupError, PermissionError):
        pass


# --- A pod slice on this machine -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def pod_worker_commands(spec: RunSpec, num_processes: int, coordinator_address: str,
                        python: str = sys.executable, repo: str | os.PathLike | None = REPO
                        ) -> list[list[str]]:
    """The argv of each process of a multi-process run: the run's own command plus the flags
    that `ul2_lm.train.initialize_distributed` reads. On a TPU pod the same `spec.command()` runs
    on every worker and JAX finds its peers by itself; elsewhere these flags say who is who."""
    base = spec.command(python=python, repo=repo)
    return [base + [f"--coordinator_address={coordinator_address}",
                    f"--num_processes={num_processes}", f"--process_id={i}"]
            for i in range(num_processes)]


class LocalPodExecutor(ParallelExecutor):
    """Each run as one job of `num_processes` processes on this machine, joined by
    jax.distributed (gloo collectives on CPU): a pod slice in miniature, for tests and for
    checking a multi-host config before paying for a slice.

    Process i logs to `<workdir>/train.log` (i = 0) or `<workdir>/train.process<i>.log`. The run
    succeeds when every process exits 0; when one fails, the others are terminated. Give each
    process its devices through `env`, e.g. {"JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}. `num_workers` runs at once.
    """

    def __init__(self, num_processes: int = 2, num_workers: int = 1, **kwargs: Any):
        super().__init__(num_workers, **kwargs)
        if num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {num_processes}")
        self.num_processes = num_processes

    def processes(self, spec: RunSpec) -> list[_Process]:
        argvs = pod_worker_commands(spec, self.num_processes, f"localhost:{free_port()}",
                                    python=self.python)
        stem, suffix = os.path.splitext(self.log_name)
        return [_Process(argv, Path(spec.workdir) /
                         (self.log_name if i == 0 else f"{stem}.process{i}{suffix}"))
                for i, argv in enumerate(argvs)]


# --- Cloud TPU VMs ---------------------------------------------------------------------------

_ZONE = re.compile(r"^[a-z]+(?:-[a-z]+)*\d+-[a-z]$")               # us-central2-b
_ACCELERATOR = re.compile(r"^v\d+[a-z]*-[1-9]\d*$")                 # v4-32, v5litepod-16, v5p-8
_PROJECT = re.compile(r"^(?:[a-z0-9][a-z0-9.-]*:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_RUNTIME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")                     # tpu-ubuntu2204-base
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9](?:/[^\s]*)?$")
_NAME_PREFIX = re.compile(r"^[a-z](?:[a-z0-9-]{0,38}[a-z0-9])?$")


@dataclasses.dataclass
class _Result:
    returncode: int
    stdout: str = ""
    stderr: str = ""

    def reason(self) -> str:
        text = error_summary(self.stderr) or error_summary(self.stdout) or "no output"
        return f"{text} ({_exit_description(self.returncode)})"


_SLICE_DONE = object()
# The reason of a dry run's (successful) outcomes, so that a study can tell them from real ones.
DRY_RUN_REASON = "dry run: nothing ran"


class GcloudTPUExecutor(Executor):
    """Runs on Cloud TPU VM slices through the gcloud CLI: one slice per run, or one per batch of
    `runs_per_slice` consecutive runs that then run one after another on it.

    What it issues (printed as it goes, and kept in `.issued`):

    1. Once per study, the source code to the bucket:
         gsutil cp ARCHIVE gs://BUCKET/code/ARCHIVE_NAME
       ARCHIVE is `repo_archive`, or a tarball of this checkout's tracked and unignored files
       (`make_source_archive`). Workers fetch it from the bucket (in parallel, inside Google's
       network) instead of the laptop pushing it to every worker with scp.
    2. Per run, before its slice exists, its config next to its outputs:
         gsutil cp - WORKDIR/run_config.json     (the config JSON on stdin)
    3. Per slice:
         gcloud compute tpus tpu-vm create NAME --zone=Z --accelerator-type=T --version=V
           --project=P
         gcloud compute tpus tpu-vm ssh NAME --zone=Z --project=P --worker=all --command=SETUP
           (SETUP: fetch and unpack the code into ~/ul2_lm, pip install -e '.[tpu,data,eval]')
         gcloud compute tpus tpu-vm ssh NAME --zone=Z --project=P --worker=all --command=RUN
           (per run; RUN: fetch its run_config.json, then
            python3 -m ul2_lm.train --config=configs/from_json.py:... --workdir=gs://...)
         gcloud compute tpus tpu-vm delete NAME --zone=Z --project=P --quiet
       The delete is issued whatever happened before it (a failed create included: a create can
       fail after the slice was allocated). Multi-host JAX starts by itself on every worker
       (ul2_lm.train sees TPU_WORKER_HOSTNAMES).

    Workdirs: a spec's gs:// workdir is used as it is; a local one becomes
    gs://BUCKET/runs/<run_id>, and a finetuning config's finetune.base_workdir that names a run of
    the study is rewritten to that run's bucket workdir (a local base outside the study is an
    error). NAME is `name_prefix` plus a hash of the slice's run ids.

    Records: the study decides what to skip, and fits, from the records in the local workdirs.
    So after each run its record comes back (`gsutil -q cat WORKDIR/record.json`, written into
    the local workdir; a run whose record cannot be fetched counts as failed, with the reason),
    and `run` starts by copying every record already in the bucket into the local workdirs
    (`gsutil -m rsync` of record.json files only): a study stopped mid-way resumes where its
    runs got to, not where the laptop last heard of them.

    dry_run=True (the default) issues nothing: every command counts as succeeded, and each run's
    Outcome is ok with reason DRY_RUN_REASON (not to be recorded as finished). Otherwise each
    command goes through `runner(argv, input=..., capture_output=True, text=True)` (subprocess.run,
    injectable) and a nonzero exit fails the runs it concerns, with gcloud's (or the trainer's)
    own error text in the reason. A delete that fails leaves the slice name in `.undeleted` and a
    warning in the log. Up to `max_slices` slices exist at once (1 in a dry run, so `.issued`
    has a fixed order).
    """

    def __init__(self, project: str, zone: str, accelerator_type: str, runtime_version: str,
                 bucket: str, name_prefix: str, dry_run: bool = True,
                 runner: Callable[..., Any] = subprocess.run,
                 repo_archive: str | os.PathLike | None = None, *, runs_per_slice: int = 1,
                 max_slices: int = 1, remote_python: str = "python3",
                 pip_extras: str = "tpu,data,eval", out: IO[str] | None = None):
        self.project = project
        self.zone = zone
        self.accelerator_type = accelerator_type
        self.runtime_version = runtime_version
        self.bucket = bucket
        self.name_prefix = name_prefix
        self.dry_run = dry_run
        self.runner = runner
        self.repo_archive = repo_archive
        self.runs_per_slice = runs_per_slice
        self.max_slices = max_slices
        self.remote_python = remote_python
        self.pip_extras = pip_extras
        self.out = out
        self.issued: list[list[str]] = []
        self.undeleted: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._remote_workdirs: dict[str, str] = {}

    # Checks.

    def validate(self) -> None:
        """Raises ValueError naming the first malformed setting (syntax only: gcloud judges
        whether the zone exists and offers the accelerator)."""
        checks = [("zone", self.zone, _ZONE, "like 'us-central2-b'"),
                  ("accelerator_type", self.accelerator_type, _ACCELERATOR,
                   "like 'v4-32' or 'v5litepod-16'"),
                  ("project", self.project, _PROJECT, "a project id like 'my-project-123'"),
                  ("runtime_version", self.runtime_version, _RUNTIME,
                   "like 'tpu-ubuntu2204-base'"),
                  ("bucket", self.bucket.removeprefix("gs://").rstrip("/"), _BUCKET,
                   "a bucket name like 'my-bucket' or 'gs://my-bucket/prefix'"),
                  ("name_prefix", self.name_prefix, _NAME_PREFIX,
                   "lowercase letters, digits and '-', starting with a letter, at most 40")]
        for what, value, pattern, expected in checks:
            if not isinstance(value, str) or not pattern.match(value):
                raise ValueError(f"GcloudTPUExecutor: {what} {value!r} is malformed; "
                                 f"expected {expected}")
        if self.runs_per_slice < 1 or self.max_slices < 1:
            raise ValueError("GcloudTPUExecutor: runs_per_slice and max_slices must be >= 1")

    # Names and places.

    @property
    def bucket_url(self) -> str:
        return "gs://" + self.bucket.removeprefix("gs://").rstrip("/")

    def code_url(self, archive: str | os.PathLike) -> str:
        return f"{self.bucket_url}/code/{Path(archive).name}"

    def slice_name(self, batch: Sequence[RunSpec]) -> str:
        digest = hashlib.sha1("\n".join(s.run_id for s in batch).encode()).hexdigest()[:8]
        return f"{self.name_prefix}-{digest}"

    def remote_workdir(self, spec: RunSpec) -> str:
        if spec.workdir.startswith("gs://"):
            return spec.workdir
        return f"{self.bucket_url}/runs/{spec.run_id}"

    def fetch_record_command(self, remote: RunSpec) -> list[str]:
        return ["gsutil", "-q", "cat", join(remote.workdir, RECORD_NAME)]

    def sync_records_command(self, local_root: str) -> list[str]:
        """Every record.json under the bucket's runs/ into the local runs directory."""
        return ["gsutil", "-m", "-q", "rsync", "-r", "-x", r"^(?!(.*/)?record\.json$).*",
                f"{self.bucket_url}/runs", local_root]

    def _sync_records(self, specs: Sequence[RunSpec]) -> None:
        """Brings the bucket's records of `specs` (local workdirs runs/<run_id>) home."""
        roots = {s.workdir[:-len(s.run_id)].rstrip("/") for s in specs
                 if not s.workdir.startswith("gs://") and s.workdir.endswith("/" + s.run_id)}
        for root in sorted(roots):
            result = self._issue(self.sync_records_command(root))
            if result.returncode:  # Nothing in the bucket yet, or no access: runs will tell.
                log.warning("could not fetch earlier records from %s/runs (%s); runs without "
                            "a local record run again", self.bucket_url, result.reason())

    def _fetch_record(self, remote: RunSpec) -> str | None:
        """Writes `remote`'s record into its local workdir; returns why it could not, or None."""
        local = self._local_workdirs.get(remote.run_id)
        if local is None or self.dry_run:
            return None
        result = self._issue(self.fetch_record_command(remote))
        if result.returncode:
            return (f"finished on the slice, but fetching its record failed: {result.reason()}; "
                    "running the study again fetches it")
        paths.write_text_atomic(join(local, RECORD_NAME), result.stdout)
        return None

    def remote_spec(self, spec: RunSpec) -> RunSpec:
        """The spec as the workers see it: bucket workdir, base workdir rewritten."""
        config = copy.deepcopy(dict(spec.config))
        finetune = config.get("finetune")
        if isinstance(finetune, Mapping) and finetune.get("base_workdir"):
            base = str(finetune["base_workdir"])
            if not base.startswith("gs://"):
                key = _local_key(base)
                if key not in self._remote_workdirs:
                    raise ValueError(
                        f"run {spec.run_id!r}: finetune.base_workdir {base!r} is a local path "
                        "that no run of this study writes; TPU workers cannot read it (put the "
                        "base on gs://)")
                config["finetune"] = dict(finetune, base_workdir=self._remote_workdirs[key])
        return dataclasses.replace(spec, workdir=self.remote_workdir(spec), config=config)

    # The commands.

    def _gcloud_tpu(self, verb: str, name: str, *flags: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, name, f"--zone={self.zone}", *flags]

    def create_command(self, name: str) -> list[str]:
        return self._gcloud_tpu("create", name, f"--accelerator-type={self.accelerator_type}",
                                f"--version={self.runtime_version}", f"--project={self.project}")

    def delete_command(self, name: str) -> list[str]:
        return self._gcloud_tpu("delete", name, f"--project={self.project}", "--quiet")

    def ssh_command(self, name: str, script: str) -> list[str]:
        return self._gcloud_tpu("ssh", name, f"--project={self.project}", "--worker=all",
                                f"--command={script}")

    def upload_code_command(self, archive: str | os.PathLike) -> list[str]:
        return ["gsutil", "cp", str(archive), self.code_url(archive)]

    def upload_config_command(self, remote: RunSpec) -> list[str]:
        return ["gsutil", "cp", "-", remote.config_path]

    def setup_script(self, archive: str | os.PathLike) -> str:
        """Shell run on every worker of a new slice: this study's code, installed."""
        tarball = "/tmp/ul2_lm-src.tar.gz"
        return " && ".join([
            "set -e", "rm -rf ~/ul2_lm", "mkdir -p ~/ul2_lm", "cd ~/ul2_lm",
            shlex.join(["gsutil", "-q", "cp", self.code_url(archive), tarball]),
            shlex.join(["tar", "-xzf", tarball]),
            shlex.join([self.remote_python, "-m", "pip", "install", "-q", "-c", "constraints.txt",
                        "-e", f".[{self.pip_extras}]" if self.pip_extras else "."]),
        ])

    def run_script(self, remote: RunSpec) -> str:
        """Shell run on every worker for one run: fetch its config, train."""
        local_config = f"/tmp/ul2_lm_runs/{remote.run_id}/run_config.json"
        train = [self.remote_python, "-m", "ul2_lm.train",
                 f"--config={CONFIG_LOADER}:{local_config}", f"--workdir={remote.workdir}"]
        return " && ".join([
            "cd ~/ul2_lm",
            shlex.join(["mkdir", "-p", os.path.dirname(local_config)]),
            shlex.join(["gsutil", "-q", "cp", remote.config_path, local_config]),
            shlex.join(train),
        ])

    # Issuing.

    def _issue(self, argv: list[str], input: str | None = None, note: str = "") -> _Result:
        with self._lock:
            self.issued.append(list(argv))
            print("+ " + shlex.join(argv) + (f"  < {note}" if note else ""),
                  file=self.out or sys.stdout, flush=True)
        if self.dry_run:
            return _Result(0)
        try:
            result = self.runner(argv, input=input, capture_output=True, text=True)
        except Exception as e:  # gcloud missing, and the like.
            return _Result(127, stderr=f"{type(e).__name__}: {e}")
        return _Result(result.returncode, result.stdout or "", result.stderr or "")

    def _upload_code(self) -> tuple[str | os.PathLike, _Result]:
        """(the archive, the upload's result): `repo_archive`, or a tarball of the checkout made
        for the upload and deleted after it (only its name is used later)."""
        if self.repo_archive is not None:
            return self.repo_archive, self._issue(self.upload_code_command(self.repo_archive))
        with tempfile.TemporaryDirectory(prefix="ul2_lm_src_") as tmp:
            archive = make_source_archive(Path(tmp) / "ul2_lm-src.tar.gz")
            return archive, self._issue(self.upload_code_command(archive))

    # Scheduling.

    def run(self, specs: Sequence[RunSpec], done: Done, skip: Skip | None = None) -> None:
        self.validate()
        self._stop.clear()
        self._remote_workdirs = {_local_key(s.workdir): self.remote_workdir(s)
                                 for s in specs if not s.workdir.startswith("gs://")}
        self._local_workdirs = {s.run_id: s.workdir for s in specs
                                if not s.workdir.startswith("gs://")}
        # Malformed specs and bad bases fail here, before anything is issued.
        _Ledger(specs, None)
        remote = {s.run_id: self.remote_spec(s) for s in specs}
        self._sync_records(specs)
        ledger = _Ledger(specs, skip)
        todo = [s for s in specs if s.run_id not in ledger.skipped]
        if not todo:
            return
        archive, upload = self._upload_code()
        if upload.returncode:
            reason = f"uploading the code failed: {upload.reason()}"
            for spec in todo:
                verdict = ledger.verdict(spec)
                outcome = verdict if isinstance(verdict, Outcome) else Outcome(
                    spec.run_id, ok=False, reason=reason)
                ledger.record(outcome)
                done(outcome)
            return

        batches = [todo[i:i + self.runs_per_slice]
                   for i in range(0, len(todo), self.runs_per_slice)]
        slots = 1 if self.dry_run else self.max_slices
        reports: queue.Queue = queue.Queue()
        active: dict[int, str] = {}  # batch index -> slice name
        pending = list(enumerate(batches))
        try:
            while pending or active:
                for index, batch in list(pending):
                    ids = {s.run_id for s in batch}
                    verdicts = [ledger.verdict(s, ignore=ids) for s in batch]
                    if _WAIT in verdicts or len(active) >= slots:
                        continue
                    pending.remove((index, batch))
                    doomed = {}
                    for spec, verdict in zip(batch, verdicts):
                        if isinstance(verdict, Outcome):
                            doomed[spec.run_id] = verdict.reason
                            ledger.record(verdict)
                            done(verdict)
                    runnable = [remote[s.run_id] for s in batch if s.run_id not in doomed]
                    if runnable:
                        name = self.slice_name(batch)
                        active[index] = name
                        threading.Thread(
                            target=self._slice_worker, daemon=True, name=name,
                            args=(index, name, runnable, doomed, archive, reports)).start()
                if not active:
                    continue  # Whatever was left had failed dependencies.
                item = reports.get()
                if isinstance(item, tuple) and item[0] is _SLICE_DONE:
                    del active[item[1]]
                else:
                    ledger.record(item)
                    done(item)
        except BaseException:
            self._stop.set()
            if active:
                names = ", ".join(active.values())
                print(f"stopping: waiting for slice(s) {names} to be deleted; if interrupted "
                      f"again, delete them by hand", file=self.out or sys.stderr, flush=True)
                while active:
                    item = reports.get()
                    if isinstance(item, tuple) and item[0] is _SLICE_DONE:
                        del active[item[1]]
            raise

    def _slice_worker(self, index: int, name: str, batch: list[RunSpec],
                      failed: dict[str, str | None], archive, reports: queue.Queue) -> None:
        """One slice's life: configs up, create, set up, each run in turn, delete. Puts each
        run's Outcome in `reports`, then (_SLICE_DONE, index)."""
        failed = dict(failed)  # run id -> reason, for this batch's own dependencies.
        reported: set[str] = set()

        def report(outcome: Outcome) -> None:
            reported.add(outcome.run_id)
            if not outcome.ok:
                failed[outcome.run_id] = outcome.reason
            reports.put(outcome)

        remaining = list(batch)
        try:
            for spec in list(remaining):
                result = self._issue(self.upload_config_command(spec), input=spec.config_json(),
                                     note=f"run_config.json of {spec.run_id}")
                if result.returncode:
                    remaining.remove(spec)
                    report(Outcome(spec.run_id, ok=False,
                                   reason=f"uploading its config failed: {result.reason()}"))
            if not remaining or self._stop.is_set():
                return
            created = self._issue(self.create_command(name))
            try:
                if created.returncode:
                    reason = f"creating TPU slice {name} failed: {created.reason()}"
                    for spec in remaining:
                        report(Outcome(spec.run_id, ok=False, reason=reason))
                    return
                setup = self._issue(self.ssh_command(name, self.setup_script(archive)))
                if setup.returncode:
                    reason = f"setting up TPU slice {name} failed: {setup.reason()}"
                    for spec in remaining:
                        report(Outcome(spec.run_id, ok=False, reason=reason))
                    return
                for spec in remaining:
                    if self._stop.is_set():
                        return
                    dep = next((d for d in spec.depends_on if d in failed), None)
                    if dep is not None:
                        report(dependency_failed(spec, dep, failed[dep]))
                        continue
                    start = time.monotonic()
                    result = self._issue(self.ssh_command(name, self.run_script(spec)))
                    seconds = time.monotonic() - start
                    reason = (result.reason() if result.returncode
                              else DRY_RUN_REASON if self.dry_run else self._fetch_record(spec))
                    report(Outcome(spec.run_id, ok=reason in (None, DRY_RUN_REASON),
                                   seconds=seconds, reason=reason))
            finally:
                deleted = self._issue(self.delete_command(name))
                if deleted.returncode:
                    gone = created.returncode and re.search(r"NOT_FOUND|not found",
                                                            deleted.stderr)
                    if not gone:
                        with self._lock:
                            self.undeleted.append(name)
                        log.warning("TPU slice %s may still exist (delete failed: %s); delete "
                                    "it by hand: %s", name, deleted.reason(),
                                    shlex.join(self.delete_command(name)))
        except Exception as e:  # A bug here must not leave the study waiting forever.
            for spec in batch:
                if spec.run_id not in reported:
                    reports.put(Outcome(spec.run_id, ok=False,
                                        reason=f"executor error: {type(e).__name__}: {e}"))
        finally:
            reports.put((_SLICE_DONE, index))


def _local_key(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def make_source_archive(dest: str | os.PathLike, repo: str | os.PathLike = REPO) -> Path:
    """A .tar.gz of the checkout's tracked and unignored files (what `git status` would commit,
    uncommitted edits included; no runs/, no .venv)."""
    files = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], check=True, capture_output=True,
                           text=True).stdout.split("\0")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        for name in sorted(set(filter(None, files))):
            if (Path(repo) / name).is_file():
                tar.add(Path(repo) / name, arcname=name)
    return dest


# --- By name ---------------------------------------------------------------------------------

EXECUTORS: dict[str, Callable[..., Executor]] = {
    "local": SequentialExecutor,
    "parallel": ParallelExecutor,
    "local_pod": LocalPodExecutor,
    "gcloud": GcloudTPUExecutor,
}


def make_executor(name: str, **options: Any) -> Executor:
    """The executor called `name` ('local', 'parallel', 'local_pod', 'gcloud'), built with
    `options` (its constructor's keyword arguments)."""
    try:
        factory = EXECUTORS[name]
    except KeyError:
        raise ValueError(f"unknown executor {name!r}; known: {', '.join(EXECUTORS)}") from None
    return factory(**options)
