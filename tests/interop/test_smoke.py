"""The smallest end-to-end check: nbdinfo sees the export over TCP and Unix."""

from __future__ import annotations

from tests.conftest import ServerProcess, require, run


def test_nbdinfo_size_tcp_and_unix(live_server: ServerProcess) -> None:
    require("nbdinfo")
    assert run(["nbdinfo", "--size", live_server.uri("live")]).stdout.strip() == "67108864"
    assert run(["nbdinfo", "--size", live_server.unix_uri("live")]).stdout.strip() == "67108864"
