"""Shared plumbing: the cache directory, atomic writes, checksums and input checks.

Every file featmatch writes goes through :func:`atomic_write_bytes` (or a helper built
on it): the data is written to a temporary file in the same directory, flushed, fsynced
and then renamed over the target, so an interrupted run never leaves a partial file
under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "cache_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save",
    "sha256_file",
    "tokens_sha256",
    "check_finite",
]

CACHE_ENV = "FEATMATCH_CACHE"


def cache_dir(*parts: str, create: bool = True) -> Path:
    """Return featmatch's cache directory (or a subfolder of it).

    The root is ``$FEATMATCH_CACHE`` when set, else ``$XDG_CACHE_HOME/featmatch``,
    else ``~/.cache/featmatch``. Weights, zoos and activation caches live here and are
    never committed.
    """
    root = os.environ.get(CACHE_ENV)
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "featmatch"
    path = base.joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_save(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` then atomically rename ``tmp_path`` to ``path``.

    ``writer`` receives a temporary path in the target's directory (so the rename is
    atomic on POSIX) that ends with the target's suffix. If it raises, the temporary
    file is removed and ``path`` is left untouched. A ``path`` that is a directory is
    refused up front (``IsADirectoryError`` naming it, not the temporary file).
    """
    path = Path(path)
    if path.is_dir():  # else os.replace fails with IsADirectoryError naming the temporary file
        raise IsADirectoryError(f"{path} is a directory; give a file path to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the real extension last: np.savez and papermill look at it
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the final file the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        writer(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_save(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2, sort_keys: bool = True) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (keys sorted unless ``sort_keys=False``)."""
    return atomic_write_text(
        path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=_json_default) + "\n"
    )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokens_sha256(tokens: Any, *, terminated: bool = False) -> str:
    """Hex SHA-256 of a token batch: its shape and its ids as contiguous int64.

    The digest is taken over ``str(shape).encode()`` followed by the int64 bytes. Two
    framings are in use as cache keys, and both are kept byte for byte:

    * ``terminated=False``: the two parts back to back (the activation-statistics cache
      key, :func:`featmatch.lm.activations.cache_key`);
    * ``terminated=True``: each part followed by a ``NUL`` byte (the token hash a
      :class:`featmatch.semantic.ReferenceSpace` stores to tie itself to its batch).

    Parameters
    ----------
    tokens : torch.Tensor or array-like of int
        Token ids, any shape (a tensor is moved to the CPU first).
    terminated : bool
        Use the NUL-terminated framing.

    Returns
    -------
    str
        64 hex digits.
    """
    if hasattr(tokens, "cpu") and callable(tokens.cpu):
        tokens = tokens.cpu()
    arr = np.ascontiguousarray(np.asarray(tokens), dtype=np.int64)
    end = b"\x00" if terminated else b""
    h = hashlib.sha256()
    h.update(str(arr.shape).encode("utf-8") + end)
    h.update(arr.tobytes() + end)
    return h.hexdigest()


def check_finite(name: str, array: Any) -> None:
    """Raise ``ValueError`` naming ``name`` if ``array`` holds NaN or Inf."""
    import torch

    if isinstance(array, torch.Tensor):
        bad = ~torch.isfinite(array)
        n_bad = int(bad.sum())
    else:
        arr = np.asarray(array)
        n_bad = int((~np.isfinite(arr)).sum()) if arr.dtype.kind in "fc" else 0
    if n_bad:
        raise ValueError(f"{name} contains {n_bad} non-finite values (NaN or Inf)")
