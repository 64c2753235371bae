"""The atheris set-up every fuzz target shares.

The targets run as standalone scripts under libFuzzer (``python
tests/fuzz/fuzz_x.py CORPUS``) and are also loaded by file path under pytest to
replay the corpus, where atheris need not be installed and nothing is
instrumented.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Sequence

try:
    import atheris
except ImportError:  # replaying the corpus under pytest needs no atheris
    atheris = None


def instrumented(module_name: str) -> contextlib.AbstractContextManager[object]:
    """Instrument nbdfleece for coverage only when the target runs as the fuzzer."""
    if atheris is not None and module_name == "__main__":
        return atheris.instrument_imports(include=["nbdfleece"])  # type: ignore[no-any-return]
    return contextlib.nullcontext()


def fuzz(test_one_input: Callable[[bytes], None], max_len: int) -> None:
    """Run libFuzzer on ``test_one_input``; ``max_len`` unless -max_len= is given."""
    assert atheris is not None, "pip install atheris"
    if not any(arg.startswith("-max_len=") for arg in sys.argv):
        sys.argv.insert(1, f"-max_len={max_len}")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


def pieces(seed: int, data: bytes, sizes: Sequence[int]) -> list[bytes]:
    """Cut ``data`` the way a network might (seed 0: in one piece); a piece is at
    most one of ``sizes`` long."""
    if seed == 0:
        return [data]
    rng = random.Random(seed)
    out, pos = [], 0
    while pos < len(data):
        n = rng.randint(1, rng.choice(sizes))
        out.append(data[pos : pos + n])
        pos += n
    return out
