"""An adapter on disk: its arrays in `adapter_model.npz` and its settings in
`adapter_config.json` (Hugging Face PEFT's field names), written atomically.

Array names are '/'-joined parameter paths in the per-layer layout
('layers/0/attention/q_proj/lora_a'), so an adapter trained with scanned layers loads into an
unscanned model and back.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.npz"


def _to_numpy(x) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32)


def flatten(tree: dict, prefix: str = "", leaf=_to_numpy) -> dict[str, Any]:
    """A nested pure dict -> {'a/b/c': leaf(array)} (float32 numpy arrays by default)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/", leaf))
        else:
            out[name] = leaf(value)
    return out


def unflatten(arrays: dict[str, np.ndarray]) -> dict:
    """The inverse of `flatten`; all-digit path parts become int keys (layer indices)."""
    tree: dict = {}
    for name, value in arrays.items():
        parts = [int(p) if p.isdigit() else p for p in name.split("/")]
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write(directory: str | os.PathLike, arrays: dict[str, np.ndarray], config: dict[str, Any]
          ) -> Path:
    """Writes the two files into `directory` (created if needed); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / WEIGHTS_FILE, lambda f: np.savez(f, **arrays))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / CONFIG_FILE, lambda f: f.write(text.encode()))
    return directory


def read(directory: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays by path, config) of an adapter directory written by `write`."""
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"adapter directory {str(directory)!r} has no {name}")
    config = json.loads((directory / CONFIG_FILE).read_text())
    with np.load(directory / WEIGHTS_FILE) as data:
        arrays = {name: data[name] for name in data.files}
    return arrays, config
