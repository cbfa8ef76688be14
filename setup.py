"""The one compiled part: unionfs/_fuseshim.c, fallocate and passthrough for pyfuse3 (see unionfs/fuseshim.py).
Everything else is in pyproject.toml. Optional: without a compiler or libfuse3-dev the
install goes on, fallocate on the mount answers EOPNOTSUPP and reads are not passed through."""
import subprocess

from setuptools import Extension, setup


def fuse3_include_dirs() -> list[str]:
    try:
        flags = subprocess.run(["pkg-config", "--cflags-only-I", "fuse3"], capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return ["/usr/include/fuse3"]
    return [flag[2:] for flag in flags if flag.startswith("-I")]


setup(ext_modules=[Extension("unionfs._fuseshim", ["unionfs/_fuseshim.c"], include_dirs=fuse3_include_dirs(),
                             libraries=["fuse3"], optional=True)])
