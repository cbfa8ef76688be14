"""Store images with known layer chains, for filesystem tests."""
from __future__ import annotations

import io

from store import Store
from store.layer import apply_tar_stream
from store.store import new_image_config

from .helpers import build_tar


def make_chain(store: Store, layers: list[list], tag: str | None = None) -> str:
    """An image whose layers are the given tar member lists (bottom first); returns its id."""
    parent = None
    for n, members in enumerate(layers):
        data = build_tar(members)
        with store.staging() as staging:
            layer = store.prepare_layer(staging, lambda w: apply_tar_stream(io.BytesIO(data), w))
            if parent is None:
                diff_ids, history = [], []
            else:
                pconf = store.image_config(parent)
                diff_ids, history = pconf["rootfs"]["diff_ids"], pconf["history"]
            config = new_image_config(diff_ids + [layer.diff_id],
                                      history + [{"created": "2030-01-01T00:00:00Z", "created_by": f"layer {n}"}],
                                      {"Cmd": ["sh"]})
            parent = store.create_image(config, parent, [layer], staging,
                                        tag if n == len(layers) - 1 else None)
    return parent
