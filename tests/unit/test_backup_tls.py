"""The agent's TLS options before any connection: which addresses need certificates, and the
URI the ``--on-snapshot`` hook gets (libnbd tools must be able to use it as it is)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdfleece_backup.connections import Tls, export_uri, tls_for
from nbdfleece_backup.errors import BackupError


def test_plaintext_addresses_need_no_certificates_and_take_none(tmp_path: Path) -> None:
    assert tls_for("nbd://127.0.0.1:10809", None) is None
    assert tls_for("nbd+unix:///?socket=/run/nbd.sock", None) is None
    with pytest.raises(BackupError, match="is a plaintext NBD address: TLS certificates need") as exc:
        tls_for("nbd://127.0.0.1", tmp_path)
    assert exc.value.status == 2


def test_nbds_needs_a_folder_with_the_ca(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="asks for TLS: --tls-certificates DIR must name") as exc:
        tls_for("nbds://127.0.0.1", None)
    assert exc.value.status == 2
    with pytest.raises(BackupError, match=f"--tls-certificates {tmp_path}: cannot load TLS CA certificate "
                                          f"{tmp_path}/ca-cert.pem: No such file or directory"):
        tls_for("nbds+unix:///?socket=/run/nbd.sock", tmp_path)
    # libnbd's URI parameter names the folder too (the same URI works with nbdinfo).
    with pytest.raises(BackupError, match=f"cannot load TLS CA certificate {tmp_path}/ca-cert.pem"):
        tls_for(f"nbds://127.0.0.1/?tls-certificates={tmp_path}", None)
    with pytest.raises(BackupError, match="bad NBD address") as exc:
        tls_for("http://127.0.0.1/", None)
    assert exc.value.status == 2


def test_the_hook_uri_names_the_export_and_the_certificates(tmp_path: Path) -> None:
    import ssl

    tls = Tls(ssl.create_default_context(), tmp_path / "pki")
    assert export_uri("nbd://127.0.0.1:10809", "snap 1") == "nbd://127.0.0.1:10809/snap%201"
    assert export_uri("nbds://h:10809/live", "s", tls) == f"nbds://h:10809/s?tls-certificates={tmp_path}/pki"
    assert (export_uri("nbds+unix:///live?socket=/run/n.sock&tls-certificates=old", "s", tls)
            == f"nbds+unix:///s?socket=/run/n.sock&tls-certificates={tmp_path}/pki")
    assert export_uri("nbd+unix:///?socket=/run/n.sock", "s") == "nbd+unix:///s?socket=/run/n.sock"


async def test_restore_takes_certificates_only_for_an_nbds_target(tmp_path: Path) -> None:
    from nbdfleece_backup.progress import Progress
    from nbdfleece_backup.restore import restore

    with pytest.raises(BackupError, match="--tls-certificates is for an nbds:// target, not a file") as exc:
        await restore(tmp_path / "no-folder", None, str(tmp_path / "disk.raw"), progress=Progress(quiet=True),
                      tls_certificates=tmp_path)
    assert exc.value.status == 2
    with pytest.raises(BackupError, match="asks for TLS"):
        await restore(tmp_path / "no-folder", None, "nbds://127.0.0.1/target", progress=Progress(quiet=True))
    assert not (tmp_path / "disk.raw").exists() and not (tmp_path / "no-folder").exists()
