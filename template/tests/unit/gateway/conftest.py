"""The gateway's test API (gatewaytest.proto), compiled once per test session."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc_tools
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import ServiceDescriptor
from grpc_tools import protoc

PROTO = Path(__file__).with_name("gatewaytest.proto")


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory holding gatewaytest_pb2.py and gatewaytest.binpb (with comments)."""
    out = tmp_path_factory.mktemp("gatewaytest")
    includes = [
        Path(grpc_tools.__file__).parent / "_proto",
        Path(str(annotations_pb2.__file__)).parents[2],
    ]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO.parent}",
        *(f"-I{path}" for path in includes),
        f"--python_out={out}",
        f"--descriptor_set_out={out / 'gatewaytest.binpb'}",
        "--include_source_info",
        "--include_imports",
        str(PROTO),
    ]
    assert protoc.main(args) == 0, "protoc failed on gatewaytest.proto"
    sys.path.insert(0, str(out))
    try:
        yield out
    finally:
        sys.path.remove(str(out))


@pytest.fixture(scope="session")
def pb(compiled: Path) -> ModuleType:
    """The generated module; importing it adds the test API to the default pool."""
    assert (compiled / "gatewaytest_pb2.py").is_file()
    return importlib.import_module("gatewaytest_pb2")


@pytest.fixture(scope="session")
def library(pb: ModuleType) -> ServiceDescriptor:
    """The Library service of the test API."""
    service: ServiceDescriptor = pb.DESCRIPTOR.services_by_name["Library"]
    return service


@pytest.fixture(scope="session")
def source_info(compiled: Path) -> descriptor_pb2.FileDescriptorSet:
    """The test API's descriptors with their comments (SourceCodeInfo)."""
    files = descriptor_pb2.FileDescriptorSet()
    files.ParseFromString((compiled / "gatewaytest.binpb").read_bytes())
    return files
