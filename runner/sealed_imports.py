"""No Python module is ever loaded from a container's root.

After a chroot or pivot_root into a container's root, Python's path finder
resolves sys.path ("/usr/lib/python3.11", the venv's site-packages) inside the
container: a lazy `import` there runs the image's or the container's own code,
in a strata process that still holds what the container must not have (the
copier's host uid and network; init's and exec's capabilities before they are
dropped, and no syscall filter yet). Codec lookups import too: a `# coding:`
line in a source file read for a traceback names `encodings.<name>`. A tar with
thousands of extended headers made the copier print a RecursionError's
traceback after its chroot, and a container that had planted tarfile.py and an
encodings module got its code run as the host's root (found in review).

So each process seals its imports just after it enters a root: the file-based
finders go, the interpreter's built-in and frozen modules stay (they are not
files), and what such a process needs is imported before it enters.
"""
from __future__ import annotations

import sys

KEPT_FINDERS = ("BuiltinImporter", "FrozenImporter")


class _Refused:
    """The last finder: every module that is neither loaded, built in nor frozen."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        raise ModuleNotFoundError(f"no module is loaded inside a container's root: {name}", name=name)

    @staticmethod
    def invalidate_caches() -> None:
        pass


def seal() -> None:
    """From now on, only modules already loaded (and built-in ones) can be imported."""
    sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "__name__", "") in KEPT_FINDERS] + [_Refused]
    sys.path[:] = []
    sys.path_hooks[:] = []
    sys.path_importer_cache.clear()
