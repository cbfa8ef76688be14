"""The attach client: the CLI side of `run` (foreground), `start -a` and `attach`.

Speaks the supervisor's framed protocol (runner.supervisor). Ctrl-P Ctrl-Q
(or --detach-keys) detaches and leaves the container running.
"""
from __future__ import annotations

import os
import selectors
import signal
import socket
import sys

from . import terminal
from .protocol import EXIT, RESIZE, STDIN, STDIN_CLOSED, STDOUT, frame, split_frames

DETACHED = object()


def parse_detach_keys(spec: str) -> bytes:
    """Docker's syntax: comma-separated `ctrl-<letter>`, `ctrl-@`, `ctrl-[` ... or single characters."""
    keys = b""
    for part in (spec or "ctrl-p,ctrl-q").split(","):
        part = part.strip()
        if not part.isascii():  # one key is one byte, as Docker's term.ToBytes reads it
            from store.containers import printable
            raise ValueError(f"invalid detach key {printable(part)}")
        if part.startswith("ctrl-") and len(part) == 6:
            ch = part[5]
            if ch.isalpha():
                keys += bytes([ord(ch.lower()) - ord("a") + 1])
            elif ch in "@[\\]^_":
                keys += bytes([0 if ch == "@" else ord(ch) - ord("[") + 27])
            else:
                raise ValueError(f"invalid detach key {part!r}")
        elif len(part) == 1:
            keys += part.encode()
        else:
            raise ValueError(f"invalid detach key {part!r}")
    return keys


def send_frame(sock: socket.socket, kind: int, payload: bytes = b"") -> None:
    sock.sendall(frame(kind, payload))


def terminal_size() -> bytes:
    """The caller's terminal size as a RESIZE frame carries it."""
    rows, cols = terminal.window_size(1)
    return f"{rows} {cols}".encode()


def attach(sock_path: str, with_stdin: bool, tty: bool, detach_keys: bytes, forward_signal=None):
    """Relay until the container exits (returns its exit code) or the user detaches (DETACHED)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dir_fd = os.open(os.path.dirname(sock_path), os.O_RDONLY | os.O_DIRECTORY)
    try:  # through /proc/self/fd: a store path can exceed AF_UNIX's 108 bytes
        sock.connect(f"/proc/self/fd/{dir_fd}/{os.path.basename(sock_path)}")
    finally:
        os.close(dir_fd)
    stdin_fd = sys.stdin.fileno() if with_stdin else None
    old_handlers = {}
    resized_r = resized_w = -1
    try:
        with terminal.raw_mode(stdin_fd if tty else None) as raw:
            if tty:
                # the handler only wakes the relay, which sends the size: a frame sent from
                # the handler could land inside one the relay is sending. Installed before
                # the first size is read, so no change falls between the two.
                resized_r, resized_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                old_handlers[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, lambda *_: _wake(resized_w))
                send_frame(sock, RESIZE, terminal_size())
            if forward_signal is not None and not raw:
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
                    old_handlers[sig] = signal.signal(sig, lambda s, _f: forward_signal(s))
            return _relay(sock, stdin_fd, detach_keys if (with_stdin and tty) else b"", resized_r)
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        for fd in (resized_r, resized_w):
            if fd >= 0:
                os.close(fd)
        sock.close()


def _wake(fd: int) -> None:
    try:
        os.write(fd, b"w")
    except BlockingIOError:  # already awake
        pass


def _relay(sock: socket.socket, stdin_fd: int | None, detach_keys: bytes, resized_fd: int = -1):
    sel = selectors.PollSelector()  # poll, not epoll: stdin may be a regular file
    sel.register(sock, selectors.EVENT_READ, "sock")
    if resized_fd >= 0:
        sel.register(resized_fd, selectors.EVENT_READ, "resized")
    if stdin_fd is not None:
        sel.register(stdin_fd, selectors.EVENT_READ, "stdin")
    buf = b""
    matched = 0
    while True:
        for key, _ in sel.select():
            if key.data == "resized":
                while True:
                    try:
                        os.read(resized_fd, 64)
                    except BlockingIOError:
                        break
                send_frame(sock, RESIZE, terminal_size())
            elif key.data == "stdin":
                data = os.read(stdin_fd, 65536)
                if not data:
                    sel.unregister(stdin_fd)
                    send_frame(sock, STDIN_CLOSED)
                    continue
                if detach_keys:
                    out = b""
                    for byte in data:
                        if byte == detach_keys[matched]:
                            matched += 1
                            if matched == len(detach_keys):
                                return DETACHED
                            continue
                        out += detach_keys[:matched] + bytes([byte])
                        matched = 0
                    data = out
                if data:
                    send_frame(sock, STDIN, data)
            else:
                chunk = sock.recv(65536)
                if not chunk:
                    return None  # the supervisor went away without an exit status
                frames, buf = split_frames(buf + chunk)
                for kind, payload in frames:
                    if kind == EXIT:
                        return int(payload)
                    os.write(1 if kind == STDOUT else 2, payload)
