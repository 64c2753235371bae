"""The QMP monitor's trio edge: listening socket, one task per client.

``serve_qmp(daemon, "unix:PATH")`` (socket created mode 0600) or
``serve_qmp(daemon, "127.0.0.1:4444")`` (loopback only: QMP has no
authentication, so anyone who can connect controls the daemon).

Each client gets a reader (bytes -> :class:`QmpSession` -> commands) and a
writer draining an outbound queue, so replies and events leave in the order
they were produced.  Commands of all clients run one at a time under a lock
per daemon, shielded from cancellation, as QEMU runs them in its main loop.
A client that fails or vanishes only ends its own task; a client that stops
reading while events pile up is disconnected rather than buffered forever.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import logging
import os
import reprlib
import socket as _stdsocket
import stat
import weakref
from typing import Any

import trio

from nbdfleece.daemon import Daemon
from nbdfleece.errors import ConfigError
from nbdfleece.qmp.commands import PACKAGE, execute
from nbdfleece.qmp.protocol import Closed, NeedData, QmpSession
from nbdfleece.qmp.schema import QmpError
from nbdfleece.server import parse_host_port

log = logging.getLogger(__name__)

RECEIVE_SIZE = 65536
OUTBOUND_QUEUE = 1024
"""Replies and events waiting for a slow client; an event beyond this disconnects it."""
DRAIN_GRACE = 5.0
"""Seconds to finish sending replies after the client stopped sending."""

_command_locks: weakref.WeakKeyDictionary[Daemon, trio.Lock] = weakref.WeakKeyDictionary()
_client_ids = itertools.count(1)

_ARGS_REPR = reprlib.Repr()
"""Logs a command's arguments bounded: they may be 1 MiB or nested 1024 deep,
beyond what ``repr`` recurses into."""
_ARGS_REPR.maxlevel, _ARGS_REPR.maxdict, _ARGS_REPR.maxlist = 16, 64, 64
_ARGS_REPR.maxstring = _ARGS_REPR.maxother = 256


def command_lock(daemon: Daemon) -> trio.Lock:
    """One lock per daemon: all monitors' commands run one after another."""
    lock = _command_locks.get(daemon)
    if lock is None:
        lock = _command_locks[daemon] = trio.Lock()
    return lock


# -- listening ------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unix_listener(path: str) -> _stdsocket.socket:
    if not path:
        raise ConfigError("QMP address unix: needs a path")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"QMP socket {path}: {exc.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"QMP socket {path}: exists and is not a socket; not replacing it")
        probe = _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
        try:
            if probe.connect_ex(path) == 0:
                raise ConfigError(f"QMP socket {path} is in use by another process")
        finally:
            probe.close()
        os.unlink(path)  # stale, left by a crash
    sock = _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # no window where the socket is accessible to others
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot create QMP socket {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return sock


def _tcp_listener(address: str) -> _stdsocket.socket:
    try:
        host, port = parse_host_port(address)
    except ValueError:
        raise ConfigError(f"QMP address must be unix:PATH or HOST:PORT, not {address!r}") from None
    try:
        infos = _stdsocket.getaddrinfo(host, port, type=_stdsocket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"QMP address {address}: {exc}") from None
    if not all(_is_loopback(str(info[4][0])) for info in infos):
        raise ConfigError(
            f"QMP address {address}: refusing to listen on non-loopback host {host!r} "
            "(QMP has no authentication; use 127.0.0.1, ::1 or a unix: socket)"
        )
    family, type_, proto, _, addr = infos[0]
    sock = _stdsocket.socket(family, type_, proto)
    try:
        sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
        if family == _stdsocket.AF_INET6:
            sock.setsockopt(_stdsocket.IPPROTO_IPV6, _stdsocket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen for QMP on {address}: {exc.strerror or exc}") from None
    return sock


def open_qmp_listener(address: str) -> trio.socket.SocketType:
    """A listening socket for a ``--qmp`` address; :class:`ConfigError` if refused."""
    sock = _unix_listener(address[5:]) if address.startswith("unix:") else _tcp_listener(address)
    sock.listen(16)
    sock.setblocking(False)
    return trio.socket.from_stdlib_socket(sock)


def _remove_socket_file(path: str, inode: int) -> None:
    """Unlink our socket file, unless something else has replaced it meanwhile."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


async def serve_qmp(
    daemon: Daemon, address: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve QMP on ``address`` until cancelled."""
    lsock = open_qmp_listener(address)
    unix_path = address[5:] if address.startswith("unix:") else None
    inode = os.lstat(unix_path).st_ino if unix_path is not None else 0
    listener = trio.SocketListener(lsock)
    monitor = Monitor(daemon)
    log.info("QMP monitor listening on %s", address if unix_path else _describe(lsock))
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.error("QMP accept: %s; retrying shortly", exc)
                        await trio.sleep(0.1)
                        continue
                    raise
                nursery.start_soon(monitor.serve_client, stream)
    finally:
        lsock.close()
        if unix_path is not None:
            _remove_socket_file(unix_path, inode)


def _describe(sock: trio.socket.SocketType) -> str:
    name = sock.getsockname()
    return f"[{name[0]}]:{name[1]}" if sock.family == _stdsocket.AF_INET6 else f"{name[0]}:{name[1]}"


# -- clients --------------------------------------------------------------------------


class Monitor:
    """Runs QMP sessions against one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.lock = command_lock(daemon)

    async def serve_client(self, stream: trio.SocketStream) -> None:
        cid = next(_client_ids)
        log.debug("qmp %d: connected", cid)
        session = QmpSession(PACKAGE)
        send_ch, recv_ch = trio.open_memory_channel[bytes](OUTBOUND_QUEUE)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop, cid, stream, recv_ch, nursery.cancel_scope)

                def deliver(event: dict[str, Any]) -> None:
                    data = session.encode_event(event)
                    if data is None:
                        return
                    try:
                        send_ch.send_nowait(data)
                    except trio.WouldBlock:
                        log.warning("qmp %d: client is not reading its events; disconnecting", cid)
                        session.close()
                        nursery.cancel_scope.cancel()
                    except (trio.ClosedResourceError, trio.BrokenResourceError):
                        pass

                unsubscribe = self.daemon.events.subscribe(deliver)
                try:
                    async with send_ch:
                        await self._read_loop(cid, stream, session, send_ch)
                finally:
                    unsubscribe()
                # Let the writer finish sending what is queued, within reason.
                nursery.cancel_scope.deadline = trio.current_time() + DRAIN_GRACE
        except Exception:
            log.exception("qmp %d: internal error; closing this client", cid)
        finally:
            await trio.aclose_forcefully(stream)
            log.debug("qmp %d: closed", cid)

    async def _read_loop(self, cid: int, stream: trio.SocketStream, session: QmpSession,
                         send_ch: trio.MemorySendChannel[bytes]) -> None:
        await send_ch.send(session.data_to_send())  # the greeting
        while True:
            try:
                data = await stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log.debug("qmp %d: receive failed: %s", cid, exc)
                return
            if not data:
                return
            session.receive_data(data)
            while True:
                event = session.next_event()
                out = session.data_to_send()
                if out:
                    await send_ch.send(out)
                if isinstance(event, NeedData):
                    break
                if isinstance(event, Closed):
                    log.warning("qmp %d: %s; disconnecting", cid, event.reason)
                    return
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("qmp %d: -> %s %s", cid, event.command, _ARGS_REPR.repr(event.arguments))
                with trio.CancelScope(shield=True):  # a command runs to completion
                    async with self.lock:
                        try:
                            result = await execute(self.daemon, event.command, event.arguments)
                        except QmpError as exc:
                            log.debug("qmp %d: <- error %s", cid, exc.desc)
                            session.send_error(event, exc.error_class, exc.desc)
                        except Exception as exc:
                            log.exception("qmp %d: command %s failed", cid, event.command)
                            session.send_error(event, "GenericError", f"internal error: {exc}")
                        else:
                            session.send_return(event, result)
                await send_ch.send(session.data_to_send())

    @staticmethod
    async def _write_loop(cid: int, stream: trio.SocketStream, recv_ch: trio.MemoryReceiveChannel[bytes],
                          scope: trio.CancelScope) -> None:
        async with recv_ch:
            try:
                async for data in recv_ch:
                    await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log.debug("qmp %d: send failed: %s", cid, exc)
                scope.cancel()  # the client is gone: stop reading too
