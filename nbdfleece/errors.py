"""Exception hierarchy, and the one place that maps failures to NBD errnos.

Each exception carries the wire code it turns into, so handlers never choose
an errno ad hoc::

    NbdfleeceError
    ├── ProtocolError        the peer broke a MUST: hard disconnect
    ├── OptionError          .rep: negotiation answers it and continues
    ├── RequestError         .errno: the request fails, the connection continues
    └── ConfigError          bad command line / config file
"""

from __future__ import annotations

import errno as _errno

from nbdfleece.constants import Errno, Rep


class NbdfleeceError(Exception):
    """Root of every error this package raises on purpose."""


class ProtocolError(NbdfleeceError):
    """The peer violated the protocol; the connection must be dropped."""


class OptionError(NbdfleeceError):
    """An option is refused with ``rep``; the handshake goes on."""

    def __init__(self, rep: Rep, message: str) -> None:
        super().__init__(message)
        self.rep = rep
        self.message = message


class RequestError(NbdfleeceError):
    """A transmission request fails with ``errno``; the connection goes on."""

    def __init__(self, errno: Errno, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message


class ConfigError(NbdfleeceError):
    """The command line or the configuration file is wrong."""


_OS_TO_NBD: dict[int, Errno] = {
    _errno.EPERM: Errno.EPERM,
    _errno.EACCES: Errno.EPERM,
    _errno.EROFS: Errno.EPERM,
    _errno.EIO: Errno.EIO,
    _errno.ENOMEM: Errno.ENOMEM,
    _errno.EINVAL: Errno.EINVAL,
    _errno.ENOSPC: Errno.ENOSPC,
    _errno.EDQUOT: Errno.ENOSPC,
    _errno.EFBIG: Errno.ENOSPC,
    _errno.EOVERFLOW: Errno.EOVERFLOW,
    _errno.EOPNOTSUPP: Errno.ENOTSUP,
    _errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_errno(exc: BaseException) -> Errno:
    """Map any failure of a request to the NBD errno sent to the client.

    OSError numbers outside the NBD set become EIO when they come from the
    storage (the data path failed), everything unexpected becomes EINVAL,
    the spec's default.
    """
    if isinstance(exc, RequestError):
        return exc.errno
    if isinstance(exc, OSError):
        if exc.errno is None:
            return Errno.EIO
        return _OS_TO_NBD.get(exc.errno, Errno.EIO)
    return Errno.EINVAL


def error_message(exc: BaseException) -> str:
    """A short human-readable text for an error chunk."""
    if isinstance(exc, RequestError):
        return exc.message
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"
