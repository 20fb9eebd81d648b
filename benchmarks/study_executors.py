r"""Wall time of one grid of finetuning runs under each local executor, in one invocation.

    python benchmarks/study_executors.py --from_study=runs/demo --data_sizes=2,10

Plans the study of `--config` (default: the demo) with only `--data_sizes`, copies the finished
pretraining runs of `--from_study` (a study of the same config that has run) into a fresh
directory per executor, so that only the finetuning runs run, and times
`python -m scaling.study` under each executor in turn (`local`: one run after another in one
process; `pool`: two long-lived workers). Prints one line per executor and the ratio; the runs
go to a temporary directory that is removed afterwards. A grid too small to fit a law (the
default) ends its study with "nothing to fit" (exit status 1): what counts here is that every
planned finetuning run finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "studies" / "demo.py"))
    p.add_argument("--from_study", required=True, help="a finished study of --config")
    p.add_argument("--data_sizes", default="2,10")
    p.add_argument("--executors", default="local,pool")
    args = p.parse_args()
    pretrain = Path(args.from_study) / "runs" / "pretrain"
    if not pretrain.is_dir():
        p.error(f"--from_study={args.from_study}: no runs/pretrain there; run the study first")
    sizes = tuple(int(n) for n in args.data_sizes.split(","))
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "grid.py"
        config.write_text(textwrap.dedent(f"""
            from scaling.grid import load_config_file

            def get_config():
                s = load_config_file({str(Path(args.config).resolve())!r})
                s.finetune.data_sizes = {sizes!r}
                s.fit.bootstrap = 0
                return s
        """))
        for executor in args.executors.split(","):
            workdir = Path(tmp) / executor
            shutil.copytree(pretrain, workdir / "runs" / "pretrain")
            command = [sys.executable, "-m", "scaling.study", f"--config={config}",
                       f"--workdir={workdir}", f"--executor={executor}", "--workers=2"]
            load = os.getloadavg()[0]
            start = time.perf_counter()
            proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            seconds[executor] = time.perf_counter() - start
            status = json.loads((workdir / "status.json").read_text())
            runs = [k for k in status if k.startswith("finetune/")]
            unfinished = [k for k in runs if status[k]["status"] != "finished"]
            print(f"{executor}: {seconds[executor]:.0f}s for {len(runs)} finetuning runs "
                  f"(study exit status {proc.returncode}), load average {load:.1f} -> "
                  f"{os.getloadavg()[0]:.1f}")
            if unfinished:
                print(f"not finished: {unfinished}\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
    if "local" in seconds:
        for name, s in seconds.items():
            if name != "local":
                print(f"{name} / local wall time: {s / seconds['local']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
