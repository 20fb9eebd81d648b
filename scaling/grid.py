"""A study config and its grid: loading configs/studies/*.py, checking it, the grid's points.

`parse` turns a study config into a `Study` or raises a `StudyError` naming the key: every
setting that can be wrong (sizes, checkpoints, methods, data sizes, held-out values, the fit's
laws, preset, bootstrap draws and target) is checked here, before any run is planned or
started. `Study.points()` is the finetuning grid: every factor swept around the anchor.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

METHODS = ("fmt", "lora", "prompt")
PET_KNOB = {"lora": ("finetune.lora.rank", "r"), "prompt": ("finetune.prompt.length", "p")}
# A size name is a directory under runs/pretrain/ and part of every run id built on it.
SIZE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# What a study's `fit` section may set (scaling.fit's settings of the same names).
FIT_KEYS = ("laws", "preset", "bootstrap", "seed", "target", "curve_law")
# Columns of the table that describe a run, not a measurement: never a fit target.
NOT_TARGETS = ("task", "method", "model_params", "pretrain_tokens", "pet_size",
               "finetune_examples", "seed", "run")


class StudyError(ValueError):
    """A study config that cannot work, named by its dotted key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"study.{key}: {message}")


# --- config files ------------------------------------------------------------------------------


def load_module(path: str | os.PathLike):
    """A config file (configs/*.py) as a module; relative paths from the repository."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parents[1] / path
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_study_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config()` of a config file (configs/*.py)."""
    module = load_module(path)
    return module.get_config(arg) if arg is not None else module.get_config()


def load_run_config(path: str | os.PathLike, key: str) -> ml_collections.ConfigDict:
    """A run config file the study names at `key`; a missing file is a StudyError."""
    try:
        return load_config_file(path)
    except FileNotFoundError as e:
        raise StudyError(key, str(e)) from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str,
                    prefix: str = "") -> None:
    """Sets `overrides` (nested like the config: {'train': {'num_steps': 40}}, or dotted keys)
    on `config`; a key the config does not have is an error naming it."""
    for key, value in dict(overrides).items():
        node, parts = config, key.split(".")
        for part in parts[:-1]:
            if part not in node:
                raise StudyError(where, f"{prefix}{key}: no section {part!r} in the run config")
            node = node[part]
        leaf = parts[-1]
        if leaf not in node:
            raise StudyError(where, f"{prefix}{key}: the run config has no key {leaf!r}")
        if isinstance(node[leaf], ml_collections.ConfigDict) and hasattr(value, "items") \
                and len(node[leaf]):
            apply_overrides(node[leaf], value, where, f"{prefix}{key}.")
        else:
            node[leaf] = value.to_dict() if hasattr(value, "to_dict") else value


def get_dotted(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


# --- the grid ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Point:
    """One finetuning run of the grid."""

    method: str
    size: str
    pretrain_step: int
    pet_size: int | None
    examples: int
    seed: int

    @property
    def run_id(self) -> str:
        pet = "full" if self.pet_size is None else f"{PET_KNOB[self.method][1]}{self.pet_size}"
        return (f"finetune/{self.method}/{self.size}/step{self.pretrain_step}/{pet}/"
                f"n{self.examples}/seed{self.seed}")


@dataclasses.dataclass
class Study:
    """A parsed, checked study config."""

    config: ml_collections.ConfigDict
    sizes: dict[str, dict[str, Any]]
    anchor_size: str
    pretrain_steps: int
    checkpoints: tuple[int, ...]
    methods: tuple[str, ...]
    data_sizes: dict[str, tuple[int, ...]]
    pet_sizes: dict[str, tuple[int, ...]]
    default_pet: dict[str, int]
    seeds: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.config.name

    def points(self) -> list[Point]:
        """The grid: every factor swept around the anchor (the anchor size's final checkpoint
        and the default PET size), each crossed with every data size and seed; no repeats."""
        out: dict[str, Point] = {}
        final = self.pretrain_steps

        def add(method, size, step, pet):
            for n in self.data_sizes[method]:
                for seed in self.seeds:
                    p = Point(method, size, step, pet, n, seed)
                    out.setdefault(p.run_id, p)

        for method in self.methods:
            pet = self.default_pet.get(method)
            for size in self.sizes:  # model-size factor
                add(method, size, final, pet)
            for step in self.checkpoints:  # pretraining-data factor
                add(method, self.anchor_size, step, pet)
            for value in self.pet_sizes.get(method, ()):  # PET-size factor
                add(method, self.anchor_size, final, value)
        return list(out.values())


def parse(config: ml_collections.ConfigDict) -> Study:
    """Checks a study config; every problem is a StudyError naming its key."""
    for key in ("name", "task", "pretrain", "finetune", "heldout", "fit"):
        if key not in config:
            raise StudyError(key, "missing")
    pre, ft = config.pretrain, config.finetune
    sizes = {name: dict(v) for name, v in dict(pre.sizes).items()}
    if not sizes:
        raise StudyError("pretrain.sizes", "names no model size")
    for name in sizes:
        _check_size_name(name)
    anchor = pre.anchor_size
    if anchor not in sizes:
        raise StudyError("pretrain.anchor_size", f"{anchor!r} is not one of {sorted(sizes)}")
    steps = int(pre.num_steps)
    checkpoints = tuple(sorted({int(s) for s in pre.checkpoints} | {steps}))
    for s in checkpoints:
        if not 0 < s <= steps:
            raise StudyError("pretrain.checkpoints", f"step {s} is not in 1..{steps} "
                             "(pretrain.num_steps)")
    methods = tuple(ft.methods)
    for m in methods:
        if m not in METHODS:
            raise StudyError("finetune.methods", f"unknown method {m!r}; methods: {list(METHODS)}")
        if m not in ft.configs:
            raise StudyError("finetune.configs", f"no config file for method {m!r}")
    data = ft.data_sizes
    data_sizes = {m: tuple(int(n) for n in (data[m] if isinstance(data, Mapping) or hasattr(
        data, "keys") else data)) for m in methods}
    for m, ns in data_sizes.items():
        if not ns or min(ns) < 1:
            raise StudyError("finetune.data_sizes", f"{m}: needs positive sizes, got {ns}")
    pet_sizes = {m: tuple(int(v) for v in dict(ft.pet_sizes).get(m, ())) for m in methods
                 if m in PET_KNOB}
    default_pet = {}
    for m in methods:
        if m in PET_KNOB:
            base = load_run_config(ft.configs[m], f"finetune.configs.{m}")
            apply_overrides(base, dict(ft.get("overrides", {})), "finetune.overrides")
            default_pet[m] = int(get_dotted(base, PET_KNOB[m][0]))
    study = Study(config=config, sizes=sizes, anchor_size=anchor, pretrain_steps=steps,
                  checkpoints=checkpoints, methods=methods, data_sizes=data_sizes,
                  pet_sizes=pet_sizes, default_pet=default_pet, seeds=tuple(int(s) for s in ft.seeds))
    _check_heldout(study)
    check_fit(config.fit)
    return study


def _check_size_name(name: Any) -> None:
    """A size name becomes runs/pretrain/<name>: a plain name, never a path."""
    if not isinstance(name, str) or not SIZE_NAME.fullmatch(name) or ".." in name:
        raise StudyError("pretrain.sizes", f"size name {name!r} is not a plain name (letters, "
                         "digits, '_', '-' and '.', starting with a letter or digit, no '..'): "
                         "it names the run's directory under runs/pretrain/")


def _check_heldout(study: Study) -> None:
    """Held-out values must be values of the grid."""
    held = dict(study.config.heldout)
    grids = {
        "model_size": list(study.sizes),
        "pretrain_step": list(study.checkpoints),
        "finetune_examples": sorted({n for ns in study.data_sizes.values() for n in ns}),
        "pet_size": sorted({v for m in study.pet_sizes for v in
                            study.pet_sizes[m] + (study.default_pet[m],)}),
    }
    for key, value in held.items():
        if key not in grids:
            raise StudyError(f"heldout.{key}", f"unknown factor; one of {sorted(grids)}")
        if value in (None, "max", "min"):
            continue
        if value not in grids[key]:
            raise StudyError(f"heldout.{key}", f"{value!r} is not in the grid {grids[key]}")


def law_names(value: Any) -> list[str]:
    """Law names given as a list, or as one comma-separated string (as scaling.fit --law)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, Sequence):
        return list(value)
    return []


def check_fit(fit: Mapping[str, Any]) -> None:
    """The fit settings scaling.fit will be given: known laws and preset, draws >= 0, a target
    that is a measurement. Checked before any run, so a typo cannot cost a study."""
    from scaling import laws, procedures

    fit = dict(fit)
    for key in fit:
        if key not in FIT_KEYS:
            raise StudyError(f"fit.{key}", f"unknown setting; the fit takes {list(FIT_KEYS)}")
    for key in ("laws", "preset", "bootstrap"):
        if key not in fit:
            raise StudyError(f"fit.{key}", "missing")
    for key in ("laws", "curve_law"):
        if fit.get(key) is None and key == "curve_law":
            continue
        names = law_names(fit.get(key))
        if not names:
            raise StudyError(f"fit.{key}", f"a list of law names, got {fit.get(key)!r}")
        for name in names:
            if name not in laws.LAWS:
                raise StudyError(f"fit.{key}", f"unknown law {name!r}; laws: {sorted(laws.LAWS)}")
    if fit["preset"] not in procedures.PRESETS:
        raise StudyError("fit.preset", f"unknown preset {fit['preset']!r}; presets: "
                         f"{sorted(procedures.PRESETS)}")
    for key in ("bootstrap", "seed"):
        value = fit.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise StudyError(f"fit.{key}", f"a whole number >= 0, got {value!r}")
    target = fit.get("target", "test_loss")
    if not isinstance(target, str) or not target or target in NOT_TARGETS:
        raise StudyError("fit.target", f"{target!r} is not a measurement of the runs (e.g. "
                         "test_loss, dev_loss, bleu)")
