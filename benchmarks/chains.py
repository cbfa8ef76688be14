"""The layer chains every system is measured on: built once for the deepest depth asked,
each depth using the bottom layers of it (a chain at depth d is the first d layers).

The bottom layer holds what the workloads touch:
  d000..d099/f000..f099   10,000 files of 1 KiB (stat, negative lookups, readdir, reads)
  big                     a 64 MiB file (sequential reads, copy-up)
  victim/v00..v09/*       1,000 files in 10 directories (delete a tree)
  moves/m00..m09/*        10 directories of 100 files (rename a lower directory)
Each layer above it adds 5 files and overwrites 5 in the d* directories, so a name
resolves through the whole chain. For each depth there is also the chain flattened
into one directory (the native system) and, in one store, an image of the chain (the
strata system: each depth's image is the parent of the next one's).

The walk chain (the memory workload) has for bottom layer 100,000 files of a few bytes
(--walk-files) in 1,000 directories d000..d999 of f000..f099, and the same layers above
it.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess

DIRS, FILES_PER_DIR, NEGATIVES = 100, 100, 5000
SMALL_FILE = 1024
BIG_MIB = 64
VICTIM_DIRS, MOVED_DIRS, FILES_PER_SUBDIR = 10, 10, 100
UNTAR_FILES = 10_000
WALK_FILES = 100_000  # the memory workload's image, in directories of FILES_PER_DIR files


@dataclasses.dataclass(frozen=True)
class Chain:
    """One depth's layers (top first, as overlayfs takes them), its flattened tree,
    and its image in a strata store."""
    depth: int
    lowers: list[str]
    flat: str
    store_root: str
    image: str


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def tree_of(root: str, dirs: int, per_dir: int, data: bytes, dir_fmt: str, file_fmt: str) -> None:
    for d in range(dirs):
        path = os.path.join(root, dir_fmt.format(d))
        os.makedirs(path)
        for n in range(per_dir):
            write_file(os.path.join(path, file_fmt.format(n)), data)


def base_layer(path: str) -> None:
    tree_of(path, DIRS, FILES_PER_DIR, b"b" * SMALL_FILE, "d{:03}", "f{:03}")
    tree_of(os.path.join(path, "victim"), VICTIM_DIRS, FILES_PER_SUBDIR, b"v\n", "v{:02}", "x{:03}")
    tree_of(os.path.join(path, "moves"), MOVED_DIRS, FILES_PER_SUBDIR, b"m\n", "m{:02}", "y{:03}")
    block = os.urandom(1 << 20)
    with open(os.path.join(path, "big"), "wb") as f:
        for _ in range(BIG_MIB):
            f.write(block)


def walk_bottom(files: int = WALK_FILES):
    """The walk chain's bottom layer of `files` files (a multiple of FILES_PER_DIR)."""
    return lambda path: tree_of(path, files // FILES_PER_DIR, FILES_PER_DIR, b"w\n", "d{:03}", "f{:03}")


def upper_layer(path: str, k: int) -> None:
    """Layer k >= 1: 5 new files and 5 overwritten ones."""
    for j in range(5):
        d = os.path.join(path, f"d{(k * 7 + j) % DIRS:03}")
        os.makedirs(d, exist_ok=True)
        write_file(f"{d}/new{k:03}_{j}", b"added\n")
        write_file(f"{d}/f{(k * 13 + j) % FILES_PER_DIR:03}", f"overwritten in {k}\n".encode())


def build_layers(root: str, depth: int, bottom=base_layer) -> list[str]:
    """Layer directories, bottom first; `bottom(path)` fills the first."""
    layers = []
    for k in range(depth):
        layer = os.path.join(root, f"layer{k:03}")
        os.makedirs(layer, exist_ok=True)
        (bottom(layer) if k == 0 else upper_layer(layer, k))
        layers.append(layer)
    return layers


def flatten(layers: list[str], dest: str) -> None:
    os.makedirs(dest)
    for layer in layers:
        subprocess.run(["cp", "-a", f"{layer}/.", dest], check=True)


def store_images(store_root: str, layers: list[str], depths: set[int]) -> dict[int, str]:
    """{depth: image id}: one image per layer, each the parent of the next."""
    from store import Store
    from store.layer import apply_directory
    from store.store import new_image_config
    store = Store(store_root)
    parent, images = None, {}
    for n, layer_dir in enumerate(layers):
        with store.staging() as staging:
            layer = store.prepare_layer(staging, lambda w: apply_directory(layer_dir, w))
            pconf = store.image_config(parent) if parent else {"rootfs": {"diff_ids": []}, "history": []}
            config = new_image_config(pconf["rootfs"]["diff_ids"] + [layer.diff_id],
                                      pconf["history"] + [{"created_by": f"layer {n}"}], {})
            parent = store.create_image(config, parent, [layer], staging)
        if n + 1 in depths:
            images[n + 1] = parent
    return images


def build_chains(root: str, depths: list[int], bottom=base_layer) -> dict[int, Chain]:
    layers = build_layers(os.path.join(root, "layers"), max(depths), bottom)
    store_root = os.path.join(root, "store")
    images = store_images(store_root, layers, set(depths))
    chains = {}
    for depth in depths:
        flat = os.path.join(root, f"flat{depth}")
        flatten(layers[:depth], flat)
        chains[depth] = Chain(depth, layers[:depth][::-1], flat, store_root, images[depth])
    return chains


def untar_source(root: str) -> str:
    """A tarball of UNTAR_FILES files of 1 KiB in 100 directories."""
    tree = os.path.join(root, "untar-tree")
    tree_of(tree, 100, UNTAR_FILES // 100, b"t" * 1024, "u{:03}", "z{:03}")
    tarball = os.path.join(root, "untar.tar")
    subprocess.run(["tar", "-C", tree, "-cf", tarball, "."], check=True)
    return tarball
