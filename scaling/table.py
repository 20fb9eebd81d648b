"""The tidy table: one row per finetuning run (or measured point), one column per quantity.

A small column store over numpy arrays (no pandas dependency). Text columns are object arrays;
every other column is float, with NaN for "not applicable" (e.g. PET size of an FMT run).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# The columns every finetuning table has, in order; generation metrics follow.
TASK, METHOD = "task", "method"
MODEL_PARAMS, PRETRAIN_TOKENS, PET_SIZE = "model_params", "pretrain_tokens", "pet_size"
FINETUNE_EXAMPLES, SEED = "finetune_examples", "seed"
DEV_LOSS, TEST_LOSS = "dev_loss", "test_loss"
CORE = (TASK, METHOD, MODEL_PARAMS, PRETRAIN_TOKENS, PET_SIZE, FINETUNE_EXAMPLES, SEED,
        DEV_LOSS, TEST_LOSS)
TEXT = (TASK, METHOD, "run")


class Table:
    """Named columns of equal length."""

    def __init__(self, columns: Mapping[str, Iterable[Any]]):
        self._cols: dict[str, np.ndarray] = {}
        n = None
        for name, values in columns.items():
            arr = _column(name, values)
            if n is not None and arr.size != n:
                raise ValueError(f"column {name!r} has {arr.size} values, others have {n}")
            n = arr.size
            self._cols[name] = arr
        self._n = n or 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._cols)

    def __len__(self) -> int:
        return self._n

    def __contains__(self, name: str) -> bool:
        return name in self._cols

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self._cols[name]
        except KeyError:
            raise KeyError(f"the table has no column {name!r}; columns: {list(self._cols)}") \
                from None

    def where(self, mask: np.ndarray) -> "Table":
        mask = np.asarray(mask)
        return Table({k: v[mask] for k, v in self._cols.items()})

    def with_column(self, name: str, values: Iterable[Any]) -> "Table":
        return Table({**self._cols, name: values})

    def concat(self, other: "Table") -> "Table":
        if set(self.names) != set(other.names):
            raise ValueError(f"cannot concatenate tables with columns {self.names} and "
                             f"{other.names}")
        return Table({k: np.concatenate([self[k], other[k]]) for k in self.names})

    def to_csv(self, path: str | os.PathLike) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.names)
            for i in range(self._n):
                w.writerow([_cell(self._cols[k][i]) for k in self.names])

    @classmethod
    def read_csv(cls, path: str | os.PathLike, text: Sequence[str] = ()) -> "Table":
        """Reads a CSV; columns whose cells all parse as numbers (or are empty) become floats."""
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            raise ValueError(f"{path}: empty CSV file (no header)")
        header, body = rows[0], rows[1:]
        for i, r in enumerate(body):
            if len(r) != len(header):
                raise ValueError(f"{path}: line {i + 2} has {len(r)} cells, the header has "
                                 f"{len(header)}")
        cols = {}
        for j, name in enumerate(header):
            cells = [r[j] for r in body]
            if name in TEXT or name in text:
                cols[name] = np.array(cells, dtype=object)
                continue
            try:
                cols[name] = np.array([float(c) if c != "" else math.nan for c in cells])
            except ValueError:
                cols[name] = np.array(cells, dtype=object)
        return cls(cols)


def configuration_ids(columns: Sequence[np.ndarray]) -> np.ndarray:
    """One integer per distinct row of the given columns, in order of first appearance
    (NaN equals NaN, so runs without a PET size group together)."""
    keys = list(zip(*[np.where(np.isnan(c), -np.inf, c).tolist() if c.dtype.kind == "f"
                      else c.tolist() for c in columns]))
    lookup: dict[Any, int] = {}
    return np.array([lookup.setdefault(k, len(lookup)) for k in keys], int)


def _column(name, values):
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values)
    if name in TEXT or arr.dtype.kind in "OUS":
        return np.array([str(v) for v in arr.ravel()], dtype=object)
    return arr.astype(float).ravel()


def _cell(v):
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return ""
        return repr(float(v))
    return str(v)
