"""A minimal blocking QMP client for the command line (``nbdfleece snapshot ...``)."""

from __future__ import annotations

import json
import socket
from typing import Any

from nbdfleece.server import parse_host_port


class QmpClientError(Exception):
    """The monitor refused a command (``error.desc``) or could not be reached."""


class QmpClient:
    """Connects, negotiates capabilities, then runs commands one at a time."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        try:
            if address.startswith("unix:"):
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.settimeout(timeout)
                self._sock.connect(address[5:])
            else:
                self._sock = socket.create_connection(parse_host_port(address), timeout)
        except (OSError, ValueError) as exc:
            raise QmpClientError(f"cannot reach the QMP monitor at {address}: {exc}") from None
        self._file = self._sock.makefile("rb")
        greeting = self._receive()
        if "QMP" not in greeting:
            raise QmpClientError(f"{address} is not a QMP monitor")
        self.execute("qmp_capabilities")

    def _receive(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QmpClientError("the QMP monitor closed the connection")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command, "id": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._receive()
            if "event" in reply:
                continue
            if "error" in reply:
                raise QmpClientError(reply["error"].get("desc", str(reply["error"])))
            return reply.get("return")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
