"""Module surgery shared by the finetuning methods: finding submodules by path, swapping them,
and re-housing a module's attributes in an instance of a subclass.

A method that adds behaviour to a Transformer (LoRA's dropout keys, prompt tuning's prompt)
builds an instance of a Transformer subclass that *adopts* the base model's attributes, so the
parameters keep their paths: the frozen part of a finetuning run has exactly the structure of a
pretrained checkpoint, and the new parameters are the only extra leaves.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flax import nnx

PathParts = tuple[Any, ...]


def adopt(new: nnx.Module, old: nnx.Module) -> None:
    """Moves every attribute of `old` onto `new` (called from `new.__init__`), keeping which
    attributes are pytree data and which are static."""
    state = vars(old)
    data = {name for name, is_data in state["_pytree__nodes"].items() if is_data}
    for name, value in state.items():
        if name.startswith("_pytree__"):
            continue
        setattr(new, name, nnx.data(value) if name in data else value)


def path_name(path: PathParts) -> str:
    """'layers/0/attention/q_proj' for the path parts of a submodule."""
    return "/".join(str(part) for part in path)


def modules_of_type(model: nnx.Module, kind: type) -> Iterator[tuple[PathParts, Any]]:
    """(path, module) for every submodule of `model` that is an instance of `kind`, in order."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, kind):
            yield tuple(path), module


def submodule(model: nnx.Module, path: PathParts) -> Any:
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def replace_submodule(model: nnx.Module, path: PathParts, new: nnx.Module) -> None:
    parent = submodule(model, path[:-1])
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)
