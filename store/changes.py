"""Dockerfile instructions applied to an image config (`import --change`, `commit -c`)."""
from __future__ import annotations

import copy
import json
import shlex

from .errors import StoreError

SUPPORTED = ("CMD", "ENTRYPOINT", "ENV", "WORKDIR", "USER", "LABEL", "EXPOSE", "VOLUME", "STOPSIGNAL")


def parse_command_form(text: str) -> list[str]:
    """JSON (exec) form when it parses as a list of strings, else shell form, as Docker does."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    return ["/bin/sh", "-c", text]


def parse_pairs(instruction: str, text: str) -> list[tuple[str, str]]:
    """`K=V K2="v 2"` pairs, or the legacy single `K value with spaces` form."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise StoreError(f"{instruction}: {e}") from None
    if not words:
        raise StoreError(f"{instruction} requires at least one argument")
    if "=" not in words[0]:
        key, _, value = text.strip().partition(" ")
        if not value.strip():
            raise StoreError(f"{instruction} {key} needs a value")
        return [(key, value.strip())]
    pairs = []
    for w in words:
        key, eq, value = w.partition("=")
        if not eq or not key:
            raise StoreError(f"{instruction}: expected KEY=VALUE, got {w!r}")
        pairs.append((key, value))
    return pairs


def apply_changes(config: dict, changes: list[str]) -> dict:
    """Return a copy of the OCI `config` object with each instruction applied in order."""
    cfg = copy.deepcopy(config)
    cmd_set = False  # ENTRYPOINT resets an inherited CMD, as in a Dockerfile (not one set here)
    for change in changes:
        instruction, _, rest = change.strip().partition(" ")
        instruction = instruction.upper()
        rest = rest.strip()
        if instruction not in SUPPORTED:
            raise StoreError(f"unsupported change instruction {instruction!r} "
                             f"(supported: {', '.join(SUPPORTED)})")
        if not rest:
            raise StoreError(f"{instruction} requires an argument")
        if instruction == "CMD":
            cfg["Cmd"] = parse_command_form(rest)
            cmd_set = True
        elif instruction == "ENTRYPOINT":
            cfg["Entrypoint"] = parse_command_form(rest)
            if not cmd_set:
                cfg["Cmd"] = None
        elif instruction == "ENV":
            env = [e for e in cfg.get("Env") or []]
            for key, value in parse_pairs("ENV", rest):
                env = [e for e in env if e.partition("=")[0] != key] + [f"{key}={value}"]
            cfg["Env"] = env
        elif instruction == "LABEL":
            labels = dict(cfg.get("Labels") or {})
            labels.update(parse_pairs("LABEL", rest))
            cfg["Labels"] = labels
        elif instruction in ("WORKDIR", "USER", "STOPSIGNAL"):
            key = {"WORKDIR": "WorkingDir", "USER": "User", "STOPSIGNAL": "StopSignal"}[instruction]
            cfg[key] = rest
        elif instruction == "EXPOSE":
            ports = dict(cfg.get("ExposedPorts") or {})
            for port in rest.split():
                ports[port if "/" in port else f"{port}/tcp"] = {}
            cfg["ExposedPorts"] = ports
        elif instruction == "VOLUME":
            volumes = dict(cfg.get("Volumes") or {})
            for v in parse_command_form(rest) if rest.startswith("[") else rest.split():
                volumes[v] = {}
            cfg["Volumes"] = volumes
    return cfg
