r"""What a config needs per device, before a slice is paid for.

python -m ul2_lm.plan --config=configs/8b_ul2.py --devices=64 --mesh=fsdp=64

Parameter and optimiser-state bytes per device are exact: the shard shapes the sharding rules
give, times the dtype sizes. Activations and temporaries come from XLA's memory analysis of the
compiled train step on fake CPU devices of the same count (`--compile`, the default); the CPU
compiler's buffer assignment is close to, not identical with, a TPU's or GPU's, so leave a margin.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags


@dataclasses.dataclass
class MemoryPlan:
    num_devices: int
    mesh: dict[str, int]
    num_params: int
    param_bytes: int  # per device
    opt_state_bytes: int  # per device
    batch_bytes: int  # per device
    temp_bytes: int | None  # per device: activations and temporaries of the compiled step
    compiled: bool

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.opt_state_bytes + self.batch_bytes + (self.temp_bytes or 0)

    def table(self) -> str:
        gib = 2.0**30
        rows = [("parameters", self.param_bytes), ("optimiser state", self.opt_state_bytes),
                ("batch", self.batch_bytes)]
        if self.temp_bytes is not None:
            rows.append(("activations + temporaries", self.temp_bytes))
        rows.append(("total", self.total_bytes))
        lines = [f"{self.num_params:,} parameters on {self.num_devices} devices, mesh {self.mesh}",
                 "| per device | GiB |", "|---|---|"]
        lines += [f"| {name} | {value / gib:.3f} |" for name, value in rows]
        if not self.compiled:
            lines.append("(activations not measured: run with --compile)")
        return "\n".join(lines)


def _shard_bytes(abstract_tree: Any) -> int:
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def plan(config, *, compile_step: bool = True) -> MemoryPlan:
    """Per-device memory of training `config` on the current (possibly fake) devices; for a
    finetuning config, of its method: the frozen base among the parameters, optimiser state
    for the trainable parameters only."""
    import jax
    import numpy as np
    from flax import nnx

    import petuning
    from ul2_lm import config as config_lib, finetune, model as model_lib, model_sizes
    from ul2_lm import partitioning, steps, train_state

    config_lib.validate(config, num_devices=jax.device_count())
    model_config = model_sizes.resolve(config.model)
    mesh = partitioning.make_mesh(config.mesh.axes)
    rules = tuple(tuple(r) for r in config.mesh.rules)

    def make_model():
        return model_lib.Transformer(model_config, rngs=nnx.Rngs(0))

    trainable, labels, overrides = nnx.Param, None, None
    dropout = model_config.dropout_rate > 0
    if finetune.is_finetuning(config):
        # The run's model and parameter groups, without its base: a plan reads no checkpoint.
        method = finetune.method_spec(config)
        if petuning.kind_of(method) == "prompt" and method.init == "text":
            method = dataclasses.replace(method, init="uniform")  # the same shapes, no vocabulary
        base_model = make_model

        def make_model():
            return petuning.apply(base_model(), method, seq_len=config.data.seq_len)[0]

        trainable = petuning.trainable_filter(method)
        labels, overrides = petuning.optimizer_groups(
            method, {k: v for k, v in config.finetune.optim.items() if v is not None})
        dropout = dropout or getattr(method, "dropout_rate", 0.0) > 0
    tx, _ = train_state.optimizer(config, model_config, param_labels=labels,
                                  group_overrides=overrides)
    layout = train_state.make_layout(make_model, tx, mesh, rules, trainable)
    abstract_frozen = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        layout.abstract_frozen, layout.frozen_shardings)

    batch_size, seq_len = config.train.global_batch_size, config.data.seq_len
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    names = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
             "decoder_positions", "decoder_segment_ids", "decoder_causal_attention")
    batch = {n: jax.ShapeDtypeStruct((batch_size, seq_len), np.int32, sharding=batch_sharding)
             for n in names}

    temp = None
    if compile_step:
        step = steps.make_train_step(layout.graphdef, tx, seed=0,
                                     num_microbatches=config.train.num_microbatches,
                                     z_loss=config.train.z_loss, dropout=dropout)
        with partitioning.activate(mesh, rules):
            compiled = jax.jit(step, out_shardings=(layout.state_shardings, None),
                               donate_argnums=(0,)).lower(
                layout.abstract_state, abstract_frozen, batch).compile()
        analysis = compiled.memory_analysis()
        temp = int(analysis.temp_size_in_bytes) if analysis is not None else None

    return MemoryPlan(
        num_devices=jax.device_count(), mesh=dict(mesh.shape),
        num_params=model_sizes.count_params(model_config)["total"],
        # A finetuning run's frozen base is held on the devices too.
        param_bytes=_shard_bytes(layout.abstract_state.params) + _shard_bytes(abstract_frozen),
        opt_state_bytes=_shard_bytes(layout.abstract_state.opt_state),
        batch_bytes=_shard_bytes(batch), temp_bytes=temp, compiled=temp is not None)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags; defined only when run as a program, so importing this module
    (from a config file, a test, another tool) never defines them twice."""
    config_flags.DEFINE_config_file("config", None, "Config file to plan.", lock_config=False)
    flags.DEFINE_integer("devices", 8, "Number of devices to plan for (simulated on the CPU).")
    flags.DEFINE_string("mesh", None, "Mesh axis sizes, e.g. 'data=2,fsdp=32,tensor=1' "
                        "(default: the config's mesh).")
    flags.DEFINE_bool("compile", True, "Compile the train step to measure activations.")


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
    axes = []
    for part in text.split(","):
        name, _, size = part.partition("=")
        if not size.strip().lstrip("-").isdigit():
            raise app.UsageError(f"--mesh: {part!r} is not AXIS=SIZE")
        axes.append((name.strip(), int(size)))
    known = {"data", "fsdp", "tensor"}
    if unknown := {n for n, _ in axes} - known:
        raise app.UsageError(f"--mesh: unknown axes {sorted(unknown)}; use {sorted(known)}")
    sizes = dict(axes)
    return tuple((name, sizes.get(name, 1)) for name in ("data", "fsdp", "tensor"))


def main(argv):
    del argv
    # The fake device count must be set before JAX starts its CPU backend.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={FLAGS.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    config = FLAGS.config
    if FLAGS.mesh:
        config.mesh.axes = parse_mesh(FLAGS.mesh)
    result = plan(config, compile_step=FLAGS.compile)
    print(result.table())
    return 0


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["config"])
    sys.exit(app.run(main))
