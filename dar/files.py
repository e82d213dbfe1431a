"""Writing files so that nothing half-written is ever read, and one writer per directory.

* :func:`atomic_path` / :func:`atomic_write_text`: write under a temporary name, fsync, rename into
  place; a crash leaves the old file (or none), never a torn one.
* :func:`directory_lock`: an exclusive lock on a run or output directory. The OS drops it when its
  process dies, so the lock file a killed process leaves behind is stale and simply taken over.
* :func:`check_free_space`: fail before a large write, naming what is needed and what is free.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from dar.errors import RunDirBusy

LOCK_NAME = ".lock"
_held: dict[Path, int] = {}  # directories this process holds, with nesting depth


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically, on error it
    is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _holder(lock_file: Path) -> str:
    try:
        info = json.loads(lock_file.read_text())
        return f"process {info['pid']} on {info['host']} ({info['purpose']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def try_directory_lock(directory: str | Path, purpose: str) -> Iterator[bool]:
    """Hold ``directory`` exclusively for this process (re-entrant within it); yields whether it was
    acquired (False: another live process holds it)."""
    directory = Path(directory).resolve()
    if directory in _held:
        _held[directory] += 1
        try:
            yield True
        finally:
            _held[directory] -= 1
        return
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        yield False
        return
    try:
        handle.seek(0)
        handle.truncate()  # a dead holder's record, if any: its lock died with it
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        _held[directory] = 1
        yield True
    finally:
        _held.pop(directory, None)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@contextlib.contextmanager
def directory_lock(directory: str | Path, purpose: str) -> Iterator[None]:
    """:func:`try_directory_lock` that raises :class:`RunDirBusy`, naming the holder, when busy."""
    with try_directory_lock(directory, purpose) as acquired:
        if not acquired:
            holder = _holder(Path(directory) / LOCK_NAME)
            raise RunDirBusy(f"{directory} is in use by {holder}; wait for it to finish or use another directory")
        yield


@contextlib.contextmanager
def job_directory_lock(directory: str | Path, purpose: str, env) -> Iterator[None]:
    """:func:`directory_lock` for a job of several processes (``env``: a ``dar.training.runtime.Distributed``):
    the main process holds ``directory``; every process learns whether it got it, so none writes and
    none waits at a barrier for a process that gave up."""
    import torch

    with contextlib.ExitStack() as stack:
        busy = None
        if env.is_main:
            try:
                stack.enter_context(directory_lock(directory, purpose))
            except RunDirBusy as error:
                busy = error
        if env.all_mean(torch.tensor(float(busy is None), device=env.device)).item() != 1.0:
            raise busy or RunDirBusy(f"{directory} is in use by another process (the main process names it)")
        yield


def check_free_space(directory: str | Path, needed_bytes: int, what: str) -> None:
    """A clear error, before writing, when ``directory``'s file system has less than ``needed_bytes``
    free (with 5 % headroom)."""
    free = shutil.disk_usage(directory).free
    if free < needed_bytes * 1.05:
        raise ValueError(f"not enough disk space for {what} in {directory}: needs about "
                         f"{_size(needed_bytes)}, {_size(free)} free")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
