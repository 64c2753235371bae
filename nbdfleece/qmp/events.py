"""QMP events: ``{"event": NAME, "data": {...}, "timestamp": {...}}`` to every monitor.

The daemon owns one :class:`EventBroadcaster` (``daemon.events``); whoever
changes state calls ``emit_event`` and every QMP client in command mode gets
the event, in the order emitted and before the reply of the command that
caused it (as QEMU sends ``BLOCK_EXPORT_DELETED`` before the ``return`` of
``block-export-del``).

Subscribers are plain callables that must not block: the QMP server queues
the event for the client's writer task.  Pure module, no trio.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Event = dict[str, Any]
Subscriber = Callable[[Event], None]


def make_event(name: str, data: dict[str, Any] | None = None, *, now: float | None = None) -> Event:
    """An event object with QEMU's ``timestamp`` (seconds, microseconds since the epoch)."""
    stamp = time.time() if now is None else now
    seconds = int(stamp)
    event: Event = {"event": name}
    if data is not None:
        event["data"] = data
    event["timestamp"] = {"seconds": seconds, "microseconds": int((stamp - seconds) * 1_000_000)}
    return event


class EventBroadcaster:
    """Fan-out of events to the subscribed QMP clients."""

    def __init__(self) -> None:
        self._subscribers: dict[int, Subscriber] = {}
        self._next = 0

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Deliver every later event to ``subscriber``; returns the unsubscribe function."""
        key = self._next
        self._next += 1
        self._subscribers[key] = subscriber

        def unsubscribe() -> None:
            self._subscribers.pop(key, None)

        return unsubscribe

    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        event = make_event(name, data)
        log.debug("event %s %s", name, data)
        for subscriber in list(self._subscribers.values()):
            try:
                subscriber(event)
            except Exception:  # one broken client must not stop the others' events
                log.exception("event subscriber failed")

    def __len__(self) -> int:
        return len(self._subscribers)
