"""Training progress on the console and in TensorBoard (written by process 0 only)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import jax

log = logging.getLogger("ul2_lm")


def setup_console() -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def human_bytes(n: float) -> str:
    """'512 B', '14.0 KiB', '1.3 MiB', '2.4 GiB'."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class MetricWriter:
    """Scalars to TensorBoard event files under `logdir`, and a one-line summary to the console."""

    def __init__(self, logdir: str | Path, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # Pure Python: no TensorFlow needed.

            self._tb = SummaryWriter(str(logdir), flush_secs=10)

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        if self._tb is None:
            return
        for name, value in values.items():
            self._tb.add_scalar(f"{prefix}{name}", float(value), global_step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Progress:
    """Steps done, steps/s and ETA, measured from the first logged step (excludes compilation)."""

    def __init__(self, first_step: int, last_step: int):
        self.first_step = first_step
        self.last_step = last_step
        self._t0: float | None = None
        self._step0 = first_step

    def mark(self, step: int) -> str:
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._step0 = now, step
            return f"step {step}/{self.last_step}"
        rate = (step - self._step0) / max(now - self._t0, 1e-9)
        eta = (self.last_step - step) / rate if rate > 0 else float("inf")
        return (f"step {step}/{self.last_step} ({100 * step / self.last_step:.0f}%, "
                f"{rate:.2f} steps/s, ETA {format_duration(eta)})")
