"""The CNCF distribution registry (Debian's docker-registry 2.8) on 127.0.0.1, for tests.

Each registry gets its own temporary config and storage and runs in its own
session (never the package's service: it listens on every interface and wants
systemd). It is ready when GET /v2/ answers (200 without auth, 401 with); it is
stopped with SIGTERM, then SIGKILL. htpasswd files are bcrypt (the registry
accepts nothing else), made with python's bcrypt from the test venv.

TokenServer is the other half of the registry's `token` auth mode: the registry trusts
a certificate (made here with openssl) and checks every bearer token's RS256 signature,
issuer, audience, lifetime and access claims; the server hands such tokens out, for
the scopes asked, to a client that gives a right user:password (none to others).

ThrottledProxy sits between strata and a registry and relays at a bounded rate,
so a test can kill the registry while a blob is half-way through; it counts the
bytes it relays, so a test can tell a resumed download from a restarted one.
"""
from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

REGISTRY_BINARY = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def htpasswd_line(user: str, password: str) -> str:
    import bcrypt
    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"


class Registry:
    """One registry process; `host` is 127.0.0.1:PORT, `data` its storage root."""

    def __init__(self, workdir: str, users: dict[str, str] | None = None, port: int | None = None,
                 token_server: "TokenServer | None" = None):
        self.workdir = workdir
        self.data = os.path.join(workdir, "data")
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.users = users
        self.token_server = token_server
        self.proc: subprocess.Popen | None = None
        os.makedirs(self.data, exist_ok=True)

    def config(self) -> str:
        text = ("version: 0.1\n"
                "log: {level: warn}\n"
                f"storage: {{filesystem: {{rootdirectory: {self.data}}}, delete: {{enabled: true}}}}\n"
                f"http: {{addr: {self.host}}}\n")
        if self.users is not None:
            path = os.path.join(self.workdir, "htpasswd")
            with open(path, "w") as f:
                f.writelines(htpasswd_line(u, p) for u, p in self.users.items())
            text += f"auth: {{htpasswd: {{realm: strata-tests, path: {path}}}}}\n"
        elif self.token_server is not None:
            t = self.token_server
            text += (f"auth: {{token: {{realm: '{t.realm}', service: {t.service}, issuer: {t.issuer}, "
                     f"rootcertbundle: {t.cert_path}}}}}\n")
        return text

    def start(self, timeout: float = 30) -> "Registry":
        config = os.path.join(self.workdir, "config.yml")
        with open(config, "w") as f:
            f.write(self.config())
        log = open(os.path.join(self.workdir, "registry.log"), "ab")
        self.proc = subprocess.Popen([REGISTRY_BINARY, "serve", config], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited {self.proc.returncode}: {self.log()}")
            if self.answers():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"docker-registry did not answer on {self.host}: {self.log()}")
            time.sleep(0.05)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError as e:
            return e.code == 401 and (self.users is not None or self.token_server is not None)
        except OSError:
            return False

    def log_text(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.workdir, "registry.log"), "rb") as f:
            return f.read().decode(errors="replace")
        return ""

    def log(self) -> str:
        return self.log_text()[-2000:]

    def kill(self) -> None:
        """SIGKILL at once (a registry that dies mid-transfer)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def blob_path(self, digest: str) -> str:
        hexdigest = digest.removeprefix("sha256:")
        return os.path.join(self.data, "docker", "registry", "v2", "blobs", "sha256", hexdigest[:2],
                            hexdigest, "data")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues the registry's bearer tokens (Docker's token protocol) on 127.0.0.1."""

    service, issuer = "strata-tests-registry", "strata-tests-issuer"

    def __init__(self, workdir: str, users: dict[str, str], lifetime: int = 300):
        self.users, self.lifetime = users, lifetime
        self.key_path = os.path.join(workdir, "token.key")
        self.cert_path = os.path.join(workdir, "token.crt")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key_path,
                        "-out", self.cert_path, "-days", "2", "-subj", "/CN=strata-tests-token-issuer"],
                       check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", self.cert_path, "-outform", "DER"], check=True,
                             capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.requests: list[dict] = []  # what each token request asked for, and who asked
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.answer(self)

            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def sign(self, data: bytes) -> bytes:
        return subprocess.run(["openssl", "dgst", "-sha256", "-sign", self.key_path], input=data,
                              check=True, capture_output=True).stdout

    def answer(self, request: http.server.BaseHTTPRequestHandler) -> None:
        import urllib.parse
        query = urllib.parse.parse_qs(urllib.parse.urlparse(request.path).query)
        user = None
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(name) != password:
                self.requests.append({"user": name, "refused": True})
                request.send_response(401)
                request.end_headers()
                return
            user = name
        scopes = query.get("scope", [])
        self.requests.append({"user": user, "scopes": scopes, "service": query.get("service")})
        access = []
        for scope in scopes if user else []:  # anonymous clients get no access
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header_b = b64url(json.dumps({"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}).encode())
        claims = b64url(json.dumps({"iss": self.issuer, "sub": user or "", "aud": self.service,
                                    "exp": now + self.lifetime, "nbf": now - 1, "iat": now,
                                    "jti": os.urandom(8).hex(), "access": access}).encode())
        signed = f"{header_b}.{claims}"
        token = f"{signed}.{b64url(self.sign(signed.encode()))}"
        body = json.dumps({"token": token, "expires_in": self.lifetime}).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ThrottledProxy:
    """Relays 127.0.0.1:port to a registry, at most `rate` bytes a second downstream."""

    def __init__(self, upstream_port: int, rate: int):
        self.upstream_port, self.rate = upstream_port, rate
        self.relayed = 0  # bytes from the registry to the client, all connections
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.closing = False
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.rate), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, rate: int | None) -> None:
        started, sent = time.monotonic(), 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                if rate:
                    with self.lock:
                        self.relayed += len(data)
                    sent += len(data)
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> "ThrottledProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.closing = True
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.close()
