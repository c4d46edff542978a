"""Thin servicers: translate between protobuf messages and the domain."""
