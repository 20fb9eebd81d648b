r"""Runs a study end to end, timed, and records what it found in benchmarks/RESULTS_study.md.

    python benchmarks/study_findings.py --config=configs/studies/demo.py --workdir=runs/demo
    python benchmarks/study_findings.py --config=configs/studies/tiny.py --workdir=runs/study_tiny

The study runs as `make demo` runs it (`python -m scaling.study --executor=pool --workers=2`,
in a child process, so the wall time includes start-up); a study directory that already holds
finished runs reuses them, so give a fresh --workdir to time a whole study. The entry appended
to RESULTS_study.md holds the command, machine, date, load, wall time, the runs' outcome and the
report's findings section (verdicts and the evidence with its intervals) and premises, copied
from REPORT.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _section(report: str, title: str) -> str:
    """The body of `## title` in a Markdown report ('' when absent)."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", report, re.S | re.M)
    return m.group(1).strip() if m else ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--executor", default="pool", help="scaling.study's --executor")
    p.add_argument("--workers", type=int, default=2, help="scaling.study's --workers")
    p.add_argument("--results_md", default=str(REPO / "benchmarks" / "RESULTS_study.md"))
    args = p.parse_args()
    flags = [f"--config={args.config}", f"--workdir={args.workdir}",
             f"--executor={args.executor}"] + (
        [f"--workers={args.workers}"] if args.executor != "local" else [])
    command = [sys.executable, "-m", "scaling.study", *flags]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO)
    seconds = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    report_path = Path(args.workdir) / "REPORT.md"
    report = report_path.read_text() if report_path.exists() else ""
    shown = "python -m scaling.study " + " ".join(flags)
    entry = [
        f"## `{args.config}` ({datetime.date.today().isoformat()})", "",
        f"Command: `{shown}` (timed by `python benchmarks/study_findings.py`)  ",
        f"Machine: {os.cpu_count()}-core {platform.machine()} "
        f"({platform.processor() or 'CPU'}), load average {load_before:.1f} -> "
        f"{load_after:.1f}  ",
        f"Wall time: {int(seconds // 60)}m{int(seconds % 60):02d}s, exit status "
        f"{proc.returncode}", "",
    ]
    findings = _section(report, "Findings")
    entry += [findings or "(the report has no Findings section)", ""]
    premises = _section(report, "Does the study measure what the paper's does?")
    if premises:
        entry += ["Premises:", "", premises, ""]
    with open(args.results_md, "a") as f:
        if f.tell() == 0:
            f.write("# Studies: what they found, and how long they took\n\n"
                    "Each entry is one timed study; verdicts and intervals are copied from its "
                    "REPORT.md.\n\n")
        f.write("\n".join(entry) + "\n")
    print(f"{shown}: {seconds:.0f}s, exit {proc.returncode}; appended to {args.results_md}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
