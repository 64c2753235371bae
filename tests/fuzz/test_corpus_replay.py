"""Every committed seed and every crash the fuzzers found, replayed without atheris.

The fuzz targets' ``TestOneInput`` holds the invariants; running it on the
committed inputs is a plain, fast unit test (no libFuzzer, no atheris), and
each file in ``regressions/<target>/`` is an input that once broke them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

HERE = Path(__file__).parent
TARGETS = ("handshake", "framer", "qmp")


def load_target(target: str) -> ModuleType:
    """The target script as a module (not as ``__main__``: no instrumentation)."""
    name = f"fuzz_{target}"
    if name in sys.modules:
        return sys.modules[name]
    if str(HERE) not in sys.path:  # the targets import fuzz_harness from beside them, as scripts do
        sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def regressions() -> list[tuple[str, Path]]:
    return [
        (target, path)
        for target in TARGETS
        for path in sorted((HERE / "regressions" / target).glob("*"))
        if path.is_file()
    ]


def test_corpus_is_committed() -> None:
    for target in TARGETS:
        assert len(list((HERE / "corpus" / target).iterdir())) >= 5, target


@pytest.mark.parametrize("target", TARGETS)
def test_seeds(target: str) -> None:
    check = load_target(target).TestOneInput
    failed = []
    for path in sorted((HERE / "corpus" / target).iterdir()):
        try:
            check(path.read_bytes())
        except Exception as exc:
            failed.append(f"{path.name}: {type(exc).__name__}: {exc}")
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize(("target", "path"), regressions(), ids=lambda v: getattr(v, "name", v))
def test_regression(target: str, path: Path) -> None:
    load_target(target).TestOneInput(path.read_bytes())
