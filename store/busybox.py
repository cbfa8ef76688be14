"""The embedded base image `busybox:latest`, made from the host's busybox-static.

The image is a pure function of the host binary: same binary, same image id.
"""
from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import time

from .errors import StoreError
from .layer import Entry, LayerWriter
from .store import Store, new_image_config

BASE_TAG = "busybox:latest"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n"
GROUP = b"root:x:0:\nnobody:x:65534:\n"
DIRS = {"bin": 0o755, "dev": 0o755, "etc": 0o755, "home": 0o755, "proc": 0o555,
        "root": 0o700, "sbin": 0o755, "sys": 0o555, "tmp": 0o1777, "usr": 0o755,
        "usr/bin": 0o755, "usr/sbin": 0o755, "var": 0o755}
PT_INTERP = 3


def find_static_busybox() -> str:
    for candidate in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox")):
        if candidate and os.path.isfile(candidate) and is_static_elf(candidate):
            return candidate
    raise StoreError("no statically linked busybox found; install the busybox-static package")


def is_static_elf(path: str) -> bool:
    """True when the ELF file has no program interpreter (it runs without a libc on disk)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
            return False
        endian = "<" if head[5] == 1 else ">"
        phoff, = struct.unpack_from(endian + "Q", head, 32)
        phentsize, phnum = struct.unpack_from(endian + "HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from(endian + "I", table, i * phentsize)[0] != PT_INTERP for i in range(phnum))


def busybox_version(binary: str) -> str:
    out = subprocess.run([binary], capture_output=True, text=True).stdout
    first = out.splitlines()[0] if out else ""
    return first.split(" ")[1] if first.startswith("BusyBox") else "unknown"


def build_busybox_image(store: Store, tag: str = BASE_TAG) -> str:
    """Create (or re-tag, when identical) the busybox base image; return its id."""
    binary = find_static_busybox()
    st = os.stat(binary)
    mtime_ns = st.st_mtime_ns // 10**9 * 10**9
    applets = subprocess.run([binary, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    version = busybox_version(binary)

    def fill(w: LayerWriter) -> None:
        w.add(".", Entry("", "dir", 0o755, mtime_ns=mtime_ns))
        for path, mode in sorted(DIRS.items()):
            w.add(path, Entry("", "dir", mode, mtime_ns=mtime_ns))
        with open(binary, "rb") as f:
            w.add("bin/busybox", Entry("", "file", 0o755, size=st.st_size, mtime_ns=mtime_ns), f)
        for applet in sorted(set(applets) - {"bin/busybox"}):
            w.add(applet, Entry("", "hardlink", target="bin/busybox"))
        for path, data in (("etc/passwd", PASSWD), ("etc/group", GROUP)):
            w.add(path, Entry("", "file", 0o644, size=len(data), mtime_ns=mtime_ns), io.BytesIO(data))

    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime_ns // 10**9))
    with store.staging() as staging:
        layer = store.prepare_layer(staging, fill)
        history = [
            {"created": created, "created_by": f"/bin/sh -c #(nop) ADD busybox-static {version} in / "},
            {"created": created, "created_by": '/bin/sh -c #(nop)  CMD ["sh"]', "empty_layer": True},
        ]
        config = new_image_config([layer.diff_id], history, {"Cmd": ["sh"], "Env": [PATH_ENV]}, created)
        return store.create_image(config, None, [layer], staging, tag)


def ensure_busybox(store: Store) -> str:
    """The base image's id, made first when `busybox:latest` does not exist yet."""
    tags = store.read_tags()
    if BASE_TAG in tags and store.image_exists(tags[BASE_TAG]):
        return tags[BASE_TAG]
    return build_busybox_image(store)


def resolve_with_base(store: Store, ref: str) -> str:
    """The image `ref` names; `busybox` (the embedded base image) is made on first use."""
    try:
        return store.resolve_image(ref)
    except StoreError:
        if ref in ("busybox", BASE_TAG):
            return ensure_busybox(store)
        raise
