"""Views of store objects: an image (read-only) or a container (image + upper layer)."""
from __future__ import annotations

import os

from store import Store

from .lower import IndexLower
from .upper import UpperLayer
from .view import UnionView


def image_lower(store: Store, image_id: str) -> IndexLower:
    config = store.image_config(image_id)
    roots = [os.path.join(store.layer_dir(d), "root") for d in config["rootfs"]["diff_ids"]]
    return IndexLower(store.index_path(image_id), roots)


def make_view_factory(store: Store, image_id: str, upper_path: str | None = None):
    """A function that opens the view; called in the server process, after any fork."""
    def make() -> UnionView:
        lower = image_lower(store, image_id)
        upper = UpperLayer(upper_path, lower.first_free_ino) if upper_path else None
        if upper is not None:
            upper.check()
        return UnionView(lower, upper)
    return make
