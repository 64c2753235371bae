"""The agent's progress output: a redrawn bar on a terminal, a few lines otherwise."""

from __future__ import annotations

import io

from nbdfleece_backup.progress import Progress, human

MiB = 1 << 20


def test_human() -> None:
    assert [human(n) for n in (0, 1023, 1024, 5 * MiB // 2, 3 << 40)] == [
        "0 B", "1023 B", "1.0 KiB", "2.5 MiB", "3.0 TiB"]


def test_terminal_bar_is_redrawn_in_place() -> None:
    out = io.StringIO()
    p = Progress(out, tty=True)
    p.start("full backup", 100 * MiB)
    p.advance(50 * MiB)
    p.advance(50 * MiB)
    p.finish()
    text = out.getvalue()
    frames = text.split("\r\033[K")[1:]
    assert frames[0].startswith("full backup [........................]   0% 0 B / 100.0 MiB")
    assert frames[-1].startswith("full backup [########################] 100% 100.0 MiB / 100.0 MiB")
    assert text.endswith("\n") and text.count("\n") == 1  # one line on the terminal in the end


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    p = Progress(out, tty=False)
    p.start("incremental backup", 10 * MiB)
    for _ in range(10):
        p.advance(MiB)
    p.finish()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("incremental backup: 0% (0 B of 10.0 MiB")
    assert lines[-1].startswith("incremental backup: 100% (10.0 MiB of 10.0 MiB")
    assert len(lines) == 11 and "\r" not in out.getvalue()


def test_quiet_keeps_notes_only() -> None:
    out = io.StringIO()
    p = Progress(out, quiet=True)
    p.start("x", 10)
    p.advance(10)
    p.finish()
    p.info("hidden")
    p.note("shown")
    assert out.getvalue() == "nbdfleece-backup: shown\n"
