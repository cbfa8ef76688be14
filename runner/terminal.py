"""Terminals made inside a container: the pty comes from the container's own devpts (so
ttyname and job control work inside), and its master goes out over a unix socket with
SCM_RIGHTS, as runc sends it to containerd's shim and podman's conmon."""
from __future__ import annotations

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
