"""The init layer: a container's mount points, as a real layer between its image and its
upper layer (Docker's <id>-init).

The sandbox mounts /proc, /dev and /sys and binds /etc/hosts, /etc/hostname
and /etc/resolv.conf; what of these the image lacks is in this layer, so
they are never made in the container's upper layer and never show in diff
or commit (no hidden paths). The layer is a pure function of the image
(root-owned, modes 0755 and 0644, times 0), so every container of an image
shares one, and a base made again after an fsck has the same inode numbers.
"""
from __future__ import annotations

import io
import stat

from store import Store
from store.layer import Entry
from store.store import InitBase
from unionfs.storeview import image_lower

INIT_DIRS = ("proc", "dev", "sys", "etc")
INIT_FILES = ("etc/hosts", "etc/hostname", "etc/resolv.conf")


def missing_paths(store: Store, image_id: str) -> list[str]:
    """The init paths the image does not have, parents first; none under a parent that
    is not a directory (a symlinked /etc: the bind then lands where it points)."""
    lower = image_lower(store, image_id, point_lookups=True)
    try:
        found: dict[str, int | None] = {"": 1}
        out = []
        for path in INIT_DIRS + INIT_FILES:
            parent, _, name = path.rpartition("/")
            parent_ino = found.get(parent)
            if parent_ino is None:  # a parent this layer makes: the child is missing too
                if parent in out:
                    out.append(path)
                continue
            ino = lower.lookup(parent_ino, name.encode())
            if ino is None:
                out.append(path)
                continue
            attrs = lower.attrs(ino)
            found[path] = ino if attrs is not None and stat.S_ISDIR(attrs.mode) else None
        return out
    finally:
        lower.close()


def ensure_base(store: Store, image_id: str) -> InitBase:
    """The image's init base (image + init layer), made on first use."""
    base = store.init_base(image_id)
    if base is not None:
        return base
    paths = missing_paths(store, image_id)

    def fill(writer) -> None:
        for path in paths:
            if path in INIT_DIRS:
                writer.add(path, Entry(path, "dir", 0o755))
            else:
                writer.add(path, Entry(path, "file", 0o644), io.BytesIO(b""))
    return store.make_init_base(image_id, fill)
