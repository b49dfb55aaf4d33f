"""Writing files atomically: a crash or a bad input never leaves half a file or destroys the old one."""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from memorycore.errors import InputError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; when the block succeeds, rename it onto ``path``.

    Parent folders are created. The file gets the permissions a plain ``open(path, "w")`` would give (the umask's),
    not the private ones of a temporary file. If the block raises, the temporary file is removed and ``path`` is left
    as it was.

    Examples
    --------
    >>> with atomic_path("out/forecast.png") as tmp:      # doctest: +SKIP
    ...     figure.savefig(tmp)
    """
    path = Path(path)
    check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as error:  # what check_writable cannot see ahead
        raise InputError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        try:
            yield Path(tmp)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise  # e.g. an input that cannot be read: not ours to rename
            raise InputError(f"cannot write {path}: {error.strerror}") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        try:
            os.replace(tmp, path)
        except OSError as error:
            raise InputError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(path: str | os.PathLike) -> None:
    """Raise :class:`InputError` now if a file could not be written at ``path``: it is a folder, a file stands where
    a parent folder should be, or the nearest existing folder does not let us write. Callers that will work for a
    while before writing (training) call this first, so the work is not lost at the end."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a folder; give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: no permission to write in {folder} (or it is read-only)")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`) and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: figures go to files, so no display is needed (imported on use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | os.PathLike, *, dpi: int = 120, image_format: str = "png") -> Path:
    """Write a matplotlib ``figure`` to ``path`` atomically (see :func:`atomic_path`), then close it, also when
    writing fails, so that long runs drawing many figures do not keep them all in memory."""
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=dpi, format=image_format)
    finally:
        pyplot().close(figure)
    return Path(path)
