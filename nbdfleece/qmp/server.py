"""Placeholder replaced by the QMP implementation (in progress)."""

from __future__ import annotations

import trio

from nbdfleece.daemon import Daemon


async def serve_qmp(
    daemon: Daemon, address: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    raise NotImplementedError("QMP is being written")
