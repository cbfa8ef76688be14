"""strata pull / push / login against a registry the attacker controls.

Hostile is that registry: a small HTTP(S) server on 127.0.0.1 whose answers each test
writes (a route is a method and a path pattern), which records every request it gets
and counts the bytes it sends. It is the attacker, not a stand-in for the real registry
(tests/test_registry.py runs that); nothing here is a mock of strata's own parts.
"""
from __future__ import annotations

import base64
import contextlib
import gzip
import http.server
import json
import os
import re
import ssl
import subprocess
import threading

import pytest

from .helpers import build_tar, member
from .test_registry import cli, error_line, home, ok, sha, user_cli  # noqa: F401 (fixtures)

USER, PASSWORD = "victim", "s3cret-password"
MEDIA = {"manifest": "application/vnd.oci.image.manifest.v1+json",
         "index": "application/vnd.oci.image.index.v1+json",
         "config": "application/vnd.oci.image.config.v1+json",
         "gzip": "application/vnd.oci.image.layer.v1.tar+gzip"}


class Request:
    """One request to Hostile, and the ways to answer it."""

    def __init__(self, handler: http.server.BaseHTTPRequestHandler, server: "Hostile", body: bytes):
        self.handler, self.server, self.body = handler, server, body
        self.method, self.path, self.headers = handler.command, handler.path, handler.headers

    def write(self, data: bytes) -> None:
        self.handler.wfile.write(data)
        with self.server.lock:
            self.server.sent += len(data)

    def reply(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.handler.send_response(status)
        for k, v in (headers or {}).items():
            self.handler.send_header(k, v)
        self.handler.send_header("Content-Length", str(len(body)))
        self.handler.end_headers()
        if self.method != "HEAD":
            self.write(body)

    def stream(self, status: int, chunks, headers: dict | None = None) -> None:
        """A chunked body of `chunks` (an endless one, if they are)."""
        self.handler.send_response(status)
        for k, v in (headers or {}).items():
            self.handler.send_header(k, v)
        self.handler.send_header("Transfer-Encoding", "chunked")
        self.handler.end_headers()
        try:
            for chunk in chunks:
                self.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.write(b"0\r\n\r\n")
        except OSError:
            self.handler.close_connection = True  # the client gave up: as it should


def endless(limit: int = 256 << 20, chunk: bytes = b"A" * (64 << 10)):
    """A body far larger than anything strata should read (bounded, so that a strata that
    reads it all still ends)."""
    for _ in range(limit // len(chunk)):
        yield chunk


class Hostile:
    def __init__(self, tls_dir: str | None = None):
        self.routes: list[tuple[str, re.Pattern, object]] = []
        self.requests: list[Request] = []
        self.sent = 0
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = bytearray()
                    while (size := int(self.rfile.readline().split(b";")[0], 16)):
                        body += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                else:
                    body = self.rfile.read(length) if length else b""
                request = Request(self, server, bytes(body))
                with server.lock:
                    server.requests.append(request)
                for method, pattern, fn in server.routes:
                    if method == self.command and (m := pattern.fullmatch(self.path.split("?")[0])):
                        return fn(request, m)
                request.reply(404, b'{"errors":[{"code":"NAME_UNKNOWN","message":"no"}]}',
                              {"Content-Type": "application/json"})

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = answer

            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls_dir:
            self.scheme = "https"
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self_signed(tls_dir))
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"{self.scheme}://{self.host}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def route(self, method: str, pattern: str, fn) -> None:
        self.routes.insert(0, (method, re.compile(pattern), fn))

    def authorizations(self) -> list[str]:
        return [r.headers.get("Authorization") for r in self.requests if r.headers.get("Authorization")]

    def serve_image(self, repository: str, tag: str, blobs: dict[str, bytes], manifest: bytes,
                    media_type: str = MEDIA["manifest"]) -> None:
        """Answer like an honest registry for one image (the test overrides what it attacks)."""
        self.route("GET", r"/v2/", lambda r, m: r.reply(200, b"{}"))
        self.route("GET", rf"/v2/{repository}/manifests/({tag}|{sha(manifest)})",
                   lambda r, m: r.reply(200, manifest, {"Content-Type": media_type,
                                                        "Docker-Content-Digest": sha(manifest)}))
        for method in ("GET", "HEAD"):
            self.route(method, rf"/v2/{repository}/blobs/(sha256:[0-9a-f]{{64}})",
                       lambda r, m: r.reply(200, blobs[m[1]]) if m[1] in blobs else r.reply(404))

    def accept_pushes(self, repository: str, upload_url: str | None = None) -> None:
        """Take uploads: POST answers `upload_url` (by default its own)."""
        upload_url = upload_url or f"{self.url}/v2/{repository}/blobs/uploads/u1"
        self.route("HEAD", rf"/v2/{repository}/blobs/.*", lambda r, m: r.reply(404))
        self.route("POST", rf"/v2/{repository}/blobs/uploads/", lambda r, m: r.reply(202, b"", {"Location": upload_url}))
        accept_uploads(self, rf"/v2/{repository}/blobs/uploads/u1")
        self.route("PUT", rf"/v2/{repository}/manifests/.*", lambda r, m: r.reply(201, b"", {
            "Docker-Content-Digest": sha(r.body)}))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def accept_uploads(server: Hostile, path: str) -> None:
    server.route("PATCH", path, lambda r, m: r.reply(202, b"", {"Location": f"{server.url}{path}",
                                                                 "Range": f"0-{len(r.body) - 1}"}))
    server.route("PUT", path, lambda r, m: r.reply(201, b""))


def self_signed(directory: str) -> tuple[str, str]:
    cert, key = os.path.join(directory, "hostile.crt"), os.path.join(directory, "hostile.key")
    if not os.path.exists(cert):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True)
    return cert, key


@contextlib.contextmanager
def hostile(tls_dir: str | None = None):
    server = Hostile(tls_dir)
    try:
        yield server
    finally:
        server.close()


def small_image(config_extra: dict | None = None, layer_extra: dict | None = None):
    """(blobs, manifest bytes) of a one-layer image."""
    tar = build_tar([member("etc", "dir", mode=0o755), member("etc/hostile", data=b"from the attacker\n")])
    layer = gzip.compress(tar, mtime=0)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
                         "rootfs": {"type": "layers", "diff_ids": [sha(tar)]}}).encode()
    manifest = {"schemaVersion": 2, "mediaType": MEDIA["manifest"],
                "config": dict({"mediaType": MEDIA["config"], "digest": sha(config), "size": len(config)},
                               **(config_extra or {})),
                "layers": [dict({"mediaType": MEDIA["gzip"], "digest": sha(layer), "size": len(layer)},
                                **(layer_extra or {}))]}
    return {sha(layer): layer, sha(config): config}, json.dumps(manifest).encode()


def credentials_for(home, *hosts: str) -> dict:
    """An auth file in `home` with the victim's password for `hosts`; the env that names it."""
    path = home / "auth.json"
    entry = {"auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
    path.write_text(json.dumps({"auths": {h: entry for h in hosts}}))
    return {"REGISTRY_AUTH_FILE": str(path)}


def basic_challenge(server: Hostile) -> None:
    """/v2/ and every request without the victim's Basic credentials answer 401."""
    wanted = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    routes = list(server.routes)
    server.routes.clear()

    def guarded(fn):
        def answer(r, m):
            if r.headers.get("Authorization") != wanted:
                return r.reply(401, b"", {"WWW-Authenticate": 'Basic realm="hostile"'})
            return fn(r, m)
        return answer
    server.routes.extend((method, pattern, guarded(fn)) for method, pattern, fn in routes)


# -- credentials --------------------------------------------------------------------------

def test_a_blob_redirected_to_another_host_does_not_take_the_credentials(cli, home, store):
    """Registries send blob GETs to storage elsewhere: the Authorization header stays behind."""
    blobs, manifest = small_image()
    with hostile() as registry, hostile() as storage:
        registry.serve_image("evil/app", "1", blobs, manifest)
        registry.route("GET", r"/v2/evil/app/blobs/(sha256:[0-9a-f]{64})",
                       lambda r, m: r.reply(307, b"", {"Location": f"{storage.url}/bucket/{m[1]}"}))
        basic_challenge(registry)
        storage.route("GET", r"/bucket/(sha256:[0-9a-f]{64})", lambda r, m: r.reply(200, blobs[m[1]]))
        env = credentials_for(home, registry.host)
        ok(cli("pull", "-q", "--tls-verify=false", f"{registry.host}/evil/app:1", env=env))
        assert [r.path for r in storage.requests if r.path.startswith("/bucket/")], "the blobs came from storage"
        assert storage.authorizations() == [], "the registry's credentials went to the storage host"
        assert registry.authorizations(), "the registry itself had them"


@pytest.mark.parametrize("user_cli", ["root", "unprivileged"], indirect=True)
def test_an_upload_location_on_another_host_gets_no_credentials(user_cli, cli, home):
    """A push's upload URL (POST's Location) on another host: the blob goes there, the
    registry's password does not."""
    ok(cli("base"))
    with hostile() as registry, hostile() as elsewhere:
        registry.accept_pushes("evil/app", upload_url=f"{elsewhere.url}/upload/u1")
        registry.route("GET", r"/v2/", lambda r, m: r.reply(200, b"{}"))
        basic_challenge(registry)
        accept_uploads(elsewhere, "/upload/u1")
        auth = os.path.join(user_cli.scratch, "auth.json")
        with open(auth, "w") as f:
            f.write(json.dumps({"auths": {registry.host: {
                "auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}}}))
        os.chmod(auth, 0o644)
        user_cli.env["REGISTRY_AUTH_FILE"] = auth
        ok(cli("save", "-o", os.path.join(user_cli.scratch, "bb.tar"), "busybox"))
        os.chmod(os.path.join(user_cli.scratch, "bb.tar"), 0o644)
        user_cli.ok("load", "-q", "-i", os.path.join(user_cli.scratch, "bb.tar"))
        user_cli.ok("push", "-q", "--tls-verify=false", "busybox", f"{registry.host}/evil/app:1")
        assert [r for r in elsewhere.requests if r.method in ("PATCH", "PUT")], "the layers went elsewhere"
        assert elsewhere.authorizations() == [], "the registry's credentials went to another host"


def test_a_token_realm_over_plain_http_gets_no_password_from_an_https_registry(cli, home, tmp_path):
    """An https registry whose token service is plain http (on another host): the password
    would cross the network in the clear. Refused unless the registry is insecure."""
    blobs, manifest = small_image()
    with hostile(str(tmp_path)) as registry, hostile() as realm:
        registry.serve_image("evil/app", "1", blobs, manifest)
        registry.route("GET", r"/v2/", lambda r, m: r.reply(401, b"", {
            "WWW-Authenticate": f'Bearer realm="{realm.url}/token",service="evil"'}))
        realm.route("GET", r"/token", lambda r, m: r.reply(200, b'{"token": "t"}'))
        env = dict(credentials_for(home, registry.host), SSL_CERT_FILE=self_signed(str(tmp_path))[0])
        line = error_line(cli("pull", "-q", f"{registry.host}/evil/app:1", env=env))
        assert "plain http" in line and "token" in line, line
        assert realm.authorizations() == [], "the password went over plain http"


def test_auth_file_is_written_through_no_planted_temporary_file(home, tmp_path):
    """--authfile /tmp/auth.json (or REGISTRY_AUTH_FILE) in a directory others can write:
    a symlink or file planted where the temporary file will be gets nothing."""
    from store.registry_config import save_credentials
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    target = tmp_path / "victim-file"
    target.write_text("untouched\n")
    os.symlink(target, shared / f".tmp.auth.json.{os.getpid()}")
    path = save_credentials("127.0.0.1:1", USER, PASSWORD, str(shared / "auth.json"))
    assert target.read_text() == "untouched\n", "the credentials went through a planted symlink"
    st = os.lstat(path)
    assert not os.path.islink(path) and st.st_mode & 0o777 == 0o600
    assert json.loads(open(path).read())["auths"]["127.0.0.1:1"]


# -- resource exhaustion ------------------------------------------------------------------

@pytest.mark.parametrize("where", ["ping", "error", "token"])
def test_an_endless_answer_is_cut_off(cli, home, where):
    """A /v2/ answer, an error body or a token that never ends: strata reads a bounded part
    of it and says so, instead of holding it all in memory."""
    blobs, manifest = small_image()
    with hostile() as registry:
        registry.serve_image("evil/app", "1", blobs, manifest)
        if where == "ping":
            registry.route("GET", r"/v2/", lambda r, m: r.stream(200, endless()))
        elif where == "error":
            registry.route("GET", r"/v2/evil/app/manifests/1", lambda r, m: r.stream(404, endless()))
        else:
            registry.route("GET", r"/v2/", lambda r, m: r.reply(401, b"", {
                "WWW-Authenticate": f'Bearer realm="{registry.url}/token"'}))
            registry.route("GET", r"/token", lambda r, m: r.stream(200, endless()))
        proc = cli("pull", "-q", "--tls-verify=false", f"{registry.host}/evil/app:1")
        assert proc.returncode == 125, proc.stderr.decode()[-2000:]
        error_line(proc)
        assert registry.sent < 32 << 20, f"strata read {registry.sent >> 20} MiB of one answer"


def test_a_config_larger_than_4_mib_is_refused_before_it_is_fetched(cli, home, store):
    blobs, manifest = small_image(config_extra={"digest": sha(b"big"), "size": 64 << 20})
    with hostile() as registry:
        registry.serve_image("evil/app", "1", blobs, manifest)
        registry.route("GET", r"/v2/evil/app/blobs/(sha256:[0-9a-f]{64})",
                       lambda r, m: r.stream(200, endless(64 << 20)))
        line = error_line(cli("pull", "-q", "--tls-verify=false", f"{registry.host}/evil/app:1"))
        assert "config" in line and "4 MiB" in line, line
        assert registry.sent < 8 << 20


# -- hostile documents and headers ---------------------------------------------------------

def index_of(manifest: bytes, platform) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": MEDIA["index"], "manifests": [
        {"mediaType": MEDIA["manifest"], "digest": sha(manifest), "size": len(manifest), "platform": platform}]}).encode()


HOSTILE_DOCUMENTS = {
    "layer media type a list": lambda: small_image(layer_extra={"mediaType": [MEDIA["gzip"]]}),
    "platform os a number": lambda: (lambda b, m: (b, index_of(m, {"os": 7, "architecture": "amd64"}), m))(
        *small_image()),
    "platform os with escapes": lambda: (lambda b, m: (b, index_of(m, {"os": "\x1b[2J\nlinux", "architecture":
                                                                       "amd64"}), m))(*small_image()),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_DOCUMENTS))
def test_a_hostile_manifest_or_index_is_a_one_line_error(cli, home, store, case):
    made = HOSTILE_DOCUMENTS[case]()
    with hostile() as registry:
        if len(made) == 3:  # an index over the manifest
            blobs, index, manifest = made
            registry.serve_image("evil/app", "1", blobs, index, MEDIA["index"])
            registry.route("GET", rf"/v2/evil/app/manifests/{sha(manifest)}",
                           lambda r, m: r.reply(200, manifest, {"Content-Type": MEDIA["manifest"]}))
        else:
            registry.serve_image("evil/app", "1", *made)
        line = error_line(cli("pull", "-q", "--tls-verify=false", f"{registry.host}/evil/app:1"))
        assert "\x1b" not in line
        assert store.image_ids() == []


HOSTILE_HEADERS = {
    "error message with a newline and escapes": (
        "GET", r"/v2/evil/app/manifests/1", lambda url: (404, json.dumps({"errors": [
            {"code": "MANIFEST_UNKNOWN", "message": "gone\n\x1b]0;owned\x07\x1b[2Jstrata: ok"}]}).encode(), {})),
    "realm not a URL": ("GET", r"/v2/", lambda url: (401, b"", {"WWW-Authenticate": 'Bearer realm="http://[::1"'})),
    "token not ASCII": ("GET", r"/token", lambda url: (200, json.dumps({"token": "t\u00f6ken"}).encode(), {})),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_a_hostile_answer_is_a_one_line_error(cli, home, store, case):
    blobs, manifest = small_image()
    method, path, answer = HOSTILE_HEADERS[case]
    with hostile() as registry:
        registry.serve_image("evil/app", "1", blobs, manifest)
        if case == "token not ASCII":
            registry.route("GET", r"/v2/", lambda r, m: r.reply(401, b"", {
                "WWW-Authenticate": f'Bearer realm="{registry.url}/token"'}))
        registry.route(method, path, lambda r, m: r.reply(*answer(registry.url)))
        line = error_line(cli("pull", "-q", "--tls-verify=false", f"{registry.host}/evil/app:1"))
        assert "\x1b" not in line and "\x07" not in line, repr(line)
        assert store.image_ids() == []


def test_an_upload_location_that_is_not_a_url_is_a_one_line_error(cli, home):
    ok(cli("base"))
    with hostile() as registry:
        registry.accept_pushes("evil/app", upload_url="http://[::1")
        registry.route("GET", r"/v2/", lambda r, m: r.reply(200, b"{}"))
        error_line(cli("push", "-q", "--tls-verify=false", "busybox", f"{registry.host}/evil/app:1"))


def test_an_https_registry_cannot_send_uploads_to_plain_http(cli, home, tmp_path):
    """A secure registry's upload Location on http:// would send the layers (and, on the
    same host, nothing else) in the clear: refused."""
    ok(cli("base"))
    with hostile(str(tmp_path)) as registry, hostile() as plain:
        registry.accept_pushes("evil/app", upload_url=f"{plain.url}/upload/u1")
        registry.route("GET", r"/v2/", lambda r, m: r.reply(200, b"{}"))
        accept_uploads(plain, "/upload/u1")
        line = error_line(cli("push", "-q", "busybox", f"{registry.host}/evil/app:1",
                              env={"SSL_CERT_FILE": self_signed(str(tmp_path))[0]}))
        assert "plain http" in line, line
        assert not [r for r in plain.requests if r.method in ("PATCH", "PUT")]


# -- verification (guards: these held before the attack, and must go on holding) ------------

def test_a_pull_by_digest_takes_only_the_manifest_with_that_digest(cli, home, store):
    blobs, manifest = small_image()
    _, other = small_image(layer_extra={"annotations": {"swapped": "yes"}})
    with hostile() as registry:
        registry.serve_image("evil/app", "1", blobs, manifest)
        registry.route("GET", rf"/v2/evil/app/manifests/{sha(manifest)}", lambda r, m: r.reply(
            200, other, {"Content-Type": MEDIA["manifest"], "Docker-Content-Digest": sha(manifest)}))
        line = error_line(cli("pull", "-q", "--tls-verify=false", f"{registry.host}/evil/app@{sha(manifest)}"))
        assert "digest mismatch" in line and sha(other) in line
        registry.route("GET", r"/v2/evil/app/blobs/(sha256:[0-9a-f]{64})",
                       lambda r, m: r.stream(200, [blobs.get(m[1], b"")] + list(endless(8 << 20))))
        line = error_line(cli("pull", "-q", "--tls-verify=false", f"{registry.host}/evil/app:1"))
        assert "is larger than" in line, line
        assert store.image_ids() == []
