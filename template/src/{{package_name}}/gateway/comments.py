"""Proto comments by element name, from the descriptor set the build writes.

Runtime `_pb2` descriptors carry no comments, so the build (hatch_build.py) also
writes `descriptors.binpb`, a FileDescriptorSet with source info, into the
package. Without it (a build that skipped it) documents simply have no
descriptions.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from importlib.resources import files

from google.protobuf import descriptor_pb2

FILE_NAME = "descriptors.binpb"

# Field numbers of FileDescriptorProto, DescriptorProto, ServiceDescriptorProto and
# EnumDescriptorProto that SourceCodeInfo paths are made of.
_MESSAGE, _ENUM, _SERVICE = 4, 5, 6
_FIELD, _NESTED, _NESTED_ENUM = 2, 3, 4
_METHOD, _ENUM_VALUE = 2, 2


def load(package: str) -> dict[str, str]:
    """Comments of the package's protos, or no comments when the build wrote none.

    Keys are full names: `pkg.Service`, `pkg.Service.Method`, `pkg.Message`,
    `pkg.Message.field`, `pkg.Enum` and `pkg.Enum.VALUE`. Raises
    google.protobuf.message.DecodeError when the file exists but is corrupt.
    """
    resource = files(package).joinpath(FILE_NAME)
    if not resource.is_file():
        return {}
    descriptors = descriptor_pb2.FileDescriptorSet()
    descriptors.ParseFromString(resource.read_bytes())
    return collect(descriptors)


def collect(descriptors: descriptor_pb2.FileDescriptorSet) -> dict[str, str]:
    """Comments of every element of a descriptor set that has one."""
    found: dict[str, str] = {}
    for file in descriptors.file:
        _File(file, found).walk()
    return found


class _File:
    def __init__(self, file: descriptor_pb2.FileDescriptorProto, found: dict[str, str]) -> None:
        self.file = file
        self.found = found
        self.locations = {
            tuple(location.path): location for location in file.source_code_info.location
        }

    def walk(self) -> None:
        prefix = self.file.package
        for i, service in enumerate(self.file.service):
            name = _join(prefix, service.name)
            self.note(name, (_SERVICE, i))
            for j, method in enumerate(service.method):
                self.note(f"{name}.{method.name}", (_SERVICE, i, _METHOD, j))
        for i, message in enumerate(self.file.message_type):
            self.message(message, prefix, (_MESSAGE, i))
        for i, enum in enumerate(self.file.enum_type):
            self.enum(enum, prefix, (_ENUM, i))

    def message(
        self, message: descriptor_pb2.DescriptorProto, prefix: str, path: tuple[int, ...]
    ) -> None:
        name = _join(prefix, message.name)
        self.note(name, path)
        for i, field in enumerate(message.field):
            self.note(f"{name}.{field.name}", (*path, _FIELD, i))
        for i, nested in enumerate(message.nested_type):
            self.message(nested, name, (*path, _NESTED, i))
        for i, enum in enumerate(message.enum_type):
            self.enum(enum, name, (*path, _NESTED_ENUM, i))

    def enum(
        self, enum: descriptor_pb2.EnumDescriptorProto, prefix: str, path: tuple[int, ...]
    ) -> None:
        name = _join(prefix, enum.name)
        self.note(name, path)
        for i, value in enumerate(enum.value):
            self.note(f"{name}.{value.name}", (*path, _ENUM_VALUE, i))

    def note(self, name: str, path: Sequence[int]) -> None:
        location = self.locations.get(tuple(path))
        if location is None:
            return
        text = textwrap.dedent(location.leading_comments or location.trailing_comments).strip()
        if text:
            self.found[name] = text


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
