"""Atomic file writes: a temporary file in the target folder, fsync, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import InputError, UnsafeFileError


def _folder_of(target: Path) -> Path:
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder {folder} does not exist; create it first")
    return folder


def _unwritable(folder: Path, e: OSError) -> InputError:
    why = e.strerror or type(e).__name__
    return InputError(f"cannot write to {folder} ({why.lower()}); choose a writable output folder")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # make the rename durable where the OS allows
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def check_output(
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    *,
    force: bool = False,
) -> Path:
    """Refuse an output that is one of the inputs (always) or that exists (unless ``force``).

    Called before any work is done, so a doomed command fails at once and writes nothing.
    """
    target = Path(out)
    resolved = target.resolve()
    for src in inputs:
        if src is None:
            continue
        s = Path(src).resolve()
        if resolved == s or resolved in s.parents:  # replacing a folder would delete its files
            raise UnsafeFileError(
                f"the output {out} is (or holds) the input {src}; headgraft never overwrites its "
                "input: choose another -o path"
            )
    if not force and (target.exists() or target.is_symlink()):
        raise InputError(f"{target} already exists; choose another output or pass --force")
    _folder_of(target)
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over it.

    On any error the temporary file is removed, so no partial output is ever left behind.
    With ``force=False`` an existing ``path`` is refused.
    """
    target = Path(path)
    if not force and target.exists():
        raise InputError(f"{target} already exists; choose another output or pass --force")
    folder = _folder_of(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as e:  # permission denied, read-only file system, ...
        raise _unwritable(folder, e) from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 would hide the output from others
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        _fsync_folder(folder)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, force: bool = True) -> Iterator[Path]:
    """Like :func:`atomic_path` for a folder (a Hugging Face model directory, sharded weights).

    The folder is written under a temporary name beside ``path``; every file in it is fsynced
    before it is renamed into place. With ``force`` an existing ``path`` is replaced (moved
    aside first and deleted only once the new folder is in place).
    """
    target = Path(path)
    if not force and (target.exists() or target.is_symlink()):
        raise InputError(f"{target} already exists; choose another output or pass --force")
    folder = _folder_of(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder))
    except OSError as e:
        raise _unwritable(folder, e) from None
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        mode = 0o666 & ~_umask()
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb+") as f:
                    os.fsync(f.fileno())
                    os.fchmod(f.fileno(), mode)  # writers that use mkstemp leave 0600
        if target.exists() or target.is_symlink():
            trash = folder / f".{target.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(target, trash)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(trash, target)
                raise
            if trash.is_dir() and not trash.is_symlink():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink()
        else:
            os.replace(tmp, target)
        _fsync_folder(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
