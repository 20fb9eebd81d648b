"""Optimiser groups for the parameters a method adds.

New parameters start far from the base's scale (B = 0; a prompt of embedding size), so Adafactor's
relative step (the update times the parameter's RMS) would barely move them: they train with
parameter scaling off, as Google's prompt-tuning code does. The result feeds
ul2_lm.optim.make_optimizer's `param_labels` and `group_overrides`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from petuning.methods import Method, kind_of, resolve_method
from ul2_lm import optim

# Path patterns of each method's own parameters (over '/'-joined pure-dict paths).
PATTERNS = {"lora": r"(^|/)lora_[ab]$", "prompt": r"^prompt$"}

NEW_PARAMETER_SETTINGS = {"multiply_by_parameter_scale": False}


def optimizer_groups(method: Method | str | Mapping[str, Any],
                     overrides: Mapping[str, Any] | None = None):
    """(param_labels, group_overrides) for `make_optimizer`: the method's new parameters form a
    group named after the method ('lora' / 'prompt') with parameter scaling off, updated with
    `overrides` (e.g. {'peak_learning_rate': 0.3}). FMT has no such group: (None, {})."""
    kind = kind_of(resolve_method(method))
    if kind == "fmt":
        return None, {}
    labels = optim.labels_by_path([(PATTERNS[kind], kind)])
    return labels, {kind: {**NEW_PARAMETER_SETTINGS, **dict(overrides or {})}}
