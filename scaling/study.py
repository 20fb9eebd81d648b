r"""A whole scaling study in one command: pretrain -> finetune grid -> fit -> report.

    python -m scaling.study --config=configs/studies/tiny.py --workdir=DIR
    python -m scaling.study --config=configs/studies/paper_wmt14_ende.py --workdir=gs://B/S --plan

The study config (configs/studies/*.py) names the pretraining runs (one per model size, keeping
intermediate checkpoints as the pretraining-data factor), the finetuning grid (methods x
finetuning-data sizes x PET sizes x seeds, over the three factors of the paper: model size,
pretraining data, PET size), the held-out values and the fit. The runner plans every run,
hands them to an executor (scaling/executors.py: local sequential by default, local parallel,
or TPU slices through gcloud; scaling/pool.py: a pool of local workers), fits the laws to what
finished and writes DIR/REPORT.md.

DIR holds: study.json (the study config and the planned runs), runs/<run_id>/ (each run's own
workdir: checkpoints, record.json, run_config.json), status.json (how each run ended), fit/
(`python -m scaling.fit` output: table.csv, fit.json, summary.md, figures/) and REPORT.md.

Run the same command again after a kill: finished runs whose config (and base) are the ones
planned now are reused, unfinished ones resume from their checkpoints, and the report comes out
as from an uninterrupted study; a run whose config changed is moved to DIR/stale/ and run again
from scratch (scaling/execution.py). Failed runs (NaN, bad data) are recorded with their reason
and left out of the fit, which says so; --retry_failed runs them again. --plan prints the run
list, the count, an estimate of accelerator hours and the commands, and runs nothing. A bad
setting stops the study before any run, in one line naming its key.

The parts: scaling/grid.py (the study config, its checks and grid), scaling/planning.py (each
run's config, identity, FLOPs and command), scaling/execution.py (what to reuse, what to run,
how each run ended), scaling/study_report.py (the fit and REPORT.md). This module is the
command line that ties them together.
"""

from __future__ import annotations

import sys
from pathlib import Path

from scaling.execution import (STATUS_FILE, Progress, StudyBusy, enable_compilation_cache,
                               enable_compilation_cache_for_children, execute, in_process_runner,
                               run_status, study_lock, write_json)
from scaling.grid import (METHODS, PET_KNOB, Point, Study, StudyError, load_config_file,
                          load_module, parse)
from scaling.planning import describe_plan, manifest, plan, validate_runs
from scaling.study_report import NothingToFit, fit_and_report, fit_settings, recommendation

__all__ = [
    "METHODS", "PET_KNOB", "STATUS_FILE", "NothingToFit", "Point", "Progress", "Study",
    "StudyBusy", "StudyError", "describe_plan", "enable_compilation_cache",
    "enable_compilation_cache_for_children", "execute", "fit_and_report", "fit_settings",
    "in_process_runner", "load_config_file", "load_module", "main", "parse", "plan",
    "recommendation", "run_status", "validate_runs",
]

# Mistakes in the study's config or its directory: one line, no traceback, exit status 2.
USER_ERRORS = (StudyError, StudyBusy)


def main(argv=None) -> int:
    from absl import app, flags
    from absl import logging as absl_logging

    del argv
    FLAGS = flags.FLAGS
    # Orbax and JAX log every checkpoint step at INFO through absl; the study's own lines say enough.
    absl_logging.set_verbosity(absl_logging.WARNING)
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    try:
        return _run(FLAGS)
    except USER_ERRORS as e:
        print(f"scaling.study: {e}", file=sys.stderr)
        return 2
    except NothingToFit as e:
        print(f"scaling.study: {e}", file=sys.stderr)
        return 1


def _run(FLAGS) -> int:
    from absl import app

    study = parse(FLAGS.config)
    workdir = FLAGS.workdir
    specs = plan(study, workdir)
    if FLAGS.plan:
        validate_runs(specs)
        print(describe_plan(study, specs, peak_flops=FLAGS.peak_tflops * 1e12, mfu=FLAGS.mfu))
        return 0
    from ul2_lm import paths

    if paths.is_remote(workdir):
        raise app.UsageError(
            f"--workdir={workdir}: a study's own directory (its lock, status, records and "
            "report) must be local; the runs go to a bucket with --executor=gcloud "
            "--bucket=gs://...")
    from scaling import executors

    if FLAGS.executor != "local":
        enable_compilation_cache_for_children()
    options = {
        "local": {"runner": in_process_runner},
        "parallel": {"num_workers": FLAGS.workers},
        "pool": {"num_workers": FLAGS.workers, "runner": in_process_runner},
        "local_pod": {"num_processes": FLAGS.processes, "num_workers": FLAGS.workers},
        "gcloud": {"project": FLAGS.gcloud_project, "zone": FLAGS.gcloud_zone,
                   "accelerator_type": FLAGS.accelerator_type,
                   "runtime_version": FLAGS.runtime_version, "bucket": FLAGS.bucket,
                   "name_prefix": FLAGS.name_prefix, "dry_run": FLAGS.dry_run,
                   "runs_per_slice": FLAGS.runs_per_slice, "max_slices": FLAGS.max_slices,
                   "remote_python": FLAGS.remote_python},
    }[FLAGS.executor]
    if FLAGS.executor == "pool":
        from scaling.pool import PoolExecutor

        executor = PoolExecutor(**options)
    else:
        executor = executors.make_executor(FLAGS.executor, **options)
    if hasattr(executor, "validate"):
        try:
            executor.validate()  # a malformed zone or slice type: before any run starts
        except ValueError as e:
            raise app.UsageError(str(e)) from None
    local = Path(workdir)
    with study_lock(local):
        validate_runs(specs)
        write_json(local / "study.json", manifest(study, specs))
        status = execute(study, specs, local, executor, retry_failed=FLAGS.retry_failed,
                         log=lambda m: print(m, file=sys.stderr, flush=True))
        if getattr(executor, "dry_run", False):
            print("dry run: nothing ran, nothing to fit")
            return 0
        report = fit_and_report(study, local, status, specs,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"report: {report}")
    return 0


def define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "A study config (configs/studies/*.py).",
                                    lock_config=False)
    flags.DEFINE_string("workdir", None, "The study's directory.")
    flags.DEFINE_bool("plan", False, "Print the run list, count, accelerator hours and commands; "
                      "run nothing.")
    flags.DEFINE_enum("executor", "local", ["local", "pool", "parallel", "local_pod", "gcloud"],
                      "Where runs run: this process; N long-lived local worker processes, "
                      "each running one run after another (fastest for many small runs); a "
                      "local process per run; multi-process jobs on this machine (as on a "
                      "pod); or TPU VM slices through gcloud.")
    flags.DEFINE_integer("workers", 2, "Runs at once (pool, parallel, local_pod).")
    flags.DEFINE_integer("processes", 2, "Processes per run (local_pod).")
    flags.DEFINE_string("gcloud_project", None, "gcloud: the project.")
    flags.DEFINE_string("gcloud_zone", None, "gcloud: the zone, e.g. us-central2-b.")
    flags.DEFINE_string("accelerator_type", None, "gcloud: the slice type, e.g. v4-32.")
    flags.DEFINE_string("runtime_version", "tpu-ubuntu2204-base", "gcloud: the TPU VM image.")
    flags.DEFINE_string("bucket", None, "gcloud: the bucket for code, configs and workdirs.")
    flags.DEFINE_string("name_prefix", "ul2lm", "gcloud: prefix of the slice names.")
    flags.DEFINE_bool("dry_run", False, "gcloud: print the commands, issue nothing.")
    flags.DEFINE_integer("runs_per_slice", 1, "gcloud: runs sharing one slice, one after another.")
    flags.DEFINE_integer("max_slices", 1, "gcloud: slices that exist at once.")
    flags.DEFINE_string("remote_python", "python3", "gcloud: the workers' Python (3.11 or newer, "
                        "as setup.py requires; name another interpreter where the image's "
                        "python3 is older).")
    flags.DEFINE_bool("retry_failed", False, "Run failed runs again.")
    flags.DEFINE_float("peak_tflops", 275.0, "Peak bf16 TFLOP/s per chip for --plan "
                       "(TPU v4: 275).")
    flags.DEFINE_float("mfu", 0.4, "Model-FLOP utilisation assumed by --plan.")


if __name__ == "__main__":
    from absl import flags

    from ul2_lm import cli

    define_flags()
    flags.mark_flags_as_required(["config"])
    cli.run(main, "scaling.study")
