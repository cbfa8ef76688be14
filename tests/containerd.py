"""containerd 1.6 (Debian's) for tests: a private daemon, driven with ctr.

Everything of the daemon's is under its work directory: a generated config
names its root, state, sockets and the opt plugin's path, and turns off the
CRI plugin (it wants CNI and a sandbox image). What containerd 1.6's runc
shim keeps in fixed places (its sockets in /run/containerd/s, the runtime's
--root /run/containerd/runc/<namespace>) is left to it; each test daemon
uses a namespace of its own, and the namespace's state directory is removed
with it. The daemon is stopped with SIGTERM, then SIGKILL; no shim may
outlive the tests.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
CONFIG = """version = 2
root = "{work}/root"
state = "{work}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.tracing",
                    "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{work}/containerd.sock"
[ttrpc]
  address = "{work}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{work}/opt"
"""


class Containerd:
    def __init__(self, work: str):
        self.work = work
        self.address = os.path.join(work, "containerd.sock")
        self.namespace = f"strata-test-{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen | None = None

    def start(self, deadline: float = 30) -> None:
        assert os.path.exists(CONTAINERD), f"{CONTAINERD} is missing (make installs Debian's containerd)"
        os.makedirs(self.work, exist_ok=True)
        config = os.path.join(self.work, "config.toml")
        with open(config, "w") as f:
            f.write(CONFIG.format(work=self.work))
        log = open(os.path.join(self.work, "containerd.log"), "wb")
        self.proc = subprocess.Popen([CONTAINERD, "--config", config], stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        end = time.monotonic() + deadline
        while self.ctr("version", check=False).returncode != 0:
            assert self.proc.poll() is None, f"containerd exited: {self.log_tail()}"
            assert time.monotonic() < end, f"containerd did not answer in {deadline} s: {self.log_tail()}"
            time.sleep(0.1)

    def log_tail(self) -> str:
        with open(os.path.join(self.work, "containerd.log"), "rb") as f:
            return f.read()[-2000:].decode(errors="replace")

    def ctr(self, *args: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.run([CTR, "--address", self.address, "--namespace", self.namespace, *args],
                              timeout=timeout, **kw)
        if check:
            assert proc.returncode == 0, f"ctr {' '.join(args)}: {proc.stderr!r}"
        return proc

    def shims(self) -> list[int]:
        """The pids of this daemon's shims (they name its address in their command line)."""
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/status") as f:  # (status never waits; cmdline may)
                    if "containerd-shim" not in f.readline():
                        continue
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if self.namespace.encode() in f.read():
                        found.append(int(name))
            except OSError:
                continue
        return found

    def stop(self) -> list[int]:
        """Stop the daemon and its containers; the shims that outlived it (killed here)."""
        for line in self.ctr("tasks", "ls", "-q", check=False).stdout.decode().split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", line, check=False)
            self.ctr("tasks", "delete", "--force", line, check=False)
        for line in self.ctr("containers", "ls", "-q", check=False).stdout.decode().split():
            self.ctr("containers", "delete", line, check=False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        left = self.shims()  # none should be: a stuck one is killed, and the caller says so
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(f"/run/containerd/runc/{self.namespace}", ignore_errors=True)
        return left
