"""The tidy table: one row per finetuning run (or measured point), one column per quantity.

A small column store over numpy arrays (no pandas dependency). Text columns are object arrays;
every other column is float, with NaN for "not applicable" (e.g. PET size of an FMT run).

`load` reads a table of measured points for fitting, in either layout:

  tidy  one row per point: finetune_examples, test_loss (or the fitted target) and
        model_params or model (an id); optional task, method, pretrain_tokens, pet_size, seed
        and any other columns.
  wide  one row per model, as public benchmarks publish them: the model id in the `model`
        column (else the first column), its parameter count in `model_params` or `size`,
        and one loss column per finetuning-set size, named by that size (0 = the base model
        without finetuning); empty cells are points not measured; other columns (family)
        are kept per row.

A missing task is the file's stem, a missing method "finetune". Each row keeps where it came
from (`source`, e.g. "flan.csv line 7"), and errors name the file, line, column and value.
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
MODEL, SOURCE = "model", "source"  # a model's id (equal-size models stay apart); a row's origin
TEXT = (TASK, METHOD, "run", MODEL, SOURCE)
SIZE_COLUMNS = (MODEL_PARAMS, "size")  # a wide table's parameter count, by preference
LAYOUTS = ("auto", "tidy", "wide")
DEFAULT_METHOD = "finetune"


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
        header, body = _read_rows(path, os.fspath(path), need_rows=False)
        body = [r for _, r in body]
        cols = {}
        for j, name in enumerate(header):
            cells = [r[j] for r in body]
            if name in TEXT or name in text:
                cols[name] = np.array(cells, dtype=object)
            else:
                cols[name] = _numbers_or_text(cells)
        return cls(cols)


def load(path: str | os.PathLike, *, layout: str = "auto", target: str = TEST_LOSS) -> Table:
    """A table of measured points for fitting, tidy or wide (see the module docstring).

    layout 'auto' reads a table as wide when two or more column names are numbers (sizes).
    Raises ValueError naming the file, line, column and value of anything it cannot use.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown table layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    name = os.path.basename(os.fspath(path))
    header, body = _read_rows(path, name)
    sizes = [j for j, h in enumerate(header) if _size_header(h) is not None]
    if layout == "wide" or (layout == "auto" and len(sizes) >= 2):
        cols, lines, file_names = _unstack(header, body, sizes, name, target)
    else:
        cols = {h: [r[j] for _, r in body] for j, h in enumerate(header)}
        lines, file_names = [line for line, _ in body], {}
    return _points(cols, lines, name, target, os.path.splitext(name)[0], file_names)


def row_labels(tab: Table, rows: Sequence[int] | np.ndarray) -> list[str]:
    """How messages name rows: the line they came from, their run, or their position."""
    rows = np.asarray(rows, int)
    if SOURCE in tab:
        return [str(v) for v in tab[SOURCE][rows]]
    if "run" in tab:
        return [f"run {v}" for v in tab["run"][rows]]
    return [f"row {i}" for i in rows]


def describe_rows(tab: Table, rows: Sequence[int] | np.ndarray, limit: int = 5) -> str:
    labels = row_labels(tab, rows)
    more = f" and {len(labels) - limit} more" if len(labels) > limit else ""
    return ", ".join(labels[:limit]) + more


def _read_rows(path, name, need_rows=True) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the (line number, cells) of every non-blank row; errors name lines."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{name}: empty file (no header)")
    (_, header), body = rows[0], rows[1:]
    header = [h.strip() for h in header]
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise ValueError(f"{name}: column name(s) {dup} appear more than once in the header")
    for line, r in body:
        if len(r) != len(header):
            raise ValueError(f"{name} line {line}: {len(r)} cells, the header has "
                             f"{len(header)}")
    if not body and need_rows:
        raise ValueError(f"{name}: a header and no data rows: nothing to fit")
    return header, body


def _size_header(h: str) -> float | None:
    try:
        v = float(h)
    except ValueError:
        return None
    return v if math.isfinite(v) and v >= 0 else None


def _unstack(header, body, sizes, name, target):
    """A wide table's rows as tidy columns of raw cells (one row per measured loss)."""
    if not sizes:
        raise ValueError(f"{name}: read as wide, but no column name is a finetuning-set size "
                         f"(a number); columns: {header}")
    size_col = next((c for c in SIZE_COLUMNS if c in header), None)
    if size_col is None:
        raise ValueError(f"{name}: a wide table needs each model's parameter count in a column "
                         f"named {' or '.join(SIZE_COLUMNS)}; columns: {header}")
    id_col = MODEL if MODEL in header else header[0]
    if _size_header(id_col) is not None or id_col == size_col:
        raise ValueError(f"{name}: a wide table's first column (or one named {MODEL!r}) names "
                         f"the model; here it is {id_col!r}")
    kept = [h for j, h in enumerate(header) if j not in sizes and h not in (id_col, size_col)]
    clash = sorted(set(kept) & {MODEL_PARAMS, FINETUNE_EXAMPLES, target, SOURCE})
    if clash:
        raise ValueError(f"{name}: a wide table's columns {clash} would clash with the tidy "
                         "columns it is read into")
    cols: dict[str, list] = {k: [] for k in (MODEL, MODEL_PARAMS, FINETUNE_EXAMPLES, target,
                                             *kept)}
    lines = []
    index = {h: j for j, h in enumerate(header)}
    for line, r in body:
        for j in sizes:
            cell = r[j].strip()
            if cell == "":
                continue  # not measured
            loss = _number(cell, name, line, header[j], "a loss", positive=True)
            cols[MODEL].append(r[index[id_col]].strip())
            cols[MODEL_PARAMS].append(r[index[size_col]])
            cols[FINETUNE_EXAMPLES].append(_size_header(header[j]))
            cols[target].append(loss)
            for h in kept:
                cols[h].append(r[index[h]])
            lines.append(line)
    if not lines:
        raise ValueError(f"{name}: every loss cell is empty: nothing to fit")
    return cols, lines, {MODEL_PARAMS: size_col, MODEL: id_col}


# Numeric columns of a fit's table: (what a cell holds, required, lower bound, bound included).
_RULES = {FINETUNE_EXAMPLES: ("a number of finetuning examples", True, 0.0, True),
          MODEL_PARAMS: ("a parameter count", True, 0.0, False),
          PRETRAIN_TOKENS: ("a number of pretraining tokens", False, 0.0, False),
          PET_SIZE: ("a PET size", False, 0.0, False),
          SEED: ("a seed", False, -math.inf, True)}


def _points(cols, lines, name, target, task, file_names) -> Table:
    n = len(lines)
    need = [c for c in (FINETUNE_EXAMPLES, target) if c not in cols]
    if MODEL_PARAMS not in cols and MODEL not in cols:
        need.append(f"{MODEL_PARAMS} (or {MODEL}, an id)")
    if need:
        raise ValueError(
            f"{name}: no column {', '.join(map(repr, need))}. A tidy table has one row per "
            f"point with columns {FINETUNE_EXAMPLES}, {target} and {MODEL_PARAMS} or {MODEL}; "
            "a wide table has one row per model, a size column and one loss column per "
            f"finetuning-set size named by the number (columns here: {list(cols)})")
    out: dict[str, Any] = {}
    for col, cells in cols.items():
        where = file_names.get(col, col)
        if col in TEXT:
            out[col] = [str(c).strip() for c in cells]
        elif col == target:
            out[col] = [_number(c, name, line, where, "a loss", positive=True)
                        for c, line in zip(cells, lines)]
        elif col in _RULES:
            what, required, low, closed = _RULES[col]
            out[col] = [_number(c, name, line, where, what, required=required, low=low,
                                closed=closed) for c, line in zip(cells, lines)]
        elif col in (DEV_LOSS, TEST_LOSS):
            out[col] = [_number(c, name, line, where, "a loss", required=False)
                        for c, line in zip(cells, lines)]
        else:  # other columns (metrics, notes): numbers when every cell is one
            out[col] = _numbers_or_text(cells)
    defaults = {TASK: [task] * n, METHOD: [DEFAULT_METHOD] * n,
                PRETRAIN_TOKENS: [math.nan] * n, PET_SIZE: [math.nan] * n, SEED: [0.0] * n,
                MODEL_PARAMS: [math.nan] * n, SOURCE: [f"{name} line {i}" for i in lines]}
    for col, values in defaults.items():
        out.setdefault(col, values)
    return Table(out)


def _number(cell, name, line, column, what, *, required=True, positive=False, low=0.0,
            closed=False) -> float:
    text = str(cell).strip()
    if text == "" and not required:
        return math.nan
    try:
        v = float(text)
    except ValueError:
        v = None
    if positive:
        low, closed = 0.0, False
    ok = v is not None and (math.isfinite(v) or (not required and math.isnan(v)))
    if ok and math.isfinite(v) and (v < low or (v == low and not closed)):
        ok = False
    if not ok:
        bound = "" if low == -math.inf else (" >= 0" if closed else " > 0")
        got = "an empty cell" if text == "" else repr(text)
        raise ValueError(f"{name} line {line}, column {column!r}: expected {what}{bound}, "
                         f"got {got}")
    return v


def _numbers_or_text(cells):
    try:
        return np.array([float(c) if str(c).strip() != "" else math.nan for c in cells])
    except ValueError:
        return np.array([str(c) for c in cells], dtype=object)


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
