"""The supervisor's event loop (step 3-4): FUSE root, stdio relay, logs, attach socket.

Imported only by the supervisor after its fork, so the CLI never pays for
pyfuse3 and trio.
"""
from __future__ import annotations

import errno
import functools
import os
import resource
import socket

import unionfs.mount  # noqa: F401  (first: it loads the shim pyfuse3 must bind to, unionfs.fuseshim)
import pyfuse3
import trio

from store.containers import container_dir
from unionfs.mount import fuse_options, mounted, serve_session
from unionfs.storeview import make_view_factory
from unionfs.view import UnionView

from .protocol import EXIT, RESIZE, STDERR, STDIN, STDIN_CLOSED, STDOUT, frame, split_frames
from . import container_spec
from . import sandbox
from . import terminal
from .changes import container_base
from .pipe_stream import PipeStream
from .stdin_relay import InputRelay
from .logs import JsonLog, log_limits, log_path

# the character devices a container's /dev holds, the only ones mknod makes in its root:
# there is no device cgroup
CONTAINER_DEVICES = frozenset(container_spec.DEVICES.values())
# and none in the root, or one from an image layer, reaches a host device (libfuse adds
# nodev and nosuid by default; named here so that no default can drop them)
ROOT_MOUNT_OPTIONS = ("nodev", "nosuid")
# fds of the server's own, and for the container's other processes, that a container
# process holding every file its limit allows must leave (fd_limit_below_server)
SERVER_RESERVED_FDS = 1024


def container_view(store, image_id: str, upper_path: str, run: int, base=None) -> UnionView:
    """The container's root: its image and init layer (`base`: runner.changes.container_base),
    its upper layer (repaired after a crash), mknod limited to CONTAINER_DEVICES."""
    return make_view_factory(store, image_id, upper_path, run, devices=CONTAINER_DEVICES, base=base)()


def fd_limit_below_server(child: int) -> None:
    """Keep a container process from taking every fd the server has (one per open file):
    where the server could not raise its limit well above the container's (no
    CAP_SYS_RESOURCE: unionfs.mount), lower the container's, before it is released, to
    SERVER_RESERVED_FDS below the server's. (Lowering a limit needs no privilege.)"""
    server_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    soft, hard = resource.prlimit(child, resource.RLIMIT_NOFILE)
    room = server_limit - SERVER_RESERVED_FDS
    if room >= SERVER_RESERVED_FDS and (hard == resource.RLIM_INFINITY or hard > room):
        soft = room if soft == resource.RLIM_INFINITY else min(soft, room)
        resource.prlimit(child, resource.RLIMIT_NOFILE, (soft, room))


def serve_container(store, config, rootfs, child, sync_w, status_r, ours, wait_attach, run, record_running,
                    container_id, record_exit):
    """Returns (exit code, error). `record_running()` is called once the root is served,
    before the child is released; `record_exit(exit code, error)` once the child is gone,
    before the attached clients hear of it (a `start` right after `run` returns must find
    the exit on record). On an exception the supervisor kills the child."""
    cdir = container_dir(store, container_id)
    upper = os.path.join(cdir, "upper")
    view = container_view(store, config["Image"], upper, run, container_base(store, config, upper))
    with mounted(view, rootfs, fuse_options(f"strata:{config['Name']}", False, ROOT_MOUNT_OPTIONS)):
        fd_limit_below_server(child)
        return trio.run(functools.partial(_serve, config, cdir, child, sync_w, status_r, ours,
                                          wait_attach, record_running, record_exit, view))


async def _serve(config, cdir, child, sync_w, status_r, ours, wait_attach, record_running, record_exit, view):
    max_bytes, max_files = log_limits(config.get("LogOpts") or {})
    log = JsonLog(log_path(cdir), max_bytes, max_files)
    clients: set = set()
    pending_size: list = []
    container_input = InputRelay()
    attached = trio.Event()
    errors: list[str] = []
    sock_path = os.path.join(cdir, "attach.sock")
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    dir_fd = os.open(cdir, os.O_RDONLY | os.O_DIRECTORY)
    try:  # through /proc/self/fd: a store path can exceed AF_UNIX's 108 bytes
        await listener.bind(f"/proc/self/fd/{dir_fd}/attach.sock.new")
    finally:
        os.close(dir_fd)
    listener.listen(8)
    os.rename(sock_path + ".new", sock_path)  # appears only once it accepts connections

    async def broadcast(kind: int, data: bytes) -> None:
        if kind in (STDOUT, STDERR):
            log.write(kind, data)
        message = frame(kind, data)
        for client in list(clients):
            try:
                await client.send(message)
            except OSError:
                clients.discard(client)

    async def handle_client(client) -> None:
        clients.add(client)
        attached.set()
        buf = b""
        try:
            while True:
                data = await client.recv(65536)
                if not data:
                    return
                frames, buf = split_frames(buf + data)
                for kind, payload in frames:
                    if kind == STDIN:
                        await container_input.deliver(payload)
                    elif kind == STDIN_CLOSED and "stdin" in ours:
                        await container_input.end()
                    elif kind == RESIZE:
                        rows, cols = (int(x) for x in payload.split())
                        if "pty" in ours:
                            terminal.set_window_size(ours["pty"], rows, cols)
                        else:
                            pending_size.append((rows, cols))
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError):
            return
        finally:
            clients.discard(client)

    async def accept_loop(nursery) -> None:
        while True:
            client, _ = await listener.accept()
            nursery.start_soon(handle_client, client)

    async def pump(fd: int, kind: int, is_pty: bool = False) -> None:
        stream = trio.lowlevel.FdStream(fd) if is_pty else PipeStream(fd)  # (runner/pipe_stream.py)
        try:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except (OSError, trio.BrokenResourceError) as e:
                    cause = e if isinstance(e, OSError) else e.__cause__
                    if isinstance(cause, OSError) and cause.errno == errno.EIO:
                        return  # a pty whose other side is gone: its end of file
                    raise
                if not data:
                    return
                await broadcast(kind, data)
        finally:
            await stream.aclose()

    async def read_status() -> None:
        stream = trio.lowlevel.FdStream(status_r)
        data = b""
        while True:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
        for line in data.decode(errors="replace").splitlines():
            code, _, message = line.partition(" ")
            errors.append(message)
            await broadcast(STDERR, f"strata: error: {message}\n".encode())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_session, view)
        nursery.start_soon(accept_loop, nursery)
        if wait_attach:
            with trio.move_on_after(30):
                await attached.wait()
        record_running()
        os.write(sync_w, b"1")  # sync 1: the root is served; the child goes on
        os.close(sync_w)
        if "console" in ours:  # the container's pty master, sent by its pid 1
            console = socket.socket(fileno=ours.pop("console"))
            await trio.lowlevel.wait_readable(console.fileno())
            _, fds, _, _ = socket.recv_fds(console, 16, 1)  # EOF, no fd: pid 1 failed first
            console.close()
            if fds:
                ours["pty"] = fds[0]
        input_fd = ours.get("pty") or ours.get("stdin")
        input_stream = None
        if input_fd is not None:
            input_stream = (trio.lowlevel.FdStream if "pty" in ours else PipeStream)(os.dup(input_fd))
        if ours.get("stdin") is not None:
            os.close(ours["stdin"])  # the stream's dup is the only write end: closing it is EOF
        nursery.start_soon(container_input.feed, input_stream)  # ends with the nursery's cancel
        if "pty" in ours and pending_size:
            terminal.set_window_size(ours["pty"], *pending_size[-1])
        async with trio.open_nursery() as pumps:
            if "pty" in ours:
                pumps.start_soon(pump, os.dup(ours["pty"]), STDOUT, True)
            else:
                pumps.start_soon(pump, ours["stdout"], STDOUT)
                pumps.start_soon(pump, ours["stderr"], STDERR)
            pumps.start_soon(read_status)
            pidfd = os.pidfd_open(child)
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
            _, status = os.waitpid(child, 0)
            exit_code = sandbox.exit_code(status)
        log.flush_partial()
        record_exit(exit_code, "; ".join(errors))
        await broadcast(EXIT, str(exit_code).encode())
        for client in list(clients):
            client.close()
        pyfuse3.terminate()
        nursery.cancel_scope.cancel()
    listener.close()
    try:
        os.unlink(sock_path)
    except OSError:
        pass
    return exit_code, "; ".join(errors)
