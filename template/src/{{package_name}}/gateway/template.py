"""Path templates of `google.api.http` rules: parsing, request paths, overlap.

The grammar is the one in google/api/http.proto:

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    FieldPath = IDENT { "." IDENT } ;
    Verb     = ":" LITERAL ;

A pure module: it knows nothing about protobuf, JSON or HTTP servers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

# Segment markers. A literal can never be one of them: the parser reads `*` and
# `**` as wildcards, never as literal text.
STAR = "*"
DOUBLE_STAR = "**"

# Characters a literal segment or verb may hold: RFC 3986 unreserved characters,
# percent-encodings and the sub-delimiters that are not template syntax.
_LITERAL_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~%!$&'()+,;@"
)
_IDENT_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_IDENT_CHARS = _IDENT_START | frozenset("0123456789")
_ENCODED_SLASH = re.compile("(%2[fF])")


class TemplateError(ValueError):
    """A path template that does not follow the grammar of google/api/http.proto."""


@dataclass(frozen=True, slots=True)
class Variable:
    """A `{field}` of a template, spanning `segments[start:end]` of the request path.

    `end` is None when the variable ends in `**` and so takes the rest of the path.
    A `multi` variable spans more than one segment: its value keeps `%2F` encoded.
    """

    field_path: str
    start: int
    end: int | None
    multi: bool


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A parsed template: literal or wildcard segments, its variables and its verb."""

    source: str
    segments: tuple[str, ...]
    variables: tuple[Variable, ...]
    verb: str | None

    @property
    def open_ended(self) -> bool:
        """Whether the template ends in `**` (matches any number of trailing segments)."""
        return bool(self.segments) and self.segments[-1] == DOUBLE_STAR

    def overlaps(self, other: PathTemplate) -> bool:
        """Whether some request path matches both templates."""
        if self.verb != other.verb:
            return False
        mine = self.segments[:-1] if self.open_ended else self.segments
        theirs = other.segments[:-1] if other.open_ended else other.segments
        if not self.open_ended and not other.open_ended and len(mine) != len(theirs):
            return False
        if self.open_ended and not other.open_ended and len(theirs) < len(mine):
            return False
        if other.open_ended and not self.open_ended and len(mine) < len(theirs):
            return False
        return all(a == b or STAR in (a, b) for a, b in zip(mine, theirs, strict=False))


def parse(source: str) -> PathTemplate:
    """Parse a template such as `/v1/{name=shelves/*/books/*}:publish`.

    Raises TemplateError naming the problem and its position.
    """
    return _Parser(source).template()


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.pos = 0
        self.segments: list[str] = []
        self.variables: list[Variable] = []

    def fail(self, problem: str) -> TemplateError:
        return TemplateError(f"{problem} at offset {self.pos} of {self.source!r}")

    def peek(self) -> str:
        return self.source[self.pos] if self.pos < len(self.source) else ""

    def template(self) -> PathTemplate:
        if self.peek() != "/":
            raise self.fail("a template must start with '/'")
        self.pos += 1
        self.segment_list(in_variable=False)
        verb = None
        if self.peek() == ":":
            self.pos += 1
            verb = self.literal()
        if self.pos != len(self.source):
            raise self.fail(f"unexpected {self.peek()!r}")
        if DOUBLE_STAR in self.segments[:-1]:
            raise self.fail("'**' must be the last segment")
        return PathTemplate(self.source, tuple(self.segments), tuple(self.variables), verb)

    def segment_list(self, *, in_variable: bool) -> int:
        count = 0
        while True:
            self.segment(in_variable=in_variable)
            count += 1
            if self.peek() != "/":
                return count
            self.pos += 1

    def segment(self, *, in_variable: bool) -> None:
        char = self.peek()
        if char == "{":
            if in_variable:
                raise self.fail("a variable must not contain another variable")
            self.variable()
        elif char == "*":
            self.pos += 1
            if self.peek() == "*":
                self.pos += 1
                self.segments.append(DOUBLE_STAR)
            else:
                self.segments.append(STAR)
        else:
            self.segments.append(self.literal())

    def variable(self) -> None:
        self.pos += 1
        path = [self.ident()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.ident())
        start = len(self.segments)
        if self.peek() == "=":
            self.pos += 1
            count = self.segment_list(in_variable=True)
        else:
            self.segments.append(STAR)
            count = 1
        if self.peek() != "}":
            raise self.fail("a variable must end with '}'")
        self.pos += 1
        field_path = ".".join(path)
        if any(v.field_path == field_path for v in self.variables):
            raise self.fail(f"variable {field_path!r} appears twice")
        end = None if self.segments[-1] == DOUBLE_STAR else len(self.segments)
        multi = count > 1 or end is None
        self.variables.append(Variable(field_path, start, end, multi))

    def ident(self) -> str:
        start = self.pos
        if not self.peek() or self.peek() not in _IDENT_START:
            raise self.fail("expected a field name")
        while self.peek() and self.peek() in _IDENT_CHARS:
            self.pos += 1
        return self.source[start : self.pos]

    def literal(self) -> str:
        start = self.pos
        while self.peek() and self.peek() in _LITERAL_CHARS:
            self.pos += 1
        if self.pos == start:
            raise self.fail("expected a literal segment, '*', '**' or a variable")
        return self.source[start : self.pos]


def split(raw_path: str) -> tuple[list[str], str | None] | None:
    """A request path (still percent-encoded) as its segments and verb.

    A raw `:` in the last segment always starts the verb: clients percent-encode a
    `:` inside a variable's value (`%3A`), as google/api/http.proto prescribes.
    Returns None for a path that no template can match (not absolute, not ASCII).
    """
    if not raw_path.startswith("/") or not raw_path.isascii():
        return None
    segments = raw_path[1:].split("/")
    last = segments[-1]
    colon = last.rfind(":")
    if colon < 0:
        return segments, None
    segments[-1] = last[:colon]
    return segments, last[colon + 1 :]


def decode(raw: str, *, multi: bool) -> str:
    """The value of a variable from its percent-encoded path text.

    Single-segment variables decode everything; multi-segment ones keep `%2F`
    (and `%2f`) encoded, so a decoded `/` is always a segment separator.
    Raises UnicodeDecodeError when the bytes are not UTF-8.
    """
    if "%" not in raw:
        return raw
    if not multi:
        return unquote(raw, errors="strict")
    # The split keeps the separators (odd indices), which stay as they were sent.
    parts = _ENCODED_SLASH.split(raw)
    return "".join(p if i % 2 else unquote(p, errors="strict") for i, p in enumerate(parts))
