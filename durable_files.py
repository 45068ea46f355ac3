"""Files that are never half-written: whole files replaced atomically, and JSONL logs appended and fsynced as
training goes. Nothing here imports torch, so light command-line tools can use it too."""

from __future__ import annotations

import json
import os
import tempfile

_UMASK = os.umask(0)  # read once at import (single-threaded): mkstemp makes 0600 files, the result should not be
os.umask(_UMASK)


def atomic_write(path: str, write) -> None:
    """Call write(file_object) on a temp file in the same directory, fsync it, then rename it over `path`,
    so a crash leaves either the old file or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # what open() would have given the file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class NullAppender:
    """What ranks other than 0 write to under torchrun: nothing."""

    def write(self, records: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlAppender:
    """Append-only JSONL, flushed after every batch and fsynced (`fsync=True`, for what was paid for: samples): a
    crash loses at most the batch being written. Lines are whole JSON objects, so a reader can skip a torn last
    line. Metrics, which a resumed run writes again, are flushed to the OS only: an fsync a step costs time."""

    def __init__(self, path: str, fsync: bool = True) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.fsync = fsync
        self.file = open(path, "a", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.file.flush()
        if self.fsync:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()
