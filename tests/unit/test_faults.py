"""The fault-injection layer in-process: rules, their counters, the fast paths, the
errno mapping, and the three ways in (``--fault``, ``[[fault]]``, QMP ``blockdev-add``).

Stores are ``MemoryStore``s, so every byte a failed request may have written can be
checked; time runs on trio's autojump clock where delays are involved.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import trio

from nbdfleece.bitmap import DirtyBitmap
from nbdfleece.block.faults import (
    OPS,
    FaultInjector,
    FaultSpec,
    FaultSpecError,
    blkdebug_spec,
    parse_errno,
    parse_ops,
    spec_from_options,
)
from nbdfleece.block.memory import MemoryStore
from nbdfleece.block.node import Segment
from nbdfleece.block.tracking import DirtyTracking
from nbdfleece.config import load_file, parse_fault_spec
from nbdfleece.constants import Errno
from nbdfleece.daemon import Daemon
from nbdfleece.errors import ConfigError, nbd_errno
from nbdfleece.exports import ExportRegistry
from nbdfleece.qmp.commands import execute
from nbdfleece.qmp.schema import QmpError
from nbdfleece.server import Server

SIZE = 1 << 20
K = 1024


class FastStore(MemoryStore):
    """A memory store with the synchronous fast paths, counting their use."""

    def __init__(self, name: str, size: int) -> None:
        super().__init__(name, size)
        self.fast_reads = 0
        self.fast_writes = 0

    def read_nowait(self, offset: int, buf: memoryview, *, sparse: bool = False) -> list[Segment] | None:
        self.fast_reads += 1
        buf[:] = self.data[offset : offset + len(buf)]
        return [Segment(0, len(buf), False)]

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        self.fast_writes += 1
        self.data[offset : offset + len(data)] = data
        return True

    def sendfile_map(self, offset: int, length: int, *, sparse: bool = False
                     ) -> tuple[int, list[Segment]] | None:
        return 99, [Segment(0, length, False)]


def layer(*specs: FaultSpec) -> tuple[FaultInjector, FastStore]:
    store = FastStore("store", SIZE)
    return FaultInjector("faulty", store, specs), store


def rule(*ops: str, **options: Any) -> FaultSpec:
    return spec_from_options({"ops": list(ops), **options})


async def outcome(coro: Any) -> int:
    """0 when the request succeeded, else the errno it failed with."""
    try:
        await coro
    except OSError as exc:
        assert exc.errno is not None
        return exc.errno
    return 0


def data(n: int, byte: int = 0xAB) -> memoryview:
    return memoryview(bytes([byte]) * n)


# -- parsing ---------------------------------------------------------------------------


def test_errno_names_and_numbers() -> None:
    assert parse_errno("EIO") == errno.EIO
    assert parse_errno("enospc") == errno.ENOSPC
    assert parse_errno("EDQUOT") == errno.EDQUOT
    assert parse_errno("28") == 28
    assert parse_errno(5) == 5
    for bad in ("EWHATEVER", "IO", "0", -3, "", True):
        with pytest.raises(FaultSpecError):
            parse_errno(bad)


def test_operation_names() -> None:
    assert parse_ops(["zero", "trim"]) == {"write-zeroes", "discard"}
    assert parse_ops(["all"]) == set(OPS)
    assert parse_ops(["status", "read"]) == {"block-status", "read"}
    with pytest.raises(FaultSpecError, match="unknown operation"):
        parse_ops(["cache"])
    with pytest.raises(FaultSpecError):
        parse_ops([])


@pytest.mark.parametrize("options, message", [
    ({"ops": ["write"], "probability": 1.5}, "probability"),
    ({"ops": ["write"], "probability": float("nan")}, "probability"),
    ({"ops": ["write"], "ranges": [(10, 10)]}, "range"),
    ({"ops": ["write"], "after": -1}, "after"),
    ({"ops": ["write"], "count": 0}, "count"),
    ({"ops": ["write"], "once": True, "count": 3}, "contradict"),
    ({"ops": ["write"], "delay": -1}, "delay"),
    ({"ops": ["write"], "unknown": 1}, "unknown"),
    ({"errno": "EIO"}, "ops"),
    ({"ops": "write"}, "list"),
    ({"ops": ["write"], "after": "many"}, "not a whole number"),
    ({"ops": ["write"], "count": 2.5}, "not a whole number"),
    ({"ops": ["write"], "probability": "x"}, "bad fault rule value"),
])
def test_invalid_rules(options: dict[str, Any], message: str) -> None:
    with pytest.raises(FaultSpecError, match=message):
        spec_from_options(options)


def test_default_errno_is_eio_unless_only_a_delay() -> None:
    assert rule("write").error == errno.EIO
    assert rule("write", delay=0.5).error is None
    assert rule("write", delay=0.5, errno="ENOSPC").error == errno.ENOSPC
    assert rule("read", once=True).count == 1


def test_cli_fault_spec() -> None:
    fc = parse_fault_spec("live:write+zero,errno=ENOSPC,p=0.25,range=1M-2M,range=4K+4K,after=3,"
                          "count=2,seed=9,partial")
    assert fc.node == "live"
    spec = fc.spec
    assert spec.ops == {"write", "write-zeroes"} and spec.error == errno.ENOSPC
    assert spec.probability == 0.25 and spec.ranges == ((1 << 20, 2 << 20), (4096, 8192))
    assert (spec.after, spec.count, spec.seed, spec.partial) == (3, 2, 9, True)
    assert parse_fault_spec("demo:flush,once").spec.count == 1
    assert parse_fault_spec("demo:all,delay=0.01").spec.error is None
    assert spec.describe() == ("write+write-zeroes,errno=ENOSPC,p=0.25,range=1048576-2097152,"
                               "range=4096-8192,after=3,count=2,seed=9,partial")
    for bad in ("live", "live:", ":write", "live:write,p=x", "live:write,p=0.1,p=0.2",
                "live:write,errno=EBOGUS", "live:write,range=5", "live:write,bogus",
                "live:read,range=2M-1M", "live:write,once=1"):
        with pytest.raises(ConfigError):
            parse_fault_spec(bad)


def test_toml_fault_tables(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[[export]]\nname = "live"\npath = "live.raw"\n'
        '[[fault]]\nnode = "live"\nops = ["write", "flush"]\nerrno = "ENOSPC"\n'
        'probability = 0.5\nranges = ["0-64K"]\nseed = 3\n'
        '[[fault]]\nnode = "live"\nops = "read"\ndelay = 0.25\n'
    )
    faults = load_file(str(cfg)).faults
    assert [f.node for f in faults] == ["live", "live"]
    assert faults[0].spec == FaultSpec(frozenset({"write", "flush"}), errno.ENOSPC, 0.5,
                                       ((0, 65536),), seed=3)
    assert faults[1].spec.error is None and faults[1].spec.delay == 0.25
    cfg.write_text('[[fault]]\nnode = "live"\nops = ["write"]\nprobability = 2\n')
    with pytest.raises(ConfigError, match="probability"):
        load_file(str(cfg))
    cfg.write_text('[[fault]]\nops = ["write"]\n')
    with pytest.raises(ConfigError, match="needs a node"):
        load_file(str(cfg))


def test_blkdebug_rules() -> None:
    spec = blkdebug_spec({"event": "write_aio", "iotype": "write", "errno": 28, "sector": 8,
                          "once": True})
    assert spec.ops == {"write"} and spec.error == 28 and spec.ranges == ((4096, 4097),)
    assert spec.count == 1 and spec.armed_by == frozenset({"write"}) and not spec.immediately
    assert blkdebug_spec({"event": "none"}).armed_by is None
    assert blkdebug_spec({"event": "none"}).ops == set(OPS)
    assert blkdebug_spec({"event": "pwritev"}).error == errno.EIO
    with pytest.raises(FaultSpecError, match="not supported"):
        blkdebug_spec({"event": "l2_load"})
    with pytest.raises(FaultSpecError, match="set-state"):
        blkdebug_spec({"event": "none", "state": 2})
    with pytest.raises(FaultSpecError, match="positive"):
        blkdebug_spec({"event": "none", "errno": 0})


# -- behaviour ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, nbd", [("EIO", Errno.EIO), ("ENOSPC", Errno.ENOSPC),
                                       ("EDQUOT", Errno.ENOSPC), ("ENOENT", Errno.EIO),
                                       ("EPERM", Errno.EPERM)])
async def test_injected_errors_map_through_nbd_errno(name: str, nbd: Errno) -> None:
    node, _ = layer(rule("write", errno=name))
    with pytest.raises(OSError) as info:
        await node.write(0, data(512))
    assert nbd_errno(info.value) == nbd
    assert "injected by fault node 'faulty'" in str(info.value)
    assert node.injected == 1


async def test_each_operation_is_chosen_separately() -> None:
    for op in OPS:
        node, _ = layer(rule(op))
        results = {
            "read": await outcome(node.read(0, memoryview(bytearray(512)))),
            "write": await outcome(node.write(0, data(512))),
            "write-zeroes": await outcome(node.write_zeroes(0, 512, may_trim=True)),
            "discard": await outcome(node.trim(0, 512)),
            "flush": await outcome(node.flush()),
            "block-status": await outcome(node.block_status(0, 512)),
        }
        assert results == {name: errno.EIO if name == op else 0 for name in OPS}, op
        assert await outcome(node.cache(0, 512)) == 0  # not an operation rules can choose


async def test_after_and_count() -> None:
    node, store = layer(rule("write", after=2, count=3))
    results = [await outcome(node.write(i * 512, data(512, i + 1))) for i in range(8)]
    assert results == [0, 0, errno.EIO, errno.EIO, errno.EIO, 0, 0, 0]
    for i in range(8):  # failed writes did not reach the store
        expected = 0 if 2 <= i <= 4 else i + 1
        assert store.data[i * 512] == expected
    assert node.rules[0].seen == 5 and node.rules[0].fired == 3


async def test_ranges() -> None:
    node, _ = layer(rule("read", "write", "flush", ranges=[(8192, 12288)]))
    assert await outcome(node.write(0, data(8192))) == 0           # ends right before
    assert await outcome(node.write(12288, data(512))) == 0        # starts right after
    assert await outcome(node.write(8191, data(2))) == errno.EIO   # one byte inside
    assert await outcome(node.read(12287, memoryview(bytearray(10)))) == errno.EIO
    assert await outcome(node.flush()) == 0                        # a flush has no range


async def test_probability_is_seeded() -> None:
    async def pattern(seed: int) -> list[int]:
        node, _ = layer(rule("write", probability=0.3, seed=seed))
        return [await outcome(node.write(0, data(512))) for _ in range(400)]

    first, again, other = await pattern(5), await pattern(5), await pattern(6)
    assert first == again
    assert first != other
    failures = sum(1 for r in first if r)
    assert 80 <= failures <= 160  # 400 draws at p=0.3: 120 +- 4.3 standard deviations
    node, _ = layer(rule("write", probability=0.0))
    assert [await outcome(node.write(0, data(1))) for _ in range(50)] == [0] * 50


async def test_rules_are_independent_and_first_error_wins() -> None:
    node, _ = layer(rule("write", errno="ENOSPC", after=1), rule("write", errno="EIO"))
    assert await outcome(node.write(0, data(1))) == errno.EIO
    assert await outcome(node.write(0, data(1))) == errno.ENOSPC
    assert [r.seen for r in node.rules] == [2, 2]


async def test_partial_write_reaches_the_disk_before_the_error() -> None:
    node, store = layer(rule("write", "write-zeroes", partial=True, count=2))
    store.data[:] = b"\x11" * SIZE
    assert await outcome(node.write(4096, data(8192, 0xEE))) == errno.EIO
    assert store.data[4096 : 4096 + 4096] == b"\xee" * 4096
    assert store.data[8192 : 8192 + 4096] == b"\x11" * 4096
    assert await outcome(node.write_zeroes(65536, 3000, may_trim=False)) == errno.EIO
    assert store.data[65536 : 65536 + 1024] == bytes(1024)  # 1500 rounded down to 512
    assert store.data[65536 + 1024 : 65536 + 3000] == b"\x11" * (3000 - 1024)
    assert await outcome(node.write(0, data(100, 0x22))) == 0  # count spent


async def test_fast_paths_defer_to_the_slow_path_while_a_rule_may_fire() -> None:
    node, store = layer(rule("write", "read", ranges=[(0, 4096)], count=1))
    buf = memoryview(bytearray(512))
    assert node.write_nowait(0, data(512)) is False
    assert node.read_nowait(0, buf) is None
    assert node.sendfile_map(0, 512) is None
    assert store.fast_writes == store.fast_reads == 0
    # outside the rule's range the fast paths pass through
    assert node.write_nowait(8192, data(512)) is True
    assert node.read_nowait(8192, buf) is not None
    assert node.sendfile_map(8192, 512) == (99, [Segment(0, 512, False)])
    assert store.fast_writes == store.fast_reads == 1
    # the slow path decides (and spends the rule); afterwards the fast path is free again
    assert await outcome(node.write(0, data(512))) == errno.EIO
    assert node.write_nowait(0, data(512)) is True
    assert node.read_nowait(0, buf) is not None


async def test_failed_writes_are_marked_dirty_above_the_fault_layer() -> None:
    node, _ = layer(rule("write", "write-zeroes", "discard"))
    tracking = DirtyTracking("live", node)
    bitmap = DirtyBitmap("b", SIZE, 4096)
    tracking.bitmaps["b"] = bitmap
    assert tracking.write_nowait(0, data(100)) is False  # fast path: marked, then refused
    assert await outcome(tracking.write(16384, data(8192))) == errno.EIO
    assert await outcome(tracking.write_zeroes(65536, 4096, may_trim=True)) == errno.EIO
    assert await outcome(tracking.trim(131072, 1)) == errno.EIO
    dirty = [i for i in range(SIZE // 4096) if bitmap.bits[i]]
    assert dirty == [0, 4, 5, 16, 32]


async def test_delay_only(autojump_clock: trio.testing.MockClock) -> None:
    node, store = layer(rule("write", delay=2.5, count=1))
    t0 = trio.current_time()
    assert await outcome(node.write(0, data(10, 7))) == 0
    assert trio.current_time() - t0 == pytest.approx(2.5)
    assert store.data[:10] == b"\x07" * 10 and node.injected == 0
    t1 = trio.current_time()
    await node.write(0, data(10))
    assert trio.current_time() == t1


async def test_blkdebug_event_arms_the_rule() -> None:
    # armed by the first write, fails reads from then on (the write itself passes)
    node, _ = layer(blkdebug_spec({"event": "write_aio", "iotype": "read", "errno": 28}))
    buf = memoryview(bytearray(512))
    assert await outcome(node.read(0, buf)) == 0
    assert node.read_nowait(0, buf) is not None  # not armed, not armable by a read
    assert node.write_nowait(SIZE - 512, data(512)) is False  # a write must go slow to arm it
    assert await outcome(node.write(SIZE - 512, data(512))) == 0
    assert await outcome(node.read(0, buf)) == errno.ENOSPC
    assert node.read_nowait(0, buf) is None
    # sector + once: only a request covering that byte, only once
    node, _ = layer(blkdebug_spec({"event": "none", "iotype": "write", "sector": 3, "once": True}))
    assert await outcome(node.write(0, data(1536))) == 0
    assert await outcome(node.write(1000, data(1000))) == errno.EIO
    assert await outcome(node.write(1000, data(1000))) == 0


# -- graph and QMP -------------------------------------------------------------------------


def make_daemon(tmp_path: Path) -> Daemon:
    return Daemon(Server(ExportRegistry()), str(tmp_path / "data"))


async def test_cli_rules_go_into_one_layer_under_the_tracking_layer(tmp_path: Path) -> None:
    image = tmp_path / "live.raw"
    image.write_bytes(bytes(SIZE))
    daemon = make_daemon(tmp_path)
    node = daemon.graph.add_file("live", str(image))
    first = daemon.graph.insert_fault(node, rule("write"))
    second = daemon.graph.insert_fault(node, rule("read", errno="ENOSPC"))
    assert first is second and node.top.child is first and len(first.rules) == 2
    assert await outcome(node.top.read(0, memoryview(bytearray(4)))) == errno.ENOSPC
    await daemon.close()


async def qmp(daemon: Daemon, name: str, args: dict[str, Any]) -> Any:
    return await execute(daemon, name, args)


async def test_qmp_fault_drivers(tmp_path: Path) -> None:
    image = tmp_path / "t.raw"
    image.write_bytes(bytes(SIZE))
    daemon = make_daemon(tmp_path)
    await qmp(daemon, "blockdev-add", {"driver": "file", "node-name": "tf", "filename": str(image)})
    await qmp(daemon, "blockdev-add", {
        "driver": "x-nbdfleece-fault", "node-name": "f", "image": "tf",
        "rules": [{"ops": ["write"], "errno": "ENOSPC", "ranges": [{"offset": 4096, "length": 1}],
                   "once": True}],
    })
    node = daemon.graph.node("f")
    assert node.driver == "x-nbdfleece-fault" and daemon.graph.node("tf").users == 1
    assert await outcome(node.top.write(0, data(8192))) == errno.ENOSPC
    assert await outcome(node.top.write(0, data(8192))) == 0
    await qmp(daemon, "blockdev-add", {
        "driver": "blkdebug", "node-name": "bd",
        "image": {"driver": "file", "filename": str(image), "read-only": True},
        "inject-error": [{"event": "read_aio", "errno": 5}], "read-only": True,
    })
    assert await outcome(daemon.graph.node("bd").top.read(0, memoryview(bytearray(8)))) == errno.EIO
    assert daemon.graph.node("bd").top.read_only
    errors: dict[str, list[tuple[dict[str, Any], str]]] = {
        "x-nbdfleece-fault": [
            ({"image": "tf", "rules": [{"ops": ["write"], "probability": "high"}]},
             "Invalid parameter type for 'rules[0].probability', expected: number"),
            ({"image": "tf", "rules": [{"ops": ["writes"]}]},
             "Parameter 'null' does not accept value 'writes'"),
            ({"image": "tf", "rules": [{"ops": ["write"], "errno": "EBOGUS"}]},
             "x-nbdfleece-fault: unknown errno name 'EBOGUS'"),
            ({"image": "tf", "rules": [{"ops": ["write"], "ranges": [{"offset": 1, "length": 0}]}]},
             "x-nbdfleece-fault: empty or negative range 1-1"),
            ({"image": "nowhere", "rules": []},
             "Cannot find device='nowhere' nor node-name='nowhere'"),
            ({"rules": []}, "Parameter 'image' is missing"),
        ],
        "blkdebug": [
            ({"image": "tf", "inject-error": [{"event": "l1_update"}]},
             "blkdebug: blkdebug event 'l1_update' is not supported"),
            ({"image": "tf", "inject-error": [{"event": "bogus"}]},
             "Parameter 'event' does not accept value 'bogus'"),
            ({"image": "tf", "inject-error": [{"event": "none", "iotype": "cache"}]},
             "Parameter 'iotype' does not accept value 'cache'"),
            ({"image": "tf", "config": "/etc/blkdebug.conf"}, "Parameter 'config' is unexpected"),
        ],
    }
    for driver, cases in errors.items():
        for args, text in cases:
            with pytest.raises(QmpError) as info:
                await qmp(daemon, "blockdev-add", {"driver": driver, "node-name": "x", **args})
            assert info.value.desc.startswith(text), (args, info.value.desc)
    assert "x" not in daemon.graph.nodes
    await qmp(daemon, "blockdev-del", {"node-name": "f"})
    assert daemon.graph.node("tf").users == 0
    await daemon.close()
