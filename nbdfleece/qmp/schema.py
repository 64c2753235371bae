"""Declarative argument schemas, checked the way QEMU's QAPI input visitor does.

A command's arguments are described once, QAPI style, and every command gets
the same checks and QEMU 7.2's error texts for free::

    BITMAP_ADD = Struct("BlockDirtyBitmapAdd", {
        "node": STR, "name": STR,
        "*granularity": UINT32, "*persistent": BOOL, "*disabled": BOOL,
    })

A leading ``*`` marks an optional member.  Checking walks the schema in
member order, so the first problem found is the one QEMU reports:

* a required member is absent:       ``Parameter 'name' is missing``
* a member has the wrong JSON type:  ``Invalid parameter type for 'name', expected: string``
* an unsigned integer is no integer: ``Parameter 'granularity' expects uint64``
* it is out of range:                ``Parameter 'granularity' expects uint32_t``
* an enum value is unknown:          ``Parameter 'mode' does not accept value 'x'``
* a member is not in the schema:     ``Parameter 'xyz' is unexpected``

Nested members are named by their full path (``actions[0].data.name``), as
QEMU's ``full_name()`` does, except in the messages QEMU builds from the
bare member name (range, enum and alternate errors), where a list element is
called ``null`` -- also as QEMU does.

This module is pure: no I/O, no trio.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

JSON = Any
"""A value decoded from JSON: dict, list, str, int, float, bool or None."""


class QmpError(Exception):
    """A QMP error reply: ``{"error": {"class": error_class, "desc": desc}}``."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass(frozen=True, slots=True)
class Where:
    """Where a value sits in the arguments: its full path and its own name."""

    full: str
    name: str | None

    def member(self, key: str) -> Where:
        return Where(f"{self.full}.{key}" if self.full else key, key)

    def element(self, index: int) -> Where:
        return Where(f"{self.full}[{index}]", None)

    @property
    def bare(self) -> str:
        return "null" if self.name is None else self.name


ROOT = Where("", None)
"""The ``arguments`` object itself."""


def _wrong_type(where: Where, expected: str) -> QmpError:
    return QmpError(f"Invalid parameter type for '{where.full}', expected: {expected}")


class Type(abc.ABC):
    """A QAPI type: checks a decoded JSON value and returns it (normalised)."""

    @abc.abstractmethod
    def check(self, value: JSON, where: Where) -> JSON:
        """Return ``value`` if it conforms, else raise :class:`QmpError`."""


class Str(Type):
    def check(self, value: JSON, where: Where) -> JSON:
        if not isinstance(value, str):
            raise _wrong_type(where, "string")
        return value


class Bool(Type):
    def check(self, value: JSON, where: Where) -> JSON:
        if not isinstance(value, bool):
            raise _wrong_type(where, "boolean")
        return value


class Int(Type):
    """QAPI ``int``/``int64``: any integer that fits in 64 signed bits."""

    def check(self, value: JSON, where: Where) -> JSON:
        if isinstance(value, bool) or not isinstance(value, int) or not -(1 << 63) <= value < (1 << 63):
            raise _wrong_type(where, "integer")
        return value


class Number(Type):
    """QAPI ``number``: any JSON number (an integer is taken as a float)."""

    def check(self, value: JSON, where: Where) -> JSON:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _wrong_type(where, "number")
        return float(value)


class UInt(Type):
    """QAPI ``uint8``..``uint64``.

    Like QEMU, negative numbers are first read as uint64 (two's complement,
    "for backward compatibility") and so fail the range check of narrower
    types.
    """

    def __init__(self, bits: int) -> None:
        self.bits = bits

    def check(self, value: JSON, where: Where) -> JSON:
        if isinstance(value, bool) or not isinstance(value, int) or not -(1 << 63) <= value < (1 << 64):
            raise QmpError(f"Parameter '{where.full}' expects uint64")
        if value < 0:
            value += 1 << 64
        if value >= 1 << self.bits:
            raise QmpError(f"Parameter '{where.bare}' expects uint{self.bits}_t")
        return value


class Enum(Type):
    def __init__(self, name: str, values: list[str] | tuple[str, ...]) -> None:
        self.name = name
        self.values = tuple(values)

    def check(self, value: JSON, where: Where) -> JSON:
        if not isinstance(value, str):
            raise _wrong_type(where, "string")
        if value not in self.values:
            raise QmpError(f"Parameter '{where.bare}' does not accept value '{value}'")
        return value


class List(Type):
    def __init__(self, element: Type) -> None:
        self.element = element

    def check(self, value: JSON, where: Where) -> JSON:
        if not isinstance(value, list):
            raise _wrong_type(where, "array")
        return [self.element.check(item, where.element(i)) for i, item in enumerate(value)]


def _split(members: Mapping[str, Type]) -> dict[str, tuple[Type, bool]]:
    """QAPI member spelling: ``"*name"`` is optional."""
    return {
        (key[1:] if key.startswith("*") else key): (typ, not key.startswith("*"))
        for key, typ in members.items()
    }


class Struct(Type):
    """A JSON object with known members; anything else is unexpected."""

    def __init__(self, name: str, members: Mapping[str, Type] | None = None) -> None:
        self.name = name
        self.members = _split(members or {})

    def check(self, value: JSON, where: Where) -> JSON:
        if not isinstance(value, dict):
            raise _wrong_type(where, "object")
        out = self.check_members(value, where)
        _check_unexpected(value, out.keys() | self.members.keys(), where)
        return out

    def check_members(self, value: dict[str, JSON], where: Where) -> dict[str, JSON]:
        """Check the declared members only (flat unions add their branch's)."""
        out: dict[str, JSON] = {}
        for key, (typ, required) in self.members.items():
            if key in value:
                out[key] = typ.check(value[key], where.member(key))
            elif required:
                raise QmpError(f"Parameter '{where.member(key).full}' is missing")
        return out


def _check_unexpected(value: dict[str, JSON], known: Any, where: Where) -> None:
    for key in value:
        if key not in known:
            raise QmpError(f"Parameter '{where.member(key).full}' is unexpected")


class Union(Type):
    """A flat union: ``base`` members, then those of the branch named by ``discriminator``.

    ``branches`` may be a live mapping (e.g. a registry filled at import
    time); its keys are the discriminator's accepted values, in order.
    """

    def __init__(
        self,
        name: str,
        discriminator: str,
        base: Mapping[str, Type] | None = None,
        branches: Mapping[str, Struct] | None = None,
    ) -> None:
        self.name = name
        self.discriminator = discriminator
        self.base = Struct(name, base)
        self.branches: Mapping[str, Struct] = branches if branches is not None else {}

    def check(self, value: JSON, where: Where) -> JSON:
        if not isinstance(value, dict):
            raise _wrong_type(where, "object")
        key = self.discriminator
        tag_where = where.member(key)
        if key not in value:
            raise QmpError(f"Parameter '{tag_where.full}' is missing")
        tag = Enum(f"{self.name}Kind", tuple(self.branches)).check(value[key], tag_where)
        out = {key: tag}
        out.update(self.base.check_members(value, where))
        branch = self.branches[tag]
        out.update(branch.check_members(value, where))
        _check_unexpected(value, out.keys() | self.base.members.keys() | branch.members.keys() | {key}, where)
        return out


class Alternate(Type):
    """One of several types, chosen by the JSON type of the value (``BlockdevRef``)."""

    def __init__(self, name: str, *, string: Type | None = None, obj: Type | None = None) -> None:
        self.name = name
        self.string = string
        self.obj = obj

    def check(self, value: JSON, where: Where) -> JSON:
        if isinstance(value, str) and self.string is not None:
            return self.string.check(value, where)
        if isinstance(value, dict) and self.obj is not None:
            return self.obj.check(value, where)
        raise QmpError(f"Invalid parameter type for '{where.bare}', expected: {self.name}")


STR = Str()
BOOL = Bool()
INT = Int()
UINT16 = UInt(16)
UINT32 = UInt(32)
UINT64 = UInt(64)
NUMBER = Number()


def check_arguments(schema: Type, arguments: JSON) -> dict[str, JSON]:
    """Check a command's ``arguments`` object against its schema (a struct or union)."""
    result: dict[str, JSON] = schema.check(arguments, ROOT)
    return result
