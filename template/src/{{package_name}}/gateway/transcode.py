"""HTTP requests to request messages, response messages to JSON, per route.

A request message is built from three parts, applied in this order, so that the
path always wins: the JSON body (for `body: "*"` the whole message, for
`body: "field"` that field), then the query string (every field not bound by the
path or the body), then the path variables. Every problem is an
`errors.InvalidArgument` whose field violation names the field or parameter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from ..errors import FieldViolation, InvalidArgument
from . import decoder, fields
from .encoder import Encoder
from .routes import Match, Route

# More parameters than any request message has fields: parse_qsl refuses more
# before it builds them.
MAX_QUERY_PARAMETERS = 1000
_BODY = "body"


@dataclass(frozen=True, slots=True)
class _PathField:
    path: str
    parents: tuple[str, ...]
    leaf: FieldDescriptor


@dataclass(frozen=True, slots=True)
class _Plan:
    variables: dict[str, _PathField]
    body: FieldDescriptor | None
    encode: Callable[[Message], Any]


class Transcoder:
    """Request and response transcoding for a fixed set of routes, compiled up front."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._encoder = Encoder()
        self._plans = {route: self._plan(route) for route in routes}

    def _plan(self, route: Route) -> _Plan:
        variables = {}
        for variable in route.template.variables:
            parts = variable.field_path.split(".")
            resolved = fields.resolve(route.input, variable.field_path)
            if isinstance(resolved, str):  # Router.build refuses these
                raise TypeError(resolved)
            variables[variable.field_path] = _PathField(
                variable.field_path, tuple(parts[:-1]), resolved[-1]
            )
        body = None
        if route.body not in (None, "*"):
            body = route.input.fields_by_name[str(route.body)]
        if route.response_body is None:
            encode = self._encoder.message(route.output)
        else:
            encode = _field_of(
                route.response_body,
                self._encoder.field(route.output.fields_by_name[route.response_body]),
            )
        return _Plan(variables, body, encode)

    def request(self, match: Match, query: str, body: bytes) -> Message:
        """The request message for a matched route.

        `query` is the raw query string (without `?`), `body` the request body
        (empty when there is none). Raises errors.InvalidArgument: malformed JSON,
        a value of the wrong type or out of range, an unknown field or query
        parameter, a query parameter with `body: "*"`, a body for a method that
        takes none.
        """
        route = match.route
        plan = self._plans[route]
        message = route.input_class()
        try:
            if body and body.strip():
                self._body(route, plan, message, body)
            if query:
                self._query(route, plan, message, query)
            for path, value in match.variables.items():
                target = plan.variables[path]
                parent: Any = message
                for name in target.parents:
                    parent = getattr(parent, name)
                setattr(parent, target.leaf.name, decoder.text(target.leaf, value, path))
        except decoder.DecodeError as exc:
            raise InvalidArgument.field(exc.path or _BODY, exc.description) from None
        return message

    def response(self, route: Route, message: Message) -> bytes:
        """The JSON body of a response message (its `response_body` field, if set)."""
        return orjson.dumps(self._plans[route].encode(message))

    def stream_item(self, route: Route, message: Message) -> bytes:
        """One message of a server stream: a JSON object and a newline (NDJSON)."""
        return orjson.dumps(self._plans[route].encode(message), option=orjson.OPT_APPEND_NEWLINE)

    def _body(self, route: Route, plan: _Plan, message: Message, body: bytes) -> None:
        where = plan.body.name if plan.body is not None else _BODY
        if route.body is None:
            raise decoder.DecodeError(_BODY, f"{route.rule} takes no request body")
        value = _load(body, where)
        if plan.body is None:
            decoder.merge(value, message, "")
        else:
            decoder.set_field(message, plan.body, value, plan.body.name, 0)

    def _query(self, route: Route, plan: _Plan, message: Message, query: str) -> None:
        try:
            pairs = parse_qsl(
                query, keep_blank_values=True, errors="strict", max_num_fields=MAX_QUERY_PARAMETERS
            )
        except UnicodeDecodeError:
            raise decoder.DecodeError("query", "not percent-encoded UTF-8") from None
        except ValueError:
            description = f"more than {MAX_QUERY_PARAMETERS} parameters"
            raise decoder.DecodeError("query", description) from None
        if route.body == "*" and pairs:
            description = f"{route.rule} takes every field in the body, none in the query"
            names = dict.fromkeys(key for key, _ in pairs)
            raise InvalidArgument([FieldViolation(key, description) for key in names])
        set_once: dict[str, str] = {}
        for key, value in pairs:
            _Parameter.find(route.input, message, key).check(plan).set(value, set_once)


def _field_of(name: str, convert: Callable[[Any], Any]) -> Callable[[Message], Any]:
    def encode(message: Message) -> Any:
        return convert(getattr(message, name))

    return encode


@dataclass(frozen=True, slots=True)
class _Parameter:
    """A query parameter resolved to its field: `path` is the field path in proto names."""

    key: str
    path: str
    parent: Any
    field: FieldDescriptor

    @classmethod
    def find(cls, descriptor: Descriptor, message: Message, key: str) -> _Parameter:
        parent: Any = message
        names: list[str] = []
        parts = key.split(".")
        for part in parts[:-1]:
            field = fields.find(descriptor, part)
            if field is None:
                raise decoder.DecodeError(key, "no such field")
            _refuse_collections(field, key)
            if not fields.is_message(field):
                raise decoder.DecodeError(key, f"{field.name} has no fields to set")
            names.append(field.name)
            parent = getattr(parent, field.name)
            descriptor = fields.message_type(field)
        field = fields.find(descriptor, parts[-1])
        if field is None:
            raise decoder.DecodeError(key, "no such field")
        names.append(field.name)
        return cls(key, ".".join(names), parent, field)

    def check(self, plan: _Plan) -> _Parameter:
        if self.path in plan.variables:
            raise decoder.DecodeError(self.key, "set by the path")
        if plan.body is not None and self.path.split(".", 1)[0] == plan.body.name:
            raise decoder.DecodeError(self.key, "set by the request body")
        return self

    def set(self, value: str, set_once: dict[str, str]) -> None:
        field, key = self.field, self.key
        if field.is_repeated and not fields.is_message(field):
            getattr(self.parent, field.name).append(decoder.text(field, value, key))
            return
        _refuse_collections(field, key)
        if self.path in set_once:
            raise decoder.DecodeError(key, "given more than once")
        set_once[self.path] = key
        oneof = field.containing_oneof
        if oneof is not None:
            group = f"{self.path.rpartition('.')[0]}:{oneof.name}"
            if group in set_once:
                raise decoder.DecodeError(key, f"a second member of oneof {oneof.name!r}")
            set_once[group] = key
        if not fields.is_message(field):
            setattr(self.parent, field.name, decoder.text(field, value, key))
            return
        target = getattr(self.parent, field.name)
        name = fields.message_type(field).full_name
        if name in fields.WRAPPERS:
            target.value = decoder.text(
                fields.message_type(field).fields_by_name["value"], value, key
            )
        elif name in fields.STRING_WKTS:
            try:
                target.FromJsonString(value)
            except ValueError as exc:
                raise decoder.DecodeError(key, str(exc)) from None
        else:
            raise decoder.DecodeError(key, f"a message: set its fields as {key}.<field>")


def _refuse_collections(field: FieldDescriptor, key: str) -> None:
    if fields.is_map(field):
        raise decoder.DecodeError(key, "a map cannot be set from the query")
    if field.is_repeated and fields.is_message(field):
        raise decoder.DecodeError(key, "a repeated message cannot be set from the query")


class _JsonError(ValueError):
    """What the standard parser accepts but RFC 8259 JSON does not."""


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _JsonError(f"key {key!r} appears twice")
            seen.add(key)
    return result


def _constant(name: str) -> object:
    raise _JsonError(f'{name} is not a JSON value (the JSON mapping spells it "{name}")')


def _load(body: bytes, where: str) -> object:
    """Parse a JSON body (RFC 8259: UTF-8, no NaN or Infinity literals, unique keys)."""
    try:
        return json.loads(body.decode("utf-8"), object_pairs_hook=_object, parse_constant=_constant)
    except UnicodeDecodeError:
        description = "not UTF-8"
    except json.JSONDecodeError as exc:
        description = f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    except _JsonError as exc:
        description = f"not valid JSON: {exc}"
    except RecursionError:
        description = "not valid JSON: nested too deeply"
    raise decoder.DecodeError(where, description)


def json_content_type(value: str | None) -> bool:
    """Whether a Content-Type header names JSON: `application/json`, UTF-8 if a charset is set."""
    if value is None:
        return False
    media, _, parameters = value.partition(";")
    if media.strip().lower() != "application/json":
        return False
    for parameter in parameters.split(";"):
        name, _, charset = parameter.partition("=")
        if name.strip().lower() == "charset" and charset.strip().strip('"').lower() != "utf-8":
            return False
    return True


def declared_length(value: str | None) -> int | None:
    """The Content-Length header as a number, None when absent.

    Raises errors.InvalidArgument when it is not a non-negative decimal number.
    """
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise InvalidArgument.field("Content-Length", "not a non-negative decimal number")
    return int(text)
