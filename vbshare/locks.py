"""One writer per folder: a run folder of `vbshare.train` and a comparison's `compare.out` are written by one
process at a time.

    with hold(folder, hint="give this run another folder (hydra.run.dir=...)"):
        ...  # write into folder

A second process that tries to hold the same folder is refused at once (no waiting) with `FolderBusy`, one
line naming the folder and the holder's pid. The lock is an advisory `flock` taken through the `filelock`
library on `<folder>/.writer.lock`; the kernel releases it when the process ends however it ends (kill -9
included), so the lock of a killed run is simply taken over by the next one. Who holds it is recorded beside it
in `<folder>/.writer.json` (pid, host, command line, start time), written atomically once the lock is held and
removed on release: the lock file itself is no place for data (a lock implementation may truncate or remove
it). The owner file only feeds the message; it never decides who may write, so one left behind by a killed
process blocks nothing.

Holding is counted per process: a process that holds a folder may hold it again (the command line takes it
before Hydra writes .hydra/ and its log there, `run_training` again for in-process callers), and the folder is
let go when the outermost holder ends.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import filelock

from .errors import VBShareError
from .files import atomic_write

LOCK_FILE = ".writer.lock"  # flock'ed while a process writes the folder
OWNER_FILE = ".writer.json"  # who holds it: {"pid", "host", "command", "started"}
LOCK_FILES = (LOCK_FILE, OWNER_FILE)
OWNER_WAIT_S = 2.0  # a holder writes its owner file right after taking the lock: how long a refused one waits for it
OWNER_POLL_S = 0.05
COMMAND_CHARS = 160  # of the holder's command line in the message


class FolderBusy(VBShareError):
    """Another process is writing the folder."""


@dataclass
class _Held:
    lock: filelock.BaseFileLock
    depth: int  # nested holds by this process
    created: bool  # the folder did not exist before the first hold


_held: dict[Path, _Held] = {}
_held_guard = threading.Lock()  # compare's worker threads hold their runs' folders side by side


def first_process() -> bool:
    """Whether this is process 0 of its launch (torchrun and accelerate set RANK / LOCAL_RANK): a data-parallel
    run is one writer, its first process; read from the environment, so it is known before the engine starts."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def owner_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.orig_argv),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def acquire(folder: str | os.PathLike, hint: str) -> Path:
    """Hold `folder` (created if missing) for this process; `FolderBusy` if another process holds it, its message
    ending with `hint` (how to proceed). Returns the resolved folder, the key for `release`."""
    folder = Path(folder).resolve()
    with _held_guard:
        held = _held.get(folder)
        if held is not None:
            held.depth += 1
            return folder
        created = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise VBShareError(f"cannot write the folder {folder}: {err.strerror}; choose another folder") from None
        lock = filelock.FileLock(folder / LOCK_FILE, timeout=0, thread_local=False)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise FolderBusy(f"{folder} is being written by {describe(holder(folder))}; wait for it to end, "
                             f"or {hint}") from None
        try:
            atomic_write(folder / OWNER_FILE, json.dumps(owner_record()).encode())
        except BaseException:
            lock.release()
            raise
        _held[folder] = _Held(lock, 1, created)
    return folder


def release(folder: Path) -> None:
    """End one hold of `folder` (as `acquire` returned it); the last one removes the owner file and unlocks. A
    folder that this process created and left empty is removed again (e.g. a command refused before it ran)."""
    with _held_guard:
        held = _held[folder]
        held.depth -= 1
        if held.depth:
            return
        del _held[folder]
        (folder / OWNER_FILE).unlink(missing_ok=True)
        held.lock.release()
        if held.created:
            with contextlib.suppress(OSError):
                if set(os.listdir(folder)) <= {LOCK_FILE}:
                    (folder / LOCK_FILE).unlink(missing_ok=True)
                    folder.rmdir()


@contextlib.contextmanager
def hold(folder: str | os.PathLike, hint: str) -> Iterator[Path]:
    """`acquire` for the duration of a `with` block; yields the resolved folder."""
    resolved = acquire(folder, hint)
    try:
        yield resolved
    finally:
        release(resolved)


def holder(folder: Path) -> dict[str, Any] | None:
    """The owner record of a held folder: read (as JSON, never executed) once the holder has written it, up to
    OWNER_WAIT_S; a record of a process no longer running is returned only if no newer one appears."""
    deadline, record = time.monotonic() + OWNER_WAIT_S, None
    while True:
        with contextlib.suppress(OSError, ValueError):
            found = json.loads((folder / OWNER_FILE).read_text())
            if isinstance(found, dict) and isinstance(found.get("pid"), int):
                record = found
                if running(record) is not False:
                    return record
        if time.monotonic() > deadline:
            return record
        time.sleep(OWNER_POLL_S)


def running(record: dict[str, Any]) -> bool | None:
    """Whether the recorded process still runs (None: it runs on another host, which this one cannot see)."""
    if record.get("host") != socket.gethostname():
        return None
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def describe(record: dict[str, Any] | None) -> str:
    """The holder in a few words: 'pid 4242 on node3 (python -m vbshare.train ..., since 2026-01-05T10:00:00+01:00)'."""
    if record is None:
        return "another process (it has not recorded itself in its owner file)"
    command = " ".join(str(record.get("command", "?")).split())  # one line whatever the arguments hold
    if len(command) > COMMAND_CHARS:
        command = command[:COMMAND_CHARS - 3] + "..."
    gone = ("; that process has ended but one it started still holds the lock: end it"
            if running(record) is False else "")
    return f"pid {record['pid']} on {record.get('host', '?')} ({command}, since {record.get('started', '?')}{gone})"
