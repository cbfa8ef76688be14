"""The syscall filter: Docker's seccomp profile format, compiled with libseccomp.

A profile is Docker's JSON (`defaultAction`, `archMap`, `syscalls` with
`names`, `action`, `errnoRet`, `args`, `includes`/`excludes` of `caps`,
`arches` and `minKernel`). `runner/seccomp.json` is strata's default,
modelled on Docker's; `--security-opt seccomp=FILE` replaces it and
`seccomp=unconfined` turns it off.

The filter is compiled in the container's child before pivot_root (libseccomp
is loaded by then) and loaded just before the user switch: loading needs
CAP_SYS_ADMIN when no_new_privs is off, and strata, like Docker, leaves it off
so that setuid programs inside keep working. So every syscall the sandbox makes
after loading (setgroups, setuid, capset, execve) must be allowed by the
profile; Docker's and strata's allow them.
"""
from __future__ import annotations

import ctypes.util
import errno
import json
import os
import platform

_real_find_library = ctypes.util.find_library
# pyseccomp asks find_library at import, which runs `ldconfig -p` (a fork and exec
# on every container start); the sonames are stable, so name them directly
ctypes.util.find_library = lambda name: {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}.get(name) \
    or _real_find_library(name)
try:
    import pyseccomp
finally:
    ctypes.util.find_library = _real_find_library

DEFAULT_PROFILE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seccomp.json")

ACTIONS = {"SCMP_ACT_ALLOW": pyseccomp.ALLOW, "SCMP_ACT_KILL": pyseccomp.KILL_THREAD,
           "SCMP_ACT_KILL_THREAD": pyseccomp.KILL_THREAD, "SCMP_ACT_KILL_PROCESS": pyseccomp.KILL_PROCESS,
           "SCMP_ACT_TRAP": pyseccomp.TRAP, "SCMP_ACT_LOG": pyseccomp.LOG,
           "SCMP_ACT_ERRNO": None, "SCMP_ACT_TRACE": None}  # these two take a number
OPERATORS = {"SCMP_CMP_NE": pyseccomp.NE, "SCMP_CMP_LT": pyseccomp.LT, "SCMP_CMP_LE": pyseccomp.LE,
             "SCMP_CMP_EQ": pyseccomp.EQ, "SCMP_CMP_GE": pyseccomp.GE, "SCMP_CMP_GT": pyseccomp.GT,
             "SCMP_CMP_MASKED_EQ": pyseccomp.MASKED_EQ}
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
    if ACTIONS[name] is not None:
        return ACTIONS[name]
    number = rule.get("errnoRet" if where != "profile" else "defaultErrnoRet")
    if number is None:
        number = errno.EPERM
    if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= 0xFFFF:
        raise ValueError(f"seccomp profile: {where}: errnoRet must be a number from 0 to 65535")
    return pyseccomp.ERRNO(number) if name == "SCMP_ACT_ERRNO" else pyseccomp.TRACE(number)


def _conditions(rule: dict, where: str) -> list[pyseccomp.Arg]:
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
        out.append(pyseccomp.Arg(index, OPERATORS[op], value, value_two))
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
        if not isinstance(arch, str) or not hasattr(pyseccomp.Arch, arch.removeprefix("SCMP_ARCH_")):
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
    f = pyseccomp.SyscallFilter(default)
    f.set_attr(pyseccomp.Attr.CTL_NNP, 0)  # setuid programs inside keep working, as in Docker
    for arch in dict.fromkeys(arches):
        try:
            f.add_arch(getattr(pyseccomp.Arch, arch.removeprefix("SCMP_ARCH_")))
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
    for names, action, conditions in rules:
        indexes = [c._arg for c in conditions]
        # conditions on distinct arguments must all hold (one rule); several on one
        # argument are alternatives (a rule each), as runc reads Docker's profiles
        groups = [conditions] if len(set(indexes)) == len(indexes) else [[c] for c in conditions]
        for name in names:
            try:
                number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
            except (OSError, ValueError):
                continue
            if number < 0:  # a syscall this libseccomp does not know: Docker skips it too
                continue
            for group in groups:
                f.add_rule(action, number, *group)
    return f
