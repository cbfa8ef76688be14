"""Errors the store raises. The CLI turns each into one `strata: error:` line."""


class StoreError(Exception):
    """A user-facing failure: the message is shown as is, exit status 125."""


class NoSuchImage(StoreError):
    def __init__(self, ref: str):
        super().__init__(f"No such image: {ref}")


class NoSuchContainer(StoreError):
    def __init__(self, ref: str):
        super().__init__(f"No such container: {ref}")


class UnsafeArchive(StoreError):
    """An archive entry would escape its layer or is malformed; nothing was stored."""

    def __init__(self, entry: str, why: str):
        shown = entry if len(entry) <= 200 else f"{entry[:200]}... ({len(entry)} characters)"
        super().__init__(f"unsafe archive entry {shown!r}: {why}")
        self.entry = entry


class BadArchive(StoreError):
    """The input is not a readable archive (truncated, corrupt, unknown format)."""
