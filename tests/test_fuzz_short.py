"""A short coverage-guided run of each fuzz target (tests/fuzz), about 20 s apiece.

Each target runs as its own process under libFuzzer (atheris), from a copy of
its committed seed corpus and regression inputs, so the run never grows the
committed corpus.  A crash, an assertion of the target's invariants, a hang
(``-timeout``) or a memory blow-up (``-rss_limit_mb``) makes libFuzzer exit
non-zero and write the input to the artifact folder: both are checked, and the
log tail is shown.  ``-m "not fuzz"`` deselects these; ``NBDFLEECE_FUZZ_SECONDS``
changes the time per target.  Long runs: tools/fuzz.sh.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is in the test extra: pip install -e '.[test]'")

FUZZ = Path(__file__).parent / "fuzz"
TARGETS = ("handshake", "framer", "qmp")
SECONDS = int(os.environ.get("NBDFLEECE_FUZZ_SECONDS", "20"))


@pytest.mark.fuzz
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_short(target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus" / target, corpus)
    regressions = FUZZ / "regressions" / target
    if regressions.is_dir():
        shutil.copytree(regressions, corpus, dirs_exist_ok=True)
    seeds = len(list(corpus.iterdir()))
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    cmd = [
        sys.executable, str(FUZZ / f"fuzz_{target}.py"),
        f"-max_total_time={SECONDS}", "-timeout=10", "-rss_limit_mb=1024",
        f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 120, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    crashes = sorted(p.name for p in artifacts.iterdir())
    assert proc.returncode == 0 and not crashes, (
        f"fuzz_{target} exited {proc.returncode}, artifacts {crashes} (keep them: copy into "
        f"tests/fuzz/regressions/{target}/ once fixed)\n{log[-6000:]}"
    )
    done = re.search(r"Done (\d+) runs in (\d+) second", log)
    assert done is not None, log[-3000:]
    runs = int(done.group(1))
    assert runs > seeds, f"only {runs} executions for {seeds} seeds:\n{log[-3000:]}"
    cov = re.findall(r"cov: (\d+) ft: (\d+)", log)
    with capsys.disabled():
        print(f"\n[fuzz] {target}: {runs} executions in {done.group(2)} s, "
              f"cov {cov[-1][0] if cov else '?'} ft {cov[-1][1] if cov else '?'}, "
              f"corpus {seeds} -> {len(list(corpus.iterdir()))}")
