"""The services this process serves, built from shared resources.

This file is yours: add a servicer here and app.py serves it, with deadlines,
error mapping, logging and health already applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .api.items import ItemServicer
from .domain.items import ItemService
from .repo.items import PostgresItemRepository
from .server import Service
from .v1 import items_pb2, items_pb2_grpc

if TYPE_CHECKING:
    from .db import Database


def build(db: Database) -> list[Service]:
    """Wire each servicer to its domain service and repositories."""
    items = ItemServicer(ItemService(PostgresItemRepository(db)))
    return [
        Service(
            name=items_pb2.DESCRIPTOR.services_by_name["ItemService"].full_name,
            register=lambda server: items_pb2_grpc.add_ItemServiceServicer_to_server(items, server),
        ),
    ]
