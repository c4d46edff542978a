"""Protobuf and gRPC stubs generated from proto/ at build time (see hatch_build.py)."""
