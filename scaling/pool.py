"""PoolExecutor: a study's runs on this machine, N at a time, in N long-lived worker processes.

A worker is started once and trains one run after another in-process, so the price of starting
a trainer (importing JAX, Flax and TensorFlow, loading compiled programs) is paid once per worker,
not once per run: what makes a grid of small runs (a CPU study) fast. ParallelExecutor, which
starts one trainer process per run, isolates runs better and suits long ones.

The promises of every executor hold (scaling/executors.py). Besides:

- A run's output (its logging, and anything written to stdout or stderr, XLA's included) goes to
  `<workdir>/train.log`, behind a header line, as with ParallelExecutor; the console keeps the
  study's progress lines.
- A run that raises fails with "<ExceptionType>: <message>" (its traceback is in its log); the
  worker goes on with the next run. A worker that dies (a crash, the OOM killer) fails the run it
  held, with the end of its log and the exit status, and is replaced; one found dead while idle
  is replaced before it is given a run.
- Ctrl-C (or an exception from `done`) terminates every worker before it propagates; workers
  ignore SIGINT themselves, so that the terminal's Ctrl-C reaches them through the study only.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path

from scaling.executors import (_READY, _WAIT, Done, Executor, Skip, _exit_description, _Ledger,
                               error_summary, train_in_process)
from scaling.runspec import Outcome, RunSpec


def _redirect_output(path: Path) -> tuple[int, int]:
    """Points this process's stdout and stderr (the file descriptors, so that C++ logging
    follows) at `path`, appending; returns the saved descriptors."""
    sys.stdout.flush()
    sys.stderr.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return saved


def _restore_output(saved: tuple[int, int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    os.close(saved[0])
    os.close(saved[1])


def _worker(conn: Connection, runner: Callable[[RunSpec], None], log_name: str) -> None:
    """A worker's life: receive a spec, run it with its output in its log, answer None (it
    finished) or the failure's reason; stop on None or when the study closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            spec = conn.recv()
        except EOFError:
            return
        if spec is None:
            return
        logfile = Path(spec.workdir) / log_name
        saved = _redirect_output(logfile)
        reason = None
        try:
            print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {spec.run_id} (study worker "
                  f"{os.getpid()})", flush=True)
            runner(spec)
        except Exception as e:  # KeyboardInterrupt and SystemExit end the worker.
            traceback.print_exc()
            reason = f"{type(e).__name__}: {e}"
        finally:
            _restore_output(saved)
        conn.send(reason)


@dataclasses.dataclass
class _Slot:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    job: tuple[RunSpec, float] | None = None  # the run it holds, and when it started


class PoolExecutor(Executor):
    """Up to `num_workers` runs at once, each worker a long-lived process running
    `runner(spec)` (default: the trainer, in-process) for one run after another."""

    terminate_grace_seconds = 5.0

    def __init__(self, num_workers: int, runner: Callable[[RunSpec], None] = train_in_process,
                 log_name: str = "train.log"):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.runner = runner
        self.log_name = log_name
        self._context = multiprocessing.get_context("spawn")  # no JAX state forked

    def _start(self) -> _Slot:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_worker, args=(child, self.runner, self.log_name),
                                        daemon=True)
        process.start()
        child.close()
        return _Slot(process, parent)

    def run(self, specs: Sequence[RunSpec], done: Done, skip: Skip | None = None) -> None:
        ledger = _Ledger(specs, skip)
        pending = [spec for spec in specs if spec.run_id not in ledger.skipped]
        slots: list[_Slot] = []
        try:
            while pending or any(s.job for s in slots):
                self._dispatch(pending, slots, ledger, done)
                busy = [s for s in slots if s.job]
                if not busy:
                    continue
                ready = wait([s.conn for s in busy] + [s.process.sentinel for s in busy])
                for slot in busy:
                    outcome = self._collect(slot, ready)
                    if outcome is not None:
                        ledger.record(outcome)
                        done(outcome)
        finally:
            self._stop(slots)

    def _dispatch(self, pending: list[RunSpec], slots: list[_Slot], ledger: _Ledger,
                  done: Done) -> None:
        """Starts every ready run there is a worker for; reports runs whose dependency failed."""
        for spec in list(pending):
            verdict = ledger.verdict(spec)
            idle = [s for s in slots if s.job is None]
            if verdict is _WAIT or (verdict is _READY and not idle
                                    and len(slots) >= self.num_workers):
                continue
            pending.remove(spec)
            if verdict is _READY:
                if not idle:
                    slots.append(self._start())
                    idle = slots[-1:]
                start = time.monotonic()
                if not idle[0].process.is_alive():  # died while idle (e.g. killed): replace it
                    self._replace(idle[0])
                try:
                    spec.write_config()
                    idle[0].conn.send(spec)
                    idle[0].job = (spec, start)
                    continue
                except Exception as e:
                    verdict = Outcome(spec.run_id, ok=False, seconds=time.monotonic() - start,
                                      reason=f"could not start: {type(e).__name__}: {e}")
            ledger.record(verdict)
            done(verdict)

    def _collect(self, slot: _Slot, ready: list) -> Outcome | None:
        """The outcome of the run `slot` holds, if it ended; a dead worker is replaced."""
        spec, start = slot.job
        if slot.conn in ready:
            try:
                reason = slot.conn.recv()
            except EOFError:  # died right after its last message, or while sending it
                reason = self._death(slot, spec)
        elif slot.process.sentinel in ready:
            reason = self._death(slot, spec)
        else:
            return None
        slot.job = None
        return Outcome(spec.run_id, ok=reason is None, reason=reason,
                       seconds=time.monotonic() - start)

    def _death(self, slot: _Slot, spec: RunSpec) -> str:
        slot.process.join()
        exitcode = slot.process.exitcode
        logfile = Path(spec.workdir) / self.log_name
        try:
            summary = error_summary(logfile.read_text(errors="replace")) or f"log {logfile}"
        except OSError:
            summary = f"no log ({logfile})"
        self._replace(slot)
        return f"worker process died: {summary} ({_exit_description(exitcode or 0)})"

    def _replace(self, slot: _Slot) -> None:
        slot.process.join()
        slot.conn.close()
        replacement = self._start()
        slot.process, slot.conn = replacement.process, replacement.conn

    def _stop(self, slots: list[_Slot]) -> None:
        """Asks idle workers to stop; terminates busy ones (after Ctrl-C or an error)."""
        for slot in slots:
            try:
                if slot.job is None:
                    slot.conn.send(None)
                else:
                    slot.process.terminate()
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + self.terminate_grace_seconds
        for slot in slots:
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            slot.conn.close()
