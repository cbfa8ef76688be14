"""The private network (runner.network): real pasta, real containers, as root and as
an unprivileged user. Servers are polled with a deadline; nothing needs the internet."""
import contextlib
import http.server
import json
import os
import select
import socket
import threading
import time
import urllib.request

import pytest

from .helpers import cli_store, run_strata, supervisors_of


@pytest.fixture(autouse=True)
def needs_pasta():
    """Fail loudly, never skip: the private network is what these tests prove."""
    assert os.path.exists("/usr/bin/pasta"), "pasta (Debian passt) is missing: `make deps` installs it"


DEADLINE = 20


@pytest.fixture(params=["root", "unprivileged"])
def strata(request, tmp_path):
    with cli_store(request, tmp_path, "network") as cli:
        yield cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_address() -> str:
    """The host's own address on its default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            raise AssertionError("the host has no IPv4 route: the private network cannot be tested") from None
        address = s.getsockname()[0]
    assert not address.startswith("127."), "the host has no address but loopback: the test needs one"
    return address


@contextlib.contextmanager
def http_server(address: str):
    """An HTTP server on the host answering "from-host"; yields (port, the clients it served)."""
    clients = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            clients.append(self.client_address[0])
            body = b"from-host\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer((address, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], clients
    finally:
        server.shutdown()
        server.server_close()


def pasta_of(store_root: str) -> int:
    """The one pasta the store's supervisors started."""
    supervisors = {str(pid) for pid in supervisors_of(store_root)}
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() in supervisors and fields["Name"].strip().startswith("pas"):
            found.append(int(pid))
    assert len(found) == 1, (supervisors, found)
    return found[0]


def wait_gone(pidfd: int) -> None:
    readable, _, _ = select.select([pidfd], [], [], DEADLINE)
    assert readable, "pasta outlived its container"


def listening(port: int, proto: str = "tcp") -> set[str]:
    """The host addresses (hex, as /proc/net shows them) something listens on at `port`."""
    found = set()
    with open(f"/proc/net/{proto}") as f:
        for line in f.read().splitlines()[1:]:
            local, _, state = line.split()[1], line.split()[2], line.split()[3]
            address, _, hex_port = local.partition(":")
            if int(hex_port, 16) == port and (state == "0A" or proto == "udp"):
                found.add(address)
    return found


def get(url: str) -> str:
    """The body at `url`, polled until the deadline (the server comes up with the container)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_own_interface_route_names_and_the_host_reached_but_not_its_loopback(strata):
    """The default network is private: eth0 with an address and a default route, a resolver
    that pasta forwards, /etc/hosts naming the container's address; a server on the host's
    own address answers from inside, one on the host's loopback does not (no --map-gw)."""
    address = host_address()
    with http_server(address) as (port, clients), http_server("127.0.0.1") as (loopback_port, loopback_clients):
        out = strata.ok("run", "--rm", "--hostname", "inside", "busybox", "sh", "-c", f"""
            ip -o -4 addr show eth0; ip route; cat /etc/resolv.conf; grep inside /etc/hosts
            echo "reach=$(timeout 10 wget -q -O- http://{address}:{port}/)"
            echo "gateway=$(timeout 3 wget -q -O- http://10.0.2.2:{loopback_port}/ 2>&1)"
            echo "loopback=$(timeout 3 wget -q -O- http://127.0.0.1:{loopback_port}/ 2>&1)" """)
        assert "inet 10.0.2.100/24" in out, out
        assert "default via 10.0.2.2 dev eth0" in out, out
        with open("/etc/resolv.conf") as f:
            host_servers = [line.split()[1] for line in f if line.startswith("nameserver") and len(line.split()) > 1]
        assert "nameserver 10.0.2.3" in out and not any(f"nameserver {ns}\n" in out for ns in host_servers), out
        assert "10.0.2.100\tinside" in out, out
        assert "reach=from-host" in out and clients, out
        # (busybox's wget -T crashes; and this VM's network may answer any address itself)
        assert "gateway=" in out and "loopback=" in out and out.count("from-host") == 1, out
        assert not loopback_clients, (out, loopback_clients)


def test_published_ports_inspect_port_and_pasta_lives_with_the_container(strata):
    """-p publishes through pasta on the address asked (all of IPv4's by default); pasta
    is started with each start and gone when the container stops or its supervisor dies."""
    tcp, tcp_local, udp = free_port(), free_port(), free_port()
    strata.ok("run", "-d", "--name", "web", "-p", f"{tcp}:8080", "--publish", f"127.0.0.1:{tcp_local}:8081/tcp",
              "-p", f"{udp}:53/udp", "busybox", "sh", "-c",
              "mkdir /www; echo inside > /www/index.html; httpd -p 8081 -h /www; exec httpd -f -p 8080 -h /www")
    assert get(f"http://127.0.0.1:{tcp}/index.html") == "inside\n"
    assert get(f"http://127.0.0.1:{tcp_local}/index.html") == "inside\n"
    assert listening(tcp) == {"00000000"} and listening(tcp_local) == {"0100007F"}, (tcp, tcp_local)
    assert listening(udp, "udp") == {"00000000"}
    info = json.loads(strata.ok("inspect", "web"))[0]
    assert info["NetworkSettings"]["Ports"] == {
        "8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(tcp)}],
        "8081/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(tcp_local)}],
        "53/udp": [{"HostIp": "0.0.0.0", "HostPort": str(udp)}]}, info["NetworkSettings"]
    assert info["NetworkSettings"]["IPAddress"] == "10.0.2.100" and info["HostConfig"]["NetworkMode"] == "bridge"
    assert strata.ok("port", "web").splitlines() == [f"8080/tcp -> 0.0.0.0:{tcp}", f"8081/tcp -> 127.0.0.1:{tcp_local}",
                                                     f"53/udp -> 0.0.0.0:{udp}"]
    assert strata.ok("port", "web", "8081") == f"127.0.0.1:{tcp_local}\n"
    assert strata.ok("ps", "--format", "{{.Ports}}") == (f"0.0.0.0:{tcp}->8080/tcp, 127.0.0.1:{tcp_local}->8081/tcp, "
                                                         f"0.0.0.0:{udp}->53/udp\n")

    pidfd = os.pidfd_open(pasta_of(strata.root))
    try:
        strata.ok("stop", "-t", "2", "web")
        wait_gone(pidfd)
    finally:
        os.close(pidfd)
    assert not listening(tcp) and strata.ok("port", "web") == ""
    strata.ok("start", "web")  # a new pasta for the new start
    assert get(f"http://127.0.0.1:{tcp}/index.html") == "inside\n"
    pidfd = os.pidfd_open(pasta_of(strata.root))
    try:  # a supervisor killed outright: pasta dies with it (PR_SET_PDEATHSIG)
        for supervisor in supervisors_of(strata.root):
            os.kill(supervisor, 9)
        wait_gone(pidfd)
    finally:
        os.close(pidfd)


def test_network_flags_and_a_missing_stack(root):
    """Bad -p values and networks are one-line errors that make nothing; without pasta
    the default is the host's network and bridge asked for is an error."""
    for args, message in [(["-p", "80"], "expected [IPV4:]HOSTPORT:CTRPORT"),
                          (["-p", "70000:80"], "invalid host port '70000'"),
                          (["-p", "8000-8002:80"], "ranges differ in length"),
                          (["-p", "[::1]:8080:80"], "expected [IPV4:]HOSTPORT:CTRPORT"),
                          (["-p", "8080:80/sctp"], "expected [IPV4:]HOSTPORT:CTRPORT"),
                          (["--network", "host", "-p", "8080:80"], "needs the private network"),
                          (["--network", "overlay"], "network 'overlay' is not supported")]:
        proc = run_strata(root, "create", *args, "busybox", "true")
        assert proc.returncode == 125 and message in proc.stderr.decode(), (args, proc)
        assert len(proc.stderr.decode().splitlines()) == 1, proc.stderr
    assert run_strata(root, "ps", "-aq").stdout == b""
    no_pasta = {"PATH": "/var/empty"}
    proc = run_strata(root, "create", "--network", "bridge", "busybox", "true", env=no_pasta)
    assert proc.returncode == 125 and proc.stderr.decode().splitlines() == [
        "strata: error: network bridge needs a user-mode stack: pasta is not installed (Debian package passt)"], proc
    cid = run_strata(root, "create", "busybox", "true", env=no_pasta, check=True).stdout.decode().strip()
    assert json.loads(run_strata(root, "inspect", cid).stdout)[0]["HostConfig"]["NetworkMode"] == "host"
    cid = run_strata(root, "create", "busybox", "true", check=True).stdout.decode().strip()
    assert json.loads(run_strata(root, "inspect", cid).stdout)[0]["HostConfig"]["NetworkMode"] == "bridge"


def test_resolv_conf_and_hosts_of_the_private_network():
    """The host's nameservers (unreachable inside: 127.0.0.53, say) give way to pasta's
    forwarder; its search and options lines stay; host and none keep the host's files."""
    from runner import network
    files = network.runtime_files("bridge", "box", "nameserver 127.0.0.53\nsearch example.org\noptions edns0\n")
    assert files["resolv.conf"] == "nameserver 10.0.2.3\nsearch example.org\noptions edns0\n"
    assert "10.0.2.100\tbox\n" in files["hosts"] and "127.0.0.1\tlocalhost\n" in files["hosts"]
    assert network.runtime_files("host", "box", "nameserver 127.0.0.53\n") == {}
    assert network.runtime_files("none", "box", "nameserver 127.0.0.53\n") == {}


def test_port_ranges_as_docker_lists_them_and_as_pasta_takes_them():
    from runner import network
    bindings = [network.parse_publish("127.0.0.1:08000-8002:9000-9002/udp"), network.parse_publish("8080:80")]
    assert network.port_bindings(bindings, bound=True) == {
        "9000/udp": [{"HostIp": "127.0.0.1", "HostPort": "8000"}], "9001/udp": [{"HostIp": "127.0.0.1", "HostPort": "8001"}],
        "9002/udp": [{"HostIp": "127.0.0.1", "HostPort": "8002"}], "80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}
    command = network.pasta_command(bindings, "/proc/self/fd/3", "/proc/self/fd/4")
    assert command[command.index("-t") + 1] == "8080:80" and command[command.index("-u") + 1] == \
        "127.0.0.1/8000-8002:9000-9002"
    for flag in ("--no-map-gw", "--ipv4-only"):
        assert flag in command
    assert command[command.index("-T") + 1] == "none" and command[command.index("-U") + 1] == "none"
