"""Run directories: local paths, or gs:// URLs on TPU pods, through etils.epath.

`pathlib.Path('gs://bucket/run')` collapses the '//' into 'gs:/bucket/run', a local path. Every
workdir, checkpoint directory and record path of the trainer goes through `as_path` instead,
which keeps a URL a URL (epath reads and writes it through its GCS backend: tf.io.gfile when
TensorFlow is installed, else fsspec's gcsfs) and makes a local path absolute. Orbax and
TensorBoard's writer take these paths as they are.
"""

from __future__ import annotations

import os
import tempfile

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL (gs://..., s3://...), False for a local path."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a URL as it is, a local path with ~ expanded, made absolute."""
    text = os.fspath(path)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replaces the file at `path` with `text` so that a reader, or a kill, never sees half of it.

    Locally: a temporary file in the same directory, flushed to disk, then renamed over the
    target. On object stores an object appears whole once its upload completes, so a plain write
    is already atomic."""
    target = as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(target):
        target.write_text(text)
        return
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        epath.Path(tmp).unlink(missing_ok=True)
        raise


def tree_bytes(path: str | os.PathLike) -> int:
    """The bytes of all files under `path` (a checkpoint step's size on disk or in the bucket)."""
    total = 0
    for directory, _, files in as_path(path).walk():
        total += sum((directory / name).stat().length for name in files)
    return total
