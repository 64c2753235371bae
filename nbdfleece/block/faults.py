"""Fault injection: a layer that fails (or slows) chosen requests, for tests and drills.

Theory of operation
-------------------
:class:`FaultInjector` is a :class:`Layer` holding a list of rules
(:class:`FaultSpec`, immutable, plus per-rule counters and a seeded RNG).  A
rule covers a set of operations (``read``, ``write``, ``write-zeroes``,
``discard``, ``flush``, ``block-status``: QEMU's ``BlkdebugIOType`` names) and
optionally byte ranges; every request it covers is counted, and the rule
*fires* when

* the first ``after`` covered requests have passed,
* it has fired fewer than ``count`` times (``once`` is ``count=1``),
* and its RNG draws below ``probability``.

A firing rule sleeps ``delay`` seconds and then, if it has an ``error``,
fails the request with ``OSError(error)``; ``partial`` writes make the first
half of a write (or zeroing) reach the layer below before the error, as a
torn write would.  Errors become NBD errnos in one place,
:func:`nbdfleece.errors.nbd_errno` (EIO and ENOSPC pass through, other
storage errnos become EIO).

Every rule sees every request it covers (rules are independent); the first
firing rule with an error decides the errno, delays of all firing rules add
up.  With one client issuing requests in order, a seed gives the same faults
on every run.

The synchronous fast paths (``read_nowait``, ``write_nowait``,
``sendfile_map``) never decide anything: whenever a live rule could cover the
request they answer "use the slow path", so counting and RNG draws happen
once per request, in the async methods.

QEMU's ``blkdebug`` rules (``inject-error``) map onto the same machinery
(:func:`blkdebug_spec`): the rule is *armed* by the first request of the kind
its ``event`` names (``read_aio``, ``write_aio``/``pwritev``, ``pwritev_zero``,
``flush_to_os``/``flush_to_disk``; ``none`` arms it at creation), ``iotype``
selects the operation, ``sector`` is a one-byte range, ``once`` is
``count=1``.
"""

from __future__ import annotations

import errno as _errno
import logging
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from nbdfleece.block.node import BlockNode, Extent, Layer, Segment

log = logging.getLogger(__name__)

OPS = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
"""Operations a rule can cover (QEMU's ``BlkdebugIOType`` values)."""
OP_ALIASES = {"zero": "write-zeroes", "trim": "discard", "status": "block-status"}
ALL = "all"

BLKDEBUG_EVENTS = (
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
    "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load", "reftable_grow",
    "reftable_update", "refblock_load", "refblock_update", "refblock_update_part",
    "refblock_alloc", "refblock_alloc_hookup", "refblock_alloc_write",
    "refblock_alloc_write_blocks", "refblock_alloc_write_table", "refblock_alloc_switch_table",
    "cluster_alloc", "cluster_alloc_bytes", "cluster_free", "flush_to_os", "flush_to_disk",
    "pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail", "pwritev_rmw_after_tail",
    "pwritev", "pwritev_zero", "pwritev_done", "empty_image_prepare", "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters", "cor_write", "cluster_alloc_space", "none",
)
"""QEMU 7.2's ``BlkdebugEvent`` values, in its order."""
BLKDEBUG_EVENT_OPS: dict[str, frozenset[str]] = {
    "read_aio": frozenset({"read"}),
    "write_aio": frozenset({"write"}),
    "pwritev": frozenset({"write"}),
    "pwritev_zero": frozenset({"write-zeroes"}),
    "flush_to_os": frozenset({"flush"}),
    "flush_to_disk": frozenset({"flush"}),
    "none": frozenset(),
}
"""The blkdebug events a node without QEMU's format drivers has: which requests fire them."""
SECTOR = 512
PARTIAL_ALIGN = 512


class FaultSpecError(ValueError):
    """A fault rule that cannot be built; the text says which part is wrong."""


def parse_errno(value: str | int) -> int:
    """``EIO``, ``ENOSPC``, any name of the ``errno`` module, or a positive number."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    elif isinstance(value, str):
        name = value.strip().upper()
        found = getattr(_errno, name, None)
        if not name.startswith("E") or not isinstance(found, int):
            raise FaultSpecError(f"unknown errno name {value!r}")
        return found
    else:
        raise FaultSpecError(f"errno must be a name or a number, not {value!r}")
    if number <= 0:
        raise FaultSpecError(f"errno must be positive, not {number}")
    return number


def parse_ops(names: Iterable[str]) -> frozenset[str]:
    """Operation names (with the aliases ``zero``, ``trim``, ``status`` and ``all``)."""
    ops: set[str] = set()
    for raw in names:
        name = OP_ALIASES.get(raw, raw)
        if name == ALL:
            ops.update(OPS)
        elif name in OPS:
            ops.add(name)
        else:
            raise FaultSpecError(f"unknown operation {raw!r} (one of {', '.join(OPS)}, all)")
    if not ops:
        raise FaultSpecError("a fault rule needs at least one operation")
    return frozenset(ops)


@dataclass(frozen=True)
class FaultSpec:
    """What one rule does; immutable, so a config can hold it (state lives in the layer)."""

    ops: frozenset[str]
    error: int | None = _errno.EIO
    """The errno to fail with; None for a rule that only delays."""
    probability: float = 1.0
    ranges: tuple[tuple[int, int], ...] = ()
    """Half-open byte ranges ``[start, end)``; a request overlapping one is covered.
    Empty: the whole node.  A ranged rule never covers ``flush``, which has no range."""
    after: int = 0
    """Covered requests that pass before the rule may fire."""
    count: int | None = None
    """How many times it fires at most (None: no limit)."""
    delay: float = 0.0
    partial: bool = False
    seed: int = 0
    armed_by: frozenset[str] | None = None
    """blkdebug: the rule waits for a request of one of these kinds (None: armed now)."""
    immediately: bool = True
    """blkdebug: False fails the request only after one scheduling round."""

    def __post_init__(self) -> None:
        if not self.ops or not self.ops <= set(OPS):
            raise FaultSpecError(f"operations must be among {', '.join(OPS)}")
        if self.error is not None and self.error <= 0:
            raise FaultSpecError("errno must be positive")
        if not 0.0 <= self.probability <= 1.0 or math.isnan(self.probability):
            raise FaultSpecError(f"probability must be between 0 and 1, not {self.probability}")
        for start, end in self.ranges:
            if not 0 <= start < end:
                raise FaultSpecError(f"empty or negative range {start}-{end}")
        if self.after < 0:
            raise FaultSpecError("after must not be negative")
        if self.count is not None and self.count < 1:
            raise FaultSpecError("count must be at least 1")
        if not 0.0 <= self.delay <= 3600 or math.isnan(self.delay):
            raise FaultSpecError("delay must be between 0 and 3600 seconds")
        if self.error is None and not self.delay:
            raise FaultSpecError("a fault rule needs an errno or a delay")

    def describe(self) -> str:
        """The rule in the ``--fault`` syntax (for logs)."""
        parts = ["+".join(op for op in OPS if op in self.ops)]
        if self.error is not None:
            parts.append(f"errno={_errno.errorcode.get(self.error, self.error)}")
        if self.probability != 1.0:
            parts.append(f"p={self.probability:g}")
        parts += [f"range={s}-{e}" for s, e in self.ranges]
        for key, value, default in (("after", self.after, 0), ("count", self.count, None),
                                    ("delay", self.delay, 0.0), ("seed", self.seed, 0)):
            if value != default:
                parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
        if self.partial:
            parts.append("partial")
        return ",".join(parts)


def spec_from_options(options: Mapping[str, Any]) -> FaultSpec:
    """A rule from its named options, as QMP and the config file give them.

    Keys: ``ops`` (list), ``errno`` (name or number), ``probability``, ``ranges``
    (list of ``(start, end)``), ``after``, ``once``, ``count``, ``delay``,
    ``partial``, ``seed``.  Without ``errno`` a rule fails with EIO, unless it
    has a ``delay``, in which case it only delays.
    """
    unknown = set(options) - {"ops", "errno", "probability", "ranges", "after", "once", "count",
                              "delay", "partial", "seed"}
    if unknown:
        raise FaultSpecError(f"unknown fault rule keys {sorted(unknown)}")
    if "ops" not in options:
        raise FaultSpecError("a fault rule needs 'ops'")
    ops = options["ops"]
    if isinstance(ops, str) or not isinstance(ops, Sequence):
        raise FaultSpecError("'ops' must be a list of operation names")
    count = options.get("count")
    if options.get("once"):
        if count not in (None, 1):
            raise FaultSpecError("'once' and 'count' contradict each other")
        count = 1
    try:
        delay = float(options.get("delay", 0.0))
        default_error = None if delay else _errno.EIO
        return FaultSpec(
            ops=parse_ops(ops),
            error=parse_errno(options["errno"]) if "errno" in options else default_error,
            probability=float(options.get("probability", 1.0)),
            ranges=tuple((_whole(s), _whole(e)) for s, e in options.get("ranges", ())),
            after=_whole(options.get("after", 0)), count=None if count is None else _whole(count),
            delay=delay, partial=bool(options.get("partial", False)),
            seed=_whole(options.get("seed", 0)),
        )
    except FaultSpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise FaultSpecError(f"bad fault rule value: {exc}") from None


def _whole(value: Any) -> int:
    """An integer option: ``3`` or ``3.0``, never ``2.5`` silently cut."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise FaultSpecError(f"not a whole number: {value!r}")
    return int(value)


def blkdebug_spec(rule: Mapping[str, Any]) -> FaultSpec:
    """QEMU's ``BlkdebugInjectErrorOptions`` (already schema-checked) as a rule."""
    event = rule["event"]
    armed_by = BLKDEBUG_EVENT_OPS.get(event)
    if armed_by is None:
        raise FaultSpecError(
            f"blkdebug event '{event}' is not supported: it belongs to QEMU's own format "
            f"drivers (supported: {', '.join(BLKDEBUG_EVENT_OPS)})"
        )
    state = rule.get("state")
    if state is not None and state != 1:
        # Without set-state rules the state stays 1 forever: the rule could never fire.
        raise FaultSpecError("blkdebug 'state' other than 1 needs set-state, which is not supported")
    ops = frozenset({rule["iotype"]}) if "iotype" in rule else frozenset(OPS)
    sector = rule.get("sector", -1)
    ranges = () if sector == -1 else ((sector * SECTOR, sector * SECTOR + 1),)
    if sector < -1:
        raise FaultSpecError(f"sector must be -1 or a sector number, not {sector}")
    error = rule.get("errno", _errno.EIO)
    if error <= 0:
        # blkdebug with errno 0 injects nothing: such a rule is a no-op, refuse it.
        raise FaultSpecError("blkdebug errno must be positive")
    return FaultSpec(
        ops=ops, error=error, ranges=ranges, count=1 if rule.get("once", False) else None,
        armed_by=None if event == "none" else armed_by, immediately=rule.get("immediately", False),
    )


@dataclass(eq=False)
class FaultRule:
    """A spec with its counters: how many covered requests it saw, how often it fired."""

    spec: FaultSpec
    seen: int = 0
    fired: int = 0
    armed: bool = False
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.spec.seed)
        self.armed = self.spec.armed_by is None

    @property
    def spent(self) -> bool:
        return self.spec.count is not None and self.fired >= self.spec.count

    def covers(self, op: str, offset: int, length: int) -> bool:
        spec = self.spec
        if op not in spec.ops:
            return False
        if not spec.ranges:
            return True
        if op == "flush":
            return False
        end = offset + max(length, 1)
        return any(s < end and offset < e for s, e in spec.ranges)

    def may_fire(self, op: str, offset: int, length: int) -> bool:
        """Whether this request could be counted or fail here (the fast paths ask)."""
        if self.spent:
            return False
        if not self.armed:  # arming is counted too, whatever the range
            return op in (self.spec.armed_by or ())
        return self.covers(op, offset, length)

    def decide(self, op: str, offset: int, length: int) -> bool:
        """Count one request and say whether the rule fires for it."""
        spec = self.spec
        if not self.armed and op in (spec.armed_by or ()):
            self.armed = True
        if not self.armed or self.spent or not self.covers(op, offset, length):
            return False
        self.seen += 1
        if self.seen <= spec.after:
            return False
        if spec.probability < 1.0 and self.rng.random() >= spec.probability:
            return False
        self.fired += 1
        return True


class FaultInjector(Layer):
    """The fault layer: see the module docstring."""

    def __init__(self, name: str, child: BlockNode, specs: Iterable[FaultSpec] = (), *,
                 read_only: bool = False) -> None:
        super().__init__(name, child)
        self.rules = [FaultRule(spec) for spec in specs]
        self._read_only = read_only
        self.injected = 0
        """Requests failed so far (delays alone are not counted)."""

    @property
    def read_only(self) -> bool:
        return self._read_only or self.child.read_only

    def add(self, spec: FaultSpec) -> None:
        self.rules.append(FaultRule(spec))

    # -- the decision -----------------------------------------------------------------
    def _may_fault(self, op: str, offset: int, length: int) -> bool:
        return any(rule.may_fire(op, offset, length) for rule in self.rules)

    async def _check(self, op: str, offset: int, length: int) -> FaultSpec | None:
        """Count the request in every rule; sleep the delays; return the failing rule."""
        failing: FaultSpec | None = None
        delay = 0.0
        for rule in self.rules:
            if rule.decide(op, offset, length):
                delay += rule.spec.delay
                if failing is None and rule.spec.error is not None:
                    failing = rule.spec
        if delay:
            await trio.sleep(delay)
        if failing is not None and not failing.immediately:
            await trio.lowlevel.checkpoint()
        return failing

    def _error(self, spec: FaultSpec, op: str, offset: int, length: int) -> OSError:
        assert spec.error is not None
        self.injected += 1
        log.debug("fault node '%s': %s at %d+%d fails with %s", self.name, op, offset, length,
                  _errno.errorcode.get(spec.error, spec.error))
        return OSError(spec.error, f"{os.strerror(spec.error)} (injected by fault node '{self.name}')")

    async def _gate(self, op: str, offset: int, length: int) -> None:
        """For requests that cannot be torn: fail before passing down."""
        if self.rules:
            failing = await self._check(op, offset, length)
            if failing is not None:
                raise self._error(failing, op, offset, length)

    @staticmethod
    def _torn_length(length: int) -> int:
        return (length // 2) // PARTIAL_ALIGN * PARTIAL_ALIGN

    # -- data path --------------------------------------------------------------------
    async def read(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment]:
        await self._gate("read", offset, len(buf))
        return await self.child.read(offset, buf, sparse=sparse)

    def read_nowait(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment] | None:
        if self._may_fault("read", offset, len(buf)):
            return None
        return self.child.read_nowait(offset, buf, sparse=sparse)

    def sendfile_map(
        self, offset: int, length: int, *, sparse: bool = False
    ) -> tuple[int, list[Segment]] | None:
        if self._may_fault("read", offset, length):
            return None
        return self.child.sendfile_map(offset, length, sparse=sparse)

    async def write(self, offset: int, data: memoryview, *, fua: bool = False) -> None:
        failing = await self._check("write", offset, len(data)) if self.rules else None
        if failing is not None:
            torn = self._torn_length(len(data)) if failing.partial else 0
            if torn:
                await self.child.write(offset, data[:torn])
            raise self._error(failing, "write", offset, len(data))
        await self.child.write(offset, data, fua=fua)

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        if self._may_fault("write", offset, len(data)):
            return False
        return self.child.write_nowait(offset, data)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fua: bool = False, fast: bool = False
    ) -> None:
        failing = await self._check("write-zeroes", offset, length) if self.rules else None
        if failing is not None:
            torn = self._torn_length(length) if failing.partial else 0
            if torn:
                await self.child.write_zeroes(offset, torn, may_trim=may_trim, fast=fast)
            raise self._error(failing, "write-zeroes", offset, length)
        await self.child.write_zeroes(offset, length, may_trim=may_trim, fua=fua, fast=fast)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._gate("discard", offset, length)
        await self.child.trim(offset, length, fua=fua)

    async def flush(self) -> None:
        await self._gate("flush", 0, 0)
        await self.child.flush()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        await self._gate("block-status", offset, length)
        return await self.child.block_status(offset, length)
