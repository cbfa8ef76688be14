"""A Dockerfile read and planned before anything is built: parsed by BuildKit's own
parser (the `dockerfile` package), checked instruction by instruction, its ARG and
ENV expanded (runner.build.lexer), and each stage's image config worked out step
by step. Only RUN, COPY and ADD need the build itself; everything a bad
Dockerfile can get wrong is found here, so it fails with one line and nothing made.
"""
from __future__ import annotations

import copy
import json
import posixpath
import re

from store import StoreError

from .lexer import Lexer

DEFAULT_SHELL = ["/bin/sh", "-c"]
# instructions whose words BuildKit expands (RUN, CMD and ENTRYPOINT are the shell's to expand)
FLAGS = {"FROM": {"platform"}, "RUN": set(), "COPY": {"from", "chown", "chmod"}, "ADD": {"chown", "chmod"}}
CONFIG_ONLY = ("ENV", "ARG", "LABEL", "USER", "EXPOSE", "VOLUME", "SHELL", "STOPSIGNAL", "CMD", "ENTRYPOINT",
               "MAINTAINER", "WORKDIR")
UNSUPPORTED = ("ONBUILD", "HEALTHCHECK")
# args Docker passes to RUN without an ARG line, and never records in the image
PROXY_ARGS = {"HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "FTP_PROXY", "ftp_proxy",
              "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"}


class DockerfileError(StoreError):
    pass


class Step:
    """One instruction of a stage, planned. `config`: the image config once it is done;
    `kind`: "config" (no layer), "run", "copy" (COPY and ADD) or "workdir" (the
    directory made when missing). `key`: what, besides the parent and the sources,
    decides the step's result (the cache key's material)."""

    __slots__ = ("line", "kind", "instruction", "created_by", "config", "argv", "env", "copy", "key")

    def __init__(self, line: int, kind: str, instruction: str, created_by: str, config: dict):
        self.line, self.kind, self.instruction, self.created_by, self.config = \
            line, kind, instruction, created_by, config
        self.argv: list[str] = []
        self.env: list[str] = []
        self.copy: dict = {}
        self.key: dict = {}


class Stage:
    __slots__ = ("index", "name", "base", "base_kind", "line", "commands", "steps", "from_text",
                 "config", "depends", "author", "error")

    def __init__(self, index: int, name: str | None, line: int, from_text: str):
        self.index, self.name, self.line, self.from_text = index, name, line, from_text
        self.base = ""          # an image id, a stage index (as str) or "scratch"
        self.base_kind = ""     # "image", "stage" or "scratch"
        self.commands: list = []
        self.steps: list[Step] = []
        self.config: dict = {}
        self.depends: set[int] = set()
        self.author = ""
        self.error: DockerfileError | None = None  # what planning it failed with (an error once it is needed)

    def label(self, many: bool) -> str:
        return (self.name or f"stage-{self.index}") if many else ""


def fail(command, message: str):
    raise DockerfileError(f"Dockerfile:{command.start_line}: {message}")


def parse(text: str):
    """(meta ARG commands, [commands of each stage]) of a Dockerfile's text; a syntax
    error, an unknown or unsupported instruction or flag is a DockerfileError."""
    import dockerfile
    try:
        commands = dockerfile.parse_string(text)
    except dockerfile.GoParseError as e:
        raise DockerfileError(f"Dockerfile: {e}") from None
    meta, stages = [], []
    for command in commands:
        check_command(command)
        if command.cmd == "FROM":
            stages.append([command])
        elif stages:
            stages[-1].append(command)
        elif command.cmd == "ARG":
            meta.append(command)
        else:
            fail(command, f"{command.cmd} before the first FROM (only ARG may come before it)")
    if not stages:
        raise DockerfileError("Dockerfile: no FROM instruction")
    return meta, stages


def check_command(command) -> None:
    cmd = command.cmd
    known = set(FLAGS) | set(CONFIG_ONLY)
    if cmd in UNSUPPORTED:
        fail(command, f"{cmd} is not supported by strata build")
    if cmd not in known:
        fail(command, f"unknown instruction: {command.original.split()[0] if command.original.split() else cmd}")
    if command.heredocs and (cmd != "RUN" or command.json or command.flags):
        fail(command, f"heredocs are supported in a RUN's shell form only, not here ({cmd})")
    for flag in command.flags:
        name = flag.removeprefix("--").partition("=")[0]
        if name not in FLAGS.get(cmd, ()):
            fail(command, f"{cmd}: unsupported flag {flag.partition('=')[0]}")
        if "=" not in flag or not flag.partition("=")[2]:
            fail(command, f"{cmd}: {flag} needs a value")
    values = [v for v in command.value if v != ""]
    if not values and not (cmd in ("CMD", "ENTRYPOINT") and command.json):
        fail(command, f"{cmd} requires at least one argument")
    if cmd in ("COPY", "ADD") and len(values) < 2:
        fail(command, f"{cmd} requires at least two arguments: a source and a destination")
    if cmd == "SHELL" and not command.json:
        fail(command, "SHELL requires the arguments to be in JSON form")
    if cmd in ("USER", "WORKDIR", "STOPSIGNAL", "MAINTAINER") and len(values) != 1:
        fail(command, f"{cmd} requires exactly one argument")


def flag(command, name: str) -> str | None:
    for f in command.flags:
        key, _, value = f.removeprefix("--").partition("=")
        if key == name:
            return value
    return None


def parse_build_args(values: list[str], environ: dict) -> dict[str, str]:
    """--build-arg K=V, or K alone for the caller's $K (left out when it has none), as Docker."""
    out = {}
    for value in values:
        key, eq, val = value.partition("=")
        if not key:
            raise DockerfileError(f"--build-arg {value!r}: no name")
        if eq:
            out[key] = val
        elif key in environ:
            out[key] = environ[key]
    return out


def env_dict(env_list: list[str]) -> dict[str, str]:
    return dict(e.partition("=")[::2] for e in env_list)


class Planner:
    """Plans the stages in order. `resolve_image(ref)` -> (image id, its OCI config): the
    bases that are images, taken from the store (or made: the embedded busybox)."""

    def __init__(self, text: str, build_args: dict[str, str], resolve_image):
        self.build_args = build_args
        self.resolve_image = resolve_image
        self.used_args: set[str] = set()
        meta, stage_commands = parse(text)
        self.lexer = Lexer(escape_of(text))
        self.meta: dict[str, str | None] = {}
        for command in meta:
            for word in command.value:
                self.declare(command, word, self.meta, {k: v for k, v in self.meta.items() if v is not None})
        self.stages: list[Stage] = []
        names = [stage_name(c[0]) for c in stage_commands]
        self.all_names = set(filter(None, names))
        for index, commands in enumerate(stage_commands):
            if names[index] is not None and names[index] in names[:index]:
                fail(commands[0], f"duplicate stage name {names[index]!r}")
            try:
                self.stages.append(self.plan_stage(index, commands))
            except DockerfileError as e:  # as BuildKit, a stage the target does not need may be broken
                stage = Stage(index, names[index], commands[0].start_line, "")
                stage.error = e
                self.stages.append(stage)

    # -- expansion -------------------------------------------------------------

    def expand(self, command, word: str, env: dict[str, str]) -> str:
        try:
            return self.lexer.expand(word, env)
        except StoreError as e:
            fail(command, str(e))

    def declare(self, command, word: str, args: dict, env: dict[str, str]) -> tuple[str, str | None]:
        """ARG NAME[=default]: its value is the build arg's, else the default (expanded)."""
        name, eq, default = word.partition("=")
        if not name or not (name[0].isalpha() or name[0] == "_") or not all(c.isalnum() or c == "_" for c in name):
            fail(command, f"ARG: invalid name {name!r}")
        value = self.expand(command, default, env) if eq else None
        if name in self.build_args:
            value = self.build_args[name]
            self.used_args.add(name)
        args[name] = value
        return name, value

    # -- stages --------------------------------------------------------------

    def stage_named(self, ref: str, before: int) -> Stage | None:
        for stage in self.stages[:before]:
            if stage.name == ref.lower() or str(stage.index) == ref:
                return stage
        return None

    def plan_stage(self, index: int, commands: list) -> Stage:
        first = commands[0]
        words = list(first.value)
        meta_env = {k: v for k, v in self.meta.items() if v is not None}
        name = stage_name(first)
        base_ref = self.expand(first, words[0], meta_env)
        if not base_ref:
            fail(first, f"FROM {words[0]}: the base image name is empty")
        stage = Stage(index, name, first.start_line, base_ref)
        earlier = self.stage_named(base_ref, index)
        if base_ref.lower() == "scratch":
            stage.base_kind, config = "scratch", {}
        elif earlier is not None:
            stage.base_kind, stage.base, config = "stage", str(earlier.index), earlier.config
            stage.depends.add(earlier.index)
        else:
            try:
                stage.base, image_config = self.resolve_image(base_ref)
            except StoreError as e:
                fail(first, f"FROM {base_ref}: {e}")
            stage.base_kind, config = "image", image_config.get("config") or {}
        config = copy.deepcopy(config)
        if stage.base_kind != "image" or not config.get("Env"):
            config.setdefault("Env", ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
        args: dict[str, str | None] = {}
        cmd_set = False
        for command in commands[1:]:
            config = copy.deepcopy(config)
            step = self.plan_step(stage, command, config, args, cmd_set)
            cmd_set = cmd_set or command.cmd == "CMD"
            stage.steps.append(step)
        stage.config = config
        return stage

    def plan_step(self, stage: Stage, command, config: dict, args: dict, cmd_set: bool) -> Step:
        cmd = command.cmd
        arg_values = {k: v for k, v in args.items() if v is not None}
        env = env_dict(config.get("Env") or [])
        scope = {**arg_values, **env}  # ENV wins over an ARG of the same name

        def ex(word: str) -> str:
            return self.expand(command, word, scope)
        shell = config.get("Shell") or DEFAULT_SHELL
        kind, text = "config", ""
        if cmd == "ENV":
            pairs = list(zip(command.value[::2], command.value[1::2]))
            expanded = [(ex(k), ex(v)) for k, v in pairs]
            for key, value in expanded:
                if not key:
                    fail(command, "ENV names must not be empty")
                env[key] = value
            config["Env"] = [f"{k}={v}" for k, v in env.items()]
            text = "ENV " + " ".join(f"{k}={v}" for k, v in expanded)
        elif cmd == "ARG":
            declared = [self.declare(command, word, args, scope) for word in command.value]
            text = "ARG " + " ".join(n if v is None else f"{n}={v}" for n, v in declared)
            for name, value in declared:  # an ARG without a value takes the global one's
                if value is None and self.meta.get(name) is not None:
                    args[name] = self.meta[name]
        elif cmd == "LABEL":
            labels = dict(config.get("Labels") or {})
            expanded = [(ex(k), ex(v)) for k, v in zip(command.value[::2], command.value[1::2])]
            labels.update(expanded)
            config["Labels"] = labels
            text = "LABEL " + " ".join(f"{k}={v}" for k, v in expanded)
        elif cmd == "MAINTAINER":
            stage.author = command.value[0]
            text = f"MAINTAINER {command.value[0]}"
        elif cmd == "USER":
            config["User"] = ex(command.value[0])
            text = f"USER {config['User']}"
        elif cmd == "STOPSIGNAL":
            config["StopSignal"] = ex(command.value[0])
            text = f"STOPSIGNAL {config['StopSignal']}"
        elif cmd == "WORKDIR":
            path = ex(command.value[0])
            config["WorkingDir"] = posixpath.normpath(posixpath.join(config.get("WorkingDir") or "/", path))
            kind, text = "workdir", f"WORKDIR {config['WorkingDir']}"
        elif cmd == "EXPOSE":
            ports = dict(config.get("ExposedPorts") or {})
            for word in command.value:
                ports[check_port(command, ex(word))] = {}
            config["ExposedPorts"] = ports
            text = "EXPOSE " + " ".join(sorted(ports))
        elif cmd == "VOLUME":
            volumes = dict(config.get("Volumes") or {})
            for word in command.value:
                path = ex(word)
                if not path:
                    fail(command, "VOLUME specified can not be an empty string")
                volumes[path] = {}
            config["Volumes"] = volumes
            text = f"VOLUME [{' '.join(ex(w) for w in command.value)}]"
        elif cmd == "SHELL":
            config["Shell"] = list(command.value)
            text = "SHELL " + json.dumps(config["Shell"])
        elif cmd in ("CMD", "ENTRYPOINT"):
            words = list(command.value) if command.json else shell + [command.value[0]]
            if cmd == "ENTRYPOINT":
                config["Entrypoint"] = words
                if not cmd_set:  # an ENTRYPOINT drops the base image's CMD, as Docker does
                    config["Cmd"] = None
            else:
                config["Cmd"] = words
            text = f"{cmd} " + json.dumps(words)
        elif cmd == "RUN":
            kind = "run"
        elif cmd in ("COPY", "ADD"):
            kind = "copy"
        step = Step(command.start_line, kind, command.original, text, config)
        step.key = {"args": arg_values, "env": config.get("Env") or [], "user": config.get("User") or "",
                    "workdir": config.get("WorkingDir") or "", "shell": shell}
        if kind == "run":
            self.plan_run(step, command, shell, arg_values, env)
        elif kind == "copy":
            self.plan_copy(stage, step, command, ex)
        step.key["instruction"] = step.created_by or step.instruction
        return step

    def plan_run(self, step: Step, command, shell: list[str], args: dict, env: dict) -> None:
        step.argv = list(command.value) if command.json else shell + [run_script(command)]
        # the build args RUN sees (ENV wins), and the prefix Docker writes in history for them
        visible = {k: v for k, v in args.items() if k not in env}
        step.env = [f"{k}={v}" for k, v in visible.items()]
        recorded = {k: v for k, v in visible.items() if k not in PROXY_ARGS}
        prefix = f"|{len(recorded)} " + " ".join(f"{k}={v}" for k, v in recorded.items()) + " " if recorded else ""
        step.created_by = "RUN " + prefix + " ".join(step.argv)

    def plan_copy(self, stage: Stage, step: Step, command, ex) -> None:
        words = [ex(w) for w in command.value]
        sources, dest = words[:-1], words[-1]
        if not dest:
            fail(command, f"{command.cmd}: the destination is empty")
        source_from = flag(command, "from")
        spec = {"add": command.cmd == "ADD", "sources": sources, "dest": dest, "from": None,
                "chown": ex(flag(command, "chown") or ""), "chmod": flag(command, "chmod")}
        if spec["chmod"] is not None:
            try:
                spec["chmod"] = int(spec["chmod"], 8)
                if not 0 <= spec["chmod"] <= 0o7777:
                    raise ValueError
            except ValueError:
                fail(command, f"{command.cmd}: --chmod={flag(command, 'chmod')}: not an octal mode")
        if spec["add"]:
            for source in sources:
                if "://" in source or source.startswith("git@"):
                    fail(command, f"ADD {source}: remote sources are not supported (no network access "
                         "during builds): download it into the context and ADD the file")
        if source_from is not None:
            ref = ex(source_from)
            earlier = self.stage_named(ref, stage.index)
            if earlier is not None:
                spec["from"] = ("stage", earlier.index, earlier.name or str(earlier.index))
                stage.depends.add(earlier.index)
            elif ref.lower() in self.all_names or ref == str(stage.index):
                fail(command, f"COPY --from={ref}: a stage can only copy from an earlier one")
            else:
                try:
                    spec["from"] = ("image", self.resolve_image(ref)[0], ref)
                except StoreError as e:
                    fail(command, f"COPY --from={ref}: {e}")
        step.copy = spec
        step.key["copy"] = {k: v for k, v in spec.items() if k != "from"}

    def unused_args(self) -> list[str]:
        return sorted(set(self.build_args) - self.used_args - PROXY_ARGS)


LONE_HEREDOC = re.compile(r"<<(-?)([\"']?)(\w+)\2")


def run_script(command) -> str:
    """A shell-form RUN's script. With heredocs, as BuildKit runs them: a RUN that is one
    heredoc alone runs its body; otherwise the shell gets the line and the bodies, with
    their terminators (`cat <<EOF > /f`)."""
    if not command.heredocs:
        return command.value[0]
    lone = LONE_HEREDOC.fullmatch(command.value[0].strip())
    if lone is not None and len(command.heredocs) == 1:
        body = command.heredocs[0].content
        if body.startswith("#!"):
            fail(command, "RUN: a heredoc with a #! line is not supported by strata build")
        return "".join(line.lstrip("\t") for line in body.splitlines(True)) if lone[1] else body
    return command.original.split(None, 1)[1].rstrip("\n")


def stage_name(first) -> str | None:
    """FROM IMAGE [AS NAME]'s NAME, lowercased, as Docker compares them."""
    words = list(first.value)
    if len(words) == 1:
        return None
    if len(words) != 3 or words[1].lower() != "as":
        fail(first, "FROM requires either one or three arguments (FROM IMAGE [AS NAME])")
    name = words[2].lower()
    if not name[:1].isalpha() or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        fail(first, f"invalid stage name {words[2]!r}")
    return name


def check_port(command, word: str) -> str:
    port, _, proto = word.partition("/")
    proto = proto.lower() or "tcp"
    low, _, high = port.partition("-")
    if proto not in ("tcp", "udp", "sctp") or not low.isdigit() or (high and not high.isdigit()) \
            or not 0 < int(low) <= 65535 or (high and not int(low) <= int(high) <= 65535):
        fail(command, f"EXPOSE: invalid port {word!r}")
    return f"{port}/{proto}"


def escape_of(text: str) -> str:
    """The `# escape=` parser directive (\\ unless it says `)."""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        key, eq, value = stripped[1:].partition("=")
        if eq and key.strip().lower() == "escape" and value.strip() in ("\\", "`"):
            return value.strip()
    return "\\"


def needed_stages(stages: list[Stage], target: str | None) -> list[Stage]:
    """The stages the target (the last stage without one) needs, in build order."""
    if target is not None:
        wanted = [s for s in stages if s.name == target.lower()]
        if not wanted:
            raise DockerfileError(f"target stage {target!r} could not be found")
        last = wanted[0]
    else:
        last = stages[-1]
    needed, pending = {last.index}, [last]
    while pending:
        for index in pending.pop().depends:
            if index not in needed:
                needed.add(index)
                pending.append(stages[index])
    wanted = [s for s in stages if s.index in needed]
    for stage in wanted:
        if stage.error is not None:
            raise stage.error
    return wanted
