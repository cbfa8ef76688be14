"""`strata pull` and `strata push`: images to and from a registry (OCI distribution API).

pull: the manifest (an index picks the platform), then the config and the layers,
each checked against its digest as it streams into the store's blob cache
(store.blobcache); the verified blobs are hard-linked into a staging OCI layout,
which store.oci.read_layout loads (checking every digest again). The store takes
nothing until the whole image is there; a pull that breaks leaves only verified
blobs and a partial file in the cache, which the next pull resumes (Range).

push: each layer is the tar a saved OCI layout has (store.tarsplit.layer_tar_writer: the
canonical tar, or the very tar the layer came as; its digest is the diff_id), made in a
thread as it is read, compressed (gzip on every core by default, store.compress) and
uploaded in one pass: never on disk. A layer is not uploaded when the registry has it already (HEAD) or has
it in another repository (a cross-repository mount), by the digests the cache knows
for it (store.blobcache layers.json: what pulls and pushes have seen). Blobs whose
digest is known beforehand go up in one PUT; a compressed stream goes up as one
streamed PATCH (or ranged PATCHes of chunk_size) and a closing PUT.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Callable, Iterator

from .blobcache import BlobCache
from .distribution import (DOCKER_MANIFEST, DOCKER_SCHEMA1, INDEX_TYPES, MANIFEST_TYPES,
                           OCI_INDEX, OCI_MANIFEST, DigestMismatch, RegistryClient, RegistryError,
                           TransferBroken, Unreachable, parse_json, printable, push_scope)
from .errors import StoreError
from .fsutil import OWNER_ONLY, write_atomic
from .reference import RemoteReference, parse_registry, parse_remote_reference
from .registry_config import find_credentials, is_insecure
from .store import Store, canonical_json, go_arch, parse_reference

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
LAYER_TYPES = {
    OCI_LAYER: None,
    OCI_LAYER + "+gzip": "gzip",
    OCI_LAYER + "+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": None,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}
FOREIGN_LAYER_TYPES = ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                       "application/vnd.oci.image.layer.nondistributable.v1.tar",
                       "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                       "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd")
CHUNK = 1 << 20
MAX_CONFIG = 4 << 20  # a config is a small JSON document, read whole: as containers/image caps it
DOWNLOADS = 3  # layers pulled at once
REF_NAME = "org.opencontainers.image.ref.name"


def open_client(ref: RemoteReference, tls_verify: bool | None) -> RegistryClient:
    """A client for the reference's registry: insecure (plain http allowed, certificates
    unchecked) with --tls-verify=false or when registries.conf says so."""
    insecure = tls_verify is False or (tls_verify is None and is_insecure(ref.registry, ref.repository))
    return RegistryClient(ref.registry, ref.api_host, insecure,
                          find_credentials(ref.registry, ref.repository))


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str, what: str) -> str:
    if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71 or \
            any(c not in "0123456789abcdef" for c in digest[7:]):
        raise RegistryError(f"unsupported digest {digest!r} for {what} (only sha256)")
    return digest


def check_descriptor(desc, what: str) -> dict:
    if not isinstance(desc, dict) or not isinstance(desc.get("size"), int) or desc["size"] < 0:
        raise RegistryError(f"{what} has no valid descriptor (digest, size)")
    check_digest(desc.get("digest"), what)
    return desc


# -- platforms ----------------------------------------------------------------

def host_platform() -> tuple[str, str, str]:
    arch = go_arch()
    return "linux", arch, {"arm64": "v8", "arm": "v7"}.get(arch, "")


def parse_platform(text: str) -> tuple[str, str, str]:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise StoreError(f"invalid platform {text!r} (expected os/arch[/variant], e.g. linux/arm64)")
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armhf": "arm", "i386": "386"}.get(parts[1], parts[1])
    return parts[0].lower(), arch, parts[2] if len(parts) == 3 else ""


def platform_name(p: dict) -> str:
    """os/arch[/variant] of an index entry, as the registry wrote it (made printable)."""
    return "/".join(printable(str(x)) for x in (p.get("os", "?"), p.get("architecture", "?"), p.get("variant", ""))
                    if x)


def choose_platform(index: dict, wanted: tuple[str, str, str], what: str) -> dict:
    """The index entry for the platform (a variant matches only when asked for, except
    arm64's v8, which is the default variant)."""
    want_os, want_arch, want_variant = wanted
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise RegistryError(f"image index {what} has no manifests list")
    candidates = []
    for desc in manifests:
        platform = desc.get("platform") if isinstance(desc, dict) else None
        if not isinstance(platform, dict):
            continue
        if platform.get("os") != want_os or platform.get("architecture") != want_arch:
            continue
        variant = platform.get("variant", "")
        if not isinstance(variant, str):
            continue
        default = {"arm64": "v8"}.get(want_arch, "")
        if want_variant and variant != want_variant and not ({variant, want_variant} <= {"", default}):
            continue
        candidates.append((variant not in ("", want_variant, default), desc))
    if not candidates:
        available = sorted({platform_name(d["platform"]) for d in manifests
                            if isinstance(d, dict) and isinstance(d.get("platform"), dict)
                            and d["platform"].get("os") not in (None, "unknown")})
        raise RegistryError(f"no manifest for platform {'/'.join(x for x in wanted if x)} in {what} "
                            f"(it has: {', '.join(available) or 'none'}; --platform to choose)")
    candidates.sort(key=lambda c: c[0])
    return check_descriptor(candidates[0][1], f"image index {what}")


# -- pull -------------------------------------------------------------------

class Puller:
    def __init__(self, store: Store, client: RegistryClient, ref: RemoteReference, progress):
        self.store, self.client, self.ref, self.progress = store, client, ref, progress
        self.cache = BlobCache(store.root)

    def manifest(self, reference: str, expected: str | None) -> tuple[bytes, str, str]:
        """(bytes, media type, digest), checked against `expected` or the registry's header."""
        body, media_type, header_digest = self.client.get_manifest(self.ref.repository, reference)
        digest = sha256_digest(body)
        claimed = expected or (header_digest if header_digest and header_digest.startswith("sha256:") else None)
        if claimed and claimed != digest:
            raise DigestMismatch(f"digest mismatch: the manifest of {self.ref} hashes to {digest}, "
                                 f"not {claimed}: nothing was stored")
        obj = parse_json(body, f"the manifest of {self.ref}")
        media_type = obj.get("mediaType") or media_type
        if media_type in DOCKER_SCHEMA1 or obj.get("schemaVersion") == 1:
            raise RegistryError(f"unsupported manifest of {self.ref}: Docker schema 1 (deprecated; "
                                f"re-push the image with a current tool)")
        if media_type not in MANIFEST_TYPES + INDEX_TYPES:
            if not media_type and "manifests" in obj:
                media_type = OCI_INDEX
            elif not media_type and "layers" in obj:
                media_type = OCI_MANIFEST
            else:
                raise RegistryError(f"unknown media type {media_type or '(none)'!r} for the manifest "
                                    f"of {self.ref}")
        return body, media_type, digest

    def resolve(self, platform: tuple[str, str, str]) -> tuple[bytes, str, str]:
        """The image manifest to pull, through an index if the reference names one."""
        body, media_type, digest = self.manifest(self.ref.reference, self.ref.digest)
        for _ in range(4):  # an index may list indexes: a few levels, not a loop
            if media_type in MANIFEST_TYPES:
                return body, media_type, digest
            desc = choose_platform(json.loads(body), platform, str(self.ref))
            body, media_type, digest = self.manifest(desc["digest"], desc["digest"])
        raise RegistryError(f"image index {self.ref} nests indexes too deeply")

    def fetch(self, desc: dict, dest: str, label: str) -> None:
        """The blob, from the cache or the registry, checked, hard-linked to `dest`."""
        digest, size = desc["digest"], desc["size"]
        if self.cache.link_into(digest, dest):
            return
        with self.cache.partial(digest) as fd:
            if self.cache.link_into(digest, dest):  # another pull finished it while this one waited
                if os.fstat(fd).st_size == 0:
                    self.cache.discard_partial(digest)
                return
            for attempt in (0, 1):
                with self.progress.task(label, size) as advance:
                    resumed = self.download(fd, digest, size, advance)
                if resumed is None:
                    break
                os.ftruncate(fd, 0)  # a resumed download may be what went wrong: once more, whole
                if not resumed or attempt:
                    self.cache.discard_partial(digest)
                    raise DigestMismatch(f"digest mismatch: blob {digest} of {self.ref} from "
                                         f"{self.ref.registry} does not hash to its digest: nothing was stored")
            os.fsync(fd)
            self.cache.complete(digest)
        if not self.cache.link_into(digest, dest):
            raise StoreError(f"blob {digest} left the cache while it was being pulled")

    def fetch_all(self, layers: list[dict], blobs: str) -> None:
        """Layer blobs into `blobs`, DOWNLOADS at a time (as Docker does); the first error
        is raised once the others have stopped, and says what is kept for the next pull."""
        def one(desc: dict) -> None:
            self.fetch(desc, os.path.join(blobs, desc["digest"][7:]), f"layer {desc['digest'][7:19]} (download)")
        try:
            if len(layers) <= 1:
                for desc in layers:
                    one(desc)
                return
            with ThreadPoolExecutor(DOWNLOADS, thread_name_prefix="pull") as pool:
                futures = [pool.submit(one, desc) for desc in layers]
                for future in futures:
                    if future.exception() is not None:
                        for other in futures:
                            other.cancel()
                        raise future.exception()
        except (TransferBroken, Unreachable) as e:
            raise type(e)(f"{e} (what arrived is kept: pull again to resume)") from None

    def download(self, fd: int, digest: str, size: int, advance) -> bool | None:
        """Fill the partial file `fd` to `size` bytes; None when it hashes to `digest`, else
        whether it had resumed a partial download (which may be what went wrong)."""
        have = os.fstat(fd).st_size
        if have > size:
            os.ftruncate(fd, 0)
            have = 0
        hasher = hashlib.sha256()
        os.lseek(fd, 0, os.SEEK_SET)
        left = have
        while left and (chunk := os.read(fd, min(CHUNK, left))):
            hasher.update(chunk)
            left -= len(chunk)
        resumed = have > 0
        if have < size:
            with self.client.open_blob(self.ref.repository, digest, have) as response:
                if have and response.status_code != 206:  # the registry sends it all again
                    os.ftruncate(fd, 0)
                    hasher, have, resumed = hashlib.sha256(), 0, False
                    if response.status_code == 416:
                        return True
                elif have and not response.headers.get("content-range", "").startswith(f"bytes {have}-"):
                    raise RegistryError(f"registry {self.ref.registry} answered a Range request for "
                                        f"{digest} with the wrong range")
                os.lseek(fd, have, os.SEEK_SET)
                advance(have)
                with self.client.transport(f"while sending blob {digest}"):
                    for chunk in response.iter_bytes(CHUNK):
                        have += len(chunk)
                        if have > size:
                            os.ftruncate(fd, 0)
                            raise RegistryError(f"blob {digest} from {self.ref.registry} is larger than "
                                                f"the {size} bytes its descriptor says: nothing was stored")
                        hasher.update(chunk)
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view):]
                        advance(len(chunk))
            if have < size:
                raise TransferBroken(f"registry {self.ref.registry} ended blob {digest} after {have} of "
                                     f"{size} bytes")
        if "sha256:" + hasher.hexdigest() == digest:
            return None
        return resumed


def pull(store: Store, name: str, platform: str | None = None, tls_verify: bool | None = None,
         progress=None) -> tuple[str, str | None, str]:
    """Pull NAME[:TAG|@DIGEST]: (image id, the store tag or None, the manifest's digest)."""
    from .oci import NO_PROGRESS, read_layout
    progress = progress or NO_PROGRESS
    ref = parse_remote_reference(name)
    tag = ref.familiar_tag()
    if tag is not None:
        parse_reference(tag)
    wanted = parse_platform(platform) if platform else host_platform()
    with open_client(ref, tls_verify) as client:
        puller = Puller(store, client, ref, progress)
        body, media_type, digest = puller.resolve(wanted)
        config_desc, layers = check_image_manifest(json.loads(body), ref)
        progress.note(f"Pulling {ref} ({digest})")
        with store.staging() as staging:
            layout = os.path.join(staging, "layout")
            blobs = os.path.join(layout, "blobs", "sha256")
            os.makedirs(blobs, OWNER_ONLY)
            write_atomic(os.path.join(blobs, digest[7:]), body)
            config_path = os.path.join(blobs, config_desc["digest"][7:])
            puller.fetch(config_desc, config_path, "config")
            config = parse_json(read_file(config_path), f"the config of {ref}")
            diff_ids = config.get("rootfs", {}).get("diff_ids") if isinstance(config.get("rootfs"), dict) else None
            if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
                raise RegistryError(f"the config of {ref} does not list one diff_id per layer")
            wanted = {}
            for desc, diff_id in zip(layers, diff_ids):
                if isinstance(diff_id, str) and os.path.isdir(store.layer_dir(diff_id)):
                    progress.note(f"layer {desc['digest'][7:19]}: already in the store")  # read_layout reuses it
                else:
                    wanted.setdefault(desc["digest"], desc)
            puller.fetch_all(list(wanted.values()), blobs)
            entry = {"mediaType": media_type, "digest": digest, "size": len(body)}
            if tag is not None:
                entry["annotations"] = {REF_NAME: tag}
            write_atomic(os.path.join(layout, "index.json"),
                         canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}))
            write_atomic(os.path.join(layout, "oci-layout"), b'{"imageLayoutVersion":"1.0.0"}')
            image_id = read_layout(store, layout, tag, progress=progress)[0]
        puller.cache.forget([config_desc["digest"]] + [d["digest"] for d in layers])
        puller.cache.prune()
        # where each layer is in this registry, for pushes (only layers stored as they came:
        # a tar strata does not make is stored as its own, with another diff_id)
        stored = store.image_config(image_id)["rootfs"]["diff_ids"]
        puller.cache.remember([(d, place(desc, ref)) for d, s, desc in zip(diff_ids, stored, layers)
                               if d == s and LAYER_TYPES.get(desc["mediaType"])])
    return image_id, tag, digest


def check_image_manifest(manifest: dict, ref: RemoteReference) -> tuple[dict, list[dict]]:
    """The config and layer descriptors, checked before anything is fetched."""
    config_desc = check_descriptor(manifest.get("config"), f"the config of {ref}")
    if config_desc["size"] > MAX_CONFIG:
        raise RegistryError(f"the config of {ref} is {config_desc['size']} bytes: more than the "
                            f"{MAX_CONFIG >> 20} MiB a config may be")
    if config_desc.get("mediaType", OCI_CONFIG) not in (OCI_CONFIG, DOCKER_CONFIG):
        raise RegistryError(f"unknown media type {config_desc['mediaType']!r} for the config of {ref} "
                            f"(not a container image)")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise RegistryError(f"the manifest of {ref} has no layers list")
    for n, desc in enumerate(layers):
        check_descriptor(desc, f"layer {n + 1} of {ref}")
        layer_type = desc.get("mediaType", "")
        if not isinstance(layer_type, str):
            raise RegistryError(f"unknown media type {layer_type!r} for layer {n + 1} of {ref}")
        if layer_type in FOREIGN_LAYER_TYPES:
            raise RegistryError(f"layer {n + 1} of {ref} is a foreign (non-distributable) layer "
                                f"({layer_type}), which strata does not fetch")
        if layer_type not in LAYER_TYPES:
            raise RegistryError(f"unknown media type {layer_type!r} for layer {n + 1} of {ref}")
    return config_desc, layers


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def place(desc: dict, ref: RemoteReference) -> dict:
    return {"digest": desc["digest"], "mediaType": desc["mediaType"], "size": desc["size"],
            "registry": ref.registry, "repository": ref.repository}


# -- push ---------------------------------------------------------------------

COMPRESSIONS = ("gzip", "zstd", "none")


def layer_media_type(compression: str, manifest_format: str) -> str:
    if manifest_format == "v2s2":
        return {"gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "none": "application/vnd.docker.image.rootfs.diff.tar"}[compression]
    return OCI_LAYER + {"gzip": "+gzip", "zstd": "+zstd", "none": ""}[compression]


@contextlib.contextmanager
def piped(write: Callable[[BinaryIO], None]) -> Iterator[BinaryIO]:
    """A readable file of what write(out) writes, in a thread (a layer's tar, made as it is
    read: never on disk). The writer's error is raised when the reader is done."""
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with open(write_fd, "wb", buffering=CHUNK) as out:
                write(out)
        except BrokenPipeError:
            pass  # the reader gave up first: its error is the one to tell
        except BaseException as e:
            failure.append(e)
    thread = threading.Thread(target=produce, daemon=True, name="layer-tar")
    thread.start()
    try:
        with open(read_fd, "rb", buffering=CHUNK) as f:
            yield f
    except BaseException:
        thread.join()
        if failure:  # the tar broke off (a damaged layer): that is why the upload failed
            raise failure[0] from None
        raise
    thread.join()
    if failure:
        raise failure[0]


class Compressed:
    """The chunks of a stream compressed (store.compress), hashed and counted as they go."""

    def __init__(self, source: BinaryIO, compression: str, level: int | None, advance):
        self.source, self.compression, self.level, self.advance = source, compression, level, advance
        self.hash = hashlib.sha256()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        from .compress import compressed_chunks
        for data, consumed in compressed_chunks(self.source, self.compression, self.level):
            self.advance(consumed)
            if data:
                self.hash.update(data)
                self.size += len(data)
                yield data

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def read_chunks(f: BinaryIO, advance, length: int | None = None) -> Iterator[bytes]:
    """The next `length` bytes of `f` (all of it when None), a chunk at a time."""
    left = length
    while left is None or left > 0:
        data = f.read(CHUNK if left is None else min(CHUNK, left))
        if not data:
            break
        if left is not None:
            left -= len(data)
        advance(len(data))
        yield data


class Pusher:
    def __init__(self, client: RegistryClient, ref: RemoteReference, cache: BlobCache, progress,
                 chunk_size: int | None):
        self.client, self.ref, self.cache, self.progress = client, ref, cache, progress
        self.chunk_size = chunk_size
        self.scopes = push_scope(ref.repository)
        self.what = f"to {ref.registry}/{ref.repository}"

    def exists(self, digest: str) -> bool:
        return self.client.blob_exists(self.ref.repository, digest, self.scopes)

    def upload(self, chunks: Iterator[bytes], location: str, what: str) -> str:
        """PATCH the chunks: one streamed request, or ranged ones of chunk_size."""
        if not self.chunk_size:
            return self.client.upload_chunk(location, self.scopes, chunks, None, None, what)
        start, pending = 0, bytearray()
        for chunk in chunks:
            pending += chunk
            while len(pending) >= self.chunk_size:
                data, pending = bytes(pending[:self.chunk_size]), pending[self.chunk_size:]
                location = self.client.upload_chunk(location, self.scopes, data, start, len(data), what)
                start += len(data)
        if pending or not start:
            location = self.client.upload_chunk(location, self.scopes, bytes(pending), start, len(pending), what)
        return location

    def upload_known(self, open_source, digest: str, size: int, label: str) -> None:
        """A blob whose digest is known: skipped when the registry has it, else one PUT
        (or ranged PATCHes and a closing PUT)."""
        if self.exists(digest):
            self.progress.note(f"{label}: already exists")
            return
        what = f"uploading {label} {self.what}"
        location = self.client.start_upload(self.ref.repository, self.scopes)
        self.client.authorization(self.scopes)  # a stream cannot be sent twice: the token first
        with self.progress.task(label, size) as advance, open_source() as source:
            if self.chunk_size:
                location = self.upload(read_chunks(source, advance, size), location, what)
                self.client.finish_upload(location, self.scopes, digest, what)
            else:
                self.client.finish_upload(location, self.scopes, digest, what, read_chunks(source, advance, size),
                                          size)

    def upload_compressed(self, open_source, size: int, compression: str, level: int | None, media_type: str,
                          label: str) -> dict:
        what = f"uploading {label} {self.what}"
        location = self.client.start_upload(self.ref.repository, self.scopes)
        self.client.authorization(self.scopes)
        with self.progress.task(f"{label} ({compression})", size) as advance, open_source() as source:
            stream = Compressed(source, compression, level, advance)
            location = self.upload(iter(stream), location, what)
            self.client.finish_upload(location, self.scopes, stream.digest, what)
        return {"mediaType": media_type, "digest": stream.digest, "size": stream.size}

    def reuse(self, diff_id: str, media_type: str, label: str) -> dict | None:
        """A descriptor for the layer from a blob the registry has, or can mount; else None."""
        for known in self.cache.places(diff_id):
            if known.get("mediaType") != media_type or known.get("registry") != self.ref.registry:
                continue
            digest, desc = known["digest"], {"mediaType": media_type, "digest": known["digest"],
                                              "size": known["size"]}
            if self.exists(digest):
                self.progress.note(f"{label}: already exists")
                return desc
            source = known.get("repository")
            if source and source != self.ref.repository:
                scopes = push_scope(self.ref.repository, source)
                if self.client.start_upload(self.ref.repository, scopes, digest, source) is None:
                    self.progress.note(f"{label}: mounted from {source}")
                    return desc
        return None


def push(store: Store, image: str, dest: str | None = None, tls_verify: bool | None = None,
         compression: str = "gzip", level: int | None = None, manifest_format: str = "oci",
         chunk_size: int | None = None, progress=None) -> str:
    """Push IMAGE to DEST (default: IMAGE's name); the digest of the manifest pushed.

    Layers are the tars a saved OCI layout has (store.tarsplit.layer_tar_writer), made
    while they are compressed and uploaded."""
    from .oci import NO_PROGRESS
    from .tarsplit import layer_tar_writer
    progress = progress or NO_PROGRESS
    if compression not in COMPRESSIONS:
        raise StoreError(f"unknown compression {compression!r} (gzip, zstd or none)")
    if manifest_format not in ("oci", "v2s2"):
        raise StoreError(f"unknown manifest format {manifest_format!r} (oci or v2s2)")
    if manifest_format == "v2s2" and compression == "zstd":
        raise StoreError("Docker v2 schema 2 manifests cannot carry zstd layers: --format oci")
    image_id = store.resolve_image(image)
    if dest is None and image.removeprefix("sha256:") in image_id:
        raise StoreError(f"push of image id {image}: name a destination (strata push IMAGE DEST)")
    ref = parse_remote_reference(dest or image)
    config_raw = read_file(os.path.join(store.image_dir(image_id), "config.json"))
    diff_ids = json.loads(config_raw)["rootfs"]["diff_ids"]
    media_type = layer_media_type(compression, manifest_format)
    with open_client(ref, tls_verify) as client:
        pusher = Pusher(client, ref, BlobCache(store.root), progress, chunk_size)
        progress.note(f"Pushing {ref}")
        layers, seen, pushed = [], [], {}
        for diff_id in diff_ids:
            label = f"layer {diff_id[7:19]}"
            desc = pushed.get(diff_id) or pusher.reuse(diff_id, media_type, label)
            if desc is None:
                size, write = layer_tar_writer(store, diff_id)
                open_source = lambda write=write: piped(write)
                if compression == "none":
                    pusher.upload_known(open_source, diff_id, size, label)
                    desc = {"mediaType": media_type, "digest": diff_id, "size": size}
                else:
                    desc = pusher.upload_compressed(open_source, size, compression, level, media_type, label)
            layers.append(desc)
            pushed[diff_id] = desc
            seen.append((diff_id, place(desc, ref)))
        pusher.cache.remember(seen)
        pusher.upload_known(lambda: contextlib.nullcontext(io.BytesIO(config_raw)), image_id,
                            len(config_raw), "config")
        manifest = {"schemaVersion": 2,
                    "mediaType": DOCKER_MANIFEST if manifest_format == "v2s2" else OCI_MANIFEST,
                    "config": {"mediaType": DOCKER_CONFIG if manifest_format == "v2s2" else OCI_CONFIG,
                               "digest": image_id, "size": len(config_raw)},
                    "layers": layers}
        body = json.dumps(manifest, indent=3).encode()
        digest = sha256_digest(body)
        claimed = client.put_manifest(ref.repository, ref.digest or ref.tag or "latest", body,
                                      manifest["mediaType"])
        if claimed and claimed != digest:
            raise DigestMismatch(f"digest mismatch: {ref.registry} took the manifest as {claimed}, "
                                 f"not {digest}")
        if ref.digest and ref.digest != digest:
            raise DigestMismatch(f"digest mismatch: the manifest pushed is {digest}, not {ref.digest}")
    return digest


def login(registry: str, user: str, password: str, tls_verify: bool | None = None) -> str:
    """Check user:password against the registry (GET /v2/ with them, through its token
    service if it has one); the registry's normalised name. Raises AuthError."""
    name, api_host = parse_registry(registry)
    insecure = tls_verify is False or (tls_verify is None and is_insecure(name))
    with RegistryClient(name, api_host, insecure, (user, password)) as client:
        response = client.send("GET", "/v2/", [], "checking the credentials")
        if not response.is_success:
            raise client.fail(response, "checking the credentials")
    return name
