"""Messages to JSON, compiled once per message type.

The output equals what `json_format.MessageToDict(message,
preserving_proto_field_name=False, always_print_fields_with_no_presence=True)`
gives, encoded with orjson: lowerCamelCase names; every field without presence
(plain proto3 scalars, repeated fields, maps) always written, with its default
value when unset; fields with presence (messages, `optional`, oneof members)
written only when set; 64-bit integers as strings; enums by name (numbers that
the enum does not name as numbers); bytes as base64; NaN and infinities as
"NaN", "Infinity", "-Infinity"; Timestamp, Duration and FieldMask as their JSON
strings; wrappers as their value; Struct, Value and ListValue as plain JSON.

json_format itself serializes `google.protobuf.Any` and messages that can carry
extensions: those are not compiled. The tests prove the equality per field kind.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
import struct
from collections.abc import Callable
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from . import fields

Convert = Callable[[Any], Any]

_FALLBACK = frozenset({"google.protobuf.Any"})
_FLOAT = struct.Struct("<f")
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
# The range of google/protobuf/timestamp.proto: 0001-01-01 to 9999-12-31.
_TIMESTAMP_SECONDS = range(-62135596800, 253402300800)
_NANOS = range(1_000_000_000)
# Timestamp text up to the minute, by minute since the epoch: responses mostly
# carry recent times. Bounded: emptied when full.
_MINUTES: dict[int, str] = {}
_MINUTES_KEPT = 4096


class Encoder:
    """JSON encoders for message types, compiled on first use and kept."""

    def __init__(self) -> None:
        self._messages: dict[str, Convert] = {}
        self._compiling: set[str] = set()

    def json(self, message: Message) -> bytes:
        """The message as JSON bytes.

        Raises json_format.SerializeToJsonError where json_format does (a Value
        holding NaN or an infinity, which JSON cannot carry as a number).
        """
        return orjson.dumps(self.message(fields.descriptor(message))(message))

    def field_json(self, message: Message, name: str) -> bytes:
        """One field of the message as JSON bytes (`response_body`)."""
        field = fields.descriptor(message).fields_by_name[name]
        return orjson.dumps(self.field(field)(getattr(message, name)))

    def message(self, descriptor: Descriptor) -> Convert:
        """The converter of a message type to JSON-ready Python values."""
        convert = self._messages.get(descriptor.full_name)
        if convert is None:
            convert = self._compile(descriptor)
        return convert

    def field(self, field: FieldDescriptor) -> Convert:
        """The converter of a field's value (a list for repeated, a dict for maps)."""
        if fields.is_map(field):
            key = _map_key(fields.message_type(field).fields_by_name["key"])
            value = self._single(fields.message_type(field).fields_by_name["value"])
            return lambda mapping: {key(k): value(v) for k, v in mapping.items()}
        single = self._single(field)
        if field.is_repeated:
            return lambda values: [single(v) for v in values]
        return single

    def _compile(self, descriptor: Descriptor) -> Convert:
        name = descriptor.full_name
        convert: Convert
        if name in fields.WRAPPERS:
            convert = _wrapper(self._single(descriptor.fields_by_name["value"]))
        elif name == "google.protobuf.Timestamp":
            convert = _timestamp
        elif name in fields.STRING_WKTS:
            convert = _to_json_string
        elif name == "google.protobuf.Struct":
            convert = self._struct
        elif name == "google.protobuf.ListValue":
            convert = self._list_value
        elif name == "google.protobuf.Value":
            convert = self._value
        elif name in _FALLBACK or descriptor.is_extendable:
            convert = _json_format
        else:
            convert = self._regular(descriptor)
        self._messages[name] = convert
        return convert

    def _regular(self, descriptor: Descriptor) -> Convert:
        table: dict[FieldDescriptor, tuple[str, Convert]] = {}
        defaults: dict[str, object] = {}

        def convert(message: Message) -> dict[str, object]:
            out = dict(defaults)
            for field, value in message.ListFields():
                key, to_json = table[field]
                out[key] = to_json(value)
            return out

        # Registered before its fields compile, so recursive types find it.
        self._messages[descriptor.full_name] = convert
        self._compiling.add(descriptor.full_name)
        for field in descriptor.fields:
            to_json = self.field(field)
            table[field] = (field.json_name, to_json)
            if field.has_presence:
                continue
            if fields.is_map(field):
                defaults[field.json_name] = {}
            elif field.is_repeated:
                defaults[field.json_name] = []
            else:
                defaults[field.json_name] = to_json(field.default_value)
        self._compiling.discard(descriptor.full_name)
        return convert

    def _single(self, field: FieldDescriptor) -> Convert:
        kind = field.type
        if kind == FieldDescriptor.TYPE_MESSAGE:
            return self._lazy(fields.message_type(field))
        if kind == FieldDescriptor.TYPE_ENUM:
            return self._enum(field)
        if kind in fields.INT64_TYPES:
            return str
        if kind == FieldDescriptor.TYPE_DOUBLE:
            return _double
        if kind == FieldDescriptor.TYPE_FLOAT:
            return _float
        if kind == FieldDescriptor.TYPE_BYTES:
            return _bytes
        return _same

    def _lazy(self, descriptor: Descriptor) -> Convert:
        name = descriptor.full_name
        if name not in self._compiling:
            return self.message(descriptor)
        # A recursive type still compiling: look its converter up at call time.
        messages = self._messages

        def late(message: Message) -> object:
            return messages[name](message)

        return late

    def _enum(self, field: FieldDescriptor) -> Convert:
        enum = fields.enum_type(field)
        if enum.full_name == "google.protobuf.NullValue":
            return lambda _: None
        names: dict[int, str] = {}
        for number, value in enum.values_by_number.items():
            names[number] = value.name
            # The custom JSON name that json_format writes, when an option sets one.
            for option, setting in value.GetOptions().ListFields():
                if option.full_name == "pb.enumvalue.json":
                    names[number] = setting.string
        return lambda number: names.get(number, number)

    def _struct(self, message: Any) -> dict[str, object]:
        return {key: self._value(value) for key, value in message.fields.items()}

    def _list_value(self, message: Any) -> list[object]:
        return [self._value(value) for value in message.values]

    def _value(self, message: Any) -> object:
        kind = message.WhichOneof("kind")
        if kind is None or kind == "null_value":
            return None
        if kind == "number_value":
            number = message.number_value
            if math.isinf(number) or math.isnan(number):
                msg = f"Value cannot hold {number} in JSON: it would parse as a string"
                raise json_format.SerializeToJsonError(msg)
            return number
        if kind == "struct_value":
            return self._struct(message.struct_value)
        if kind == "list_value":
            return self._list_value(message.list_value)
        return getattr(message, kind)


def _wrapper(inner: Convert) -> Convert:
    def convert(message: Any) -> object:
        return inner(message.value)

    return convert


def _same(value: object) -> object:
    return value


def _to_json_string(message: Any) -> str:
    text: str = message.ToJsonString()
    return text


def _timestamp(message: Any) -> str:
    # Timestamp.ToJsonString's format without its datetime arithmetic, with the
    # text up to the minute kept: this runs for every timestamp of every response.
    seconds, nanos = message.seconds, message.nanos
    if seconds not in _TIMESTAMP_SECONDS or nanos not in _NANOS:
        msg = f"Timestamp is not valid: seconds {seconds}, nanos {nanos}"
        raise json_format.SerializeToJsonError(msg)
    minute, secs = divmod(seconds, 60)
    prefix = _MINUTES.get(minute)
    if prefix is None:
        if len(_MINUTES) >= _MINUTES_KEPT:
            _MINUTES.clear()
        days, rest = divmod(minute, 1440)
        hours, minutes = divmod(rest, 60)
        date = dt.date.fromordinal(days + _EPOCH_ORDINAL).isoformat()
        prefix = _MINUTES[minute] = f"{date}T{hours:02d}:{minutes:02d}:"
    if nanos == 0:
        return f"{prefix}{secs:02d}Z"
    if nanos % 1_000_000 == 0:
        return f"{prefix}{secs:02d}.{nanos // 1_000_000:03d}Z"
    if nanos % 1000 == 0:
        return f"{prefix}{secs:02d}.{nanos // 1000:06d}Z"
    return f"{prefix}{secs:02d}.{nanos:09d}Z"


def _json_format(message: Message) -> object:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=False, always_print_fields_with_no_presence=True
    )


def _bytes(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _double(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return _non_finite(value)


def _float(value: float) -> float | str:
    if not math.isfinite(value):
        return _non_finite(value)
    # The shortest decimal that reads back as the same 32-bit float, as json_format
    # writes it (a float field holds a 32-bit value in a Python float).
    precision = 6
    rounded = float(f"{value:.{precision}g}")
    while _FLOAT.unpack(_FLOAT.pack(rounded))[0] != value:
        precision += 1
        rounded = float(f"{value:.{precision}g}")
    return rounded


def _non_finite(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _map_key(field: FieldDescriptor) -> Convert:
    if field.type == FieldDescriptor.TYPE_BOOL:
        return lambda key: "true" if key else "false"
    return str
