"""Remote image references, normalised as Docker's distribution/reference does.

NAME[:TAG][@DIGEST]. The first path component is a registry when it has a "." or
a ":" or is "localhost" (or has upper case); otherwise the registry is docker.io,
and a one-component name on docker.io is under library/. "index.docker.io" is
docker.io. The store tags a pulled image with Docker's familiar name (debian:12,
user/app:1, localhost:5000/app:1), which is what `strata push` parses back.
"""
from __future__ import annotations

import re

from .errors import StoreError
from .store import NAME_COMPONENT

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
DOMAIN_RE = re.compile(rf"{DOMAIN_COMPONENT}(?:\.{DOMAIN_COMPONENT})*(?::[0-9]+)?", re.ASCII)
PATH_RE = re.compile(rf"{NAME_COMPONENT}(?:/{NAME_COMPONENT})*", re.ASCII)
TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)
ANY_DIGEST_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,}", re.ASCII)


class RemoteReference:
    __slots__ = ("registry", "repository", "tag", "digest")

    def __init__(self, registry: str, repository: str, tag: str | None, digest: str | None):
        self.registry, self.repository, self.tag, self.digest = registry, repository, tag, digest

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def familiar_name(self) -> str:
        if self.registry != DOCKER_HUB:
            return f"{self.registry}/{self.repository}"
        return self.repository.removeprefix("library/")

    def familiar_tag(self) -> str | None:
        """The store tag for this reference (None for a reference by digest alone)."""
        if self.tag is None and self.digest is not None:
            return None
        return f"{self.familiar_name}:{self.tag or 'latest'}"

    def with_tag(self, tag: str | None, digest: str | None = None) -> "RemoteReference":
        return RemoteReference(self.registry, self.repository, tag, digest)

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_remote_reference(text: str) -> RemoteReference:
    """[docker://]NAME[:TAG][@DIGEST] -> a normalised reference, or a one-line StoreError."""
    original = text
    text = text.removeprefix("docker://").removeprefix("//")
    bad = f"invalid reference format: {original!r}"
    name, at, digest = text.partition("@")
    if at:
        if not ANY_DIGEST_RE.fullmatch(digest):
            raise StoreError(f"{bad} (a digest is sha256:<64 hex digits>)")
        if not DIGEST_RE.fullmatch(digest):
            raise StoreError(f"{bad}: unsupported digest {digest!r} (only sha256)")
    tag = None
    head, _, last = name.rpartition("/")
    if ":" in last:
        last, _, tag = last.partition(":")
        if not TAG_RE.fullmatch(tag):
            raise StoreError(f"{bad} (a tag is up to 128 letters, digits, '_', '.', '-')")
        name = f"{head}/{last}" if head else last
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        registry, path = first, rest
        if not DOMAIN_RE.fullmatch(registry):
            raise StoreError(f"{bad}: {registry!r} is not a registry host[:port]")
    else:
        registry, path = DOCKER_HUB, name
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not PATH_RE.fullmatch(path):
        hint = " (repository names are lowercase)" if path.lower() != path else ""
        raise StoreError(f"{bad}{hint}")
    if len(registry) + 1 + len(path) > 255:
        raise StoreError(f"{bad}: the name is longer than 255 characters")
    return RemoteReference(registry, path, tag, digest or None)


def parse_registry(text: str) -> tuple[str, str]:
    """A registry as login and logout name it (host[:port], or Docker's legacy
    https://index.docker.io/v1/) -> (name as references spell it, API host)."""
    name = text
    if name.startswith(("http://", "https://")):
        name = name.split("://", 1)[1].split("/", 1)[0]
    name = name.rstrip("/")
    if name in ("index.docker.io", DOCKER_HUB_API):
        name = DOCKER_HUB
    if not DOMAIN_RE.fullmatch(name):
        raise StoreError(f"invalid registry {text!r} (expected host[:port], e.g. localhost:5000)")
    return name, DOCKER_HUB_API if name == DOCKER_HUB else name
