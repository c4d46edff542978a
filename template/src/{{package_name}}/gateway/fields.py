"""Questions about protobuf fields that routing, transcoding and OpenAPI all ask."""

from __future__ import annotations

import functools
from typing import cast

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

# Well-known types whose JSON form is a string (google.protobuf.json_format).
STRING_WKTS = frozenset(
    {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"}
)
WRAPPERS = frozenset(
    {
        f"google.protobuf.{name}Value"
        for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String")
    }
    | {"google.protobuf.BytesValue"}
)
INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
UNSIGNED_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
    }
)
FLOAT_TYPES = frozenset({FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE})
INT_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_FIXED32,
    }
    | INT64_TYPES
)


def descriptor(message: Message) -> Descriptor:
    """The descriptor of a message's type."""
    # The upb runtime's own Descriptor class, which its stubs keep apart.
    return cast("Descriptor", message.DESCRIPTOR)


def message_type(field: FieldDescriptor) -> Descriptor:
    """The message type of a message field. Raises TypeError for other fields."""
    if field.message_type is None:
        raise TypeError(f"{field.full_name} is not a message field")
    return field.message_type


def enum_type(field: FieldDescriptor) -> EnumDescriptor:
    """The enum type of an enum field. Raises TypeError for other fields."""
    if field.enum_type is None:
        raise TypeError(f"{field.full_name} is not an enum field")
    return field.enum_type


def is_map(field: FieldDescriptor) -> bool:
    """Whether the field is a `map<K, V>` (a repeated field of map entries)."""
    message = field.message_type
    return message is not None and message.GetOptions().map_entry


def is_message(field: FieldDescriptor) -> bool:
    """Whether the field holds messages (maps included)."""
    return field.type == FieldDescriptor.TYPE_MESSAGE


def is_scalar(field: FieldDescriptor) -> bool:
    """Whether the field holds one number, string, bool, bytes or enum value."""
    return field.type != FieldDescriptor.TYPE_MESSAGE and not field.is_repeated


def find(message: Descriptor, name: str) -> FieldDescriptor | None:
    """The field called `name`, by its proto name or its lowerCamelCase JSON name."""
    return _names(message).get(name)


@functools.cache
def _names(message: Descriptor) -> dict[str, FieldDescriptor]:
    # Cached per message type: a process has a fixed, small set of them.
    names = {field.json_name: field for field in message.fields}
    names.update(message.fields_by_name)
    return names


def resolve(message: Descriptor, path: str) -> list[FieldDescriptor] | str:
    """The fields along a dotted path (proto names only), or why it names no field.

    Every step before the last must be a singular message field.
    """
    fields: list[FieldDescriptor] = []
    current = message
    parts = path.split(".")
    for index, part in enumerate(parts):
        field = current.fields_by_name.get(part)
        if field is None:
            return f"{current.full_name} has no field {part!r}"
        fields.append(field)
        if index < len(parts) - 1:
            if not is_message(field) or field.is_repeated:
                return f"{'.'.join(parts[: index + 1])} is not a singular message field"
            current = message_type(field)
    return fields
