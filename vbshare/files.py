"""Atomic file writes: every file vbshare writes goes through a temporary file in the same folder and a rename.
And `read_tensors`, the one way vbshare reads a `torch.save` file back: tensors and plain containers only.

A crash leaves either the old file or the new one, never half of one. The temporary file is created with the
mode a plain `open(path, "w")` would give (0o666 minus the user's umask), so colleagues on a shared filesystem
can read results exactly as they could read any other file the user writes (`tempfile.mkstemp` would make
every file private, 0o600).

A write that fails (disk full, permission denied, read-only filesystem) raises `WriteError`: one line naming the
path and the fix, and still the OSError it was (same errno). The old file, if any, is left as it was.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import secrets
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import VBShareError, WriteError

FILE_MODE = 0o666  # what open() asks for; the kernel subtracts the umask
_TEMP_ATTEMPTS = 100
# errno -> what to do about it (anything else: its own message, then "check the folder")
FIXES = {errno.ENOSPC: "free space on that disk, or write to another one",
         errno.EDQUOT: "free space within your disk quota, or write elsewhere",
         errno.EACCES: "make the folder writable for you, or write elsewhere",
         errno.EPERM: "make the folder writable for you, or write elsewhere",
         errno.EROFS: "the filesystem is read-only: write elsewhere"}


def write_error(err: OSError, path: str | os.PathLike, exact: bool = False) -> WriteError:
    """The one-line WriteError for `err`, met while writing `path`: named by the error's own file name (a file
    inside the folder `path`, say), or by `path` itself when `exact`."""
    if isinstance(err, WriteError):
        return err
    target = path if exact or not err.filename else err.filename
    cause = err.strerror or str(err) or type(err).__name__
    fix = FIXES.get(err.errno, "check the folder and try again")
    return WriteError(f"cannot write {target}: {cause}; {fix}", err.errno, err.strerror, str(target))


@contextlib.contextmanager
def writing(path: str | os.PathLike, exact: bool = False) -> Iterator[None]:
    """Any OSError inside the block becomes the WriteError of `path` (see `write_error`)."""
    try:
        yield
    except OSError as err:
        raise write_error(err, path, exact) from err


def _create_temp(folder: Path, name: str) -> tuple[int, Path]:
    """A new, exclusively created temporary file beside `name` in `folder`: (descriptor, path)."""
    for _ in range(_TEMP_ATTEMPTS):
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file for {name} in {folder}")


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    with writing(path, exact=True):  # named by the file asked for, not its temporary name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path.parent, path.name)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` with the same temporary-file-and-rename guarantee."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` to `path` (created when missing): a log such as a run's metrics."""
    with writing(path, exact=True), open(path, "a") as handle:
        handle.write(text)


def read_tensors(path: str | os.PathLike) -> Any:
    """`torch.load(path, weights_only=True)` onto the CPU: tensors and plain containers (dict, list, tuple, str,
    numbers, None) only. Anything else in the file (a pickled object, a function call) is refused in one line
    without being run: a checkpoint is data, never code."""
    path = Path(path)
    if not path.is_file():
        raise VBShareError(f"{path} is missing; the checkpoint is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # a global outside torch's weights-only allow-list: never imported
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1] if lines else "")
        raise VBShareError(f"{path} holds more than tensors and plain values ({reason.rstrip('.')}); it is not read: "
                           "a checkpoint is data, never code") from None
    except Exception as err:  # a damaged or foreign file: torch raises RuntimeError, KeyError, EOFError, ...
        first = (str(err).strip().splitlines() or [""])[0]
        raise VBShareError(f"{path} is not a readable tensor file ({type(err).__name__}: {first}); the checkpoint "
                           "is damaged") from None
