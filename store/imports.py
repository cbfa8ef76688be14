"""`strata import`: a rootfs tarball or a directory becomes a one-layer image."""
from __future__ import annotations

import os
import stat
import sys

from .changes import apply_changes
from .errors import StoreError
from .layer import apply_directory, apply_tar_stream
from .store import Store, new_image_config, now_rfc3339, parse_reference


def import_image(store: Store, source: str, tag: str | None = None, changes: list[str] = (),
                 message: str = "") -> str:
    """Import `source` (a tar file, possibly compressed, a directory, or "-" for stdin).

    Everything is built in staging first; a bad archive leaves the store as it was.
    """
    if tag is not None:
        parse_reference(tag)  # reject a bad name before doing any work
    container_config = apply_changes({}, list(changes))
    with store.staging() as staging:
        if source == "-":
            layer = store.prepare_layer(staging, lambda w: apply_tar_stream(sys.stdin.buffer, w))
        else:
            try:
                st = os.stat(source)
            except OSError as e:
                raise StoreError(f"cannot read {source}: {e.strerror}") from None
            if stat.S_ISDIR(st.st_mode):
                layer = store.prepare_layer(staging, lambda w: apply_directory(source, w))
            else:
                with open(source, "rb") as f:
                    layer = store.prepare_layer(staging, lambda w: apply_tar_stream(f, w))
        created = now_rfc3339()
        history = [{"created": created, "created_by": "",
                    "comment": message or f"Imported from {source}"}]
        config = new_image_config([layer.diff_id], history, container_config, created)
        return store.create_image(config, None, [layer], staging, tag)
