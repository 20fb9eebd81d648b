"""How much of a model a method trains: counts against the base model's parameters."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from petuning.prompt import PromptParam
from ul2_lm import logging_utils

# Parameters a method adds; everything else of type nnx.Param is the base model.
PET_PARAMS = (nnx.LoRAParam, PromptParam)
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.Any(*PET_PARAMS)))


def _count_and_bytes(state) -> tuple[int, int]:
    leaves = jax.tree.leaves(nnx.to_pure_dict(state))
    return (sum(int(x.size) for x in leaves),
            sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in leaves))


def trainable_report(model: nnx.Module, trainable: nnx.filterlib.Filter) -> dict[str, Any]:
    """{'count', 'bytes', 'base_count', 'percent_of_base'} of the parameters `trainable`
    selects; the base excludes LoRA and prompt parameters. Works on abstract models too."""
    count, nbytes = _count_and_bytes(nnx.state(model, trainable))
    base_count, _ = _count_and_bytes(nnx.state(model, BASE_PARAMS))
    return {"count": count, "bytes": nbytes, "base_count": base_count,
            "percent_of_base": 100.0 * count / base_count if base_count else float("nan")}


def summary(report: dict[str, Any], name: str = "trainable") -> str:
    """One line, e.g. 'lora: 3,584 trainable parameters = 0.71% of 504,832 base (14.0 KiB)'."""
    return (f"{name}: {report['count']:,} trainable parameters = "
            f"{report['percent_of_base']:.4g}% of {report['base_count']:,} base "
            f"({logging_utils.human_bytes(report['bytes'])})")


def pet_record(kind: str, size: int | None, report: dict[str, Any]) -> dict[str, Any] | None:
    """The run record's "pet" entry: None for FMT, else {'kind', 'size', 'num_trainable_params'}
    (size = LoRA rank or prompt length; see petuning.size_of)."""
    if kind == "fmt":
        return None
    return {"kind": kind, "size": size, "num_trainable_params": report["count"]}
