"""An OpenAPI 3.1 document of the gateway, from the same routes and descriptors.

Schemas follow the JSON the gateway reads and writes (encoder.py, decoder.py):
lowerCamelCase properties, 64-bit integers as strings, enums by name, Timestamp
as a date-time string, Duration and FieldMask as strings, bytes as base64, maps
as objects. No property is `required`: one schema serves requests, where every
field is optional, and responses, which always carry the fields without
presence (plain scalars, repeated fields, maps) and the others only when set.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from . import fields
from .routes import Route
from .template import DOUBLE_STAR, STAR

Schema = dict[str, Any]

STATUS = "google.rpc.Status"
_ANY = "google.protobuf.Any"
# HTTP methods an OpenAPI path item can hold; other custom kinds (and `*`) are
# left out of the document.
_OPERATIONS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_NDJSON = "application/x-ndjson"
_INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32 = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
_INT64 = {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
_UINT64 = {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}
_NUMBER = {
    "anyOf": [{"type": "number"}, {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}]
}
_SCALARS: dict[int, Schema] = {
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
    FieldDescriptor.TYPE_DOUBLE: _NUMBER,
    FieldDescriptor.TYPE_FLOAT: _NUMBER,
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}
_WELL_KNOWN: dict[str, Schema] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Value": {},
    "google.protobuf.Empty": {"type": "object"},
}


def parameter_names(route: Route) -> dict[str, str]:
    """OpenAPI names of the route's path parameters, mapped to the fields they fill.

    Dots become underscores (`item.id` -> `item_id`): tools such as schemathesis
    cannot handle dotted path parameters. A variable over several segments
    (`{name=shelves/*/books/*}`) keeps its literals in the OpenAPI path and has
    one parameter per wildcard (`shelves/{name}/books/{name_2}`); the field takes
    the whole matched text. Wildcards outside variables fill no field ("").
    """
    return {name: field_path for name, field_path, _ in _path_parts(route) if name}


def _path_parts(route: Route) -> list[tuple[str, str, str]]:
    """The OpenAPI path of a route as (parameter name, field path, literal) parts."""
    template = route.template
    by_start = {variable.start: variable for variable in template.variables}
    taken = {variable.field_path.replace(".", "_") for variable in template.variables}
    parts: list[tuple[str, str, str]] = []
    anonymous = itertools.count(1)
    variable = None
    for index, segment in enumerate(template.segments):
        variable = by_start.get(index, variable)
        inside = variable is not None and (variable.end is None or index < variable.end)
        if segment not in (STAR, DOUBLE_STAR):
            parts.append(("", "", segment))
            continue
        if variable is not None and inside:
            base = variable.field_path.replace(".", "_")
            count = sum(1 for _, path, _ in parts if path == variable.field_path)
            name = base if count == 0 else f"{base}_{count + 1}"
            parts.append((name, variable.field_path, ""))
            continue
        name = f"segment{next(anonymous)}"
        while name in taken:
            name = f"segment{next(anonymous)}"
        parts.append((name, "", ""))
    return parts


def document(
    routes: Iterable[Route],
    *,
    title: str,
    version: str,
    descriptions: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes`.

    `descriptions` maps full proto names to their comments (comments.load);
    without them the document has no descriptions. Routes whose HTTP method
    OpenAPI cannot name (a custom kind such as `*`) are left out.
    """
    return _Builder(descriptions or {}).build(list(routes), title, version)


class _Builder:
    def __init__(self, descriptions: Mapping[str, str]) -> None:
        self.descriptions = descriptions
        self.schemas: dict[str, Schema] = {}
        self.operation_ids: set[str] = set()

    def build(self, routes: list[Route], title: str, version: str) -> dict[str, Any]:
        paths: dict[str, dict[str, Any]] = {}
        tags: dict[str, dict[str, str]] = {}
        for route in routes:
            method = route.http_method.lower()
            if method not in _OPERATIONS:
                continue
            service = route.method.split("/")[1]
            tag = service.rsplit(".", 1)[-1]
            tags[tag] = self.described({"name": tag}, service)
            path, parameters = self.path(route)
            # Non-overlapping routes have distinct OpenAPI paths, so nothing is replaced.
            paths.setdefault(path, {})[method] = self.operation(route, tag, parameters)
        self.schemas[STATUS] = _status_schema()
        self.schemas.setdefault(_ANY, _any_schema())
        return {
            "openapi": "3.1.0",
            "info": {"title": title, "version": version},
            "tags": [tags[name] for name in sorted(tags)],
            "paths": dict(sorted(paths.items())),
            "components": {"schemas": dict(sorted(self.schemas.items()))},
        }

    def described(self, target: dict[str, Any], name: str) -> dict[str, Any]:
        text = self.descriptions.get(name)
        if text:
            target["description"] = text
        return target

    def path(self, route: Route) -> tuple[str, list[Schema]]:
        texts: list[str] = []
        parameters: list[Schema] = []
        for name, field_path, literal in _path_parts(route):
            if not name:
                texts.append(literal)
                continue
            texts.append("{" + name + "}")
            if field_path:
                parameters.append(self.path_parameter(route, name, field_path))
            else:
                parameters.append(
                    {
                        "name": name,
                        "in": "path",
                        "required": True,
                        "description": "Any path segment; it fills no field of the request.",
                        "schema": {"type": "string"},
                    }
                )
        verb = f":{route.template.verb}" if route.template.verb else ""
        return "/" + "/".join(texts) + verb, parameters

    def path_parameter(self, route: Route, name: str, field_path: str) -> Schema:
        resolved = fields.resolve(route.input, field_path)
        if isinstance(resolved, str):  # Router.build refuses these
            raise TypeError(resolved)
        leaf = resolved[-1]
        parameter = self.described(
            {"name": name, "in": "path", "required": True, "schema": self.field(leaf)},
            leaf.full_name,
        )
        if name != field_path:
            parameter["x-field-path"] = field_path
        variable = next(v for v in route.template.variables if v.field_path == field_path)
        if variable.multi:
            segments = route.template.segments[variable.start : variable.end]
            whole = "/".join(segments)
            note = f"One segment of `{field_path}`, which takes the whole `{whole}` text."
            parameter["description"] = f"{parameter.get('description', '')}\n\n{note}".strip()
        return parameter

    def operation(self, route: Route, tag: str, parameters: list[Schema]) -> dict[str, Any]:
        short = route.method.rsplit("/", 1)[-1]
        operation_id = f"{tag}_{short}"
        for number in itertools.count(2):
            if operation_id not in self.operation_ids:
                break
            operation_id = f"{tag}_{short}{number}"
        self.operation_ids.add(operation_id)
        method_name = route.method[1:].replace("/", ".")
        operation = self.described(
            {"operationId": operation_id, "tags": [tag], "x-grpc-method": route.method},
            method_name,
        )
        text = self.descriptions.get(method_name)
        if text:
            operation["summary"] = text.split("\n", 1)[0]
        if route.body != "*":
            parameters = [*parameters, *self.query_parameters(route)]
        if parameters:
            operation["parameters"] = parameters
        if route.body is not None:
            schema = (
                self.message(route.input)
                if route.body == "*"
                else self.field(route.input.fields_by_name[route.body])
            )
            operation["requestBody"] = {"content": {"application/json": {"schema": schema}}}
        operation["responses"] = {
            "200": {"description": "OK", "content": self.response_content(route)},
            "default": {
                "description": "An error, as a google.rpc.Status",
                "content": {"application/json": {"schema": _ref(STATUS)}},
            },
        }
        return operation

    def response_content(self, route: Route) -> dict[str, Any]:
        if route.response_body is None:
            schema = self.message(route.output)
        else:
            schema = self.field(route.output.fields_by_name[route.response_body])
        if route.streaming:
            return {_NDJSON: {"schema": schema, "x-stream-item": True}}
        return {"application/json": {"schema": schema}}

    def query_parameters(self, route: Route) -> list[Schema]:
        # Every field the path and body leave, flattened through singular messages.
        # A type already on the path stops the walk: recursive types would never end.
        taken = {variable.field_path for variable in route.template.variables}
        if route.body is not None:
            taken.add(route.body)
        found: list[Schema] = []
        pending: list[tuple[Descriptor, str, tuple[str, ...]]] = [
            (route.input, "", (route.input.full_name,))
        ]
        while pending:
            message, prefix, seen = pending.pop(0)
            for field in message.fields:
                path = f"{prefix}{field.name}"
                kind = fields.message_type(field).full_name if fields.is_message(field) else ""
                if path in taken or (kind and field.is_repeated):  # maps are repeated too
                    continue
                if kind in fields.WRAPPERS or kind in fields.STRING_WKTS or not kind:
                    parameter = {"name": path, "in": "query", "schema": self.field(field)}
                    found.append(self.described(parameter, field.full_name))
                elif kind not in (*_WELL_KNOWN, _ANY, *seen):
                    nested = fields.message_type(field)
                    pending.append((nested, f"{path}.", (*seen, kind)))
        return found

    def field(self, field: FieldDescriptor) -> Schema:
        if fields.is_map(field):
            entry = fields.message_type(field)
            return {
                "type": "object",
                "additionalProperties": self.single(entry.fields_by_name["value"]),
            }
        single = self.single(field)
        if field.is_repeated:
            return {"type": "array", "items": single}
        return single

    def single(self, field: FieldDescriptor) -> Schema:
        if fields.is_message(field):
            return self.message(fields.message_type(field))
        if field.type == FieldDescriptor.TYPE_ENUM:
            enum = fields.enum_type(field)
            if enum.full_name == "google.protobuf.NullValue":
                return {"type": "null"}
            if enum.full_name not in self.schemas:
                schema: Schema = {"type": "string", "enum": [v.name for v in enum.values]}
                self.schemas[enum.full_name] = self.described(schema, enum.full_name)
            return _ref(enum.full_name)
        return dict(_SCALARS[field.type])

    def message(self, message: Descriptor) -> Schema:
        name = message.full_name
        if name in fields.WRAPPERS:
            return self.single(message.fields_by_name["value"])
        if name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[name])
        if name == _ANY:
            self.schemas.setdefault(_ANY, _any_schema())
            return _ref(_ANY)
        if name not in self.schemas:
            schema: Schema = {"type": "object", "properties": {}}
            self.schemas[name] = self.described(schema, name)
            for field in message.fields:
                schema["properties"][field.json_name] = self.described(
                    self.field(field), field.full_name
                )
        return _ref(name)


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _any_schema() -> Schema:
    return {
        "type": "object",
        "description": "A message of the type named by @type, with its fields beside it.",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    }


def _status_schema() -> Schema:
    return {
        "type": "object",
        "description": "The error model of google/rpc/status.proto.",
        "properties": {
            "code": {"type": "integer", "format": "int32", "description": "A google.rpc.Code."},
            "message": {"type": "string", "description": "A message for developers."},
            "details": {"type": "array", "items": _ref(_ANY)},
        },
    }
