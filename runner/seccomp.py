"""The syscall filter: Docker's seccomp profile format, compiled with libseccomp.

A profile is Docker's JSON (`defaultAction`, `archMap`, `syscalls` with
`names`, `action`, `errnoRet`, `args`, `includes`/`excludes` of `caps`,
`arches` and `minKernel`). `runner/seccomp.json` is strata's default,
modelled on Docker's; `--security-opt seccomp=FILE` replaces it and
`seccomp=unconfined` turns it off.

The filter is compiled to BPF once per profile, capability set and kernel and
kept in the store (`cached_program`: libseccomp spends ~10 ms turning its rules
into BPF, which seccomp_load would do on every start's critical path); the
container's child reads it before pivot_root and installs it with seccomp(2)
just before the user switch: installing needs CAP_SYS_ADMIN when no_new_privs
is off, and strata, like Docker, leaves it off
so that setuid programs inside keep working. So every syscall the sandbox makes
after loading (setgroups, setuid, capset, execve) must be allowed by the
profile; Docker's and strata's allow them.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import platform

DEFAULT_PROFILE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seccomp.json")

# libseccomp's action and operator values (seccomp.h; pyseccomp uses the same):
# named here so that a start whose program is cached never loads libseccomp
ALLOW, KILL_THREAD, KILL_PROCESS, TRAP, LOG = 0x7FFF0000, 0x00000000, 0x80000000, 0x00030000, 0x7FFC0000
ACTIONS = {"SCMP_ACT_ALLOW": ALLOW, "SCMP_ACT_KILL": KILL_THREAD, "SCMP_ACT_KILL_THREAD": KILL_THREAD,
           "SCMP_ACT_KILL_PROCESS": KILL_PROCESS, "SCMP_ACT_TRAP": TRAP, "SCMP_ACT_LOG": LOG,
           "SCMP_ACT_ERRNO": 0x00050000, "SCMP_ACT_TRACE": 0x7FF00000}  # these two take a number
NUMBERED = {"SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"}
OPERATORS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5,
             "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
ARCHES = {"SCMP_ARCH_X86": 0x40000003, "SCMP_ARCH_X86_64": 0xC000003E, "SCMP_ARCH_X32": 0x4000003E,
          "SCMP_ARCH_ARM": 0x40000028, "SCMP_ARCH_AARCH64": 0xC00000B7}


def _libseccomp():
    """pyseccomp, imported on first compile. It asks find_library at import, which runs
    `ldconfig -p` (a fork and exec); the sonames are stable, so they are named."""
    import ctypes.util
    real = ctypes.util.find_library
    ctypes.util.find_library = lambda name: {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}.get(name) \
        or real(name)
    try:
        import pyseccomp
    finally:
        ctypes.util.find_library = real
    return pyseccomp


# Docker's `arches` conditions use Go's architecture names
NATIVE_ARCH = {"x86_64": ("SCMP_ARCH_X86_64", "amd64"), "aarch64": ("SCMP_ARCH_AARCH64", "arm64")}.get(
    platform.machine(), ("SCMP_ARCH_NATIVE", platform.machine()))


def load_default_profile() -> dict:
    with open(DEFAULT_PROFILE_PATH, "rb") as f:
        return json.load(f)


def _action(rule: dict, where: str) -> int:
    name = rule.get("action") if where != "profile" else rule.get("defaultAction")
    if name not in ACTIONS:
        raise ValueError(f"seccomp profile: {where}: unknown action {name!r}")
    if name not in NUMBERED:
        return ACTIONS[name]
    number = rule.get("errnoRet" if where != "profile" else "defaultErrnoRet")
    if number is None:
        number = errno.EPERM
    if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= 0xFFFF:
        raise ValueError(f"seccomp profile: {where}: errnoRet must be a number from 0 to 65535")
    return ACTIONS[name] | number


def _conditions(rule: dict, where: str) -> list[tuple[int, int, int, int]]:
    args = rule.get("args") or []
    if not isinstance(args, list):
        raise ValueError(f"seccomp profile: {where}: args must be a list")
    out = []
    for arg in args:
        if not isinstance(arg, dict):
            raise ValueError(f"seccomp profile: {where}: each of args must be an object")
        index, op = arg.get("index"), arg.get("op")
        value, value_two = arg.get("value", 0), arg.get("valueTwo", 0)
        if not isinstance(index, int) or not 0 <= index <= 5:
            raise ValueError(f"seccomp profile: {where}: argument index must be 0 to 5")
        if op not in OPERATORS:
            raise ValueError(f"seccomp profile: {where}: unknown operator {op!r}")
        for v in (value, value_two):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 64:
                raise ValueError(f"seccomp profile: {where}: argument values must be unsigned 64-bit numbers")
        out.append((index, OPERATORS[op], value, value_two))
    return out


def _names(rule: dict, where: str) -> list[str]:
    names = rule.get("names") or ([rule["name"]] if rule.get("name") else [])
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"seccomp profile: {where}: names must be a list of syscall names")
    return names


def _kernel_version() -> tuple[int, ...]:
    release = os.uname().release
    numbers = []
    for part in release.split("-")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits or 0))
    return tuple(numbers)


def _applies(rule: dict, caps: set[str], where: str) -> bool:
    """Docker's includes (all must hold) and excludes (none may)."""
    includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
    if not isinstance(includes, dict) or not isinstance(excludes, dict):
        raise ValueError(f"seccomp profile: {where}: includes and excludes must be objects")
    arch = NATIVE_ARCH[1]
    if includes.get("arches") and arch not in includes["arches"]:
        return False
    if includes.get("caps") and not set(includes["caps"]) <= caps:
        return False
    if includes.get("minKernel"):
        try:
            wanted = tuple(int(x) for x in str(includes["minKernel"]).split("."))
        except ValueError:
            raise ValueError(f"seccomp profile: {where}: minKernel {includes['minKernel']!r} is not a version") from None
        if _kernel_version() < wanted:
            return False
    if excludes.get("arches") and arch in excludes["arches"]:
        return False
    if excludes.get("caps") and set(excludes["caps"]) & caps:
        return False
    return True


def validate_profile(profile) -> None:
    """ValueError, with one line that says what is wrong, unless `profile` compiles."""
    compile_filter(profile, set(), validate_only=True)


def compile_filter(profile, caps: set[str], validate_only: bool = False):
    """A libseccomp filter for a container whose bounding set is `caps` (names like
    CAP_CHOWN), or None when validating."""
    if not isinstance(profile, dict):
        raise ValueError("seccomp profile: must be a JSON object")
    default = _action(profile, "profile")
    syscalls = profile.get("syscalls") or []
    if not isinstance(syscalls, list):
        raise ValueError("seccomp profile: syscalls must be a list")
    arches = []
    for entry in profile.get("archMap") or []:
        if isinstance(entry, dict) and entry.get("architecture") == NATIVE_ARCH[0]:
            arches += entry.get("subArchitectures") or []
    arches += [a for a in profile.get("architectures") or [] if a != NATIVE_ARCH[0]]  # the older form
    for arch in arches:
        if arch not in ARCHES:
            raise ValueError(f"seccomp profile: unknown architecture {arch!r}")
    rules = []
    for n, rule in enumerate(syscalls):
        where = f"syscalls[{n}]"
        if not isinstance(rule, dict):
            raise ValueError(f"seccomp profile: {where} must be an object")
        names, action, conditions = _names(rule, where), _action(rule, where), _conditions(rule, where)
        if _applies(rule, caps, where) and action != default:
            rules.append((names, action, conditions))
    if validate_only:
        return None
    pyseccomp = _libseccomp()
    f = pyseccomp.SyscallFilter(default)
    f.set_attr(pyseccomp.Attr.CTL_NNP, 0)  # setuid programs inside keep working, as in Docker
    for arch in dict.fromkeys(arches):
        try:
            f.add_arch(ARCHES[arch])
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
    for names, action, conditions in rules:
        indexes = [c[0] for c in conditions]
        # conditions on distinct arguments must all hold (one rule); several on one
        # argument are alternatives (a rule each), as runc reads Docker's profiles
        groups = [conditions] if len(set(indexes)) == len(indexes) else [[c] for c in conditions]
        for name in names:
            number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
            if number < 0:  # a syscall this libseccomp does not know: Docker skips it too
                continue
            for group in groups:
                f.add_rule(action, number, *(pyseccomp.Arg(*c) for c in group))
    return f


SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}.get(platform.machine(), 317)
SECCOMP_SET_MODE_FILTER = 1
_libc = ctypes.CDLL(None, use_errno=True)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Program:
    """A filter compiled to BPF: struct sock_filter instructions of 8 bytes, ready to install."""

    __slots__ = ("code",)

    def __init__(self, code: bytes):
        if not code or len(code) % 8:
            raise ValueError("seccomp: not a BPF program")
        self.code = code

    @classmethod
    def exported(cls, syscall_filter) -> Program:
        """libseccomp's export of `syscall_filter` (through a pipe: it writes to an fd)."""
        read_end, write_end = os.pipe()
        try:
            with open(write_end, "wb", closefd=False) as w:
                syscall_filter.export_bpf(w)
            os.close(write_end)
            write_end = -1
            chunks = []
            while chunk := os.read(read_end, 65536):
                chunks.append(chunk)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
        return cls(b"".join(chunks))

    def install(self) -> None:
        """seccomp(SECCOMP_SET_MODE_FILTER): needs CAP_SYS_ADMIN or no_new_privs."""
        buffer = ctypes.create_string_buffer(self.code, len(self.code))
        program = _SockFprog(len(self.code) // 8, ctypes.cast(buffer, ctypes.c_void_p))
        if _libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(program)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot install the seccomp filter: {os.strerror(err)}")


def cached_program(profile, caps: set[str], cache_dir: str | None) -> Program:
    """The BPF program of `profile` (None: the default) for `caps`, from `cache_dir`
    when a start made it before: compiling costs ~10 ms of every start, on its
    critical path. The key covers all the program depends on: the profile, the
    capabilities, the architecture and the kernel (minKernel conditions)."""
    if profile is None:
        with open(DEFAULT_PROFILE_PATH, "rb") as f:
            text = f.read()
    else:
        text = json.dumps(profile, sort_keys=True).encode()
    key = hashlib.sha256(b"\0".join([text, " ".join(sorted(caps)).encode(), NATIVE_ARCH[0].encode(),
                                      os.uname().release.encode()])).hexdigest()
    path = os.path.join(cache_dir, f"{key}.bpf") if cache_dir else None
    if path:
        try:
            with open(path, "rb") as f:
                return Program(f.read())
        except (FileNotFoundError, ValueError):  # not made yet, or cut short: made again
            pass
    program = Program.exported(compile_filter(json.loads(text), caps))
    if path:
        try:
            os.makedirs(cache_dir, mode=0o700, exist_ok=True)
            tmp = f"{path}.{os.getpid()}"
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "wb") as f:
                f.write(program.code)
            os.replace(tmp, path)
        except OSError:
            pass  # a cache: the next start compiles again
    return program
