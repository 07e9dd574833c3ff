"""Writing a folder so that an interrupted write leaves nothing half done."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import FactorkitError


def check_writable_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise FactorkitError(f"{path} already exists; choose another folder or pass overwrite=True (--overwrite).")
    if path.exists() and not path.is_dir():
        raise FactorkitError(f"{path} is a file, not a folder; choose a folder path.")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it is renamed to ``path``.

    On any error the temporary folder is removed and ``path`` is untouched.
    """
    target = Path(path)
    check_writable_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write the file there. On success
    it is synced to disk and renamed over ``path`` (so readers see the old file
    or the whole new one, never a part); on any error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_size(path: str | os.PathLike, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern))
