"""Where registry credentials and registry settings live, as podman and skopeo keep them.

Credentials: the file `strata login` writes is $REGISTRY_AUTH_FILE when set, else
$XDG_CONFIG_HOME/strata/auth.json (~/.config/strata/auth.json). Lookups read it and
then ~/.docker/config.json. Both have containers' auth.json / Docker's config.json
shape: {"auths": {"KEY": {"auth": base64("user:password")}}}, KEY a registry
(host[:port]) or a registry and repository prefix ("host/ns"; the most specific key
wins), or Docker's legacy "https://index.docker.io/v1/". Keys other than "auths"
(credHelpers, ...) are kept when the file is rewritten, and not used.

Registry settings: $XDG_CONFIG_HOME/strata/registries.conf, TOML in the shape of
containers' registries.conf v2, of which strata reads only this:

    [[registry]]
    location = "localhost:5000"      # a host[:port], or host[:port]/repository-prefix
    insecure = true                  # plain http allowed, certificates not verified

No registry is insecure unless it is listed so (or --tls-verify=false is given):
not even localhost, as podman has it (Docker trusts 127.0.0.0/8 by itself).
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import secrets

from .errors import StoreError
from .fsutil import fsync_dir

DOCKER_HUB = "docker.io"
LEGACY_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io")


def config_home() -> str:
    return os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")


def auth_file() -> str:
    """The file `strata login` writes and lookups read first."""
    return os.environ.get("REGISTRY_AUTH_FILE") or os.path.join(config_home(), "strata", "auth.json")


def auth_files() -> list[str]:
    return [auth_file(), os.path.join(os.path.expanduser("~"), ".docker", "config.json")]


def registries_conf() -> str:
    return os.path.join(config_home(), "strata", "registries.conf")


def normalize_key(key: str) -> str:
    """An auths key as a registry[/repository-prefix]: Docker's legacy URL keys lose their
    scheme and path, and Docker Hub's old names are docker.io."""
    if key.startswith(("http://", "https://")):
        key = key.split("://", 1)[1].split("/", 1)[0]
    host, slash, rest = key.partition("/")
    if host in LEGACY_HUB_KEYS[1:]:
        host = DOCKER_HUB
    return host + slash + rest


def read_auth_file(path: str) -> dict:
    """The whole JSON object of an auth file; {} when it does not exist."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read credentials from {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("auths", {}), dict):
        raise StoreError(f"cannot read credentials from {path}: not an auth.json object")
    return data


def decode_auth(path: str, key: str, entry) -> tuple[str, str]:
    try:
        user, sep, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
    except (TypeError, KeyError, ValueError, binascii.Error):
        sep = ""
    if not sep:
        raise StoreError(f"cannot read credentials for {key} in {path}: \"auth\" is not base64 user:password")
    return user, password


def find_credentials(registry: str, repository: str = "") -> tuple[str, str] | None:
    """(user, password) for the registry (and repository), or None: anonymous."""
    wanted = [f"{registry}/{repository}"] if repository else []
    parts = repository.split("/")
    wanted += [f"{registry}/{'/'.join(parts[:n])}" for n in range(len(parts) - 1, 0, -1)] + [registry]
    for path in auth_files():
        auths = read_auth_file(path).get("auths", {})
        normalized = {normalize_key(k): (k, v) for k, v in auths.items()}
        for key in wanted:
            if key in normalized and isinstance(normalized[key][1], dict) and normalized[key][1].get("auth"):
                return decode_auth(path, key, normalized[key][1])
    return None


def save_credentials(registry: str, user: str, password: str, path: str | None = None) -> str:
    """Store user:password for `registry` in the auth file (0600, replaced atomically)."""
    path = path or auth_file()
    data = read_auth_file(path)
    auths = data.setdefault("auths", {})
    for key in [k for k in auths if normalize_key(k) == registry]:
        del auths[key]
    auths[registry] = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
    write_auth_file(path, data)
    return path


def remove_credentials(registry: str | None, path: str | None = None) -> list[str]:
    """Forget `registry`'s credentials (every registry's when None); the keys removed."""
    path = path or auth_file()
    data = read_auth_file(path)
    auths = data.get("auths", {})
    removed = [k for k in auths if registry is None or normalize_key(k) == registry]
    for key in removed:
        del auths[key]
    if removed:
        write_auth_file(path, data)
    return removed


def write_auth_file(path: str, data: dict) -> None:
    """Replace the auth file atomically, 0600 whatever the umask. It may be in a directory
    others can write (--authfile /tmp/auth.json): the temporary file has a name no one can
    guess and is made new (O_EXCL, O_NOFOLLOW), so nothing planted there gets the
    credentials, and its mode is set on the fd, never through the name."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700)
    tmp = os.path.join(directory, f".tmp.{os.path.basename(path)}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(json.dumps(data, indent="\t").encode() + b"\n")
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def insecure_locations() -> list[str]:
    """The locations registries.conf lists with insecure = true."""
    path = registries_conf()
    try:
        with open(path, "rb") as f:
            import tomllib
            conf = tomllib.load(f)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {path}: {e}") from None
    entries = conf.get("registry", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise StoreError(f"cannot read {path}: [[registry]] must be a list of tables")
    with contextlib.suppress(AttributeError):
        return [e["location"].rstrip("/") for e in entries if e.get("insecure") is True and e.get("location")]
    raise StoreError(f"cannot read {path}: a location is not a string")


def is_insecure(registry: str, repository: str = "") -> bool:
    name = f"{registry}/{repository}"
    return any(name == loc or name.startswith(loc + "/") or registry == loc for loc in insecure_locations())
