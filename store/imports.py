"""`strata import`: a rootfs tarball or a directory becomes a one-layer image."""
from __future__ import annotations

import os
import stat
import sys

from .changes import apply_changes
from .errors import StoreError
from .layer import apply_directory, apply_tar_stream
from .store import Store, new_image_config, now_rfc3339, parse_reference


class AdvancingWriter:
    """A LayerWriter that reports the data bytes of the files it is given (progress)."""

    def __init__(self, writer, advance):
        self.writer, self.advance = writer, advance

    def add(self, raw_name: str, entry, data=None) -> None:
        self.writer.add(raw_name, entry, data)
        if entry.kind == "file":
            self.advance(entry.size)


def import_image(store: Store, source: str, tag: str | None = None, changes: list[str] = (),
                 message: str = "", progress=None) -> str:
    """Import `source` (a tar file, possibly compressed, a directory, or "-" for stdin).

    Everything is built in staging first; a bad archive leaves the store as it was.
    `progress`: as store.oci has it (the archive's bytes read, or a directory's data).
    """
    from .oci import NO_PROGRESS, VerifyingReader
    progress = progress or NO_PROGRESS
    if tag is not None:
        parse_reference(tag)  # reject a bad name before doing any work
    container_config = apply_changes({}, list(changes))
    with store.staging() as staging:
        if source == "-":
            with progress.task("import stdin", None) as advance:
                counted = VerifyingReader(sys.stdin.buffer, None, None, "stdin", advance)
                layer = store.prepare_layer(staging, lambda w: apply_tar_stream(counted, w))
        else:
            try:
                st = os.stat(source)
            except OSError as e:
                raise StoreError(f"cannot read {source}: {e.strerror}") from None
            if stat.S_ISDIR(st.st_mode):
                with progress.task(f"import {source}", None) as advance:
                    layer = store.prepare_layer(staging, lambda w: apply_directory(source, AdvancingWriter(w, advance)))
            else:
                with open(source, "rb") as f, progress.task(f"import {source}", st.st_size) as advance:
                    counted = VerifyingReader(f, None, None, source, advance)
                    layer = store.prepare_layer(staging, lambda w: apply_tar_stream(counted, w))
        created = now_rfc3339()
        history = [{"created": created, "created_by": "",
                    "comment": message or f"Imported from {source}"}]
        config = new_image_config([layer.diff_id], history, container_config, created)
        return store.create_image(config, None, [layer], staging, tag)
