"""A container's private network: its own network namespace, wired to the host by a
user-mode stack (pasta, Debian's passt), as rootless podman does.

    --network bridge (Docker's name; `pasta` too)   the default when the stack is usable
    --network host | none
    -p [IP:]HOSTPORT:CTRPORT[/tcp|udp]              ranges (8000-8009:9000-9009) too

The container sees one interface (eth0, ADDRESS/PREFIX, default route via GATEWAY)
and a resolver at DNS that pasta forwards to the host's first nameserver. The
supervisor starts pasta once the container's child has unshared its network
namespace and stops it when the container exits; pasta is the supervisor's child
with PR_SET_PDEATHSIG, so it never outlives it.

What pasta (0.0~git20230309, Debian 12) does that this works around:
- Run as root it switches to nobody before it opens the target namespace, and
  nobody may neither open /proc/PID/ns/net of a root process nor setns() into a
  namespace of the host's user namespace. So it runs with --runas 0 (it still
  drops every capability it does not need and sandboxes itself) and gets the
  namespace as an inherited fd, named /proc/self/fd/N (a process may always
  follow its own fd links).
- By default it copies the host's address into the namespace; the host's own
  address is then local inside and the host cannot be reached at all. The
  container gets slirp4netns's 10.0.2.100/24 instead, IPv4 only (Docker's
  default bridge has no IPv6 either).
- Its defaults forward every port: -t/-u auto publish whatever the container
  listens on, and -T/-U auto forward the container's own loopback ports to the
  host's. Both are turned off; only -p ports are published.
- Connections to the gateway address are mapped to the host's loopback unless
  --no-map-gw: a container would reach every service the host keeps on
  127.0.0.1. That is off too; a server on the host's own address is reached.
- With -f and --pid it writes its pid once the namespace is configured: given a
  pipe, that is the readiness signal, and end of file on it is its failure.
- /dev/net/tun is 0600 on these VMs (no udev; distributions make it 0666): an
  unprivileged user's pasta cannot make its tap device then, and the private
  network is not the default for that user (asked for, it is an error).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

BRIDGE = "bridge"
MODES = (BRIDGE, "pasta", "host", "none")  # pasta: podman's name for the same network
ADDRESS, PREFIX, GATEWAY, DNS = "10.0.2.100", 24, "10.0.2.2", "10.0.2.3"
PASTA = "pasta"
READY_SECONDS = 10

_PUBLISH = re.compile(r"^(?:(?P<ip>[0-9.]+):)?(?P<host>\d+(?:-\d+)?):(?P<ctr>\d+(?:-\d+)?)"
                      r"(?:/(?P<proto>tcp|udp))?$")


class NetworkError(Exception):
    """A network that cannot be had; its text is the one-line error."""


def uses_stack(mode: str | None) -> bool:
    return mode in (BRIDGE, "pasta")


def stack_missing() -> str | None:
    """Why this user cannot have the private network, or None when it can."""
    if shutil.which(PASTA) is None:
        return "pasta is not installed (Debian package passt)"
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return f"/dev/net/tun is missing or not readable and writable by uid {os.getuid()}"
    return None


def choose_mode(asked: str | None, publish: list[dict]) -> str:
    """The network a new container gets: the one asked for, else bridge where the stack
    is usable (Docker's default is a private network), else host."""
    if asked is None:
        asked = BRIDGE if stack_missing() is None else "host"
    if asked not in MODES:
        raise NetworkError(f"network {asked!r} is not supported ({', '.join(MODES)})")
    if uses_stack(asked):
        missing = stack_missing()
        if missing:
            raise NetworkError(f"network {asked} needs a user-mode stack: {missing}")
    elif publish:
        raise NetworkError(f"-p/--publish needs the private network (--network bridge), not {asked}")
    return asked


def _port_range(text: str, what: str, value: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    low, high = int(first), int(last or first)
    if not 1 <= low <= high <= 65535:
        raise NetworkError(f"invalid {what} port {text!r} in -p {value!r}")
    return low, high


def parse_publish(value: str) -> dict:
    """One -p value as Docker's PortBinding plus the container side:
    {"HostIp", "HostPort", "ContainerPort", "Protocol"} (ports may be ranges)."""
    match = _PUBLISH.match(value)
    if not match:
        raise NetworkError(f"invalid -p {value!r}: expected [IPV4:]HOSTPORT:CTRPORT[/tcp|udp]")
    host = _port_range(match["host"], "host", value)
    ctr = _port_range(match["ctr"], "container", value)
    if host[1] - host[0] != ctr[1] - ctr[0]:
        raise NetworkError(f"invalid -p {value!r}: the host and container ranges differ in length")
    ip = match["ip"] or ""
    if ip:
        import ipaddress
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise NetworkError(f"invalid host address {ip!r} in -p {value!r} (IPv4 only)") from None
    return {"HostIp": ip, "HostPort": _spelled(host), "ContainerPort": _spelled(ctr),
            "Protocol": match["proto"] or "tcp"}


def _spelled(ports: tuple[int, int]) -> str:
    return str(ports[0]) if ports[0] == ports[1] else f"{ports[0]}-{ports[1]}"


def _each_port(binding: dict):
    """(container port, host port) of each port of a binding's range, as Docker lists them."""
    host, ctr = (int(p.partition("-")[0]) for p in (binding["HostPort"], binding["ContainerPort"]))
    last = int(binding["ContainerPort"].rpartition("-")[2])
    return ((port, host + port - ctr) for port in range(ctr, last + 1))


def port_bindings(bindings: list[dict], bound: bool = False) -> dict:
    """Docker's HostConfig.PortBindings ({"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}),
    or (`bound`) NetworkSettings.Ports, where no address is all of IPv4's (0.0.0.0)."""
    out: dict = {}
    for b in bindings:
        for ctr, host in _each_port(b):
            out.setdefault(f"{ctr}/{b['Protocol']}", []).append(
                {"HostIp": b["HostIp"] or ("0.0.0.0" if bound else ""), "HostPort": str(host)})
    return out


def settings(mode: str, bindings: list[dict], running: bool) -> dict:
    """inspect's NetworkSettings (ports and addresses only while the container runs, as Docker)."""
    private = uses_stack(mode) and running
    return {"Ports": port_bindings(bindings, True) if private else {},
            "IPAddress": ADDRESS if private else "", "IPPrefixLen": PREFIX if private else 0,
            "Gateway": GATEWAY if private else ""}


def ps_ports(config: dict, running: bool) -> str:
    """ps's PORTS column, as Docker's: 0.0.0.0:8080->80/tcp, ..."""
    ports = settings(config.get("NetworkMode"), config.get("PortBindings") or [], running)["Ports"]
    return ", ".join(f"{b['HostIp']}:{b['HostPort']}->{key}" for key, published in ports.items() for b in published)


def runtime_files(mode: str, hostname: str, host_resolv: str) -> dict:
    """/etc/hosts and /etc/resolv.conf for a private network (none otherwise): the
    host's resolver is out of reach inside (it may be on the host's loopback), so the
    forwarded DNS address replaces its nameservers; search and options lines stay."""
    if not uses_stack(mode):
        return {}
    kept = [line for line in host_resolv.splitlines() if line.split()[:1] in (["search"], ["domain"], ["options"])]
    return {"hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ADDRESS}\t{hostname}\n",
            "resolv.conf": "\n".join([f"nameserver {DNS}", *kept]) + "\n"}


def pasta_command(bindings: list[dict], netns: str, pidfile: str) -> list[str]:
    ports = {"tcp": [], "udp": []}
    for b in bindings:
        address = f"{b['HostIp']}/" if b["HostIp"] else ""
        ports[b["Protocol"]].append(f"{address}{b['HostPort']}:{b['ContainerPort']}")
    command = [PASTA, "--config-net", "--foreground", "--quiet", "--runas", "0", "--ipv4-only",
               "--address", ADDRESS, "--netmask", str(PREFIX), "--gateway", GATEWAY, "--ns-ifname", "eth0",
               "--dns-forward", DNS, "--no-map-gw", "-T", "none", "-U", "none"]
    for flag, proto in (("-t", "tcp"), ("-u", "udp")):
        for spec in ports[proto] or ["none"]:
            command += [flag, spec]
    return command + ["--pid", pidfile, "--netns", netns]


def _die_with_parent() -> None:
    # (Popen's child before exec; the supervisor has no thread yet: see Stack.start)
    import prctl
    prctl.set_pdeathsig(signal.SIGKILL)


class Stack:
    """The running pasta of one container start."""

    __slots__ = ("process", "ready_fd", "log_path")

    def __init__(self, process: subprocess.Popen, ready_fd: int, log_path: str):
        self.process, self.ready_fd, self.log_path = process, ready_fd, log_path

    @classmethod
    def start(cls, child: int, netns_ready: int, bindings: list[dict], container_dir: str) -> "Stack":
        """pasta for `child`'s network namespace, once `netns_ready` says it exists.
        Called before the supervisor has any thread or event loop (Popen's pre-exec hook)."""
        try:
            if os.read(netns_ready, 1) != b"1":
                raise NetworkError("the container's network namespace was not made")
        finally:
            os.close(netns_ready)
        netns = os.open(f"/proc/{child}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        ready_r, ready_w = os.pipe()
        log_path = os.path.join(container_dir, "pasta.log")
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            process = subprocess.Popen(pasta_command(bindings, f"/proc/self/fd/{netns}", f"/proc/self/fd/{ready_w}"),
                                       pass_fds=(netns, ready_w), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       preexec_fn=_die_with_parent, cwd="/")
        except OSError as e:
            os.close(ready_r)
            raise NetworkError(f"cannot start pasta: {e.strerror}") from None
        finally:
            os.close(netns)
            os.close(ready_w)
            os.close(log)
        return cls(process, ready_r, log_path)

    def wait_ready(self) -> None:
        """Until pasta has configured the namespace and bound the published ports."""
        import select
        if self.ready_fd < 0:
            return
        try:
            readable, _, _ = select.select([self.ready_fd], [], [], READY_SECONDS)
            pid = os.read(self.ready_fd, 64) if readable else b""
        finally:
            os.close(self.ready_fd)
            self.ready_fd = -1
        if not pid.strip():
            self.stop()
            self.reap()
            raise NetworkError(f"pasta failed: {self.failure()}")

    def failure(self) -> str:
        """pasta's own last words (not its complaints about a missing syslog)."""
        try:
            with open(self.log_path, errors="replace") as f:
                lines = [line.strip() for line in f if line.strip() and "syslog" not in line]
        except OSError:
            lines = []
        code = self.process.returncode
        return lines[-1] if lines else f"exit status {code}" if code is not None else "no answer"

    def stop(self) -> None:
        """Tell pasta to go; called when the container has exited. Its exit takes ~15 ms
        (the kernel unregistering the tap device), so it is reaped after the exit is
        recorded: `run` then `start` at once would find the container still running."""
        if self.ready_fd >= 0:
            os.close(self.ready_fd)
            self.ready_fd = -1
        if self.process.poll() is None:
            self.process.terminate()

    def reap(self) -> None:
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- strata port ------------------------------------------------------------------------

def add_parsers(add_parser) -> None:
    p = add_parser("port", help="list a container's published ports",
                   description="The published ports of a running container (-p), as HOSTIP:HOSTPORT.")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("private", metavar="PRIVATE_PORT[/PROTO]", nargs="?")
    p.set_defaults(func=cmd_port)


def cmd_port(args, store) -> int:
    from store import StoreError
    from store.containers import Status, resolve_container
    from .state import current_state
    config = resolve_container(store, args.container)
    running = current_state(store, config["Id"])["Status"] == Status.RUNNING
    ports = settings(config.get("NetworkMode"), config.get("PortBindings") or [], running)["Ports"]
    if args.private:
        port, _, proto = args.private.partition("/")
        key = f"{port}/{proto or 'tcp'}"
        if key not in ports:
            raise StoreError(f"no public port {key!r} published for {args.container}")
        for b in ports[key]:
            print(f"{b['HostIp']}:{b['HostPort']}")
        return 0
    for key, published in ports.items():
        for b in published:
            print(f"{key} -> {b['HostIp']}:{b['HostPort']}")
    return 0
