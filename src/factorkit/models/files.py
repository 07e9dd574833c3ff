"""The one writer: folders and files appear whole or not at all, and factorkit
replaces only what it wrote itself.

A folder is written into a temporary sibling ``.NAME.tmp-HOST-PID-RANDOM``,
synced to disk, then renamed over ``NAME``. A write killed half way leaves
only such a temporary; the next write to the same target removes those whose
process (on this host) is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator

from ..errors import FactorkitError

FACTORKIT_JSON = "factorkit.json"
# written by atomic_dir into every folder whose files do not already say that
# factorkit wrote it (PEFT folders, caches), so that overwrite=True can tell
# factorkit's folders from the user's
MARKER = ".factorkit"


def written_by_factorkit(path: Path) -> bool:
    """A folder factorkit wrote: the marker, a saved model (factorkit.json), or a
    WaRA adapter (adapter_config.json with the factorkit_version that wrote it)."""
    if (path / MARKER).is_file() or (path / FACTORKIT_JSON).is_file():
        return True
    try:
        return "factorkit_version" in json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_writable_target(path: str | os.PathLike, overwrite: bool, *,
                          protect: str | os.PathLike | None = None) -> None:
    """Refuse, before any work, a target that cannot or must not be written.

    ``protect`` is the input model: the target may neither be it nor hold it."""
    path = Path(path)
    if protect is not None and Path(protect).exists():  # a hub id or built-in name is no folder to protect
        target, source = path.resolve(), Path(protect).resolve()
        if source == target or target in source.parents:
            raise FactorkitError(f"{path} is or holds the input model {protect}; choose another output folder.")
    if path.exists() and not path.is_dir():
        raise FactorkitError(f"{path} is a file, not a folder; choose a folder path.")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FactorkitError(f"{path} already exists; choose another folder or pass overwrite=True (--overwrite).")
        if not written_by_factorkit(path):
            raise FactorkitError(f"{path} holds files factorkit did not write; choose another folder or empty it.")
    _check_parent_writable(path)


def check_writable_file(path: str | os.PathLike, what: str = "the file") -> None:
    """Refuse, before any work, a file target that cannot be written: a folder, a
    path under a file, or one in a folder not writable. Missing folders on the way
    are created when the file is written, as for an output folder."""
    path = Path(path)
    if path.is_dir():
        raise FactorkitError(f"{what} {path} is a folder; name a file to write.")
    _check_parent_writable(path)


def _check_parent_writable(path: Path) -> None:
    # the temporary folder is made beside the target: probe the nearest folder that exists on the way there
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise FactorkitError(f"{path} cannot be created because {ancestor} is a file; choose another folder.")
    probe = ancestor / f".factorkit-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        raise FactorkitError(f"cannot write {path}: {ancestor} is not writable ({exc.strerror}); "
                             "choose a folder you can write to.") from None


def _temp_path(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove_stale(target: Path) -> None:
    """Remove the temporaries of earlier writes to ``target`` whose process has died."""
    host = socket.gethostname()
    for leftover in target.parent.iterdir():
        for kind in ("tmp", "old"):
            prefix = f".{target.name}.{kind}-"
            if not leftover.name.startswith(prefix):
                continue
            owner, _, pid = leftover.name[len(prefix):].rpartition("-")[0].rpartition("-")
            if owner != host or not pid.isdigit() or _alive(int(pid)):
                continue  # another host's, or a live write's
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _write_error(target: Path, exc: OSError) -> FactorkitError:
    reason = exc.strerror or first_sentence(exc)  # not str(exc): it repeats the errno and the path
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return FactorkitError(f"not enough space to write {target}: {reason}; free space or choose another folder.")
    return FactorkitError(f"could not write {target}: {reason}; check the folder or choose another one.")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, *,
               protect: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it is synced and renamed to ``path``.

    On any error the temporary folder is removed and ``path`` is untouched; an
    OSError while writing (a full disk) becomes one FactorkitError.
    ``overwrite`` replaces only an empty folder or one factorkit wrote;
    ``protect`` (the input model) is never replaced.
    """
    target = Path(path)
    check_writable_target(target, overwrite, protect=protect)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = _temp_path(target, "tmp")
    try:
        tmp.mkdir()  # not tempfile.mkdtemp: its 0700 would ignore the user's umask
        try:
            yield tmp
            if not written_by_factorkit(tmp):  # a PEFT folder, a cache: nothing in it says whose it is
                (tmp / MARKER).write_text("written by factorkit, which may replace this folder when asked to\n")
            _sync_tree(tmp)
        except OSError as exc:
            raise _write_error(target, exc) from exc
        if target.exists():
            old = _temp_path(target, "old")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # never leave the target deleted
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
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
    _remove_stale(target)
    tmp = _temp_path(target, "tmp")
    try:
        try:
            yield tmp
            _settle(tmp, _umask())
        except OSError as exc:
            raise _write_error(target, exc) from exc
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sync_tree(folder: Path) -> None:
    umask = _umask()
    for root, _, names in os.walk(folder):
        for name in names:
            _settle(Path(root) / name, umask)
        _fsync_dir(Path(root))


def _settle(file: Path, umask: int) -> None:
    """Sync a written file and widen its permissions to what the umask allows
    (safetensors writes its files 0600, whatever the umask)."""
    os.chmod(file, os.stat(file).st_mode & 0o7777 | 0o666 & ~umask)
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    umask = os.umask(0o22)  # the only way to read it: set and restore
    os.umask(umask)
    return umask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(file: Path) -> dict:
    """A JSON object from ``file``; a missing or unreadable file is one FactorkitError naming it."""
    if not file.is_file():
        raise FactorkitError(f"{file} is missing; the folder is damaged, save it again.")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FactorkitError(f"{file} is not valid JSON ({first_sentence(exc)}); the folder is damaged, "
                             "save it again.") from None
    if not isinstance(data, dict):
        raise FactorkitError(f"{file} holds a JSON {type(data).__name__}, not an object; the folder is damaged, "
                             "save it again.")
    return data


def first_sentence(exc: BaseException) -> str:
    """An exception's message cut to fit inside one sentence of ours."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    # "Validation error for field 'x':" and the like introduce the reason on the next line
    text = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    return text.split(". ")[0].rstrip(".:") or type(exc).__name__


def folder_size(path: str | os.PathLike, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern))
