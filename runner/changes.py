"""A container's changes: its upper layer against its base (the image and its init
layer, runner.initlayer), for diff and commit.

Containers made before init layers were real layers (their config has no
InitLayer) run on the image alone, with their mount points made in the upper
layer and listed in its meta `init_paths`: those paths stay out of their
diffs and commits, as they always did.
"""
from __future__ import annotations

import json

from store import Store
from unionfs.storeview import UpperChanges
from unionfs.upper import stored_meta

from . import initlayer

LEGACY_INIT_PATHS = "init_paths"  # the upper layer's meta of a container made before init layers


def container_base(store: Store, config: dict, upper_path: str):
    """The init base a container runs on, or None for one made before init layers (no
    InitLayer in its config, and an upper layer that holds its mount points: one of
    those never started gets the init layer, for good)."""
    if not config.get("InitLayer") and stored_meta(upper_path, LEGACY_INIT_PATHS) is not None:
        return None
    return initlayer.ensure_base(store, config["Image"])


def open_container_changes(store: Store, config: dict, upper_path: str) -> UpperChanges:
    base = container_base(store, config, upper_path)
    changes = UpperChanges(store, config["Image"], upper_path, base)
    if base is None:
        changes.hidden = set(json.loads(changes.upper.get_meta(LEGACY_INIT_PATHS) or "[]"))
    return changes


def init_paths(changes: UpperChanges) -> set[str]:
    """The paths of the container's init layer (its runtime mount points): export leaves
    them out unless something of the container's own is below them."""
    if changes.base is None:
        return set(changes.hidden)
    return {"/" + e.path for e in changes.store.layer_entries(changes.base.layer) if e.path and not e.implicit}
