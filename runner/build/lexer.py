"""Variable expansion in Dockerfile words, as BuildKit's shell lexer does it
(frontend/dockerfile/shell/lex.go, ProcessWord): quotes, escapes, $VAR, ${VAR},
${VAR:-default}, ${VAR-default}, ${VAR:+alt}, ${VAR+alt}, ${VAR:?message} and
${VAR?message}. Not a shell: no word splitting, no globbing, no command
substitution. An unset variable expands to nothing, as in BuildKit.
"""
from __future__ import annotations

from store import StoreError

SPECIAL_PARAMS = "@*#?-$!0"


class ExpansionError(StoreError):
    pass


class Lexer:
    """One word at a time: `expand(word, env)`. `escape` is the Dockerfile's escape
    character (`# escape=` directive: \\ or `)."""

    __slots__ = ("escape", "word", "pos", "env")

    def __init__(self, escape: str = "\\"):
        self.escape = escape

    def expand(self, word: str, env: dict[str, str]) -> str:
        self.word, self.pos, self.env = word, 0, env
        result, _ = self._until(None)
        return result

    # -- scanning ------------------------------------------------------------

    def _peek(self) -> str | None:
        return self.word[self.pos] if self.pos < len(self.word) else None

    def _next(self) -> str | None:
        ch = self._peek()
        if ch is not None:
            self.pos += 1
        return ch

    def _until(self, stop: str | None) -> tuple[str, bool]:
        """The processed text up to `stop` (consumed; None: the end), and whether it was found."""
        out = []
        while (ch := self._peek()) is not None:
            if stop is not None and ch == stop:
                self.pos += 1
                return "".join(out), True
            if ch == "'":
                out.append(self._single_quoted())
            elif ch == '"':
                out.append(self._double_quoted())
            elif ch == "$":
                out.append(self._dollar())
            else:
                self.pos += 1
                if ch == self.escape:
                    ch = self._next()
                    if ch is None:
                        break
                out.append(ch)
        return "".join(out), False

    def _single_quoted(self) -> str:
        self.pos += 1
        end = self.word.find("'", self.pos)
        if end < 0:
            raise ExpansionError("unexpected end of statement while looking for matching single-quote")
        text, self.pos = self.word[self.pos:end], end + 1
        return text

    def _double_quoted(self) -> str:
        self.pos += 1
        out = []
        while True:
            ch = self._peek()
            if ch is None:
                raise ExpansionError("unexpected end of statement while looking for matching double-quote")
            if ch == '"':
                self.pos += 1
                return "".join(out)
            if ch == "$":
                out.append(self._dollar())
                continue
            self.pos += 1
            if ch == self.escape:
                following = self._peek()
                if following is None:  # a \ at the end of the word is dropped
                    continue
                if following in ('"', "$", self.escape):  # all other escapes stay as written
                    ch = self._next()
            out.append(ch)

    def _name(self) -> str:
        start = self.pos
        ch = self._peek()
        if ch is not None and ch.isdigit():
            while (ch := self._peek()) is not None and ch.isdigit():
                self.pos += 1
            return self.word[start:self.pos]
        if ch is not None and ch in SPECIAL_PARAMS:
            self.pos += 1
            return ch
        while (ch := self._peek()) is not None and (ch.isalnum() or ch == "_"):
            self.pos += 1
        return self.word[start:self.pos]

    def _dollar(self) -> str:
        self.pos += 1
        if self._peek() is None:
            return "$"
        if self._peek() != "{":
            name = self._name()
            return self.env.get(name, "") if name else "$"
        self.pos += 1
        if self._peek() is None:
            raise ExpansionError("syntax error: missing '}'")
        if self._peek() == "}":
            raise ExpansionError("bad substitution: ${}")
        name = self._name()
        ch = self._next()
        if ch == "}":
            return self.env.get(name, "")
        colon = ch == ":"
        modifier = self._next() if colon else ch
        if modifier not in ("-", "+", "?"):
            if ch is None or (colon and modifier is None):
                raise ExpansionError("syntax error: missing '}'")
            raise ExpansionError(f"unsupported modifier ({modifier}) in substitution")
        word, found = self._until("}")
        if not found:
            raise ExpansionError("syntax error: missing '}'")
        value = self.env.get(name)
        present = value is not None and (value != "" or not colon)
        if modifier == "-":
            return value if present else word
        if modifier == "+":
            return word if present else ""
        if not present:
            raise ExpansionError(f"{name}: {word or 'is not allowed to be unset'}")
        return value
