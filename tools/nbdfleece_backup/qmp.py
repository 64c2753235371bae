"""A small trio QMP client: one command at a time, events kept for whoever waits for them.

QEMU and nbdfleece both end every message with a newline, so messages are
read line by line.  Events that arrive before a reply are appended to
:attr:`Qmp.events`; :meth:`Qmp.wait_event` looks there first, then reads on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import trio

from nbdfleece_backup.errors import BackupError

MAX_LINE = 64 << 20


class QmpError(BackupError):
    """The monitor answered a command with an error."""

    def __init__(self, command: str, desc: str, error_class: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.desc = desc
        self.error_class = error_class


def parse_address(address: str) -> tuple[str, str | tuple[str, int]]:
    """``unix:PATH``, a socket path, or ``HOST:PORT`` -> ("unix", path) or ("tcp", (host, port))."""
    if address.startswith("unix:"):
        return "unix", address[5:]
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and "/" not in address:
        return "tcp", (host.strip("[]") or "127.0.0.1", int(port))
    return "unix", address


class Qmp:
    """A connected, negotiated QMP session (``async with await Qmp.connect(...)``)."""

    def __init__(self, stream: trio.abc.Stream, address: str) -> None:
        self._stream = stream
        self.address = address
        self._buffer = bytearray()
        self._ids = 0
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}

    @classmethod
    async def connect(cls, address: str, timeout: float = 30.0) -> Qmp:
        kind, where = parse_address(address)
        try:
            with trio.fail_after(timeout):
                if kind == "unix":
                    assert isinstance(where, str)
                    stream: trio.abc.Stream = await trio.open_unix_socket(os.fspath(where))
                else:
                    assert isinstance(where, tuple)
                    stream = await trio.open_tcp_stream(*where)
                qmp = cls(stream, address)
                greeting = await qmp._receive()
                if "QMP" not in greeting:
                    raise BackupError(f"{address} is not a QMP monitor")
                qmp.greeting = greeting
                await qmp.execute("qmp_capabilities")
                return qmp
        except trio.TooSlowError:
            raise BackupError(f"cannot reach the QMP monitor at {address}: "
                              f"no answer in {timeout:g} s") from None
        except OSError as exc:
            raise BackupError(f"cannot reach the QMP monitor at {address}: {exc.strerror or exc}") from None

    async def __aenter__(self) -> Qmp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def _receive(self) -> dict[str, Any]:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except ValueError:
                    raise BackupError(f"QMP monitor at {self.address} sent malformed JSON") from None
                if not isinstance(message, dict):
                    raise BackupError(f"QMP monitor at {self.address} sent a non-object")
                return message
            if len(self._buffer) > MAX_LINE:
                raise BackupError(f"QMP monitor at {self.address} sent an endless message")
            try:
                data = await self._stream.receive_some(65536)
            except (OSError, trio.BrokenResourceError) as exc:
                raise BackupError(f"lost the QMP monitor at {self.address}: {exc}") from None
            if not data:
                raise BackupError(f"the QMP monitor at {self.address} closed the connection "
                                  "(did the server stop?)")
            self._buffer += data

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run ``command``; raises :class:`QmpError` with the monitor's ``desc``."""
        self._ids += 1
        request: dict[str, Any] = {"execute": command, "id": self._ids}
        if arguments:
            request["arguments"] = arguments
        try:
            await self._stream.send_all(json.dumps(request).encode() + b"\n")
        except (OSError, trio.BrokenResourceError) as exc:
            raise BackupError(f"lost the QMP monitor at {self.address}: {exc}") from None
        while True:
            message = await self._receive()
            if "event" in message:
                self.events.append(message)
                continue
            if message.get("id") != self._ids:
                continue  # a reply to an earlier, abandoned request
            if "error" in message:
                error = message["error"]
                raise QmpError(command, str(error.get("desc", error)), str(error.get("class", "")))
            return message.get("return")

    async def wait_event(self, name: str, match: Callable[[dict[str, Any]], bool],
                         timeout: float) -> dict[str, Any] | None:
        """The first event ``name`` whose ``data`` satisfies ``match`` (consumed), None on timeout."""
        with trio.move_on_after(timeout):
            while True:
                for i, event in enumerate(self.events):
                    if event.get("event") == name and match(event.get("data") or {}):
                        del self.events[i]
                        return event
                message = await self._receive()
                if "event" in message:
                    self.events.append(message)
        return None
