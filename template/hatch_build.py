"""Build hook: generate protobuf and gRPC stubs (with .pyi) from proto/ at build time.

The stubs are build output, not source: they are gitignored and rewritten on every
build, and uv rebuilds the package whenever a .proto changes (`tool.uv.cache-keys`),
so the code can never run against stale stubs. The same run writes
`src/<package>/descriptors.binpb`, the protos as a FileDescriptorSet with their
comments, which the stubs do not carry and the OpenAPI document describes with.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _plugin(name: str) -> str:
    """Locate a protoc plugin installed in the build environment."""
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / name, Path(sys.executable).parent / name):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        msg = f"protoc plugin {name!r} not found; is mypy-protobuf in build-system.requires?"
        raise RuntimeError(msg)
    return found


def generate(root: Path) -> list[Path]:
    """Compile every proto/**/*.proto into src/, returning the files written."""
    import grpc_tools  # noqa: PLC0415 - only present in the build environment
    import grpc_tools.protoc  # noqa: PLC0415

    proto_root = root / "proto"
    protos = sorted(proto_root.rglob("*.proto"))
    if not protos:
        return []
    out = root / "src"
    # google/protobuf/*.proto ship inside grpc_tools; google/api/*.proto inside
    # googleapis-common-protos (the `google` namespace package).
    api_protos = importlib.import_module("google.api.annotations_pb2").__file__
    includes = [Path(grpc_tools.__file__).parent / "_proto", Path(str(api_protos)).parents[2]]
    # Drop stubs of protos that were renamed or deleted.
    for directory in {out / p.parent.relative_to(proto_root) for p in protos}:
        for old in directory.glob("*_pb2*.py*"):
            old.unlink()
    # proto/<package>/... mirrors src/<package>/...
    descriptor_set = out / protos[0].relative_to(proto_root).parts[0] / "descriptors.binpb"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        *(f"-I{path}" for path in includes),
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        f"--descriptor_set_out={descriptor_set}",
        "--include_source_info",
        "--include_imports",
        *(str(p) for p in protos),
    ]
    if grpc_tools.protoc.main(args) != 0:
        msg = f"protoc failed for {', '.join(str(p.relative_to(root)) for p in protos)}"
        raise RuntimeError(msg)
    return [*sorted(out.rglob("*_pb2*.py*")), descriptor_set]


class ProtoBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Run `generate` before every wheel or editable build."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:  # noqa: ARG002
        """Generate the stubs into the source tree."""
        if os.environ.get("SKIP_PROTO_GENERATION") == "1":
            return
        generate(Path(self.root))
