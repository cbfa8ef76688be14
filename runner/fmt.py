"""Output formatting the way Docker prints it: sizes, ages, tables, Go-style templates."""
from __future__ import annotations

import datetime
import json
import re

from .errors import UsageError

TEMPLATE_ACTION = re.compile(r"{{(.*?)}}", re.S)
TEMPLATE_FIELD = re.compile(r"{{\s*(json\s+)?\.([A-Za-z]\w*)?\s*}}")
FIELD_EXPR = re.compile(r"\s*(?:(json|index)\s+)?\.((?:[A-Za-z]\w*)(?:\.[A-Za-z]\w*)*)?((?:\s+(?:\d+|\"[^\"]*\"))*)\s*$")


class TemplateError(UsageError):
    """A --format template strata cannot render (Go's text/template says what)."""


def human_size(size: float) -> str:
    """go-units HumanSizeWithPrecision(size, 3): decimal units, 3 significant digits."""
    units = ["B", "kB", "MB", "GB", "TB", "PB"]
    i = 0
    while size >= 1000 and i < len(units) - 1:
        size /= 1000.0
        i += 1
    return f"{size:.3g}{units[i]}"


def human_duration(seconds: float) -> str:
    """go-units HumanDuration."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(s / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{hours // 24 // 365} years"


def parse_time(text: str) -> datetime.datetime | None:
    """RFC 3339 with up to nanoseconds (Python parses only microseconds)."""
    if not text:
        return None
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", text)
    if not m:
        return None
    frac = (m[2] or ".0")[:7]
    tz = "+00:00" if m[3] == "Z" else m[3]
    return datetime.datetime.fromisoformat(m[1] + frac + tz)


def since(text: str) -> str:
    when = parse_time(text)
    if when is None:
        return "N/A"
    age = (datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()
    return human_duration(age) + " ago"


def docker_time(text: str) -> str:
    """Docker's CreatedAt: '2026-11-27 23:52:11 +0000 UTC'."""
    when = parse_time(text)
    return when.strftime("%Y-%m-%d %H:%M:%S +0000 UTC") if when else ""


# what a container names (files, processes) reaches the admin's terminal: control
# characters would move the cursor, retitle the window or fake a line of output
_UNSAFE = {c: f"\\x{c:02x}" for c in list(range(0x20)) + list(range(0x7f, 0xa0))}
_UNSAFE.update({ord("\\"): "\\\\", ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"})


def terminal_safe(text: str) -> str:
    """`text` with backslashes, control characters and undecodable bytes escaped (\\n,
    \\x1b, \\xff), so that one name is one line and moves no cursor."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escaped(c) for c in text)


def _escaped(c: str) -> str:
    code = ord(c)
    if code in _UNSAFE:
        return _UNSAFE[code]
    if 0xdc80 <= code <= 0xdcff:  # a byte that is not UTF-8 (surrogateescape)
        return f"\\x{code - 0xdc00:02x}"
    return c if c.isprintable() else f"\\u{code:04x}"


def print_table(headers: list[str], rows: list[list[str]], out) -> None:
    """Columns padded like Go's tabwriter with padding 3; cells made terminal-safe."""
    rows = [[terminal_safe(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    for row in [headers] + rows:
        cells = [c.ljust(widths[i] + 3) if i < len(row) - 1 else c for i, c in enumerate(row)]
        out.write("".join(cells).rstrip() + "\n")


def go_format(value) -> str:
    """How Go's text/template prints a value: lists as [a b], maps as map[k:v]."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + " ".join(go_format(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{go_format(v)}" for k, v in sorted(value.items())) + "]"
    return str(value)


def render_template(template: str, obj: dict) -> str:
    """The Go template subset Docker users write: {{.A.B}}, {{json .A}}, {{index .A 0}}.

    Anything else ({{if}}, {{range}}, pipes) is an error, never printed as is.
    """
    template = template.replace("\\t", "\t").replace("\\n", "\n")

    def action(m: re.Match) -> str:
        parsed = FIELD_EXPR.match(m[1])
        if not parsed:
            raise TemplateError(f"template: unsupported action {{{{{m[1].strip()}}}}}")
        func, path, args = parsed[1], parsed[2], parsed[3].split()
        value = obj
        for name in path.split(".") if path else []:
            if not isinstance(value, dict) or name not in value:
                raise TemplateError(f"template: can't evaluate field {name}")
            value = value[name]
        if func == "index":
            for arg in args:
                try:
                    value = value[int(arg)] if arg.isdigit() else value[arg.strip('"')]
                except (IndexError, KeyError, TypeError):
                    raise TemplateError(f"template: index {arg} out of range") from None
        elif args:
            raise TemplateError(f"template: unsupported action {{{{{m[1].strip()}}}}}")
        if func == "json":
            return json.dumps(value)
        return go_format(value)

    return TEMPLATE_ACTION.sub(action, template)


def header_name(field: str) -> str:
    """`CreatedSince` -> `CREATED SINCE`, as Docker titles template columns."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", field).upper()


def check_template(fmt: str, fields: tuple[str, ...] | None = None) -> None:
    """TemplateError unless `fmt` renders; with `fields` (the objects' keys, flat values),
    also a field no object has. For errors even when there is nothing to print."""
    if fmt == "json":
        return
    for action in TEMPLATE_ACTION.findall(fmt):
        parsed = FIELD_EXPR.match(action)
        if not parsed:
            raise TemplateError(f"template: unsupported action {{{{{action.strip()}}}}}")
        name = (parsed[2] or "").partition(".")[0]
        if fields is not None and name and name not in fields:
            raise TemplateError(f"template: can't evaluate field {name}")
    if "{{" in TEMPLATE_ACTION.sub("", fmt):  # Go: an action without its }}
        raise TemplateError(f"template: unclosed action in {fmt!r}")


def print_formatted(fmt: str, objects: list[dict], out, fields: tuple[str, ...] | None = None) -> None:
    """--format json|TEMPLATE|table TEMPLATE, for any list of Docker-style objects.
    Everything is rendered before anything is written: a bad template prints nothing."""
    check_template(fmt, fields)
    if fmt == "json":
        for obj in objects:
            out.write(json.dumps(obj, sort_keys=True) + "\n")
        return
    if fmt.startswith("table"):
        body = fmt[len("table"):].strip() or "\t".join("{{.%s}}" % k for k in (objects[0] if objects else {}))
        body = body.replace("\\t", "\t")
        header = TEMPLATE_FIELD.sub(lambda m: header_name(m[2] or ""), body)
        lines = [header] + [render_template(body, o) for o in objects]
        rows = [line.split("\t") for line in lines]
        print_table(rows[0], rows[1:], out)
        return
    out.write("".join(render_template(fmt, obj) + "\n" for obj in objects))


def print_inspected(fmt: str | None, objects: list[dict], out) -> None:
    """`inspect`'s output: the objects as one indented JSON array, or each by --format."""
    if fmt:
        print_formatted(fmt, objects, out)
    else:
        out.write(json.dumps(objects, indent=4) + "\n")
