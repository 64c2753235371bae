"""Exports: the names clients connect to, each pointing at a block node.

The handshake sees exports only through :class:`ExportInfo`, a frozen
snapshot with the facts negotiation needs, so the protocol core stays pure
and exports can be added or removed (QMP, next issues) between handshakes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from nbdfleece.block.node import BlockNode
from nbdfleece.constants import BASE_ALLOCATION
from nbdfleece.extents import ExtentArray, as_extents

ExtentProvider = Callable[[int, int], Awaitable[ExtentArray]]
"""(offset, length) -> extent array ``(n, 2)`` of (length, flags) from ``offset``."""


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake needs to know about one export."""

    name: str
    size: int
    read_only: bool
    description: str = ""
    contexts: tuple[str, ...] = (BASE_ALLOCATION,)
    """Meta contexts offered, in a fixed order: a context's id is its index + 1."""

    def context_id(self, context: str) -> int | None:
        try:
            return self.contexts.index(context) + 1
        except ValueError:
            return None


@dataclass(eq=False)
class Export:
    """A named, client-visible view of a node."""

    name: str
    node: BlockNode
    read_only: bool = False
    description: str = ""
    providers: dict[str, ExtentProvider] = field(default_factory=dict)
    """Meta contexts beyond ``base:allocation`` (dirty bitmaps, allocation depth)."""

    def info(self) -> ExportInfo:
        return ExportInfo(
            name=self.name,
            size=self.node.size,
            read_only=self.read_only or self.node.read_only,
            description=self.description,
            contexts=(BASE_ALLOCATION, *self.providers),
        )

    async def extents(self, context: str, offset: int, length: int) -> ExtentArray:
        """(length, flags) extents of ``context`` from ``offset``."""
        if context == BASE_ALLOCATION:
            found = await self.node.block_status(offset, length)
            return as_extents((e.length, int(e.flags)) for e in found)
        return await self.providers[context](offset, length)


class ExportRegistry:
    """Name -> export; implements the handshake's ``ExportDirectory``."""

    def __init__(self) -> None:
        self._exports: dict[str, Export] = {}

    def add(self, export: Export) -> None:
        if export.name in self._exports:
            raise KeyError(f"export '{export.name}' already exists")
        self._exports[export.name] = export

    def remove(self, name: str) -> Export:
        return self._exports.pop(name)

    def get(self, name: str) -> Export | None:
        """Look up by name; the empty name means the first export (default)."""
        if name == "" and name not in self._exports:
            return next(iter(self._exports.values()), None)
        return self._exports.get(name)

    def __iter__(self) -> Iterator[Export]:
        return iter(list(self._exports.values()))

    def __len__(self) -> int:
        return len(self._exports)

    # -- ExportDirectory --------------------------------------------------
    def lookup(self, name: str) -> ExportInfo | None:
        export = self.get(name)
        return export.info() if export is not None else None

    def listing(self) -> list[tuple[str, str]]:
        return [(e.name, e.description) for e in self._exports.values()]
