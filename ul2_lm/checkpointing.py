"""Checkpoints of a training run: async orbax saves, retention, safe resume.

One directory per run holds one sub-directory per saved step (orbax's layout: `<dir>/<step>/`
with the train state and a small JSON metadata item). What this adds to orbax's manager:

- retention keeps the last `keep_last` steps *and* the `keep_best` best by a named metric, so
  the best checkpoint survives however old it is;
- a state holding NaN or Inf is never saved (the error names the first offending path);
- `restore` checks the checkpoint against the state it is restored into and names the first
  parameter whose shape differs (or that is missing) before reading any array;
- when the newest step cannot be read (a file missing or truncated), `restore` warns, naming
  the step and the reason, and falls back to the previous one. Nothing is deleted for it: a
  step found unreadable is only moved aside (to `<step>.corrupt`) when a new save of that step
  or an earlier one needs the name. Saves that never committed (orbax's
  `<step>.orbax-checkpoint-tmp` directories, e.g. after a SIGKILL) are not steps at all.

Arrays are restored straight into the shardings of the abstract state passed in, so nothing is
gathered on one device first; every process of a multi-process run calls the same methods.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from ul2_lm import paths

log = logging.getLogger("ul2_lm.checkpointing")

STATE, METADATA = "state", "metadata"
CORRUPT_SUFFIX = ".corrupt"


class _NoMetricsIsFine(logging.Filter):
    """Orbax warns on every save without metrics once best-tracking is on; most steps of a run
    are saved between evaluations, so that warning is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Also silent: the notes orbax logs when a base checkpoint is opened read-only.
        return not any(text in str(record.msg) for text in
                       ("did not provide metrics", "read_only=True", "is read only"))


if not any(isinstance(f, _NoMetricsIsFine) for f in logging.getLogger("absl").filters):
    logging.getLogger("absl").addFilter(_NoMetricsIsFine())


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or restored; the message names the path and why."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint's arrays do not fit the state it is restored into (another config)."""


class NonFiniteStateError(CheckpointError):
    """A state holding NaN or Inf was handed to `save`."""


class _OrbaxManager(ocp.CheckpointManager):
    """Orbax's manager, except that a step whose metrics file is unreadable counts as saved
    without metrics instead of making the whole directory unopenable."""

    def _get_metrics(self, step: int):
        try:
            return super()._get_metrics(step)
        except Exception as e:  # noqa: BLE001 -- a damaged file must not stop a resume
            log.warning("the metrics of checkpoint step %d cannot be read (%s); keep-best "
                        "treats the step as saved without metrics", step, _short(str(e)))
            return None


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat_arrays(tree) -> dict[str, Any]:
    """'/'-joined path -> array-like leaf, in tree order; paths as orbax names its items."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _flat_metadata(tree, prefix: str = "") -> dict[str, Any]:
    """The same flattening for orbax's stored tree metadata (dicts, lists, None for empties)."""
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {} if tree is None else {prefix: tree}
    out = {}
    for key, value in items:
        out.update(_flat_metadata(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def _non_finite_leaves(tree) -> list[str]:
    """Paths of floating leaves holding NaN or Inf (one device round trip for the whole tree)."""
    flat = {path: x for path, x in _flat_arrays(tree).items()
            if hasattr(x, "dtype") and np.issubdtype(np.dtype(x.dtype), np.inexact)}
    if not flat:
        return []
    finite = np.asarray(jax.device_get(_all_finite_per_leaf(list(flat.values()))))
    return [path for path, ok in zip(flat, finite) if not ok]


@jax.jit
def _all_finite_per_leaf(leaves):
    return jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves])


def _as_abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _json_scalar(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"metric {name!r} is {value!r}; metrics must be numbers") from None


def _setting(config, key: str, default):
    if config is None:
        return default
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    return get(key, default)


class CheckpointManager:
    """Saves and restores train states of one run in `directory`.

    Settings come from `config` (config.checkpoint: keep_last, keep_best, best_metric,
    best_mode ('min' | 'max'), async_save), and a keyword argument of the same name overrides
    one. `every_steps` is the trainer's business: `save` always saves the step it is given.
    """

    def __init__(self, directory: str | os.PathLike, config: Any = None, *,
                 keep_last: int | None = None, keep_best: int | None = None,
                 best_metric: str | None = None, best_mode: str | None = None,
                 async_save: bool | None = None):
        def pick(value, key, default):
            return _setting(config, key, default) if value is None else value

        self.directory = paths.as_path(directory)
        self.keep_last = int(pick(keep_last, "keep_last", 2))
        self.keep_best = int(pick(keep_best, "keep_best", 1))
        self.best_metric = pick(best_metric, "best_metric", "dev_loss")
        self.best_mode = pick(best_mode, "best_mode", "min")
        async_save = bool(pick(async_save, "async_save", True))
        if self.best_mode not in ("min", "max"):
            raise CheckpointError(f"config.checkpoint.best_mode: {self.best_mode!r} is not one "
                                  "of ['min', 'max']")
        if self.keep_last < 1:
            raise CheckpointError(
                f"config.checkpoint.keep_last: must be >= 1, got {self.keep_last}")
        if self.keep_best < 0:
            raise CheckpointError(
                f"config.checkpoint.keep_best: must be >= 0, got {self.keep_best}")

        worst = math.inf if self.best_mode == "min" else -math.inf

        def score(metrics) -> float:
            # A step saved without the metric (or with NaN) ranks last, never best.
            value = (metrics or {}).get(self.best_metric)
            return worst if value is None or math.isnan(value) else float(value)

        keep = [policies.LatestN(n=self.keep_last)]
        if self.keep_best:
            keep.append(policies.BestN(get_metric_fn=score, reverse=self.best_mode == "min",
                                       n=self.keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            best_fn=score,
            best_mode=self.best_mode,
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        # Handlers named up front, so a fresh manager can read what an earlier process wrote.
        self._manager = _OrbaxManager(
            self.directory, options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(),
                           METADATA: ocp.JsonCheckpointHandler()})
        self._unreadable: dict[int, str] = {}  # step -> why restore could not read it
        self.restored_step: int | None = None

    # --- saving --------------------------------------------------------------------------

    def save(self, step: int, state, *, metrics: Mapping[str, Any] | None = None,
             metadata: Mapping[str, Any] | None = None) -> None:
        """Starts saving `state` (a pytree of arrays) as `step`; returns once it is safe to
        modify `state`, while the write goes on in the background when async_save is on.

        `metrics` (numbers, e.g. {'dev_loss': 2.1}) rank the step for keep-best; `metadata` is
        any small JSON-able dict (data-iterator position, seeds, a config fingerprint).
        Raises NonFiniteStateError, naming the first path holding NaN or Inf, before anything
        is written.
        """
        step = int(step)
        bad = _non_finite_leaves(state)
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise NonFiniteStateError(
                f"refusing to save step {step} to {self.directory}: {bad[0]!r}{more} holds NaN "
                "or Inf")
        metrics = None if metrics is None else {
            str(k): _json_scalar(k, v) for k, v in metrics.items()}
        self._move_aside_unreadable(step)
        if step in self._manager.all_steps():
            raise CheckpointError(f"{self.directory / str(step)}: a checkpoint of step {step} "
                                  "already exists")
        self._manager.save(
            step,
            args=ocp.args.Composite(**{
                STATE: ocp.args.StandardSave(state),
                METADATA: ocp.args.JsonSave(dict(metadata or {})),
            }),
            metrics=metrics,
            force=True,  # when to save is the caller's decision, not orbax's interval policy
        )

    def _move_aside_unreadable(self, step: int) -> None:
        """Renames steps found unreadable that are >= `step`, so the run can save over them.

        They would otherwise keep counting as the newest steps (and make the next resume fall
        back again). Renamed, not deleted: a person may still want to look at them."""
        doomed = sorted(s for s in self._unreadable if s >= step)
        if not doomed:
            return
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            for s in doomed:
                source = self.directory / str(s)
                target = self.directory / f"{s}{CORRUPT_SUFFIX}"
                n = 1
                while target.exists():
                    n += 1
                    target = self.directory / f"{s}{CORRUPT_SUFFIX}{n}"
                if source.exists():
                    source.rename(target)
                    log.warning("moved unreadable checkpoint step %d aside to %s (it failed to "
                                "restore: %s)", s, target, self._unreadable[s])
        ocp.multihost.sync_global_processes("ul2_lm_checkpointing_move_aside")
        for s in doomed:
            del self._unreadable[s]
        self._manager.reload()

    def wait_until_finished(self) -> None:
        """Blocks until every save started so far is committed (or has failed, raising)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- what is there -------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (a save still in flight counts once started)."""
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None. `restore` may still fall back from it."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step with the best `best_metric` among kept steps, or None if none has it."""
        candidates = []
        for step in self.all_steps():
            value = (self.metrics(step) or {}).get(self.best_metric)
            if value is not None and not math.isnan(value):
                candidates.append((value, step))
        if not candidates:
            return None
        pick = min if self.best_mode == "min" else max
        return pick(candidates)[1]

    def metrics(self, step: int) -> dict[str, float] | None:
        """The metrics saved with `step`, or None."""
        return self._manager.metrics(int(step))

    # --- restoring -----------------------------------------------------------------------

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Returns (state, metadata) of `step`, or of the newest readable step when None.

        `abstract_state` is the pytree to restore into: ShapeDtypeStructs (or arrays) whose
        `.sharding` says where each array goes; each process reads only its shards. Raises
        IncompatibleCheckpointError, naming the first mismatching path and both shapes, when
        the checkpoint does not fit; CheckpointError when no step can be read. With step=None,
        an unreadable newest step is skipped with a warning and the previous one is tried.
        The step restored is left in `self.restored_step`.
        """
        abstract_state = jax.tree.map(_as_abstract, abstract_state)
        self._manager.wait_until_finished()
        if step is not None:
            step = int(step)
            if step not in self.all_steps():
                raise CheckpointError(f"{self.directory}: no checkpoint of step {step}; "
                                      f"committed steps: {self.all_steps()}")
            return self._restore_step(step, abstract_state)
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"{self.directory}: no committed checkpoint to restore")
        failures = []
        for candidate in reversed(steps):
            try:
                return self._restore_step(candidate, abstract_state)
            except IncompatibleCheckpointError:
                raise
            except CheckpointError as e:
                reason = str(e.__cause__ or e)
                self._unreadable[candidate] = reason
                failures.append(f"step {candidate}: {reason}")
                log.warning("checkpoint step %d in %s cannot be restored (%s); falling back to "
                            "the previous step", candidate, self.directory, _short(reason))
        raise CheckpointError(f"{self.directory}: no checkpoint step can be restored:\n  "
                              + "\n  ".join(_short(f, 500) for f in failures))

    def restore_best(self, abstract_state) -> tuple[Any, dict[str, Any]]:
        """Like `restore`, for the step with the best `best_metric`."""
        step = self.best_step()
        if step is None:
            raise CheckpointError(f"{self.directory}: no kept checkpoint was saved with metric "
                                  f"{self.best_metric!r}")
        return self.restore(abstract_state, step=step)

    def _restore_step(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
        step_dir = self.directory / str(step)
        try:
            stored = self._manager.item_metadata(step)[STATE]
            stored = _flat_metadata(stored.tree if hasattr(stored, "tree") else stored)
        except Exception as e:  # noqa: BLE001 -- any failure to read means the step is unusable
            raise CheckpointError(f"{step_dir}: cannot read the array metadata") from e
        if not stored:
            raise CheckpointError(f"{step_dir}: the state item is missing or empty")
        _check_compatible(step_dir, stored, _flat_arrays(abstract_state))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(abstract_state),
                METADATA: ocp.args.JsonRestore(),
            }))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{step_dir}: reading the arrays failed") from e
        self.restored_step = step
        return restored[STATE], dict(restored[METADATA] or {})


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_compatible(step_dir: epath.Path, stored: Mapping[str, Any],
                      wanted: Mapping[str, Any]):
    for path, target in wanted.items():
        if path not in stored:
            raise IncompatibleCheckpointError(
                f"checkpoint {step_dir} does not fit the state to restore: {path!r} (shape "
                f"{tuple(target.shape)}) is missing from the checkpoint; was it written with "
                "another model or optimiser config?")
        have = tuple(stored[path].shape)
        if have != tuple(target.shape):
            raise IncompatibleCheckpointError(
                f"checkpoint {step_dir} does not fit the state to restore: {path!r} has shape "
                f"{have} in the checkpoint but {tuple(target.shape)} in this run's state; was it "
                "written with another model or optimiser config?")
    extra = [path for path in stored if path not in wanted]
    if extra:
        raise IncompatibleCheckpointError(
            f"checkpoint {step_dir} does not fit the state to restore: it holds {extra[0]!r} "
            f"(shape {tuple(stored[extra[0]].shape)}), which this run's state does not have"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def committed_steps(directory: str | os.PathLike) -> list[int]:
    """The committed steps under a run's checkpoint directory, oldest first, read without
    creating or changing anything (a missing directory has none)."""
    # Orbax's own test of a finished step: renamed from its temporary name on a file system,
    # a commit marker on GCS (where a step is written in place).
    return sorted(ocp.utils.checkpoint_steps(paths.as_path(directory)))


def restore_subtree(directory: str | os.PathLike, key: str, abstract: Any,
                    step: int | None = None) -> tuple[Any, int]:
    """(the `key` part of a saved state, its step), e.g. the parameters of another run's train
    state without its optimiser state: a finetuning run reading its pretrained base.

    Read-only: nothing in `directory` is created, moved or deleted. `abstract` (arrays or
    ShapeDtypeStructs with shardings) says the shapes and placement; the stored `key` subtree
    must match it exactly, or IncompatibleCheckpointError names the first differing path.
    """
    directory = paths.as_path(directory)
    steps = committed_steps(directory)
    if not steps:
        raise CheckpointError(f"{directory}: no committed checkpoint")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise CheckpointError(f"{directory}: no checkpoint of step {step}; committed steps: {steps}")
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(),
                       METADATA: ocp.JsonCheckpointHandler()})
    try:
        return _restore_part(manager, directory / str(step), step, key, abstract), step
    finally:
        manager.close()


def _restore_part(manager, step_dir: epath.Path, step: int, key: str, abstract: Any) -> Any:
    try:
        stored = manager.item_metadata(step)[STATE]
        stored = _flat_metadata(stored.tree if hasattr(stored, "tree") else stored)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{step_dir}: cannot read the array metadata") from e
    prefix = key + "/"
    stored = {path.removeprefix(prefix): meta for path, meta in stored.items()
              if path.startswith(prefix)}
    if not stored:
        raise CheckpointError(f"{step_dir}: the saved state has no {key!r} part")
    abstract = jax.tree.map(_as_abstract, abstract)
    _check_compatible(step_dir, stored, _flat_arrays(abstract))
    target = {key: abstract}
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)}))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{step_dir}: reading the {key!r} arrays failed") from e
    return restored[STATE][key]
