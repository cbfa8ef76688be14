"""Container logs: Docker's json-file format, written by the supervisor, read by `strata logs`.

containers/<id>/json.log      {"log": "...", "stream": "stdout", "time": "<RFC3339Nano>"} per line
containers/<id>/json.log.N    rotated files, N = 1 the newest (--log-opt max-size=, max-file=)

The writer lives in the supervisor (runner.serve); readers are the CLI and the tests.
No trio and no store here: both sides import it.
"""
from __future__ import annotations

import json
import os
import time

from .protocol import STDERR, STDOUT

LOG_NAME = "json.log"
LOG_MAX_BYTES_DEFAULT = 10 * 1024 * 1024
LOG_MAX_FILES_DEFAULT = 3
SIZE_UNITS = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def log_limits(opts: dict) -> tuple[int, int]:
    """(max bytes per file, files kept) from Docker's json-file options; ValueError if bad."""
    size = opts.get("max-size")
    max_bytes = LOG_MAX_BYTES_DEFAULT
    if size:
        unit = SIZE_UNITS.get(size[-1].lower())
        max_bytes = int(size[:-1]) * unit if unit else int(size)
    max_files = int(opts.get("max-file") or LOG_MAX_FILES_DEFAULT)
    if max_bytes < 0 or max_files < 0:
        raise ValueError("negative log limit")
    return max_bytes, max_files


def log_path(cdir: str) -> str:
    return os.path.join(cdir, LOG_NAME)


# -- writing (the supervisor) ----------------------------------------------------------

class JsonLog:
    """Docker's json-file driver: one JSON object per line, rotated by size."""

    def __init__(self, path: str, max_bytes: int, max_files: int):
        self.path, self.max_bytes, self.max_files = path, max_bytes, max_files
        self.f = self._open()
        self.pending = {STDOUT: b"", STDERR: b""}

    def write(self, stream: int, data: bytes) -> None:
        buf = self.pending[stream] + data
        *lines, rest = buf.split(b"\n")
        self.pending[stream] = rest
        for line in lines:
            self._record(stream, line + b"\n")

    def flush_partial(self) -> None:
        for stream, rest in self.pending.items():
            if rest:
                self._record(stream, rest)
                self.pending[stream] = b""

    def _record(self, stream: int, line: bytes) -> None:
        ns = time.time_ns()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"
        entry = {"log": line.decode("utf-8", "replace"), "stream": "stdout" if stream == STDOUT else "stderr",
                 "time": stamp}
        self.f.write(json.dumps(entry).encode() + b"\n")
        self.f.flush()
        if self.max_bytes and self.f.tell() >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self.f.close()
        for n in range(self.max_files - 1, 0, -1):
            src = self.path if n == 1 else f"{self.path}.{n - 1}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{n}")
        if self.max_files <= 1:
            os.unlink(self.path)
        self.f = self._open()

    def _open(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a line torn by a supervisor's kill -9
            os.write(fd, b"\n")                          # stays alone: the next entry starts afresh
        return os.fdopen(fd, "ab")


# -- reading (`strata logs`) -----------------------------------------------------------

def log_files(cdir: str) -> list[str]:
    """The container's log files, oldest first."""
    rotated = sorted((f for f in os.listdir(cdir) if f.startswith(LOG_NAME + ".")),
                     key=lambda f: -int(f.rsplit(".", 1)[1]))
    base = log_path(cdir)
    return [os.path.join(cdir, f) for f in rotated] + ([base] if os.path.exists(base) else [])


def read_log_entries(f) -> tuple[list[dict], int]:
    """The entries of a json.log from where `f` is, and the bytes they took: a last line
    without its newline is still being written (left for later), and a line torn by a
    supervisor's kill -9 (the next one starts on a line of its own) is passed over."""
    entries, consumed = [], 0
    for line in f:
        if not line.endswith(b"\n"):
            break
        consumed += len(line)
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries, consumed


def read_logs(cdir: str) -> tuple[list[dict], int]:
    """Every entry, oldest first, and how far json.log was read (where following goes on)."""
    entries, offset = [], 0
    for name in log_files(cdir):
        with open(name, "rb") as f:
            read, consumed = read_log_entries(f)
        entries += read
        if name == log_path(cdir):
            offset = consumed   # (follow goes on from there, with a line half written)
    return entries, offset


def read_new_entries(cdir: str, offset: int) -> tuple[list[dict], int]:
    """The whole entries json.log gained past `offset`, and the bytes they took."""
    path = log_path(cdir)
    if not os.path.exists(path) or os.path.getsize(path) <= offset:
        return [], 0
    with open(path, "rb") as f:
        f.seek(offset)
        return read_log_entries(f)
