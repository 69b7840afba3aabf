"""Run the kernel tests with `fxprune.kernels` imported alone, without the rest of fxprune.

Why: the oldest supported torch is tested from its CPU wheel (torch 2.13.0+cpu in .ci/run), and no
CPU torchvision wheel for it is on the registries CI reaches (the PyPI torchvision links CUDA
torch), while `import fxprune` imports torchvision. The kernels layer imports nothing from fxprune
but `fxprune.errors` (tests/test_layers.py holds it to that), so it can be tested on its own: this
script makes `fxprune` a namespace of its source folder (no `fxprune/__init__.py` runs), exposes
the error types the tests name, and hands the rest to pytest.

    python tests/kernels_alone.py [pytest args]      # default: the kernel test files
    python tests/kernels_alone.py --selfcheck [...]  # the Triton self-check (TRITON_INTERPRET=1)
"""
from __future__ import annotations

import os
import runpy
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_kernels.py", "tests/test_kernels_dispatch.py"]


def bootstrap() -> None:
    """`fxprune` as a bare package of its folder, with the typed errors on it."""
    sys.path.insert(0, str(ROOT))
    package = types.ModuleType("fxprune")
    package.__path__ = [str(ROOT / "fxprune")]
    sys.modules["fxprune"] = package
    from fxprune import errors

    for name in ("FxpruneError", "ConfigError", "InputError"):
        setattr(package, name, getattr(errors, name))
    os.environ["FXPRUNE_KERNELS_ALONE"] = "1"  # subprocesses of the tests come back through here


def main(argv: list[str]) -> int:
    bootstrap()
    if argv[:1] == ["--selfcheck"]:
        sys.argv = ["fxprune.kernels.selfcheck", *argv[1:]]
        try:
            runpy.run_module("fxprune.kernels.selfcheck", run_name="__main__")
        except SystemExit as e:
            return int(e.code or 0)
        return 0
    import pytest

    os.chdir(ROOT)
    # --noconftest: tests/conftest.py imports the whole package (its helpers are not used here)
    return pytest.main(["-q", "-p", "no:cacheprovider", "--noconftest", *(argv or TESTS)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
