"""The OCI image layout (image-spec v1.1 "image-layout"): write the store's images
into one, and load images from one.

A layout is a directory with `oci-layout` ({"imageLayoutVersion": "1.0.0"}),
`index.json` (an image index whose entries name their image with the
annotation org.opencontainers.image.ref.name) and `blobs/<alg>/<hex>`: the
manifests, configs and layers, each named by its digest.

Writing: a layer blob is the store's canonical tar of that layer (uncompressed,
media type application/vnd.oci.image.layer.v1.tar), so its digest is the
layer's diff_id and writing the same image twice gives the same bytes; the
config blob is the image's config.json as stored, so its digest is the image
id. A layer loaded from a tar strata did not make keeps that tar's split
(store.tarsplit) and is written back byte for byte, so a loaded image keeps
its id; only a tar the split cannot make again (one naming a path twice) is
stored as strata's own tar, and that image's diff_ids, and id, change.

Reading: image indexes (OCI, and Docker's manifest lists) pick a platform;
manifests may be OCI or Docker v2 schema 2; layers tar, tar+gzip or
tar+zstd. Every blob's size and digest are checked as it streams, and each
layer's uncompressed stream against its diff_id. Everything is built in the
store's staging and the images are created only once every blob checked out,
so a bad layout leaves the store as it was (invariant 7).

`progress`: an object with `task(description, total)` returning a context
manager whose value is called with the bytes done since the last call, and
`note(line)` (runner.progress implements both; NO_PROGRESS does nothing).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import stat
from typing import BinaryIO, Callable, Iterator

from .errors import BadArchive, StoreError
from .fsutil import OWNER_ONLY, fsync_dir, open_beneath
from .store import PreparedLayer, Store, canonical_json, go_arch, parse_reference

OCI_LAYOUT_VERSION = "1.0.0"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"  # Docker 25+ save names its images so

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
# tar, gzip and zstd layers, OCI and Docker names, distributable or not; the
# compression is told by the data's magic bytes (store.layer.open_decompressed)
LAYER_TYPES = frozenset(
    base + suffix
    for base in (OCI_LAYER, "application/vnd.oci.image.layer.nondistributable.v1.tar",
                 DOCKER_LAYER, "application/vnd.docker.image.rootfs.foreign.diff.tar")
    for suffix in ("", "+gzip", "+zstd")) | {"application/vnd.docker.image.rootfs.diff.tar.gzip",
                                            "application/vnd.docker.image.rootfs.diff.tar.zstd",
                                            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"}

DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})", re.ASCII)
MAX_JSON_BLOB = 16 << 20  # manifests, indexes, configs: read into memory
READ_CHUNK = 1 << 20


class NoProgress:
    @contextlib.contextmanager
    def task(self, description: str, total: int | None):
        yield lambda n: None

    def note(self, line: str) -> None:
        pass


NO_PROGRESS = NoProgress()


def short_digest(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def digest_hex(digest, what: str) -> str:
    """The hex of a "sha256:<hex>" digest; anything else is a one-line error."""
    if not isinstance(digest, str):
        raise StoreError(f"{what}: digest {digest!r} is not a string")
    m = DIGEST_RE.fullmatch(digest)
    if not m:
        algorithm = digest.partition(":")[0] if ":" in digest else ""
        if algorithm and algorithm != "sha256" and re.fullmatch(r"[a-z0-9+._-]+", algorithm):
            raise StoreError(f"{what}: unsupported digest algorithm {algorithm!r}")
        raise StoreError(f"{what}: invalid digest {digest!r}")
    return m[1]


class DigestMismatch(StoreError):
    def __init__(self, what: str, expected: str, got: str):
        super().__init__(f"digest mismatch for {what}: expected {expected}, got {got}")


class VerifyingReader(io.RawIOBase):
    """Reads a blob, hashing and counting it; `check()` at the end compares both with
    the descriptor. More bytes than the descriptor's size is an error at once."""

    def __init__(self, raw: BinaryIO, digest: str | None, size: int | None, what: str,
                 advance: Callable[[int], None] = lambda n: None):
        self.raw, self.digest, self.expected_size, self.what = raw, digest, size, what
        self.hash = hashlib.sha256()
        self.count = 0
        self.advance = advance

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.raw.readinto(buf)
        if n:
            self.hash.update(memoryview(buf)[:n])
            self.count += n
            self.advance(n)
            if self.expected_size is not None and self.count > self.expected_size:
                raise StoreError(f"{self.what}: blob is larger than its descriptor's {self.expected_size} bytes")
        return n or 0

    def drain(self) -> None:
        buf = bytearray(READ_CHUNK)
        while self.readinto(buf):
            pass

    def check(self) -> None:
        """Raise unless everything was read and it hashes to the digest."""
        self.drain()
        if self.expected_size is not None and self.count != self.expected_size:
            raise BadArchive(f"{self.what}: truncated blob ({self.count} of {self.expected_size} bytes)")
        got = "sha256:" + self.hash.hexdigest()
        if self.digest is not None and got != self.digest:
            raise DigestMismatch(self.what, self.digest, got)


# -- where blobs come from --------------------------------------------------------

class BlobSource:
    """The files of a layout by their path relative to it: a directory here,
    the members of a tar archive in store.archive; `fd` is the one they are read from."""

    fd = -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self, relpath: str) -> tuple[BinaryIO, int]:
        raise NotImplementedError

    def read_small(self, relpath: str, what: str, limit: int = MAX_JSON_BLOB) -> bytes:
        f, size = self.open(relpath)
        with f:
            if size > limit:
                raise StoreError(f"{what} is {size} bytes, more than {limit} allowed")
            return f.read(limit + 1)

    def blob_path(self, digest: str, what: str) -> str:
        return f"blobs/sha256/{digest_hex(digest, what)}"

    def open_blob(self, desc: dict, what: str, advance=lambda n: None) -> VerifyingReader:
        """The blob a descriptor names: by its digest, or (docker-archive, where a layer's
        digest may be unknown) by its "path" in the archive."""
        path = desc.get("path") or self.blob_path(desc["digest"], what)
        try:
            f, _ = self.open(path)
        except FileNotFoundError:
            raise StoreError(f"{what}: {desc.get('digest') or path} is missing from the archive") from None
        return VerifyingReader(f, desc.get("digest"), desc.get("size"), what, advance)

    def read_blob(self, desc: dict, what: str) -> bytes:
        size = desc.get("size")
        if not isinstance(size, int) or not 0 <= size <= MAX_JSON_BLOB:
            raise StoreError(f"{what}: bad or too large size {size!r} in its descriptor")
        reader = self.open_blob(desc, what)
        with reader:
            data = reader.raw.read(size + 1)
            reader.hash.update(data)
            reader.count = len(data)
            reader.check()
        return data


class DirectorySource(BlobSource):
    """A layout directory someone else may have made: its files are opened beneath it
    without following any symlink (a blob linked to a host file, to /dev/zero, a blobs/
    linked elsewhere), and only regular files are read: a FIFO is opened without blocking
    and refused."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the user's own path may be a link

    def open(self, relpath: str) -> tuple[BinaryIO, int]:
        if relpath.startswith("/") or ".." in relpath.split("/"):
            raise StoreError(f"layout path {relpath!r} leaves the layout")
        try:
            fd = open_beneath(self.fd, relpath, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EXDEV):
                raise BadArchive(f"layout file {relpath!r} is a symlink, or under one; not read") from None
            if e.errno == errno.ENOTDIR:  # (without openat2, a symlinked directory says so too)
                raise BadArchive(f"layout path {relpath!r} goes through a symlink or a non-directory") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise BadArchive(f"layout file {relpath!r} is not a regular file; not read")
        return os.fdopen(fd, "rb", buffering=0), st.st_size


def parse_json_value(data: bytes, what: str):
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadArchive(f"{what} is not valid JSON ({e})") from None
    except RecursionError:  # [[[[... a few hundred thousand deep: json recurses
        raise BadArchive(f"{what} is not valid JSON (nested too deeply)") from None


def parse_json(data: bytes, what: str) -> dict:
    obj = parse_json_value(data, what)
    if not isinstance(obj, dict):
        raise BadArchive(f"{what} is not a JSON object")
    return obj


# -- reading ------------------------------------------------------------------------

class ImagePlan:
    """One image to load: its manifest's config and layers, and the names to tag it."""

    __slots__ = ("config_raw", "config", "layers", "names", "what", "source")

    def __init__(self, source: BlobSource, config_raw: bytes | None, config: dict, layers: list[dict], what: str):
        self.source, self.config_raw, self.config, self.layers, self.what = source, config_raw, config, layers, what
        self.names: list[str] = []


def host_platform() -> dict:
    return {"os": "linux", "architecture": go_arch()}


def parse_platform(platform: str | dict | None) -> dict:
    if platform is None:
        return host_platform()
    if isinstance(platform, dict):
        return platform
    parts = platform.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise StoreError(f"invalid platform {platform!r} (expected OS/ARCH[/VARIANT])")
    out = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        out["variant"] = parts[2]
    return out


def platform_text(p: dict) -> str:
    return "/".join(x for x in (p.get("os", "?"), p.get("architecture", "?"), p.get("variant")) if x)


def pick_platform(index: dict, platform: dict, what: str) -> dict:
    entries = [m for m in index.get("manifests") or () if isinstance(m, dict)]
    def fits(m):
        p = m.get("platform") or {}
        return (p.get("os") == platform["os"] and p.get("architecture") == platform["architecture"]
                and ("variant" not in platform or p.get("variant") == platform["variant"]))
    matches = [m for m in entries if fits(m)]
    if not matches:
        have = ", ".join(sorted({platform_text(m.get("platform") or {}) for m in entries})) or "none"
        raise StoreError(f"no manifest for platform {platform_text(platform)} in {what} (it has: {have})")
    return matches[0]


def descriptor(obj, what: str) -> dict:
    if not isinstance(obj, dict) or not isinstance(obj.get("mediaType", ""), str):
        raise BadArchive(f"{what}: malformed descriptor")
    digest_hex(obj.get("digest"), what)
    return obj


def plan_manifest(source: BlobSource, desc: dict, platform: dict, what: str) -> ImagePlan:
    """Follow a descriptor (through image indexes) to one image's manifest, and read
    and check its config."""
    for _ in range(8):  # an index of indexes of ... is bounded
        media_type = desc.get("mediaType", "")
        if media_type not in INDEX_TYPES + MANIFEST_TYPES:
            raise StoreError(f"{what}: unknown media type {media_type!r}")
        body = parse_json(source.read_blob(desc, what), what)
        body_type = body.get("mediaType", media_type)
        if body_type != media_type and not (media_type in INDEX_TYPES and body_type in INDEX_TYPES):
            raise StoreError(f"{what}: descriptor says {media_type!r} but the blob is {body_type!r}")
        if media_type in INDEX_TYPES:
            desc = descriptor(pick_platform(body, platform, what), what)
            what = f"manifest {short_digest(desc['digest'])}"
            continue
        return plan_image(source, body, what)
    raise StoreError(f"{what}: image indexes nested too deeply")


def plan_image(source: BlobSource, manifest: dict, what: str) -> ImagePlan:
    if manifest.get("schemaVersion") != 2:
        raise StoreError(f"{what}: unsupported manifest schemaVersion {manifest.get('schemaVersion')!r}")
    config_desc = descriptor(manifest.get("config"), f"{what} config")
    if config_desc.get("mediaType") not in CONFIG_TYPES:
        raise StoreError(f"{what}: unknown media type {config_desc.get('mediaType')!r} for the config")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise BadArchive(f"{what}: manifest has no layer list")
    for i, layer in enumerate(layers):
        descriptor(layer, f"{what} layer {i + 1}")
        if layer.get("mediaType") not in LAYER_TYPES:
            raise StoreError(f"{what}: unknown media type {layer.get('mediaType')!r} for layer {i + 1}")
    config_raw = source.read_blob(config_desc, f"config {short_digest(config_desc['digest'])}")
    return ImagePlan(source, config_raw, check_config(config_raw, len(layers), what), layers, what)


def check_config(config_raw: bytes, n_layers: int, what: str) -> dict:
    config = parse_json(config_raw, f"{what} config")
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or rootfs.get("type") != "layers":
        raise BadArchive(f"{what}: config has no rootfs.diff_ids")
    for d in diff_ids:
        digest_hex(d, f"{what} config diff_id")
    if len(diff_ids) != n_layers:
        raise BadArchive(f"{what}: {n_layers} layers but {len(diff_ids)} diff_ids in the config")
    return config


def local_name(ref: str) -> str:
    """A reference as strata tags it: NAME:TAG, Docker Hub's names in their short form
    (docker.io/library/busybox:1 is busybox:1, as docker load shows it)."""
    name = parse_reference(ref)
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/", "index.docker.io/"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def names_of(entry: dict) -> list[str]:
    """The tags an index.json entry asks for."""
    annotations = entry.get("annotations") or {}
    for key in (CONTAINERD_NAME, REF_NAME):
        name = annotations.get(key)
        if isinstance(name, str) and name:
            return [local_name(name)]
    return []


def plan_layout(source: BlobSource, ref: str | None, platform, what: str = "layout") -> list[ImagePlan]:
    try:
        layout = parse_json(source.read_small("oci-layout", "oci-layout"), "oci-layout")
    except FileNotFoundError:
        raise BadArchive(f"{what} is not an OCI image layout (no oci-layout file)") from None
    if layout.get("imageLayoutVersion") != OCI_LAYOUT_VERSION:
        raise StoreError(f"unsupported OCI layout version {layout.get('imageLayoutVersion')!r}")
    try:
        index = parse_json(source.read_small("index.json", "index.json"), "index.json")
    except FileNotFoundError:
        raise BadArchive(f"{what} has no index.json") from None
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise BadArchive("index.json has no manifest list")
    if ref is not None:
        entries = [e for e in entries if isinstance(e, dict) and ref in (
            (e.get("annotations") or {}).get(REF_NAME), (e.get("annotations") or {}).get(CONTAINERD_NAME))]
        if not entries:
            raise StoreError(f"no image named {ref!r} in the {what}")
    if not entries:
        raise StoreError(f"the {what} holds no image")
    return plan_entries(source, [(descriptor(e, "index.json entry"), names_of(e)) for e in entries],
                        parse_platform(platform))


def plan_entries(source: BlobSource, entries: list[tuple[dict, list[str]]], platform: dict) -> list[ImagePlan]:
    """One plan per distinct manifest, carrying every name given to it."""
    plans: dict[str, ImagePlan] = {}
    for desc, names in entries:
        key = desc["digest"]
        if key not in plans:
            plans[key] = plan_manifest(source, desc, platform, f"manifest {short_digest(key)}")
        plans[key].names.extend(n for n in names if n not in plans[key].names)
    return list(plans.values())


def layer_in_store(store: Store, diff_id: str) -> PreparedLayer | None:
    """A layer the store has already: reused, not read again (as docker load does)."""
    layer_dir = store.layer_dir(diff_id)
    try:
        entries = store.layer_entries(diff_id)
        size = store.layer_size(diff_id)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return PreparedLayer(diff_id, entries, size, layer_dir)


def prepare_blob_layer(store: Store, staging: str, source: BlobSource, desc: dict, diff_id: str,
                       what: str, progress) -> PreparedLayer:
    """Apply one layer blob in staging, checking its digest, size and diff_id, and keep its
    tar split (store.tarsplit), so that the layer is `diff_id`. Where the split cannot
    make the tar again the layer returned has strata's canonical digest instead."""
    from .layer import apply_tar_stream, layer_digest, open_decompressed
    from .tarsplit import SplitUnusable, TarSplitRecorder, save_split
    os.mkdir(staging, OWNER_ONLY)
    split_path = os.path.join(staging, "tarsplit.zst")
    recorder = None
    with progress.task(what, desc.get("size")) as advance:
        blob = source.open_blob(desc, what, advance)

        def fill(writer):
            nonlocal recorder
            with blob:
                try:
                    decompressed, compressed = open_decompressed(blob)
                    # the uncompressed stream's digest is the diff_id; uncompressed, it is the blob's
                    recorder = TarSplitRecorder(decompressed, split_path, hashing=compressed)
                    # tarfile reads 10 kB at a time: served from one buffer, not through every reader
                    apply_tar_stream(io.BufferedReader(recorder, READ_CHUNK), writer, recorder.on_member,
                                     decompress=False)
                except StoreError as e:
                    blob.check()  # a blob that is not what its digest says: that is the cause
                    if type(e) is BadArchive:
                        raise BadArchive(f"{what}: {e}") from None
                    raise
                blob.check()
                got = "sha256:" + (recorder if compressed else blob).hash.hexdigest()
                if got != diff_id:
                    raise DigestMismatch(f"{what} (uncompressed, the config's diff_id)", diff_id, got)
        try:
            layer = store.prepare_layer(staging, fill, diff_id)
        except BaseException:
            if recorder is not None:
                recorder.abandon()
            raise
    try:
        recorder.finish(layer.entries)
        save_split(split_path, recorder.size(), layer.staging)
    except SplitUnusable as e:
        layer.diff_id = layer_digest(layer.entries, os.path.join(layer.staging, "root"))
        progress.note(f"{what}: kept as strata's own tar ({short_digest(layer.diff_id)}), as {e}: "
                      "the image's id changes")
    return layer


def load_plans(store: Store, plans: list[ImagePlan], progress=None) -> list[str]:
    """Build every new layer of every plan in staging, then create the images."""
    progress = progress or NO_PROGRESS
    with store.staging() as staging:
        prepared: dict[str, PreparedLayer] = {}  # by the diff_id of the config
        for plan in plans:
            for desc, diff_id in zip(plan.layers, plan.config["rootfs"]["diff_ids"]):
                if diff_id in prepared:
                    continue
                layer = layer_in_store(store, diff_id)
                if layer is None:
                    layer = prepare_blob_layer(store, os.path.join(staging, f"layer-{len(prepared)}"), plan.source,
                                               desc, diff_id, f"layer {short_digest(diff_id)}", progress)
                prepared[diff_id] = layer
        image_ids = []
        for n, plan in enumerate(plans):
            layers = [prepared[d] for d in plan.config["rootfs"]["diff_ids"]]
            stored_as = [layer.diff_id for layer in layers]
            if stored_as != plan.config["rootfs"]["diff_ids"]:
                # a tar kept as strata's own (prepare_blob_layer): the config, so the id, change
                plan.config = dict(plan.config, rootfs={"type": "layers", "diff_ids": stored_as})
                plan.config_raw = None
            image_stage = os.path.join(staging, f"image-{n}")
            os.mkdir(image_stage, OWNER_ONLY)
            names = plan.names
            try:
                image_id = store.create_image(plan.config, None, layers, image_stage, names[0] if names else None,
                                              raw_config=plan.config_raw)
            except FileNotFoundError:
                raise StoreError("a layer was removed while the image was loaded; try again") from None
            for name in names[1:]:
                store.tag(image_id, name)
            image_ids.append(image_id)
            for name in names:
                progress.note(f"Loaded image: {name}")
            if not names:
                progress.note(f"Loaded image ID: {image_id}")
        return image_ids


def read_layout(store: Store, layout_dir: str, ref: str | None = None, platform=None,
                progress=None) -> list[str]:
    """Load the image(s) of the OCI layout at `layout_dir` (only those named `ref`, when
    given); tag them by their ref names; return their ids. Nothing is stored on error."""
    if not os.path.isdir(layout_dir):
        raise StoreError(f"{layout_dir}: not a directory")
    with DirectorySource(layout_dir) as source:
        return load_from_source(store, source, ref, platform, progress, f"layout {layout_dir}")


def load_from_source(store: Store, source: BlobSource, ref, platform, progress, what: str) -> list[str]:
    return load_plans(store, plan_layout(source, ref, platform, what), progress)


# -- writing --------------------------------------------------------------------------

class LayoutSink:
    """Where a written layout's files go: a directory here, a tar stream in store.archive.
    `add_blob` is skipped for blobs already there (`has_blob`)."""

    def has_blob(self, hex_digest: str) -> bool:
        raise NotImplementedError

    def add_file(self, relpath: str, data: bytes) -> None:
        raise NotImplementedError

    def add_stream(self, relpath: str, size: int, write: Callable[[BinaryIO], None]) -> None:
        raise NotImplementedError


class OutputFile:
    """A file being written whose write errors (ENOSPC, EIO, ...) name the file the user
    asked for (`dest`), not the temporary one, nor nothing at all."""

    def __init__(self, f: BinaryIO, dest: str):
        self.f, self.dest = f, dest

    def _failed(self, e: OSError) -> StoreError:
        return StoreError(f"cannot write {self.dest}: {e.strerror or e}")

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            raise self._failed(e) from None

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            raise self._failed(e) from None

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self, failing: bool = False) -> None:
        """Close (the buffer's last bytes are written now); `failing`: an error is on its
        way already, and the one closing meets would only hide it."""
        try:
            self.f.close()
        except OSError as e:
            if not failing:
                raise self._failed(e) from None

    @contextlib.contextmanager
    def closing(self) -> Iterator["OutputFile"]:
        try:
            yield self
            self.flush()
        except BaseException:
            self.close(failing=True)
            raise
        self.close()


@contextlib.contextmanager
def replacing(dest: str) -> Iterator[OutputFile]:
    """A file written beside `dest` and renamed onto it once whole and on disk; on an
    error it is removed and `dest` is left as it was. The temporary file is made anew
    under a random name (O_EXCL, O_NOFOLLOW): in a directory others write to, a name
    planted there is never written through. A symlink at `dest` is replaced, not followed."""
    head, tail = os.path.split(os.path.abspath(dest))
    if os.path.isdir(dest):
        raise StoreError(f"cannot write {dest}: Is a directory")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        tmp = os.path.join(head, f".{tail}.tmp-{os.urandom(6).hex()}")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise StoreError(f"cannot write {dest}: {e.strerror}") from None
    try:
        with OutputFile(os.fdopen(fd, "wb"), dest).closing() as out:
            yield out
            out.flush()
            try:
                os.fsync(fd)
            except OSError as e:
                raise out._failed(e) from None
        os.rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class DirectorySink(LayoutSink):
    """A layout directory written in place. Its blobs/ and blobs/sha256/ must be its own
    directories, not symlinks (into which a layout someone else prepared would have the
    blobs written), and an existing blob or index.json counts only as a regular file."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(path, exist_ok=True)
        for sub in ("blobs", "blobs/sha256"):
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(path, sub))
            if not stat.S_ISDIR(os.lstat(os.path.join(path, sub)).st_mode):
                raise StoreError(f"{path}: its {sub} is not a directory (a symlink?); not written into")

    def has_blob(self, hex_digest: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(os.path.join(self.path, "blobs", "sha256", hex_digest)).st_mode)
        except FileNotFoundError:
            return False

    def _replace(self, relpath: str, fill: Callable[[BinaryIO], None]) -> None:
        with replacing(os.path.join(self.path, relpath)) as f:
            fill(f)

    def add_file(self, relpath: str, data: bytes) -> None:
        self._replace(relpath, lambda f: f.write(data))

    def add_stream(self, relpath: str, size: int, write) -> None:
        self._replace(relpath, write)

    def close(self) -> None:
        fsync_dir(os.path.join(self.path, "blobs", "sha256"))
        fsync_dir(self.path)

    def existing_index(self) -> list[dict]:
        try:
            with DirectorySource(self.path) as layout:  # beneath it, a regular file
                index = parse_json(layout.read_small("index.json", "the existing index.json"),
                                   "the existing index.json")
        except FileNotFoundError:
            return []
        manifests = index.get("manifests") or []
        return [e for e in manifests if isinstance(e, dict)] if isinstance(manifests, list) else []


class SavedImage:
    """What a written image is: its manifest descriptor and the paths of its blobs."""

    __slots__ = ("image_id", "names", "manifest_desc", "config_path", "layer_paths")

    def __init__(self, image_id, names, manifest_desc, config_path, layer_paths):
        self.image_id, self.names, self.manifest_desc = image_id, names, manifest_desc
        self.config_path, self.layer_paths = config_path, layer_paths


def resolve_refs(store: Store, refs: list[str]) -> list[tuple[str, list[str]]]:
    """(image id, names) for each distinct image `refs` name, in order: a tag names the
    image by itself; an id names it by every tag it has (as docker save does)."""
    if not refs:
        raise StoreError("no image given")
    tags = store.read_tags()
    out: dict[str, list[str]] = {}
    for ref in refs:
        image_id = store.resolve_image(ref)
        try:
            name = parse_reference(ref)
        except StoreError:
            name = None
        names = [name] if tags.get(name) == image_id else []
        have = out.setdefault(image_id, [])
        have.extend(n for n in names if n not in have)
    return list(out.items())


def write_images(store: Store, refs: list[str], sink: LayoutSink, progress=None) -> list[SavedImage]:
    """Write the blobs of the images `refs` name to `sink`; return what was written."""
    from .tarsplit import layer_tar_writer
    progress = progress or NO_PROGRESS
    saved = []
    for image_id, names in resolve_refs(store, refs):
        with open(os.path.join(store.image_dir(image_id), "config.json"), "rb") as f:
            config_raw = f.read()
        config = json.loads(config_raw)
        layer_descs, layer_paths = [], []
        for diff_id in config["rootfs"]["diff_ids"]:
            hex_digest = digest_hex(diff_id, f"image {short_digest(image_id)}")
            size, write = layer_tar_writer(store, diff_id)
            if not sink.has_blob(hex_digest):
                with progress.task(f"layer {hex_digest[:12]}", size) as advance:
                    sink.add_stream(f"blobs/sha256/{hex_digest}", size,
                                    lambda out: write(ProgressWriter(out, advance)))
            layer_descs.append({"mediaType": OCI_LAYER, "digest": diff_id, "size": size})
            layer_paths.append(f"blobs/sha256/{hex_digest}")
        config_path = f"blobs/sha256/{image_id.removeprefix('sha256:')}"
        sink.add_file(config_path, config_raw)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": image_id, "size": len(config_raw)},
                    "layers": layer_descs}
        manifest_raw = canonical_json(manifest)
        manifest_digest = "sha256:" + hashlib.sha256(manifest_raw).hexdigest()
        sink.add_file(f"blobs/sha256/{manifest_digest.removeprefix('sha256:')}", manifest_raw)
        desc = {"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest_raw),
                "platform": {"architecture": config.get("architecture", go_arch()), "os": config.get("os", "linux")}}
        saved.append(SavedImage(image_id, names, desc, config_path, layer_paths))
    return saved


class ProgressWriter:
    """A write-only stream that reports the bytes it passes on."""

    def __init__(self, out: BinaryIO, advance: Callable[[int], None]):
        self.out, self.advance, self.count = out, advance, 0

    def write(self, data) -> int:
        self.out.write(data)
        self.count += len(data)
        self.advance(len(data))
        return len(data)


def index_entries(saved: list[SavedImage]) -> list[dict]:
    """index.json's entries: one per name (an unnamed image gets one without a name)."""
    out = []
    for image in saved:
        for name in image.names or [None]:
            entry = dict(image.manifest_desc)
            if name is not None:
                entry["annotations"] = {REF_NAME: name}
            out.append(entry)
    return out


def layout_index(entries: list[dict]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries},
                      indent=2, sort_keys=True).encode() + b"\n"


OCI_LAYOUT_FILE = canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION})


def write_layout(store: Store, refs: list[str], layout_dir: str, progress=None) -> None:
    """Write the images `refs` name into the OCI layout at `layout_dir` (made if missing;
    an existing layout keeps its other images, entries of the same name are replaced)."""
    if os.path.exists(layout_dir) and not os.path.isdir(layout_dir):
        raise StoreError(f"{layout_dir}: exists and is not a directory")
    if os.path.isdir(layout_dir) and os.listdir(layout_dir) and not os.path.exists(
            os.path.join(layout_dir, "oci-layout")):
        raise StoreError(f"{layout_dir}: not empty and not an OCI image layout")
    sink = DirectorySink(layout_dir)
    saved = write_images(store, refs, sink, progress)
    entries = index_entries(saved)
    new_names = {e["annotations"][REF_NAME] for e in entries if "annotations" in e}
    new_digests = {e["digest"] for e in entries}
    kept = [e for e in sink.existing_index()
            if (e.get("annotations") or {}).get(REF_NAME) not in new_names
            and not (e.get("digest") in new_digests and not (e.get("annotations") or {}).get(REF_NAME))]
    sink.add_file("oci-layout", OCI_LAYOUT_FILE)
    sink.add_file("index.json", layout_index(kept + entries))
    sink.close()


def iter_blob_paths(saved: list[SavedImage]) -> Iterator[str]:
    for image in saved:
        yield from image.layer_paths
        yield image.config_path
