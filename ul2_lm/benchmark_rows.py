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


def append_row(path: str, script: str, flags: Sequence[str], cells: Sequence[str]) -> None:
    """Appends `| date | machine | command | *cells |` to the Markdown table in `path`."""
    command = " ".join([f"python benchmarks/{script}"] +
                       [f for f in flags if not f.startswith("--results_md")])
    row = [datetime.date.today().isoformat(), machine(), f"`{command}`", *cells]
    with open(path, "a") as f:
        f.write("| " + " | ".join(row) + " |\n")
