"""HTTP routes from the `google.api.http` annotations of gRPC services.

`Router.build` reads every annotated method of the services it is given, checks
each rule against the request and response messages (refusing, with one line per
problem, what could never be served), and compiles the templates into a tree of
segments that `Router.match` walks once per request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from google.api import http_pb2
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from ..errors import InvalidArgument
from . import fields
from .template import STAR, PathTemplate, TemplateError, decode, parse, split

# The HTTP method of each pattern of HttpRule; `custom` names its own.
_PATTERNS = {"get": "GET", "put": "PUT", "post": "POST", "delete": "DELETE", "patch": "PATCH"}
ANY_METHOD: Final = "*"


class RouteError(ValueError):
    """Annotations that cannot be served; the message has one line per problem."""


@dataclass(frozen=True, eq=False)
class Route:
    """One HTTP binding of a gRPC method.

    `body` is None (no request body), "*" (every field not bound by the path) or
    the name of a top-level request field; `response_body` likewise names the
    response field sent as the HTTP body, or is None for the whole message.
    """

    method: str
    http_method: str
    template: PathTemplate
    input: Descriptor
    output: Descriptor
    input_class: type[Message]
    output_class: type[Message]
    body: str | None
    response_body: str | None
    streaming: bool

    @property
    def rule(self) -> str:
        """The binding as `VERB /template`, for messages and logs."""
        return f"{self.http_method} {self.template.source}"


@dataclass(frozen=True, slots=True)
class Match:
    """A request path bound to a route; `variables` maps field paths to decoded values."""

    route: Route
    variables: dict[str, str]


@dataclass(frozen=True, slots=True)
class NotFound:
    """No route has this path."""


@dataclass(frozen=True, slots=True)
class MethodNotAllowed:
    """Routes have this path, but not for this HTTP method; `allow` lists their methods."""

    allow: tuple[str, ...]


NOT_FOUND: Final = NotFound()


@dataclass(eq=False)
class _Node:
    """A tree of segments: literal children, a `*` child, and routes ending here."""

    literals: dict[str, _Node] = field(default_factory=dict)
    star: _Node | None = None
    # Routes whose template ends at this node, and routes whose trailing `**`
    # starts here, each by verb (None for no verb).
    ends: dict[str | None, Route] = field(default_factory=dict)
    rest: dict[str | None, Route] = field(default_factory=dict)

    def insert(self, route: Route) -> None:
        node = self
        segments = route.template.segments
        for segment in segments[:-1] if route.template.open_ended else segments:
            if segment == STAR:
                node.star = node.star or _Node()
                node = node.star
            else:
                node = node.literals.setdefault(segment, _Node())
        target = node.rest if route.template.open_ended else node.ends
        target[route.template.verb] = route

    def find(self, segments: list[str], index: int, verb: str | None) -> Route | None:
        # Recursion is bounded by the depth of the tree, not by the request: past
        # the deepest template there is no child left to descend into.
        if index == len(segments):
            return self.ends.get(verb) or self.rest.get(verb)
        segment = segments[index]
        if not segment:
            return None
        child = self.literals.get(segment)
        if child is not None:
            found = child.find(segments, index + 1, verb)
            if found is not None:
                return found
        if self.star is not None:
            found = self.star.find(segments, index + 1, verb)
            if found is not None:
                return found
        route = self.rest.get(verb)
        if route is not None and all(segments[index:]):
            return route
        return None


class Router:
    """Every route of a set of services, matched by HTTP method and path."""

    def __init__(self, routes: Iterable[Route], unrouted: Iterable[str] = ()) -> None:
        """Index `routes`; `unrouted` names annotated methods that are not served.

        Raises RouteError when two routes would match the same request.
        """
        self.routes = tuple(routes)
        self.unrouted = tuple(unrouted)
        _refuse_overlaps(self.routes)
        self._trees: dict[str, _Node] = {}
        for route in self.routes:
            self._trees.setdefault(route.http_method, _Node()).insert(route)
        self._any = self._trees.pop(ANY_METHOD, None)

    @classmethod
    def build(cls, services: Iterable[ServiceDescriptor]) -> Router:
        """Routes of every annotated method of `services`.

        Methods without a `google.api.http` annotation are not exposed. Client- and
        bidi-streaming methods are listed in `unrouted` (HTTP/1.1 request bodies
        cannot carry a stream of messages); server-streaming ones are routed with
        `streaming` set. Raises RouteError listing every rule that cannot be served.
        """
        routes: list[Route] = []
        unrouted: list[str] = []
        problems: list[str] = []
        for service in services:
            for method in service.methods:
                rule = _http_rule(method)
                if rule is None:
                    continue
                name = f"/{service.full_name}/{method.name}"
                if method.client_streaming:
                    unrouted.append(name)
                    continue
                for binding, nested in _bindings(rule):
                    try:
                        routes.append(_route(name, method, binding, nested=nested))
                    except RouteError as exc:
                        problems.append(f"{name}: {exc}")
        if problems:
            raise RouteError("\n".join(problems))
        return cls(routes, unrouted)

    def match(self, http_method: str, raw_path: str) -> Match | NotFound | MethodNotAllowed:
        """The route for a request, with its path variables decoded.

        `raw_path` is the path as sent, still percent-encoded, without the query
        (ASGI's `raw_path`). Raises errors.InvalidArgument when a variable's value
        is not percent-encoded UTF-8.
        """
        parsed = split(raw_path)
        if parsed is None:
            return NOT_FOUND
        segments, verb = parsed
        tree = self._trees.get(http_method)
        route = tree.find(segments, 0, verb) if tree is not None else None
        if route is None and self._any is not None:
            route = self._any.find(segments, 0, verb)
        if route is None:
            allow = tuple(
                sorted(
                    method
                    for method, other in self._trees.items()
                    if method != http_method and other.find(segments, 0, verb) is not None
                )
            )
            return MethodNotAllowed(allow) if allow else NOT_FOUND
        return Match(route, _bind(route, segments))


def _bind(route: Route, segments: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for variable in route.template.variables:
        raw = "/".join(segments[variable.start : variable.end])
        try:
            values[variable.field_path] = decode(raw, multi=variable.multi)
        except UnicodeDecodeError:
            raise InvalidArgument.field(
                variable.field_path, "the path segment is not percent-encoded UTF-8"
            ) from None
    return values


def _http_rule(method: MethodDescriptor) -> http_pb2.HttpRule | None:
    for option, value in method.GetOptions().ListFields():
        if option.full_name == "google.api.http":
            rule: http_pb2.HttpRule = value
            return rule
    return None


def _bindings(rule: http_pb2.HttpRule) -> Iterable[tuple[http_pb2.HttpRule, bool]]:
    yield rule, False
    for extra in rule.additional_bindings:
        yield extra, True


def _route(name: str, method: MethodDescriptor, rule: http_pb2.HttpRule, *, nested: bool) -> Route:
    pattern = rule.WhichOneof("pattern")
    if pattern is None:
        raise RouteError("an HttpRule sets none of get, put, post, delete, patch or custom")
    if pattern == "custom":
        http_method, source = rule.custom.kind, rule.custom.path
        token = http_method.replace("-", "")
        if http_method != ANY_METHOD and not (token.isascii() and token.isalpha()):
            raise RouteError(f"custom kind {http_method!r} is not an HTTP method or '*'")
    else:
        http_method, source = _PATTERNS[pattern], getattr(rule, pattern)
    where = f"{http_method} {source}"
    if nested and rule.additional_bindings:
        raise RouteError(f"{where}: additional_bindings must not nest")
    try:
        template = parse(source)
    except TemplateError as exc:
        raise RouteError(f"{where}: malformed path template: {exc}") from None
    request, response = method.input_type, method.output_type
    for variable in template.variables:
        problem = _path_field_problem(request, variable.field_path)
        if problem:
            raise RouteError(f"{where}: path variable {variable.field_path!r}: {problem}")
    body = rule.body or None
    if body not in (None, "*"):
        target = request.fields_by_name.get(str(body))
        if target is None:
            raise RouteError(f"{where}: body {body!r}: {request.full_name} has no such field")
        if any(v.field_path == body for v in template.variables):
            raise RouteError(f"{where}: body {body!r} is also a path variable")
    response_body = rule.response_body or None
    if response_body is not None and response_body not in response.fields_by_name:
        raise RouteError(
            f"{where}: response_body {response_body!r}: {response.full_name} has no such field"
        )
    return Route(
        method=name,
        http_method=http_method,
        template=template,
        input=request,
        output=response,
        input_class=GetMessageClass(request),
        output_class=GetMessageClass(response),
        body=body,
        response_body=response_body,
        streaming=method.server_streaming,
    )


def _path_field_problem(request: Descriptor, path: str) -> str | None:
    resolved = fields.resolve(request, path)
    if isinstance(resolved, str):
        return resolved
    leaf = resolved[-1]
    if fields.is_map(leaf):
        return "a map field cannot be bound to the path"
    if leaf.is_repeated:
        return "a repeated field cannot be bound to the path"
    if fields.is_message(leaf):
        return "a message field cannot be bound to the path; bind one of its scalar fields"
    return None


def _refuse_overlaps(routes: tuple[Route, ...]) -> None:
    problems = [
        f"{a.method} ({a.rule}) and {b.method} ({b.rule}) would match the same requests"
        for i, a in enumerate(routes)
        for b in routes[i + 1 :]
        if ANY_METHOD in (a.http_method, b.http_method) or a.http_method == b.http_method
        if a.template.overlaps(b.template)
    ]
    if problems:
        raise RouteError("\n".join(problems))
