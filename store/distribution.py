"""A client of the OCI distribution API (registry v2), over httpx.

One RegistryClient talks to one registry: it pings /v2/ first (which tells https
from plain http for an insecure registry, and what authentication the registry
asks for), then answers 401s as the registry's WWW-Authenticate says: Basic with
the stored credentials, or Bearer with a token from the realm it names (with the
credentials, or anonymous), per set of scopes. A request whose body is a stream
cannot be sent twice, so its token is fetched before it is sent.

Every failure is a RegistryError with one line that says what went wrong and
where; transport errors are mapped here and nowhere else.

The registry may be the attacker's. Credentials go only to the registry's own origin
(scheme, host, port) and to the token realm it names, which must be https unless the
registry is insecure (a password would cross the network in the clear); httpx drops the
Authorization header itself when a redirect leaves the origin. Every answer is read
streamed, and only so far: a manifest up to MAX_MANIFEST, anything else that is not a
blob up to MAX_BODY (an endless error body or token is cut off, not held in memory).
Text the registry wrote goes into errors through printable(): one line, no escapes.
"""
from __future__ import annotations

import base64
import contextlib
import json
import re
import ssl
import time
from typing import Iterator

import httpx

from .errors import StoreError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join(MANIFEST_TYPES + INDEX_TYPES)
MAX_MANIFEST = 4 << 20  # as containerd: a manifest is small; a registry that sends more is wrong
MAX_BODY = 1 << 20  # an error, a token, /v2/: as containers/image caps error bodies and tokens

USER_AGENT = "strata/0.1"


class RegistryError(StoreError):
    """A registry refused or failed a request; the message is one line."""


class AuthError(RegistryError):
    pass


class Unreachable(RegistryError):
    pass


class TransferBroken(RegistryError):
    """The connection broke in the middle of a body: what arrived so far is good to keep."""


class DigestMismatch(RegistryError):
    pass


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """WWW-Authenticate: 'Bearer realm="...",service="...",scope="..."' -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for m in re.finditer(r'\s*([A-Za-z][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?', rest):
        value = m[2] if m[2] is not None else m[3]
        params[m[1].lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme.lower(), params


def error_codes(body: bytes) -> list[tuple[str, str]]:
    """(code, message) of the registry's {"errors": [...]} body, if it sent one."""
    with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
        return [(str(e.get("code", "")), printable(str(e.get("message", "")))) for e in json.loads(body)["errors"]]
    return []


def printable(text: str) -> str:
    """Text a registry wrote, as one line of plain characters: no newline, no terminal
    escape, no bidi control gets from a hostile registry into an error."""
    return "".join(c if c.isprintable() else "?" for c in text)


class RegistryClient:
    """Requests to one registry. `registry` is its name as references spell it (docker.io);
    `api_host` is where the API is (registry-1.docker.io for docker.io)."""

    def __init__(self, registry: str, api_host: str, insecure: bool = False,
                 credentials: tuple[str, str] | None = None, timeout: float = 60):
        self.registry, self.api_host, self.insecure, self.credentials = registry, api_host, insecure, credentials
        verify: ssl.SSLContext | bool = False if insecure else ssl.create_default_context()
        self.http = httpx.Client(verify=verify, follow_redirects=True, headers={"User-Agent": USER_AGENT},
                                 timeout=httpx.Timeout(timeout, connect=15))
        self.base: str | None = None
        self.challenge: tuple[str, dict[str, str]] | None = None
        self.tokens: dict[frozenset, tuple[str, float]] = {}  # scopes -> (token, monotonic expiry)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport errors, in one place ---------------------------------------

    @contextlib.contextmanager
    def transport(self, what: str) -> Iterator[None]:
        try:
            yield
        except httpx.TimeoutException:
            raise Unreachable(f"registry {self.registry} timed out {what}") from None
        except httpx.ConnectError as e:
            raise Unreachable(f"registry {self.registry} unreachable: {self._reason(e)}") from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
            raise TransferBroken(f"registry {self.registry} broke the connection {what}: "
                                 f"{self._reason(e)}") from None
        except httpx.HTTPError as e:
            raise RegistryError(f"registry {self.registry}: {what} failed: {self._reason(e)}") from None

    def _reason(self, e: Exception) -> str:
        text = str(e) or type(e).__name__
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return (f"its TLS certificate is not trusted ({text.rpartition(':')[2].strip(' )')}); "
                    f"--tls-verify=false to connect anyway")
        if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
            return ("it does not speak https (plain http is used only for an insecure registry: "
                    "--tls-verify=false, or insecure = true in registries.conf)")
        return printable(text.splitlines()[0] if text.strip() else type(e).__name__)

    def fail(self, response: httpx.Response, what: str, scopes: list[str] = ()) -> RegistryError:
        """The one-line error for a response that is not a success (its body is read here,
        its first MAX_BODY bytes)."""
        try:
            body = response.content
        except httpx.ResponseNotRead:
            body = b""
            if not response.is_stream_consumed:
                with contextlib.suppress(RegistryError):
                    body = self.read_capped(response, MAX_BODY, what)
        codes = dict(error_codes(body))
        status = response.status_code
        if status == 401 or "UNAUTHORIZED" in codes:
            if self.credentials is None:
                return AuthError(f"authentication required by {self.registry} ({what}): "
                                 f"strata login {self.registry}")
            return AuthError(f"authentication refused by {self.registry} ({what}) for user "
                             f"{self.credentials[0]!r}")
        if status == 403 or "DENIED" in codes:
            return AuthError(f"access denied by {self.registry} ({what})")
        for code, label in (("MANIFEST_UNKNOWN", "manifest unknown"), ("NAME_UNKNOWN", "name unknown"),
                            ("BLOB_UNKNOWN", "blob unknown"), ("NAME_INVALID", "name invalid"),
                            ("TAG_INVALID", "tag invalid"), ("MANIFEST_INVALID", "manifest invalid"),
                            ("MANIFEST_BLOB_UNKNOWN", "manifest blob unknown"),
                            ("DIGEST_INVALID", "digest invalid"), ("SIZE_INVALID", "size invalid"),
                            ("BLOB_UPLOAD_UNKNOWN", "upload unknown"), ("UNSUPPORTED", "unsupported"),
                            ("TOOMANYREQUESTS", "too many requests")):
            if code in codes:
                detail = codes[code] if codes[code] and codes[code] != label else ""
                return RegistryError(f"{label}: {what}" + (f" ({detail})" if detail else ""))
        if status == 404:
            return RegistryError(f"not found: {what}")
        return RegistryError(f"registry {self.registry} answered {status} {printable(response.reason_phrase)} "
                             f"({what})")

    def read_capped(self, response: httpx.Response, limit: int, what: str) -> bytes:
        """The body of a streamed response, `limit` bytes at most (more is an error); the
        response is closed, and keeps the body as httpx's read() would (.content)."""
        body = bytearray()
        try:
            with self.transport(what):
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise RegistryError(f"registry {self.registry} sent more than {limit >> 20} MiB "
                                            f"{what}")
        finally:
            response.close()
        response._content = bytes(body)  # what httpx's own read() sets
        return response._content

    def get(self, url, what: str, **kw) -> httpx.Response:
        """A GET whose answer is small (/v2/, a token): streamed and read to MAX_BODY."""
        with self.transport(what):
            response = self.http.send(self.http.build_request("GET", url, params=kw.pop("params", None)),
                                      stream=True, **kw)
        self.read_capped(response, MAX_BODY, what)
        return response

    def same_origin(self, url) -> bool:
        """Whether `url` is the registry's own scheme, host and port (credentials go nowhere else)."""
        if self.base is None:
            return False
        mine, other = httpx.URL(self.base), httpx.URL(str(url))
        return (mine.scheme, mine.host, mine.port) == (other.scheme, other.host, other.port)

    def location(self, response: httpx.Response, default: str | None = None) -> str:
        """The upload URL a response's Location names, checked: http(s), and never plain http
        for a registry reached over https (unless it is insecure): the layers would go in the clear."""
        text = response.headers.get("location", default)
        try:
            url = response.url.join(text)
        except httpx.InvalidURL:
            raise RegistryError(f"registry {self.registry} sent an upload location that is not a URL: "
                                f"{printable(text)!r}") from None
        if url.scheme not in ("http", "https"):
            raise RegistryError(f"registry {self.registry} sent an upload location that is not http(s): "
                                f"{printable(str(url))!r}")
        if url.scheme == "http" and self.base and self.base.startswith("https:") and not self.insecure:
            raise RegistryError(f"registry {self.registry} sent an upload location on plain http "
                                f"({printable(str(url))}): refused for a registry reached over https")
        return str(url)

    # -- authentication -----------------------------------------------------

    def ping(self) -> None:
        """GET /v2/: the scheme (https; http too when insecure) and the challenge, if any."""
        schemes = ("https", "http") if self.insecure else ("https",)
        error: RegistryError | None = None
        for scheme in schemes:
            try:
                response = self.get(f"{scheme}://{self.api_host}/v2/", "answering /v2/")
            except RegistryError as e:
                if error is None or isinstance(error, Unreachable):  # what one that answered said
                    error = e
                continue
            if response.status_code == 401 and "www-authenticate" in response.headers:
                self.challenge = parse_challenge(response.headers["www-authenticate"])
            elif not response.is_success:
                error = RegistryError(f"{self.api_host} is not a registry: GET /v2/ answered "
                                      f"{response.status_code} {printable(response.reason_phrase)}")
                continue
            self.base = f"{scheme}://{self.api_host}"
            return
        raise error

    def url(self, path: str) -> str:
        if self.base is None:
            self.ping()
        return self.base + path

    def authorization(self, scopes: list[str]) -> str | None:
        if self.challenge is None:
            return None
        scheme, params = self.challenge
        if scheme == "basic":
            if self.credentials is None:
                return None
            return "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
        if scheme == "bearer":
            key = frozenset(scopes)
            token, expires = self.tokens.get(key, ("", 0.0))
            if time.monotonic() >= expires:
                token, lifetime = self.fetch_token(params, scopes)
                self.tokens[key] = (token, time.monotonic() + max(lifetime - 10, lifetime / 2))
            return "Bearer " + token
        raise AuthError(f"registry {self.registry} asks for {scheme} authentication, which strata "
                        f"does not speak (Basic and Bearer only)")

    def fetch_token(self, params: dict[str, str], scopes: list[str]) -> tuple[str, float]:
        """(token, seconds it lives: expires_in, else the spec's 60)."""
        realm = params.get("realm")
        try:
            url = httpx.URL(realm or "")
        except httpx.InvalidURL:
            url = None
        if url is None or url.scheme not in ("https", "http") or not url.host:
            raise AuthError(f"registry {self.registry} asks for a bearer token without a realm URL")
        if url.scheme == "http" and not self.insecure:
            raise AuthError(f"registry {self.registry} names a token service on plain http "
                            f"({printable(realm)}): refused, it would have the credentials in the clear "
                            f"(--tls-verify=false, or insecure = true in registries.conf, to allow it)")
        query = [("scope", s) for s in scopes] or ([("scope", params["scope"])] if "scope" in params else [])
        if "service" in params:
            query.insert(0, ("service", params["service"]))
        auth = httpx.BasicAuth(*self.credentials) if self.credentials else None
        response = self.get(url, "answering the token request", params=query, auth=auth)
        if response.status_code in (401, 403):
            who = f"user {self.credentials[0]!r}" if self.credentials else "anonymous access"
            raise AuthError(f"authentication refused by {self.registry}'s token service ({who})")
        if not response.is_success:
            raise AuthError(f"token service of {self.registry} answered {response.status_code} "
                            f"{printable(response.reason_phrase)}")
        try:
            body = json.loads(response.content)
            token = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token, lifetime = None, 0
        if not isinstance(token, str) or not token or not all("!" <= c <= "~" for c in token):
            raise AuthError(f"token service of {self.registry} sent no token (of visible ASCII characters)")
        return token, lifetime

    def send(self, method: str, path_or_url: str, scopes: list[str], what: str, *, headers=None,
             content=None, params=None, stream: bool = False, replayable: bool = True) -> httpx.Response:
        """One request, with authorization (to the registry's own origin only); a 401 is
        answered once (for a replayable body). Unless `stream`, the answer is read (MAX_BODY)."""
        url = path_or_url if path_or_url.startswith(("http://", "https://")) else self.url(path_or_url)
        own = self.same_origin(url)
        for attempt in (0, 1):
            all_headers = dict(headers or {})
            auth = self.authorization(scopes) if own else None
            if auth:
                all_headers["Authorization"] = auth
            with self.transport(what):
                request = self.http.build_request(method, url, headers=all_headers, content=content,
                                                  params=params)
                response = self.http.send(request, stream=True)
            header = response.headers.get("www-authenticate")
            if response.status_code != 401 or attempt or not replayable or not header or \
                    not (own and self.same_origin(response.url)):  # another host's challenge is not ours
                if not stream:
                    self.read_capped(response, MAX_BODY, what)
                return response
            self.read_capped(response, MAX_BODY, what)  # small; kept readable for fail()
            challenge = parse_challenge(header)
            if challenge[0] != "bearer" and (challenge == self.challenge or self.credentials is None):
                self.challenge = challenge
                return response  # the credentials were sent, or there are none
            self.challenge = challenge  # a new challenge, or a token that no longer does: a new one
            self.tokens.pop(frozenset(scopes), None)
        return response

    # -- manifests ---------------------------------------------------------

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str, str | None]:
        """(bytes, media type, the registry's Docker-Content-Digest) of a manifest or index."""
        what = f"for {self.registry}/{repository}{'@' if reference.startswith('sha256:') else ':'}{reference}"
        response = self.send("GET", f"/v2/{repository}/manifests/{reference}", pull_scope(repository),
                             what, headers={"Accept": ACCEPT}, stream=True)
        try:
            if not response.is_success:
                raise self.fail(response, what.replace("for ", "", 1))
            body = self.read_capped(response, MAX_MANIFEST, f"as the manifest {what}")
        finally:
            response.close()
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        return body, media_type, response.headers.get("docker-content-digest")

    def put_manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> str | None:
        what = f"for {self.registry}/{repository}:{reference}"
        response = self.send("PUT", f"/v2/{repository}/manifests/{reference}", push_scope(repository),
                             what, headers={"Content-Type": media_type}, content=body)
        if response.status_code not in (200, 201):
            raise self.fail(response, f"uploading the manifest {what}")
        return response.headers.get("docker-content-digest")

    # -- blobs -------------------------------------------------------------

    @contextlib.contextmanager
    def open_blob(self, repository: str, digest: str, offset: int = 0) -> Iterator[httpx.Response]:
        """GET a blob (from `offset` on: the response is 206 when the registry honours it)."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = self.send("GET", f"/v2/{repository}/blobs/{digest}", pull_scope(repository),
                             f"for blob {digest}", headers=headers, stream=True)
        try:
            if not response.is_success and response.status_code != 416:
                raise self.fail(response, f"{digest} in {self.registry}/{repository}")
            yield response
        finally:
            response.close()

    def blob_exists(self, repository: str, digest: str, scopes: list[str]) -> bool:
        response = self.send("HEAD", f"/v2/{repository}/blobs/{digest}", scopes, f"for blob {digest}")
        if response.status_code == 404:
            return False
        if not response.is_success:
            raise self.fail(response, f"checking blob {digest} in {self.registry}/{repository}")
        return True

    def start_upload(self, repository: str, scopes: list[str], mount: str | None = None,
                     source: str | None = None) -> str | None:
        """POST an upload; the upload URL, or None when the blob was mounted from `source`."""
        params = {"mount": mount, "from": source} if mount and source else None
        response = self.send("POST", f"/v2/{repository}/blobs/uploads/", scopes,
                             f"starting an upload to {self.registry}/{repository}", params=params)
        if response.status_code == 201 and mount:
            return None
        if response.status_code != 202 or "location" not in response.headers:
            raise self.fail(response, f"starting an upload to {self.registry}/{repository}")
        return self.location(response)

    def upload_chunk(self, location: str, scopes: list[str], data, start: int | None, length: int | None,
                     what: str) -> str:
        """PATCH data to an upload: a ranged chunk (start, length), or a whole stream
        (start None: chunked transfer encoding). The next upload URL."""
        headers = {"Content-Type": "application/octet-stream"}
        if start is not None:
            headers.update({"Content-Range": f"{start}-{start + length - 1}", "Content-Length": str(length)})
        response = self.send("PATCH", location, scopes, what, headers=headers, content=data,
                             replayable=start is not None and isinstance(data, bytes))
        if response.status_code != 202:
            raise self.fail(response, what)
        return self.location(response, location)

    def finish_upload(self, location: str, scopes: list[str], digest: str, what: str, data=b"",
                      length: int | None = None) -> None:
        """PUT ?digest= closing an upload, with the whole blob (monolithic) or nothing (after PATCHes)."""
        url = httpx.URL(location).copy_merge_params({"digest": digest})
        headers = {"Content-Type": "application/octet-stream",
                   "Content-Length": str(len(data) if length is None else length)}
        response = self.send("PUT", str(url), scopes, what, headers=headers, content=data,
                             replayable=isinstance(data, bytes))
        if response.status_code not in (201, 204):
            raise self.fail(response, what)


def pull_scope(repository: str) -> list[str]:
    return [f"repository:{repository}:pull"]


def push_scope(repository: str, mount_from: str | None = None) -> list[str]:
    scopes = [f"repository:{repository}:pull,push"]
    if mount_from and mount_from != repository:
        scopes.append(f"repository:{mount_from}:pull")
    return scopes


def parse_json(body: bytes, what: str) -> dict:
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise RegistryError(f"{what} is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RegistryError(f"{what} is not a JSON object")
    return obj
