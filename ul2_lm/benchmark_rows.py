"""Dated Markdown rows for benchmarks/RESULTS*.md: which machine ran a benchmark, and how."""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Sequence

import jax


def machine() -> str:
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"
    return f"{jax.local_device_count()} x {device.device_kind}"


def under_load(fn, *args):
    """(fn(*args), 'load average A -> B'): other jobs on a shared machine show in absolute
    figures, so a row says how busy the machine was before and after."""
    before = os.getloadavg()[0]
    result = fn(*args)
    return result, f"load average {before:.1f} -> {os.getloadavg()[0]:.1f}"


def append_row(path: str, script: str, flags: Sequence[str], cells: Sequence[str]) -> None:
    """Appends `| date | machine | command | *cells |` to the Markdown table in `path`."""
    command = " ".join([f"python benchmarks/{script}"] +
                       [f for f in flags if not f.startswith("--results_md")])
    row = [datetime.date.today().isoformat(), machine(), f"`{command}`", *cells]
    with open(path, "a") as f:
        f.write("| " + " | ".join(row) + " |\n")
