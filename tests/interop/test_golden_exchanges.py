"""Every exchange of protocol/vectors/exchanges.json against the real server.

Client steps are sent in random fragments; server steps must arrive byte for
byte (error message texts are free, see ``check_s2c``).
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProcess, make_image
from tests.unit.test_golden import EXCHANGES, SCENARIOS


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"server closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_step(sock: socket.socket, step: dict[str, Any]) -> None:
    if "hex" in step:
        want = bytes.fromhex(step["hex"])
        assert recv_exact(sock, len(want)) == want, step["note"]
        return
    prefix = bytes.fromhex(step["hex_prefix"])
    assert recv_exact(sock, len(prefix)) == prefix, step["note"]
    (length,) = struct.unpack(">I", recv_exact(sock, 4))
    body = recv_exact(sock, length)
    if "error" in step:
        error, msglen = struct.unpack_from(">IH", body)
        assert error == step["error"], step["note"]
        assert msglen == length - 6
        body = body[6:]
    assert 1 <= len(body) <= 4096
    body.decode("utf-8")


def send_step(sock: socket.socket, step: dict[str, Any], rng: random.Random) -> None:
    """Send a ``c2s`` step in random pieces: the server must not depend on how bytes arrive."""
    data = bytes.fromhex(step["hex"])
    while data:
        n = rng.randint(1, max(1, len(data)))
        sock.sendall(data[:n])
        data = data[n:]


@pytest.fixture
def vector_server(server_factory: Any, tmp_path: Path) -> ServerProcess:
    args = []
    for e in EXCHANGES["exports"]:
        image = make_image(tmp_path / f"{e['name']}.raw", e["size"])
        spec = f"{e['name']}={image}"
        if not e["writable"]:
            spec += ",readonly"
        if e["description"]:
            spec += f",description={e['description']}"
        args += ["--export", spec]
    server: ServerProcess = server_factory(*args)
    return server


@pytest.mark.interop
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s["name"] for s in SCENARIOS])
def test_exchange_against_server(vector_server: ServerProcess, scenario: dict[str, Any]) -> None:
    rng = random.Random(scenario["name"])
    with vector_server.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(10)
        for step in scenario["steps"]:
            if step["dir"] == "c2s":
                try:
                    send_step(sock, step, rng)
                except (BrokenPipeError, ConnectionResetError):
                    # The server may hang up as soon as it has seen enough of a bad last
                    # step (x6: four bytes that are not the request magic), before the rest.
                    assert step is scenario["steps"][-1] and scenario["end"] == "server_closes"
                    break
            else:
                read_step(sock, step)
        if scenario["end"] == "server_closes":
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b"", "server sent more than the scenario expects"
