"""The one errno mapping (``nbdfleece.errors.nbd_errno``) against QEMU 7.2's.

QEMU's ``system_errno_to_nbd_errno`` (nbd/server.c) is restated below; every
errno the platform knows is checked, so a mapping added or changed on either
side without updating the documented differences (protocol/nbd.md §5,
protocol/qmp.md "Deliberate differences") fails here.
"""

from __future__ import annotations

import errno

import pytest

from nbdfleece.constants import Errno
from nbdfleece.errors import RequestError, nbd_errno

QEMU_7_2: dict[int, Errno] = {
    errno.EPERM: Errno.EPERM,
    errno.EROFS: Errno.EPERM,
    errno.EIO: Errno.EIO,
    errno.ENOMEM: Errno.ENOMEM,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.ENOSPC: Errno.ENOSPC,
    errno.EOVERFLOW: Errno.EOVERFLOW,
    errno.ENOTSUP: Errno.ENOTSUP,
    errno.EOPNOTSUPP: Errno.ENOTSUP,
    errno.ESHUTDOWN: Errno.ESHUTDOWN,
    errno.EINVAL: Errno.EINVAL,
}
"""QEMU's explicit cases; everything else is NBD_EINVAL there."""

DELIBERATE: dict[int, Errno] = {errno.EACCES: Errno.EPERM}
"""Where nbdfleece chooses otherwise than QEMU by name (protocol/nbd.md §5)."""


def expected(code: int) -> Errno:
    """QEMU's answer, the deliberate exceptions, and EIO for other storage errnos
    (QEMU: EINVAL), among them ETIMEDOUT of a timed-out copy-before-write."""
    if code in DELIBERATE:
        return DELIBERATE[code]
    return QEMU_7_2.get(code, Errno.EIO)


@pytest.mark.parametrize("code", sorted(errno.errorcode), ids=lambda c: errno.errorcode[c])
def test_every_os_errno(code: int) -> None:
    assert nbd_errno(OSError(code, "x")) == expected(code)


def test_qemus_explicit_cases_are_kept() -> None:
    """Apart from the documented exceptions, QEMU's named cases map the same here."""
    for code, nbd in QEMU_7_2.items():
        assert nbd_errno(OSError(code, "x")) == nbd, errno.errorcode[code]


def test_timed_out_copy_is_eio_and_not_qemus_einval() -> None:
    """The documented difference a cbw-timeout shows (protocol/qmp.md)."""
    assert nbd_errno(OSError(errno.ETIMEDOUT, "copy-before-write timed out after 1 s")) == Errno.EIO
    assert nbd_errno(TimeoutError(errno.ETIMEDOUT, "t")) == Errno.EIO


def test_other_failures() -> None:
    assert nbd_errno(RequestError(Errno.ENOTSUP, "fast zero")) == Errno.ENOTSUP
    assert nbd_errno(OSError("no errno")) == Errno.EIO
    assert nbd_errno(ValueError("a bug")) == Errno.EINVAL  # the spec's default, as QEMU's
