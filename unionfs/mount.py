"""Mounting and serving a UnionView, in the foreground or as a background server.

Background mode forks before pyfuse3 or trio start any thread, and the child
reports "ready" (or the error) over a pipe, so the caller returns only once
the mount is usable, and with the real error when it is not.

pyfuse3 quirk: before every request its session loop takes a trio.Lock that
only matters when several tasks read /dev/fuse. Taking it is a checkpoint, one
more pass through trio's scheduler per request: about a quarter of a cold
lookup (45 -> 33 us in benchmarks/floorfs.py's tree). strata serves with one
task (max_tasks=1), so `mounted` swaps in a lock-free wait. pyfuse3's
loop finds `_wait_fuse_readable` among its module globals at every call; if a
pyfuse3 release drops that name, the stock wait is used.

Wake-up latency: a request that arrives while the server sleeps in epoll
waits for the scheduler to wake it, which on these VMs costs about as much
as answering it. While requests come back to back (the last one arrived
within BURST_GAP of the reply before it), the wait first polls /dev/fuse
without sleeping for up to $STRATA_FUSE_SPIN_US microseconds (default 30):
a sequential client's next request is usually there by then. A burst's end
costs one unanswered poll window; an idle mount never polls. Only with two
or more CPUs (on one, polling would only delay the client); 0 turns it off.
`python -m benchmarks --systems strata,strata-nospin --workloads lookup` shows both, and
what each costs in server CPU (results.json's server_cpu_seconds).

File descriptors: the server holds one host fd per open handle, so every
file the container holds open on the mount costs one of the server's fds,
and the server's limit, inherited from whoever started it, is often no
larger than one container process's (20,000 on these VMs). `mounted` raises
the soft RLIMIT_NOFILE to the hard one, and with CAP_SYS_RESOURCE (root) the
hard one to fs.nr_open. Processes forked before it (the supervisor's
container child) keep the limit they were given. (Root on these VMs lacks
CAP_SYS_RESOURCE; runner.serve then lowers the container's limit instead.)
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys
import traceback
from typing import Iterator

from . import fuseshim  # noqa: F401  (before anything imports pyfuse3: see unionfs.fuseshim)
from . import fallocate, killpriv, noopen, passthrough, requests

log = logging.getLogger("strata.unionfs")


def fuse_options(fsname: str, readonly: bool, extra: list[str] = ()) -> set[str]:
    opts = {"default_permissions", f"fsname={fsname}", "subtype=strata"}
    # root and user-namespace owners may let other uids in (containers need it)
    if os.geteuid() == 0 or in_user_namespace():
        opts.add("allow_other")
    if readonly:
        opts.add("ro")
    opts.update(extra)
    return opts


def in_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def fuse_device_fds() -> set[int]:
    """This process's open /dev/fuse descriptors."""
    out = set()
    for name in os.listdir("/proc/self/fd"):  # (its own directory fd shows too, and is gone)
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                out.add(int(name))
        except OSError:
            pass
    return out


def raise_fd_limit() -> int:
    """Raise this process's RLIMIT_NOFILE as far as allowed (module comment); the new soft limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            ceiling = int(f.read())
    except (OSError, ValueError):
        ceiling = hard
    if hard != resource.RLIM_INFINITY and ceiling > hard:
        try:  # needs CAP_SYS_RESOURCE in the initial user namespace
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
            return ceiling
        except (OSError, ValueError):
            pass
    # (never above nr_open, whatever the hard limit says: no process gets more fds)
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


BURST_GAP = 0.0002  # seconds between a reply and the next request that count as back to back


def spin_seconds() -> float:
    """How long to poll for the next request before sleeping (see the module comment)."""
    try:
        micros = float(os.environ.get("STRATA_FUSE_SPIN_US", "30"))
    except ValueError:
        micros = 30.0
    return micros / 1e6 if len(os.sched_getaffinity(0)) > 1 else 0.0


def install_single_task_wait(fuse_fd: int, spin: float | None = None) -> bool:
    """Replace pyfuse3's per-request wait (see the module comment); True if done."""
    import inspect
    import select
    import time

    import pyfuse3
    import trio
    if not inspect.iscoroutinefunction(getattr(pyfuse3, "_wait_fuse_readable", None)):
        return False
    wait_readable, closed = trio.lowlevel.wait_readable, trio.ClosedResourceError
    spin = spin_seconds() if spin is None else spin
    poller = select.poll()
    poller.register(fuse_fd, select.POLLIN)
    poll, clock, checkpoint = poller.poll, time.perf_counter, trio.lowlevel.checkpoint
    in_burst, caught = False, 0

    async def wait_fuse_readable() -> bool:  # pyfuse3's contract: False ends the loop
        nonlocal in_burst, caught
        if in_burst:
            deadline = clock() + spin
            while clock() < deadline:
                if poll(0):
                    caught += 1
                    if caught % 16 == 0:  # a long burst must not starve the loop's other tasks
                        await checkpoint()
                    return True
            in_burst = False  # the burst is over: sleep until the next one
        started = clock()
        try:
            await wait_readable(fuse_fd)
        except closed:  # pyfuse3.terminate() closed the session
            return False
        in_burst = spin > 0 and clock() - started < BURST_GAP
        return True
    pyfuse3._wait_fuse_readable = wait_fuse_readable
    return True


async def serve_session(view) -> None:
    """pyfuse3's loop with one task: requests are answered in order, each without a lock;
    beside it, what writes left pending is stored when the mount is idle for a moment
    (and at the end by view.close, which `mounted` calls)."""
    import pyfuse3
    import trio
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store_while_idle, view)
        await pyfuse3.main(min_tasks=1, max_tasks=1)
        nursery.cancel_scope.cancel()


async def store_while_idle(view, interval: float = 0.5) -> None:
    """UnionView.store_when_idle every `interval` seconds (no request is being served
    then: one task serves them all, in order)."""
    import trio
    while True:
        await trio.sleep(interval)
        try:
            view.store_when_idle()
        except OSError as e:  # a full disk, say: the next transaction tries again
            log.warning("storing pending writes failed: %s", e)


@contextlib.contextmanager
def mounted(view, mountpoint: str, options: set[str]) -> Iterator[None]:
    """`view` mounted with pyfuse3 for the block; unmounted and closed afterwards, whatever
    happened (the standalone server and the container supervisor both serve this way)."""
    import pyfuse3

    from .ops import UnionOperations
    raise_fd_limit()
    before = fuse_device_fds()
    operations = UnionOperations(view)
    fallocate.set_handler(operations.fallocate)  # (the session pyfuse3.init makes takes it)
    no_open = noopen.request(noopen.wanted())
    passed_through = passthrough.request(passthrough.wanted() and not no_open)  # (and the mount)
    killpriv.request(not passed_through)
    try:
        pyfuse3.init(operations, mountpoint, options)
    except BaseException:
        fallocate.set_handler(None)
        passthrough.request(False)
        killpriv.request(False)
        noopen.request(False)
        view.close()
        raise
    passthrough.request(False)
    killpriv.request(False)
    noopen.request(False)
    view.no_open = no_open
    if passed_through:
        view.passthrough = passthrough.Passthrough()
    fuse_fds = fuse_device_fds() - before
    if len(fuse_fds) == 1:  # the session's channel, found without pyfuse3's private C globals
        install_single_task_wait(fuse_fds.pop())
    try:
        yield
    finally:
        try:
            pyfuse3.close(unmount=True)
        finally:
            fallocate.set_handler(None)
            try:
                requests.save_if_asked()
            finally:
                view.close()


def serve(make_view, mountpoint: str, fsname: str, readonly: bool, debug: bool = False,
          on_ready=None) -> None:
    """Mount and serve until unmounted or SIGTERM/SIGINT; always unmount on the way out."""
    import pyfuse3
    import trio

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="strata-fuse: %(levelname)s %(message)s")
    opts = fuse_options(fsname, readonly)
    if debug:
        opts.add("debug")
    view = make_view()
    with mounted(view, mountpoint, opts):
        if on_ready is not None:
            on_ready()

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                async def stop_on_signal() -> None:
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                        async for _ in signals:
                            pyfuse3.terminate()
                            return
                nursery.start_soon(stop_on_signal)
                await serve_session(view)
                nursery.cancel_scope.cancel()

        trio.run(run)


def serve_in_background(make_view, mountpoint: str, fsname: str, readonly: bool,
                        debug: bool = False) -> int:
    """Double-fork a server; return 0 once the mount is up, or print its error and return 1."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as r:
            message = r.read()
        os.waitpid(pid, 0)
        if message == b"ok":
            return 0
        sys.stderr.write(message.decode(errors="replace") or "strata-fuse: the server died while mounting\n")
        return 1
    # first child: new session, then fork again so the server is not a session leader
    try:
        os.close(read_end)
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        if not debug:
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        os.chdir("/")

        def ready() -> None:
            os.write(write_end, b"ok")
            os.close(write_end)

        serve(make_view, mountpoint, fsname, readonly, debug, on_ready=ready)
        os._exit(0)
    except BaseException as e:  # report to the waiting parent, whatever it was
        try:
            msg = f"strata-fuse: error: {describe(e)}\n"
            if debug:
                msg += traceback.format_exc()
            os.write(write_end, msg.encode())
        finally:
            os._exit(1)


def describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    return str(e) or type(e).__name__


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """Unmount a FUSE mount (also one whose server died: ENOTCONN)."""
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return
    if os.geteuid() == 0:
        args = ["umount"] + (["-l"] if lazy else []) + [mountpoint]
        proc2 = subprocess.run(args, capture_output=True, text=True)
        if proc2.returncode == 0:
            return
    raise OSError(errno.EINVAL, (proc.stderr.strip() or "unmount failed"), mountpoint)
