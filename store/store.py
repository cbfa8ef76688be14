"""The on-disk store: layers, images, tags (and, later, containers).

Layout under the root:
  lock                         flock serialising every metadata update
  tmp/                         staging; objects are built here, then renamed in
  layers/<hex>/root/           file data and directories of one layer
  layers/<hex>/index.json      the layer's metadata index (store.layer.Entry)
  layers/<hex>/meta.json       {"size": bytes of file data, "entries": n}
  images/<hex>/config.json     OCI image config; <hex> = sha256 of these exact bytes
  images/<hex>/meta.json       {"parent": "sha256:..." | null}
  images/<hex>/index.db        the merged index (store.index)
  tags.json                    {"name:tag": "sha256:<hex>"}
  containers/<id>/config.json  {"Image": "sha256:<hex>", ...}

Metadata is JSON, replaced atomically (temp file, fsync, rename) while the
lock is held. Objects are content addressed and immutable, so a crash leaves
at worst an unreferenced object, never a half-written one (invariant 7).

Layer contents are never readable by other local users, whatever the mode of
the root (which may be made beforehand, 0755): the store's subdirectories and
all below them are 0700, files at most 0700 (store.layer: image modes are
metadata). A store made before this rule is tightened when it is opened: its
subdirectories, still loose, say so; they are changed last, so a crash
half-way is finished at the next open.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import time
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple

from .errors import NoSuchImage, StoreError
from .fsutil import OWNER_ONLY, flocked, fsync_dir, remove_tree, tighten_tree, write_atomic

if TYPE_CHECKING:  # the layer and index modules load only where layers are made (CLI start-up time)
    from .layer import Entry, LayerWriter

NAME_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REFERENCE_RE = re.compile(
    rf"(?P<name>(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?{NAME_COMPONENT}(?:/{NAME_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?", re.ASCII)
HEX_RE = re.compile(r"(?:sha256:)?([0-9a-f]{1,64})", re.ASCII)
FULL_HEX_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
SUBDIRS = ("tmp", "layers", "images", "containers", "cache", "inits")
TOP_FILES = ("lock", "tags.json")


def default_root() -> str:
    """$STRATA_ROOT, else /var/lib/strata for root, else $XDG_DATA_HOME/strata."""
    if os.environ.get("STRATA_ROOT"):
        return os.environ["STRATA_ROOT"]
    if os.geteuid() == 0:
        return "/var/lib/strata"
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data_home, "strata")


def parse_reference(ref: str) -> str:
    """Normalise NAME[:TAG] to "name:tag" (default tag latest), or raise."""
    m = REFERENCE_RE.fullmatch(ref)
    if not m or len(m["name"]) > 255:
        raise StoreError(f"invalid reference format: {ref!r} (expected NAME[:TAG], lowercase)")
    if FULL_HEX_RE.fullmatch(m["name"]):  # would shadow an image id
        raise StoreError(f"invalid repository name {ref!r}: 64-byte hexadecimal strings are image ids")
    return f"{m['name']}:{m['tag'] or 'latest'}"


def now_rfc3339() -> str:
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def go_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)


class PreparedLayer:
    """A layer built in staging, not yet part of the store."""

    __slots__ = ("diff_id", "entries", "size", "staging")

    def __init__(self, diff_id: str, entries: list, size: int, staging: str):
        self.diff_id, self.entries, self.size, self.staging = diff_id, entries, size, staging


class ImageInfo:
    __slots__ = ("id", "config", "parent", "tags", "size")

    def __init__(self, id: str, config: dict, parent: str | None, tags: list[str], size: int):
        self.id, self.config, self.parent, self.tags, self.size = id, config, parent, tags, size

    @property
    def created(self) -> str:
        return self.config.get("created", "")


# where an init layer's inode numbers start: far above any image's or upper layer's (both
# count up from the image's next_ino), below the standalone filesystem's (unionfs.lower)
INIT_INODES = 1 << 60


class InitBase(NamedTuple):
    """An image plus its init layer: the merged index and the chain's layers."""
    index_path: str
    diff_ids: list[str]
    layer: str


class Store:
    """One store root. Cheap to construct; every method re-reads what it needs."""

    def __init__(self, root: str | None = None, create: bool = True):
        """create=False: a missing store is an error, not made (fsck must find one)."""
        self.root = os.path.abspath(root or default_root())
        self.lock_path = os.path.join(self.root, "lock")
        if not create and not os.path.exists(self.lock_path):
            raise StoreError(f"no store at {self.root}")
        os.makedirs(self.root, mode=OWNER_ONLY, exist_ok=True)  # a root made beforehand keeps its mode
        for sub in SUBDIRS:
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(self.root, sub), OWNER_ONLY)
        if not os.path.exists(self.lock_path):
            with flocked(self.lock_path):
                pass
        self._tighten_if_loose()
        self._remove_stale_staging()

    def _tighten_if_loose(self) -> None:
        """A store made before every part of it was its owner's alone: make it so."""
        loose = [sub for sub in SUBDIRS if os.lstat(os.path.join(self.root, sub)).st_mode & ~OWNER_ONLY & 0o7777]
        if not loose:
            return
        for name in TOP_FILES:
            with contextlib.suppress(FileNotFoundError):
                path = os.path.join(self.root, name)
                os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) & OWNER_ONLY)
        for sub in loose:
            tighten_tree(os.path.join(self.root, sub),
                         keep=container_runtime_file if sub == "containers" else lambda relpath: False)

    def _remove_stale_staging(self) -> None:
        """Staging left by a command that was killed (its pid is gone) is garbage."""
        tmp = os.path.join(self.root, "tmp")
        for name in os.listdir(tmp):
            kind, _, rest = name.partition("-")
            pid = rest.partition("-")[0]
            if kind not in ("stage", "trash") or not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                remove_tree(os.path.join(tmp, name))
            except PermissionError:
                pass  # alive, and someone else's

    # -- paths -------------------------------------------------------------

    def layer_dir(self, diff_id: str) -> str:
        return os.path.join(self.root, "layers", diff_id.removeprefix("sha256:"))

    def image_dir(self, image_id: str) -> str:
        return os.path.join(self.root, "images", image_id.removeprefix("sha256:"))

    def index_path(self, image_id: str) -> str:
        return os.path.join(self.image_dir(image_id), "index.db")

    def init_dir(self, image_id: str) -> str:
        return os.path.join(self.root, "inits", image_id.removeprefix("sha256:"))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with flocked(self.lock_path):
            yield

    @contextlib.contextmanager
    def staging(self) -> Iterator[str]:
        """A private directory under tmp/, removed afterwards whatever happens."""
        path = os.path.join(self.root, "tmp", f"stage-{os.getpid()}-{os.urandom(6).hex()}")
        os.mkdir(path, 0o700)
        try:
            yield path
        finally:
            remove_tree(path)

    # -- reading -----------------------------------------------------------

    def read_tags(self) -> dict[str, str]:
        try:
            with open(os.path.join(self.root, "tags.json"), "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def image_ids(self) -> list[str]:
        names = os.listdir(os.path.join(self.root, "images"))
        return sorted("sha256:" + n for n in names if re.fullmatch(r"[0-9a-f]{64}", n))

    def image_exists(self, image_id: str) -> bool:
        return os.path.exists(os.path.join(self.image_dir(image_id), "config.json"))

    def image_config(self, image_id: str) -> dict:
        with open(os.path.join(self.image_dir(image_id), "config.json"), "rb") as f:
            return json.load(f)

    def image_parent(self, image_id: str) -> str | None:
        with open(os.path.join(self.image_dir(image_id), "meta.json"), "rb") as f:
            parent = json.load(f)["parent"]
        return parent if parent and self.image_exists(parent) else None

    def layer_size(self, diff_id: str) -> int:
        with open(os.path.join(self.layer_dir(diff_id), "meta.json"), "rb") as f:
            return json.load(f)["size"]

    def layer_entries(self, diff_id: str) -> list[Entry]:
        from .layer import load_index
        return load_index(os.path.join(self.layer_dir(diff_id), "index.json"))

    def image_info(self, image_id: str, tags: dict[str, str] | None = None) -> ImageInfo:
        tags = self.read_tags() if tags is None else tags
        config = self.image_config(image_id)
        size = sum(self.layer_size(d) for d in dict.fromkeys(config["rootfs"]["diff_ids"]))
        return ImageInfo(image_id, config, self.image_parent(image_id),
                         sorted(t for t, i in tags.items() if i == image_id), size)

    def list_images(self) -> list[ImageInfo]:
        tags = self.read_tags()
        return [self.image_info(i, tags) for i in self.image_ids()]

    def resolve_image(self, ref: str) -> str:
        """A tag, a full id or a unique id prefix -> "sha256:<hex>"; else NoSuchImage."""
        try:
            image_id = self.read_tags().get(parse_reference(ref))
        except StoreError:
            image_id = None
        if image_id and self.image_exists(image_id):
            return image_id
        m = HEX_RE.fullmatch(ref)
        if m:
            matches = [i for i in self.image_ids() if i[7:].startswith(m[1])]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise StoreError(f"image id prefix {ref!r} is ambiguous ({len(matches)} images)")
        raise NoSuchImage(ref)

    def children_of(self, image_id: str) -> list[str]:
        return [i for i in self.image_ids() if self.image_parent(i) == image_id]

    def containers_using(self, image_id: str) -> list[str]:
        out = []
        cdir = os.path.join(self.root, "containers")
        for name in sorted(os.listdir(cdir)):
            try:
                with open(os.path.join(cdir, name, "config.json"), "rb") as f:
                    if json.load(f).get("Image") == image_id:
                        out.append(name)
            except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
                continue
        return out

    # -- making layers and images -------------------------------------------

    def prepare_layer(self, staging: str, fill: Callable[[LayerWriter], None],
                      diff_id: str | None = None) -> PreparedLayer:
        """Build a layer in `staging/layer` with `fill(writer)`, and digest it. `diff_id`:
        the digest of the tar `fill` applied, checked by the caller, which keeps what
        makes that tar again (store.tarsplit); then the canonical tar is not made."""
        from .layer import LayerWriter, layer_digest, save_index
        layer_stage = os.path.join(staging, "layer")
        os.mkdir(layer_stage, OWNER_ONLY)
        writer = LayerWriter(layer_stage)
        try:
            fill(writer)
            entries = writer.finish()
        finally:
            writer.close()
        if diff_id is None:
            diff_id = layer_digest(entries, writer.root_path)
        size = sum(e.size for e in entries if e.kind == "file")
        save_index(entries, os.path.join(layer_stage, "index.json"))
        write_atomic(os.path.join(layer_stage, "meta.json"),
                     canonical_json({"size": size, "entries": len(entries)}))
        return PreparedLayer(diff_id, entries, size, layer_stage)

    def create_image(self, config: dict, parent: str | None, new_layers: list[PreparedLayer],
                     staging: str, tag: str | None = None, raw_config: bytes | None = None) -> str:
        """Add an image whose chain is the parent's plus `new_layers`; tag it.

        The merged index is the parent's index copied plus the new layers
        applied, so its cost is independent of the parent chain's depth.
        `raw_config`: the config's bytes as another tool wrote them (load,
        pull), kept so that the image id is their digest; else canonical JSON.
        """
        import hashlib

        from . import index as merged_index
        raw = canonical_json(config) if raw_config is None else raw_config
        image_id = "sha256:" + hashlib.sha256(raw).hexdigest()
        image_stage = os.path.join(staging, "image")
        # built even when the image exists now: an rmi may remove it before the lock is ours
        os.mkdir(image_stage, OWNER_ONLY)
        write_atomic(os.path.join(image_stage, "config.json"), raw)
        write_atomic(os.path.join(image_stage, "meta.json"), canonical_json({"parent": parent}))
        try:
            merged_index.build_index(os.path.join(image_stage, "index.db"),
                                     self.index_path(parent) if parent else None,
                                     config["rootfs"]["diff_ids"], [l.entries for l in new_layers])
        except FileNotFoundError:
            raise NoSuchImage(parent) from None
        placed: list[str] = []
        with self.locked():
            try:
                if parent is not None and not self.image_exists(parent):
                    raise NoSuchImage(parent)
                for layer in new_layers:
                    dest = self.layer_dir(layer.diff_id)
                    if not os.path.exists(dest):
                        os.rename(layer.staging, dest)
                        placed.append(dest)
                dest = self.image_dir(image_id)
                if not os.path.exists(dest):
                    os.rename(image_stage, dest)
                    placed.append(dest)
                fsync_dir(os.path.join(self.root, "layers"))
                fsync_dir(os.path.join(self.root, "images"))
                if tag is not None:
                    self._set_tag_locked(parse_reference(tag), image_id)
            except BaseException:
                for path in reversed(placed):
                    remove_tree(path)
                raise
        return image_id

    # -- init layers: what containers of an image run on ----------------------

    def init_base(self, image_id: str) -> InitBase | None:
        """The image plus its init layer (a container's mount points: see runner.initlayer),
        if made: inits/<image>/ holds the merged index and names the layer."""
        try:
            with open(os.path.join(self.init_dir(image_id), "meta.json"), "rb") as f:
                layer = json.load(f)["layer"]
        except (FileNotFoundError, ValueError, KeyError):
            return None
        diff_ids = self.image_config(image_id)["rootfs"]["diff_ids"] + [layer]
        return InitBase(os.path.join(self.init_dir(image_id), "index.db"), diff_ids, layer)

    def make_init_base(self, image_id: str, fill: Callable[[LayerWriter], None]) -> InitBase:
        """Make the image's init layer with `fill` (a pure function of the image: the same
        layer for every container of it) and the merged index of image + layer."""
        from . import index as merged_index
        with self.staging() as staging:
            layer = self.prepare_layer(staging, fill)
            stage = os.path.join(staging, "init")
            os.mkdir(stage, OWNER_ONLY)
            diff_ids = self.image_config(image_id)["rootfs"]["diff_ids"]
            merged_index.build_index(os.path.join(stage, "index.db"), self.index_path(image_id),
                                     diff_ids + [layer.diff_id], [layer.entries], aside_from=INIT_INODES)
            write_atomic(os.path.join(stage, "meta.json"), canonical_json({"layer": layer.diff_id}))
            with self.locked():
                if not self.image_exists(image_id):
                    raise NoSuchImage(image_id)
                if not os.path.exists(self.layer_dir(layer.diff_id)):
                    os.rename(layer.staging, self.layer_dir(layer.diff_id))
                    fsync_dir(os.path.join(self.root, "layers"))
                if not os.path.exists(self.init_dir(image_id)):
                    os.rename(stage, self.init_dir(image_id))
                    fsync_dir(os.path.join(self.root, "inits"))
        return self.init_base(image_id)

    def init_layers_in_use(self) -> set[str]:
        """The layers of the init bases of images that exist."""
        used = set()
        for name in os.listdir(os.path.join(self.root, "inits")):
            image_id = "sha256:" + name
            if not self.image_exists(image_id):
                continue
            base = self.init_base(image_id)
            if base is not None:
                used.add(base.layer)
        return used

    # -- tags and removal ----------------------------------------------------

    def _write_tags_locked(self, tags: dict[str, str]) -> None:
        write_atomic(os.path.join(self.root, "tags.json"), json.dumps(tags, indent=1, sort_keys=True).encode())

    def _set_tag_locked(self, name: str, image_id: str) -> None:
        tags = self.read_tags()
        tags[name] = image_id
        self._write_tags_locked(tags)

    def tag(self, source: str, target: str) -> str:
        """Point `target` at the image `source` names; the old target image keeps its data."""
        name = parse_reference(target)
        with self.locked():
            image_id = self.resolve_image(source)
            self._set_tag_locked(name, image_id)
        return image_id

    def remove_image(self, ref: str, force: bool = False) -> list[str]:
        """Docker's rmi: untag, then delete the image and layers nobody else uses.

        Refuses while a container or a child image depends on the image,
        unless `force`; even forced, an image a container runs on only loses
        its tags (the container still needs its index).
        """
        with self.locked():
            image_id = self.resolve_image(ref)
            tags = self.read_tags()
            image_tags = sorted(t for t, i in tags.items() if i == image_id)
            by_tag = False
            try:
                by_tag = parse_reference(ref) in image_tags
            except StoreError:
                pass
            short = image_id[7:19]
            if by_tag and len(image_tags) > 1:
                del tags[parse_reference(ref)]
                self._write_tags_locked(tags)
                return [f"Untagged: {parse_reference(ref)}"]
            if not by_tag and len(image_tags) > 1 and not force:
                raise StoreError(f"conflict: unable to delete {short} (must be forced) - "
                                 f"image is referenced in multiple repositories")
            users = self.containers_using(image_id)
            children = self.children_of(image_id)
            if (users or (children and not by_tag)) and not force:
                what = (f"container {users[0][:12]} is using it" if users
                        else "image has dependent child images")
                raise StoreError(f"conflict: unable to delete {short} - {what}")
            messages = []
            for t in image_tags:
                del tags[t]
                messages.append(f"Untagged: {t}")
            if image_tags:
                self._write_tags_locked(tags)
            if users or (children and by_tag and not force):
                return messages  # stays as a <none> image
            messages.append(f"Deleted: {image_id}")
            self._delete_image_locked(image_id)
            for diff_id in self._unreferenced_layers_locked():
                self._delete_dir_locked(self.layer_dir(diff_id))
                messages.append(f"Deleted: {diff_id}")
            return messages

    def _delete_dir_locked(self, path: str) -> None:
        """Rename away first, so the store never shows a half-deleted object."""
        trash = os.path.join(self.root, "tmp", f"trash-{os.getpid()}-{os.urandom(6).hex()}")
        os.rename(path, trash)
        remove_tree(trash)

    def _delete_image_locked(self, image_id: str) -> None:
        if os.path.exists(self.init_dir(image_id)):
            self._delete_dir_locked(self.init_dir(image_id))
        self._delete_dir_locked(self.image_dir(image_id))

    def _unreferenced_layers_locked(self) -> list[str]:
        used = self.init_layers_in_use()
        for i in self.image_ids():
            used.update(self.image_config(i)["rootfs"]["diff_ids"])
        names = os.listdir(os.path.join(self.root, "layers"))
        return sorted(d for d in ("sha256:" + n for n in names) if d not in used)


def container_runtime_file(relpath: str) -> bool:
    """containers/<id>/runtime/*: hosts, hostname, resolv.conf, bind-mounted into the
    container, whose users must read them (their directory can be 0700: a bind mount
    does not go through the host path)."""
    parts = relpath.split("/")
    return len(parts) == 3 and parts[1] == "runtime"


def new_image_config(diff_ids: list[str], history: list[dict], container_config: dict,
                     created: str | None = None, author: str = "") -> dict:
    """An OCI image config with Docker's field names."""
    config = {
        "architecture": go_arch(),
        "os": "linux",
        "created": created or now_rfc3339(),
        "config": container_config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    if author:
        config["author"] = author
    return config
