"""Items: validation, pagination and concurrency rules of the example API."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NoReturn, Protocol
from uuid import UUID

from ..errors import Aborted, FieldViolation, InvalidArgument, NotFound

NAME_MAX = 200
DESCRIPTION_MAX = 2000
PAGE_SIZE_DEFAULT = 20
PAGE_SIZE_MAX = 100
MUTABLE_FIELDS = frozenset({"name", "description"})
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
_ETAG = re.compile(r'W/"([0-9]{1,18})"')


@dataclass(frozen=True)
class Item:
    """A stored item."""

    id: UUID
    name: str
    description: str
    create_time: datetime
    update_time: datetime
    version: int

    @property
    def etag(self) -> str:
        """Opaque version tag; changes on every update (AIP-154)."""
        return f'W/"{self.version}"'


@dataclass(frozen=True)
class Cursor:
    """Position after the last item of a page (keyset pagination)."""

    create_time: datetime
    id: UUID


@dataclass(frozen=True)
class Page:
    """One page of items and the token of the next, empty on the last page."""

    items: list[Item]
    next_page_token: str


class ItemRepository(Protocol):
    """Storage the item rules need."""

    async def create(self, name: str, description: str, request_id: UUID | None) -> Item:
        """Insert an item; with a request_id already used, return that earlier item."""
        ...

    async def get(self, item_id: UUID) -> Item | None:
        """The item, or None."""
        ...

    async def list_after(self, cursor: Cursor | None, limit: int) -> list[Item]:
        """Up to `limit` items after `cursor`, ordered by (create_time, id)."""
        ...

    async def update(
        self, item_id: UUID, changes: dict[str, str], expected_version: int | None
    ) -> Item | None:
        """Apply `changes` if the item exists (at `expected_version`, when given)."""
        ...

    async def delete(self, item_id: UUID, expected_version: int | None) -> bool:
        """Delete the item if it exists (at `expected_version`, when given)."""
        ...


def _parse_id(value: str, field: str) -> UUID:
    # Only the form ids are given out in: UUID() also takes braces, a urn:uuid: prefix
    # or no hyphens, which would make one item have many ids.
    if _ID.fullmatch(value) is None:
        raise InvalidArgument.field(field, "must be an item id (a UUID like the ones returned)")
    return UUID(value)


def _parse_etag(value: str, field: str) -> int | None:
    if not value:
        return None
    # ASCII digits only (str.isdigit accepts '²', which int() rejects), and few enough
    # for the bigint version column.
    match = _ETAG.fullmatch(value)
    if match is not None:
        return int(match.group(1))
    raise InvalidArgument.field(field, "must be an etag returned by this API")


def _check_text(name: str | None, description: str | None) -> list[FieldViolation]:
    problems = []
    if name is not None:
        if not name.strip():
            problems.append(FieldViolation("item.name", "must not be empty"))
        elif len(name) > NAME_MAX:
            problems.append(FieldViolation("item.name", f"must be at most {NAME_MAX} characters"))
    if description is not None and len(description) > DESCRIPTION_MAX:
        problems.append(
            FieldViolation("item.description", f"must be at most {DESCRIPTION_MAX} characters")
        )
    # PostgreSQL text cannot hold NUL; the driver would fail the insert instead.
    problems += [
        FieldViolation(field, "must not contain NUL characters")
        for field, value in (("item.name", name), ("item.description", description))
        if value is not None and "\x00" in value
    ]
    return problems


def encode_page_token(cursor: Cursor) -> str:
    """Opaque token for the page after `cursor`."""
    raw = json.dumps({"t": cursor.create_time.isoformat(), "i": str(cursor.id)})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str) -> Cursor:
    """Inverse of encode_page_token; raises InvalidArgument for anything else."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        created = datetime.fromisoformat(data["t"])
        if created.tzinfo is None:
            raise ValueError("naive timestamp")  # noqa: TRY301 - same answer as a bad token
        # In UTC, as the driver sends it: 9999-12-31T23:59-14:00 overflows here, not there.
        cursor = Cursor(created.astimezone(UTC), UUID(data["i"]))
    # Any JSON may arrive here: wrong types fail in UUID() (AttributeError) and deep
    # nesting in json.loads (RecursionError); all of it is just a bad token.
    except (
        binascii.Error,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        RecursionError,
        OverflowError,
    ):
        raise InvalidArgument.field("page_token", "is not a token returned by ListItems") from None
    return cursor


class ItemService:
    """Use cases of the item API."""

    def __init__(self, repo: ItemRepository) -> None:
        self._repo = repo

    async def create(self, name: str, description: str, request_id: str) -> Item:
        """Create an item; idempotent per request_id."""
        problems = _check_text(name, description)
        rid: UUID | None = None
        if request_id:
            try:
                rid = UUID(request_id)
            except ValueError:
                problems.append(FieldViolation("request_id", "must be a UUID"))
        if problems:
            raise InvalidArgument(problems)
        return await self._repo.create(name, description, rid)

    async def get(self, item_id: str) -> Item:
        """The item named by item_id."""
        item = await self._repo.get(_parse_id(item_id, "id"))
        if item is None:
            raise NotFound(f"item {item_id} not found")
        return item

    async def list_items(self, page_size: int, page_token: str) -> Page:
        """One page of items, oldest first."""
        if page_size < 0 or page_size > PAGE_SIZE_MAX:
            raise InvalidArgument.field("page_size", f"must be between 0 and {PAGE_SIZE_MAX}")
        size = page_size or PAGE_SIZE_DEFAULT
        cursor = decode_page_token(page_token) if page_token else None
        items = await self._repo.list_after(cursor, size + 1)
        if len(items) <= size:
            return Page(items, "")
        last = items[size - 1]
        return Page(items[:size], encode_page_token(Cursor(last.create_time, last.id)))

    async def update(
        self, item_id: str, name: str, description: str, mask: list[str], etag: str
    ) -> Item:
        """Change the fields in `mask`; with no mask, the fields the request sets (AIP-134).

        `*` names every mutable field, so it clears those the request leaves empty. An
        empty string counts as not set (proto3 cannot tell them apart), so clearing a
        field takes a mask that names it.
        """
        uid = _parse_id(item_id, "item.id")
        version = _parse_etag(etag, "item.etag")
        paths: set[str] = set(mask)
        if paths == {"*"}:
            paths = set(MUTABLE_FIELDS)
        elif not paths:
            given = {"name": name, "description": description}
            paths = {field for field, value in given.items() if value}
            if not paths:
                raise InvalidArgument.field(
                    "update_mask",
                    "nothing to update: set a field of item, or name the fields to change "
                    "(an empty field in the mask is cleared)",
                )
        unknown = sorted(paths - MUTABLE_FIELDS)
        if unknown:
            raise InvalidArgument.field(
                "update_mask",
                f"unknown or immutable field(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(MUTABLE_FIELDS))}",
            )
        changes = {"name": name, "description": description}
        changes = {k: v for k, v in changes.items() if k in paths}
        problems = _check_text(changes.get("name"), changes.get("description"))
        if problems:
            raise InvalidArgument(problems)
        item = await self._repo.update(uid, changes, version)
        if item is None:
            await self._conflict_or_missing(uid, item_id)
        return item

    async def delete(self, item_id: str, etag: str) -> None:
        """Delete the item (only at the given etag, when one is sent)."""
        uid = _parse_id(item_id, "id")
        version = _parse_etag(etag, "etag")
        if not await self._repo.delete(uid, version):
            await self._conflict_or_missing(uid, item_id)

    async def _conflict_or_missing(self, uid: UUID, item_id: str) -> NoReturn:
        if await self._repo.get(uid) is None:
            raise NotFound(f"item {item_id} not found")
        raise Aborted(f"item {item_id} was changed concurrently; read it again and retry")
