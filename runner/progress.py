"""Progress of long transfers (save, load, import, export, commit, pull, push).

The store reports through the small interface store.oci documents:
`task(description, total)` is a context manager whose value is called with the
bytes done since the last call; `note(line)` is a result for the user
("Loaded image: ..."). This module draws it:

- on a terminal: a bar per task with bytes, rate and time left (rich), on stderr;
- otherwise: one plain line per finished task (description, bytes, time, rate);
- quiet (-q): no progress at all.

Notes go to stdout (or stderr, for a command whose stdout is its result), quiet or
not, as docker load's "Loaded image" does.
rich is imported only when a bar is drawn (CLI start-up time). Tasks may run in
threads (parallel blob transfers): the plain printer and rich both lock.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Callable, Iterator, TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class Progress:
    """Quiet: no progress lines; the base of the two that draw."""

    def __init__(self, notes_to: str = "stdout"):
        # "stdout" or "stderr", looked up when a note is made: rich redirects both above its bars
        self.notes_to = notes_to

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        yield lambda n: None

    def note(self, line: str) -> None:
        print(line, file=getattr(sys, self.notes_to), flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PlainProgress(Progress):
    """One line per finished task, for logs and pipes."""

    def __init__(self, stream: TextIO, notes_to: str = "stdout"):
        super().__init__(notes_to)
        self.stream = stream
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def task(self, description: str, total: int | None):
        done = 0
        start = time.monotonic()

        def advance(n: int) -> None:
            nonlocal done
            done += n
        yield advance
        elapsed = max(time.monotonic() - start, 1e-6)
        with self.lock:
            print(f"{description}: {human_bytes(done)} in {elapsed:.1f} s ({human_bytes(done / elapsed)}/s)",
                  file=self.stream, flush=True)


class BarProgress(Progress):
    """A rich bar per task, kept on screen when it is done."""

    def __init__(self, stream: TextIO, notes_to: str = "stdout"):
        super().__init__(notes_to)
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)
        self.bars = RichProgress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=Console(file=stream), transient=False)
        self.started = False

    @contextlib.contextmanager
    def task(self, description: str, total: int | None):
        if not self.started:
            self.bars.start()
            self.started = True
        task_id = self.bars.add_task(description, total=total)
        yield lambda n: self.bars.advance(task_id, n)
        task = self.bars.tasks[task_id]
        self.bars.update(task_id, total=task.completed)  # a full bar, whatever the estimate was

    def close(self) -> None:
        if self.started:
            self.bars.stop()
            self.started = False


def make_progress(quiet: bool = False, stream: TextIO | None = None, notes_to: str = "stdout") -> Progress:
    """The progress a command shows: bars on a terminal, lines elsewhere, none when quiet."""
    stream = stream or sys.stderr
    if quiet:
        return Progress(notes_to)
    if stream.isatty():
        return BarProgress(stream, notes_to)
    return PlainProgress(stream, notes_to)
