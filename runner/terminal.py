"""Terminals: the container's, and the caller's.

A container's pty comes from its own devpts (so ttyname and job control work
inside), and its master goes out over a unix socket with SCM_RIGHTS, as runc
sends it to containerd's shim and podman's conmon. The caller's terminal is
put in raw mode while attached, and its size is passed on to the pty."""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import termios

TIOCGPTN, TIOCSPTLCK = 0x80045430, 0x40045431


def open_container_pty() -> tuple[int, int]:
    """A pty pair from /dev/ptmx of the container's devpts instance."""
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
    number = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
    slave = os.open(f"/dev/pts/{number}", os.O_RDWR | os.O_NOCTTY)
    return master, slave


def take_terminal(console: socket.socket) -> None:
    """Make a pty, send its master over `console` and make the slave this process's stdio
    and controlling terminal (in a session of its own)."""
    master, slave = open_container_pty()
    try:
        socket.send_fds(console, [b"/dev/ptmx"], [master])
    finally:
        os.close(master)
    if os.getsid(0) != os.getpid():
        os.setsid()
    for target in range(3):
        os.dup2(slave, target)
    if slave > 2:
        os.close(slave)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def window_size(fd: int = 1) -> tuple[int, int]:
    """(rows, columns) of the terminal on `fd`; 24x80 where there is none."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        return rows, cols
    except OSError:
        return 24, 80


def set_window_size(fd: int, rows: int, cols: int) -> None:
    """The size of the pty whose master is `fd` (its processes get SIGWINCH)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


@contextlib.contextmanager
def raw_mode(fd: int | None):
    """The caller's terminal on `fd` in raw mode for the block, then as it was; nothing
    when `fd` is no terminal. TCSANOW, as TCSAFLUSH would drop what was typed ahead;
    restored with TCSADRAIN, after what the container wrote."""
    import tty
    saved = termios.tcgetattr(fd) if fd is not None and os.isatty(fd) else None
    try:
        if saved is not None:
            tty.setraw(fd, termios.TCSANOW)
        yield saved is not None
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
