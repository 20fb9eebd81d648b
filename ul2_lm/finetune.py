"""Finetuning a pretrained base: full-model tuning, LoRA or prompt tuning (config.finetune).

`prepare(config)` does every check a finetuning run can fail on before anything is built:
the method's settings, the base run (its checkpoint must exist, and its model must have this
config's shape), the data subset against the dataset, the epoch budget. It returns a `Finetune`
that the trainer (ul2_lm/train.py) asks for the model to build, the trainable filter, the
optimiser groups, the initial state and the frozen base.

What a finetuning run saves: its train state holds the *trainable* parameters and their
optimiser state only. Under FMT that is the whole model; under LoRA or prompt tuning it is the
adapters or the prompt, and the frozen base is read again from the base run's checkpoint on
resume. Every checkpoint's metadata names the base (workdir, step) and carries a fingerprint of
its parameters (per-array sum and sum of squares), so a checkpoint is never silently combined
with another base.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

import petuning
from ul2_lm import checkpointing, logging_utils, model as model_lib, model_sizes, paths
from ul2_lm import record as record_lib, train_state
from ul2_lm.config import ConfigError

log = logging_utils.log

# The shape fields a base checkpoint and a finetuning run must agree on.
SHAPE_FIELDS = ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
                "mlp_dim", "scan_layers")
# Relative tolerance of the base fingerprint (sums over arrays sharded differently may round
# differently; another base differs in its leading digits).
FINGERPRINT_RTOL = 1e-4


def is_finetuning(config: ml_collections.ConfigDict) -> bool:
    return config.finetune.method is not None


def pretrain_command(config: ml_collections.ConfigDict, workdir: str | epath.Path) -> str:
    """The command that produces a base checkpoint for this config's model."""
    return f"python -m ul2_lm.train --config=configs/{config.model.size}_ul2.py --workdir={workdir}"


# --- the method ---------------------------------------------------------------------------------

_FIELD = re.compile(r"(LoRAConfig|PromptConfig)\.(\w+)")
_SECTION = {"LoRAConfig": "finetune.lora", "PromptConfig": "finetune.prompt"}


def _as_config_error(error: ValueError, default_key: str) -> ConfigError:
    """A petuning ValueError ('LoRAConfig.rank=0 ...') as a ConfigError on its config key."""
    match = _FIELD.search(str(error))
    key = default_key
    if match:
        key = f"{_SECTION[match[1]]}.{match[2]}"
    return ConfigError(key, str(error))


def method_spec(config: ml_collections.ConfigDict) -> petuning.methods.Method:
    """The petuning method config that config.finetune names."""
    ft = config.finetune
    kind = ft.method
    try:
        if kind == "fmt":
            return petuning.FMTConfig()
        if kind == "lora":
            lora = ft.lora
            targets = lora.targets
            return petuning.LoRAConfig(
                rank=lora.rank, alpha=lora.alpha, dropout_rate=lora.dropout_rate,
                use_rslora=lora.use_rslora,
                targets=petuning.DEFAULT_TARGETS if targets is None else
                (targets if isinstance(targets, str) else tuple(targets)))
        if kind == "prompt":
            p = ft.prompt
            return petuning.PromptConfig(length=p.length, init=p.init, top_k=p.top_k,
                                         init_text=p.init_text)
    except ValueError as e:
        raise _as_config_error(e, f"finetune.{kind}") from None
    raise ConfigError("finetune.method", f"{kind!r} is not one of {list(petuning.KINDS)}")


# --- the base run -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Base:
    """The pretraining run a finetuning run starts from."""

    workdir: epath.Path
    step: int
    record: dict[str, Any] | None

    @property
    def checkpoints(self) -> epath.Path:
        return self.workdir / "checkpoints"

    @property
    def pretrain_tokens(self) -> int | None:
        """Tokens the base had seen at `step` (steps x global batch x sequence length)."""
        if self.record is None:
            return None
        cfg = self.record.get("config", {})
        try:
            return int(self.step * cfg["train"]["global_batch_size"] * cfg["data"]["seq_len"])
        except (KeyError, TypeError):
            return None

    def reference(self) -> dict[str, Any]:
        return {"workdir": str(self.workdir), "step": self.step,
                "pretrain_tokens": self.pretrain_tokens,
                "model_size": (self.record or {}).get("config", {}).get("model", {}).get("size")}


def find_base(config: ml_collections.ConfigDict, model_config: model_lib.ModelConfig) -> Base:
    """The base run config.finetune names, checked without reading any array."""
    ft = config.finetune
    if not ft.base_workdir:
        raise ConfigError("finetune.base_workdir",
                          f"finetuning (method {ft.method!r}) needs the workdir of a pretraining "
                          f"run; produce one with: {pretrain_command(config, 'DIR')}")
    workdir = paths.as_path(ft.base_workdir)
    steps = checkpointing.committed_steps(workdir / "checkpoints")
    if not steps:
        raise ConfigError("finetune.base_workdir",
                          f"{workdir} holds no pretrained checkpoint ({workdir / 'checkpoints'} "
                          f"has no committed step); produce it with: "
                          f"{pretrain_command(config, workdir)}")
    step = steps[-1] if ft.base_step is None else int(ft.base_step)
    if step not in steps:
        raise ConfigError("finetune.base_step",
                          f"{step} is not a checkpoint of {workdir}; its steps are {steps}")
    record = record_lib.read(workdir)
    if record is not None:
        if record.get("kind") != "pretrain":
            raise ConfigError("finetune.base_workdir",
                              f"{workdir} is a {record['method']} finetuning run: its "
                              "checkpoints hold only the method's parameters, not a base model")
        _check_same_shape(record, model_config, workdir)
    return Base(workdir=workdir, step=step, record=record)


def _check_same_shape(base_record: Mapping[str, Any], model_config: model_lib.ModelConfig,
                      workdir: epath.Path) -> None:
    try:
        base_model = model_sizes.resolve(base_record["config"]["model"])
    except (KeyError, TypeError, ValueError):
        return  # an older or hand-made record: the checkpoint's own shapes are checked on reading
    for field in SHAPE_FIELDS:
        have, want = getattr(base_model, field), getattr(model_config, field)
        if have != want:
            raise ConfigError(
                f"model.{field}",
                f"{want} here, but the base run {workdir} was pretrained with {field}={have} "
                f"(model.size={base_record['config']['model'].get('size')!r}); a finetuning run "
                "must have its base's shape")


@jax.jit
def _moments(leaves):
    return jnp.stack([jnp.stack([jnp.sum(x.astype(jnp.float32)),
                                 jnp.sum(jnp.square(x.astype(jnp.float32)))]) for x in leaves])


def fingerprint(params) -> dict[str, list[float]]:
    """Per-array [sum, sum of squares] of a parameter tree: tells one base from another."""
    flat = checkpointing._flat_arrays(params)  # pylint: disable=protected-access
    if not flat:
        return {}
    moments = np.asarray(jax.device_get(_moments(list(flat.values()))), np.float64)
    return {path: [float(a), float(b)] for path, (a, b) in zip(flat, moments)}


def fingerprint_mismatch(saved: Mapping[str, Any], loaded: Mapping[str, Any]) -> str | None:
    """The first array path where two fingerprints differ, or None."""
    for path in sorted(set(saved) | set(loaded)):
        a, b = saved.get(path), loaded.get(path)
        if a is None or b is None or not np.allclose(a, b, rtol=FINGERPRINT_RTOL, atol=1e-6):
            return path
    return None


# --- the run's setup ----------------------------------------------------------------------------


@dataclasses.dataclass
class Finetune:
    """Everything method- and base-specific the trainer needs; built by `prepare`."""

    config: ml_collections.ConfigDict
    model_config: model_lib.ModelConfig
    method: petuning.methods.Method
    base: Base
    num_examples: int  # the finetuning data: exactly this many training examples
    num_steps: int
    eval_every_steps: int  # dev-loss evaluations (finetune.eval_every_epochs, in steps)
    encode: Callable[[str], Any] | None = None

    @property
    def kind(self) -> str:
        return petuning.kind_of(self.method)

    @property
    def trainable(self) -> nnx.filterlib.Filter:
        return petuning.trainable_filter(self.method)

    def make_model(self) -> nnx.Module:
        base = model_lib.Transformer(self.model_config,
                                     rngs=nnx.Rngs(params=self.config.train.seed))
        model, _ = petuning.apply(base, self.method, key=self.config.train.seed,
                                  seq_len=self.config.data.seq_len, encode=self.encode)
        return model

    def optimizer_groups(self):
        overrides = {k: v for k, v in self.config.finetune.optim.items() if v is not None}
        return petuning.optimizer_groups(self.method, overrides)

    # The frozen base and the initial state ----------------------------------------------------

    def load_base_params(self, abstract) -> Any:
        """The base run's parameters at its step, in `abstract`'s shapes and shardings."""
        try:
            params, _ = checkpointing.restore_subtree(self.base.checkpoints, "params", abstract,
                                                      step=self.base.step)
        except checkpointing.IncompatibleCheckpointError as e:
            raise checkpointing.IncompatibleCheckpointError(
                f"the base checkpoint does not fit this run's model ({e}); config.model must "
                "have the base run's shape") from None
        return params

    def initial_state(self, tx, layout: train_state.Layout, mesh, rules):
        """(train state at step 0, frozen params, base fingerprint) of a fresh finetuning run."""
        if self.kind == "fmt":
            params = self.load_base_params(layout.abstract_params)
            state = train_state.TrainState(
                step=jnp.zeros((), jnp.int32), params=params,
                opt_state=train_state.fresh_opt_state(tx, params, layout),
                skipped_steps=jnp.zeros((), jnp.int32))
            state = jax.device_put(state, layout.state_shardings)
            return state, {}, fingerprint(params)
        state, _ = train_state.create(self.make_model, tx, layout, mesh, rules,
                                      trainable=self.trainable, with_frozen=False)
        frozen = self.load_base_params(layout.abstract_frozen)
        if self.kind == "prompt":
            # The prompt is drawn from the embeddings the base was trained with, not from the
            # random table the model was built with.
            prompt = petuning.initial_prompt(self.method, frozen["embedding"],
                                             self.config.train.seed, encode=self.encode)
            params = dict(state.params)
            params["prompt"] = jax.device_put(prompt, layout.param_shardings["prompt"])
            state = state.replace(params=params,
                                  opt_state=train_state.fresh_opt_state(tx, params, layout))
        return state, frozen, fingerprint(frozen)

    def frozen_for_resume(self, layout: train_state.Layout, metadata: Mapping[str, Any],
                          checkpoint_dir: epath.Path) -> Any:
        """The frozen base of a resumed run, checked against the base its checkpoint names."""
        self.check_reference(metadata, checkpoint_dir)
        if self.kind == "fmt":
            return {}
        frozen = self.load_base_params(layout.abstract_frozen)
        self.check_fingerprint(metadata, fingerprint(frozen), checkpoint_dir)
        return frozen

    def check_reference(self, metadata: Mapping[str, Any], checkpoint_dir: epath.Path) -> None:
        saved = (metadata or {}).get("base")
        if saved is None:
            raise checkpointing.IncompatibleCheckpointError(
                f"checkpoint {checkpoint_dir} names no base run: it was not written by a "
                "finetuning run")
        if int(saved["step"]) != self.base.step:
            raise checkpointing.IncompatibleCheckpointError(
                f"checkpoint {checkpoint_dir} was trained on the base {saved['workdir']} step "
                f"{saved['step']}, but config.finetune names {self.base.workdir} step "
                f"{self.base.step}; finetune into another workdir, or point config.finetune."
                "base_workdir / base_step back at its base")
        if paths.as_path(saved["workdir"]) != self.base.workdir:
            # A moved or copied study: the base's fingerprint, not its path, decides.
            log.warning("checkpoint %s names its base as %s; using %s (its parameters are "
                        "checked against the base's fingerprint)", checkpoint_dir,
                        saved["workdir"], self.base.workdir)

    def check_fingerprint(self, metadata: Mapping[str, Any], loaded: Mapping[str, Any],
                          checkpoint_dir: epath.Path) -> None:
        saved = (metadata or {}).get("base", {}).get("fingerprint") or {}
        bad = fingerprint_mismatch(saved, loaded)
        if bad is not None:
            raise checkpointing.IncompatibleCheckpointError(
                f"checkpoint {checkpoint_dir} was trained on another base than the one now in "
                f"{self.base.workdir} step {self.base.step}: parameter {bad!r} differs (the "
                "base run was changed or retrained since); loading it would give other results")

    def checkpoint_metadata(self, base_fingerprint: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.base.reference(), "fingerprint": dict(base_fingerprint)}

    # What the record says -------------------------------------------------------------------

    def record_fields(self, layout: train_state.Layout, report: Mapping[str, Any]
                      ) -> dict[str, Any]:
        state_bytes = _nbytes(layout.abstract_state)
        fmt = _fmt_state_bytes(self.config, self.model_config, self.num_steps)
        return {
            "base": self.base.reference(),
            "pet": petuning.pet_record(self.kind, petuning.size_of(self.method), report),
            "trainable": dict(report),
            "checkpoint": {"state_bytes": state_bytes, "fmt_state_bytes": fmt,
                           "state_ratio_to_fmt": state_bytes / fmt},
        }


def _nbytes(tree) -> int:
    return sum(int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def _fmt_state_bytes(config, model_config, num_steps: int) -> int:
    """Bytes of a full-model-tuning train state of this model (parameters + optimiser)."""
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: model_lib.Transformer(model_config, rngs=nnx.Rngs(params=0))), nnx.Param))
    tx, _ = train_state.optimizer(config, model_config, num_steps)
    return _nbytes(abstract) + _nbytes(jax.eval_shape(tx.init, abstract))


def _vocabulary_encoder(config):
    from ul2_lm.data import pipeline  # the data modules (seqio, TensorFlow) load here only

    vocab = pipeline.vocabulary(config.data)
    return vocab.encode


def _dataset_size(config) -> int:
    from ul2_lm.data import finetune_tasks

    return finetune_tasks.source(config.data).size("train")


def prepare(config: ml_collections.ConfigDict, model_config: model_lib.ModelConfig) -> Finetune:
    """Checks a finetuning config against its method, base and data; builds nothing."""
    ft = config.finetune
    method = method_spec(config)
    kind = petuning.kind_of(method)
    if config.data.task != "synthetic":  # synthetic data: the trainer without seqio or TF
        from ul2_lm.data import finetune_tasks

        known = sorted(finetune_tasks.FINETUNE_TASKS)
        if config.data.task not in known:
            raise ConfigError("data.task", f"{config.data.task!r} is not a finetuning task; one "
                              f"of {known}")
        for i, task in enumerate(config.evaluation.zero_shot_tasks):
            if task not in known:
                raise ConfigError("evaluation.zero_shot_tasks",
                                  f"entry {i} {task!r} is not a finetuning task; one of {known}")
    if kind == "prompt":
        if config.data.pack:
            raise ConfigError("data.pack", "prompt tuning puts its prompt once in front of "
                              "every row: set data.pack=False")
        if method.length + config.data.seq_len > model_config.max_seq_len:
            raise ConfigError("finetune.prompt.length",
                              f"{method.length} prompt positions + data.seq_len "
                              f"{config.data.seq_len} exceed the model's max_seq_len "
                              f"{model_config.max_seq_len}; shorten the prompt or the sequences")
    encode = (_vocabulary_encoder(config)
              if kind == "prompt" and method.init == "text" and method.init_token_ids is None
              else None)
    # The method on an abstract model: a LoRA target pattern that matches nothing, or a rank
    # larger than a matrix, fails here, before anything is allocated.
    try:
        nnx.eval_shape(lambda: petuning.apply(
            model_lib.Transformer(model_config, rngs=nnx.Rngs(params=0)), method,
            seq_len=config.data.seq_len, encode=encode)[0])
    except ValueError as e:
        raise _as_config_error(e, f"finetune.{kind}") from None
    base = find_base(config, model_config)

    if config.data.task == "synthetic":
        dataset = config.train.global_batch_size
    else:
        dataset = _dataset_size(config)
    requested = config.data.finetune.num_examples
    if requested is not None and requested > dataset:
        raise ConfigError("data.finetune.num_examples",
                          f"{requested} examples requested, but the training split of "
                          f"{config.data.task!r} has {dataset}")
    num_examples = dataset if requested is None else int(requested)
    num_steps = config.train.num_steps
    if ft.num_epochs is not None:
        if ft.num_epochs <= 0:
            raise ConfigError("finetune.num_epochs", f"must be > 0, got {ft.num_epochs!r}")
        if config.data.pack:
            raise ConfigError("finetune.num_epochs", "an epoch budget counts examples, and a "
                              "packed row holds a varying number of them: set data.pack=False "
                              "or give train.num_steps")
        # The paper's budget: at most train.num_steps steps or num_epochs epochs.
        num_steps = min(num_steps, _epochs_to_steps(ft.num_epochs, num_examples, config))
    eval_every_steps = config.train.eval_every_steps
    if ft.eval_every_epochs is not None:
        if config.data.pack:
            raise ConfigError("finetune.eval_every_epochs", "an epoch counts examples, and a "
                              "packed row holds a varying number of them: set data.pack=False "
                              "or use train.eval_every_steps")
        eval_every_steps = max(_epochs_to_steps(ft.eval_every_epochs, num_examples, config),
                               int(ft.eval_min_steps))
    if config.optim.warmup_steps > num_steps:
        raise ConfigError("optim.warmup_steps", f"{config.optim.warmup_steps} exceeds the "
                          f"run's {num_steps} steps")
    return Finetune(config=config, model_config=model_config, method=method, base=base,
                    num_examples=num_examples, num_steps=num_steps,
                    eval_every_steps=eval_every_steps, encode=encode)


def _epochs_to_steps(epochs: float, num_examples: int, config: ml_collections.ConfigDict) -> int:
    """Steps that `epochs` passes over `num_examples` take at the run's batch size (>= 1)."""
    return max(1, math.ceil(epochs * num_examples / config.train.global_batch_size))
