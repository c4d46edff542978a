"""JSON values and query-string text into messages (the proto3 JSON mapping).

Accepts what `json_format.ParseDict` accepts, with deliberate differences: an
unknown field is refused (never ignored), a field given under both its proto name
and its JSON name is refused (json_format keeps the last), bytes must be valid
base64 (json_format drops stray characters), and a float field takes any number
that rounds to a finite 32-bit float (json_format refuses the largest float it
writes itself, 3.4028235e+38).
Every refusal names the field by its path in the request (`item.tags[2]`).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from . import fields

MAX_DEPTH = 100
_FLOAT32 = struct.Struct("<f")
_INTEGER = re.compile(r"-?[0-9]+")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|-?\.[0-9]+(?:[eE][+-]?[0-9]+)?")
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_BOOL_TEXT = {"true": True, "false": False}
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: range(-(2**31), 2**31),
    FieldDescriptor.TYPE_SINT32: range(-(2**31), 2**31),
    FieldDescriptor.TYPE_SFIXED32: range(-(2**31), 2**31),
    FieldDescriptor.TYPE_UINT32: range(2**32),
    FieldDescriptor.TYPE_FIXED32: range(2**32),
    FieldDescriptor.TYPE_INT64: range(-(2**63), 2**63),
    FieldDescriptor.TYPE_SINT64: range(-(2**63), 2**63),
    FieldDescriptor.TYPE_SFIXED64: range(-(2**63), 2**63),
    FieldDescriptor.TYPE_UINT64: range(2**64),
    FieldDescriptor.TYPE_FIXED64: range(2**64),
}


class DecodeError(Exception):
    """A value that does not fit its field; `path` names the field in the request."""

    def __init__(self, path: str, description: str) -> None:
        super().__init__(f"{path}: {description}")
        self.path = path
        self.description = description


def join(path: str, name: str) -> str:
    """The path of field `name` inside `path`."""
    return f"{path}.{name}" if path else name


def merge(value: object, message: Message, path: str, depth: int = 0) -> None:
    """Merge a parsed JSON value into `message`. Raises DecodeError."""
    if depth > MAX_DEPTH:
        raise DecodeError(path, f"nested more than {MAX_DEPTH} messages deep")
    name = fields.descriptor(message).full_name
    if name in fields.WRAPPERS:
        inner = fields.descriptor(message).fields_by_name["value"]
        wrapper: Any = message
        if value is not None:
            wrapper.value = scalar(inner, value, path)
        return
    if name in fields.STRING_WKTS:
        _from_json_string(message, value, path)
        return
    if name in ("google.protobuf.Struct", "google.protobuf.ListValue", "google.protobuf.Value"):
        _dynamic(message, value, path, depth)
        return
    if name == "google.protobuf.Any":
        _any(message, value, path)
        return
    if not isinstance(value, dict):
        raise DecodeError(path, f"expected a JSON object, got {_kind(value)}")
    seen: dict[str, str] = {}
    for key, item in value.items():
        field = fields.find(fields.descriptor(message), key)
        if field is None:
            raise DecodeError(join(path, key), "no such field")
        field_path = join(path, field.name)
        if field.name in seen:
            raise DecodeError(field_path, f"given twice, as {seen[field.name]!r} and {key!r}")
        seen[field.name] = key
        oneof = field.containing_oneof
        if oneof is not None and item is not None:
            if oneof.name in seen:
                raise DecodeError(field_path, f"a second member of oneof {oneof.name!r}")
            seen[oneof.name] = key
        set_field(message, field, item, field_path, depth)


def set_field(
    message: Message, field: FieldDescriptor, value: object, path: str, depth: int
) -> None:
    """Set one field of `message` from its parsed JSON value. Raises DecodeError."""
    target: Any = getattr(message, field.name)
    if value is None:
        _null(message, field)
    elif fields.is_map(field):
        if not isinstance(value, dict):
            raise DecodeError(path, f"expected a JSON object (a map), got {_kind(value)}")
        key_field = fields.message_type(field).fields_by_name["key"]
        value_field = fields.message_type(field).fields_by_name["value"]
        for key, item in value.items():
            item_path = f"{path}[{key}]"
            converted = text(key_field, key, item_path)
            if item is None:
                raise DecodeError(item_path, "null is not a map value")
            if fields.is_message(value_field):
                merge(item, target[converted], item_path, depth + 1)
            else:
                target[converted] = scalar(value_field, item, item_path)
    elif field.is_repeated:
        if not isinstance(value, list):
            raise DecodeError(path, f"expected a JSON array, got {_kind(value)}")
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            if fields.is_message(field):
                if item is None and fields.message_type(field).full_name != "google.protobuf.Value":
                    raise DecodeError(item_path, "null is not an element of a repeated field")
                merge(item, target.add(), item_path, depth + 1)
            elif item is None:
                raise DecodeError(item_path, "null is not an element of a repeated field")
            else:
                target.append(scalar(field, item, item_path))
    elif fields.is_message(field):
        target.SetInParent()
        merge(value, target, path, depth + 1)
    else:
        setattr(message, field.name, scalar(field, value, path))


def _null(message: Message, field: FieldDescriptor) -> None:
    if fields.is_message(field) and fields.message_type(field).full_name == "google.protobuf.Value":
        getattr(message, field.name).null_value = 0
    elif field.type == FieldDescriptor.TYPE_ENUM and (
        fields.enum_type(field).full_name == "google.protobuf.NullValue"
    ):
        setattr(message, field.name, 0)
    else:
        message.ClearField(field.name)


def scalar(field: FieldDescriptor, value: object, path: str) -> object:
    """A parsed JSON value as the Python value of a non-message field."""
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            raise DecodeError(path, f"expected a string, got {_kind(value)}")
        if not value.isascii():
            _check_utf8(value, path)
        return value
    if kind == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise DecodeError(path, f"expected true or false, got {_kind(value)}")
        return value
    if isinstance(value, str):
        return text(field, value, path)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DecodeError(path, f"expected a number, got {_kind(value)}")
    if kind in _INT_RANGES:
        return _integer(kind, value, path)
    if kind in fields.FLOAT_TYPES:
        return _float(kind, float(value), path)
    if kind == FieldDescriptor.TYPE_ENUM:
        if isinstance(value, float) and not value.is_integer():
            return _bad_enum(field, value, path)
        return _enum_number(field, int(value), path)
    raise DecodeError(path, f"expected base64 text, got {_kind(value)}")


def text(field: FieldDescriptor, value: str, path: str) -> object:
    """The Python value of a non-message field from its text (query, path, map key)."""
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        if not value.isascii():
            _check_utf8(value, path)
        return value
    if kind == FieldDescriptor.TYPE_BOOL:
        if value not in _BOOL_TEXT:
            raise DecodeError(path, f"expected true or false, got {value!r}")
        return _BOOL_TEXT[value]
    if kind in _INT_RANGES:
        if _INTEGER.fullmatch(value):
            return _integer(kind, int(value), path)
        if _NUMBER.fullmatch(value):
            return _integer(kind, float(value), path)
        raise DecodeError(path, f"expected an integer, got {value!r}")
    if kind in fields.FLOAT_TYPES:
        special = _NON_FINITE.get(value)
        if special is not None:
            return special
        if not _NUMBER.fullmatch(value):
            raise DecodeError(path, f"expected a number, got {value!r}")
        return _float(kind, float(value), path)
    if kind == FieldDescriptor.TYPE_BYTES:
        return _base64(value, path)
    enum = fields.enum_type(field)
    named = enum.values_by_name.get(value)
    if named is not None:
        return named.number
    if _INTEGER.fullmatch(value):
        return _enum_number(field, int(value), path)
    # A custom JSON name set by the `pb.enumvalue.json` option, as json_format reads it.
    for candidate in enum.values:
        for option, setting in candidate.GetOptions().ListFields():
            if option.full_name == "pb.enumvalue.json" and setting.string == value:
                return candidate.number
    return _bad_enum(field, value, path)


def _integer(kind: int, value: float, path: str) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise DecodeError(path, f"expected an integer, got {value!r}")
        value = int(value)
    if value not in _INT_RANGES[kind]:
        raise DecodeError(path, f"{value} is out of range")
    return value


def _float(kind: int, value: float, path: str) -> float:
    if math.isinf(value):
        raise DecodeError(path, 'out of range (the JSON mapping writes "Infinity")')
    if kind == FieldDescriptor.TYPE_FLOAT:
        # Whatever rounds to a finite 32-bit float fits, the largest one included:
        # json_format writes it as 3.4028235e+38, just above it.
        try:
            _FLOAT32.pack(value)
        except OverflowError:
            raise DecodeError(path, "out of range for a 32-bit float") from None
    return value


def _enum_number(field: FieldDescriptor, number: int, path: str) -> int:
    if number in fields.enum_type(field).values_by_number:
        return number
    if fields.enum_type(field).is_closed or number not in _INT_RANGES[FieldDescriptor.TYPE_INT32]:
        raise DecodeError(path, f"{number} is not a value of {fields.enum_type(field).full_name}")
    return number


def _bad_enum(field: FieldDescriptor, value: object, path: str) -> int:
    raise DecodeError(path, f"{value!r} is not a value of {fields.enum_type(field).full_name}")


def _base64(value: str, path: str) -> bytes:
    # Standard or URL-safe alphabet, padding optional, as the JSON mapping allows.
    data = value.replace("-", "+").replace("_", "/").encode("ascii", "replace")
    try:
        return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
    except binascii.Error:
        raise DecodeError(path, "not valid base64") from None


def _check_utf8(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DecodeError(path, "contains an unpaired surrogate") from None


def _from_json_string(message: Any, value: object, path: str) -> None:
    if not isinstance(value, str):
        raise DecodeError(path, f"expected a string, got {_kind(value)}")
    try:
        message.FromJsonString(value)
    except ValueError as exc:
        raise DecodeError(path, str(exc)) from None


def _dynamic(message: Any, value: Any, path: str, depth: int) -> None:
    # Struct, Value and ListValue hold any JSON; json_format's own conversion is
    # exact for them, and the only failure is a wrong outer shape.
    try:
        json_format.ParseDict(value, message, max_recursion_depth=MAX_DEPTH - depth)
    except (json_format.ParseError, ValueError, TypeError) as exc:
        raise DecodeError(
            path, f"not valid for {fields.descriptor(message).full_name}: {exc}"
        ) from None


def _any(message: Message, value: Any, path: str) -> None:
    if not isinstance(value, dict):
        raise DecodeError(path, f"expected a JSON object, got {_kind(value)}")
    if value and not isinstance(value.get("@type"), str):
        raise DecodeError(join(path, "@type"), "expected the type URL of the message")
    try:
        json_format.ParseDict(value, message)
    except (json_format.ParseError, KeyError, TypeError, ValueError) as exc:
        raise DecodeError(path, f"not a valid Any: {exc}") from None


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
