"""Compile protos/ into extproc/api before packaging, so the wheel carries them
(they are generated, never committed). Everything else is in pyproject.toml."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithProtos(build_py):  # type: ignore[misc]
    def run(self) -> None:
        spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
        assert spec is not None
        assert spec.loader is not None
        generate = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(generate)
        generate.generate(ROOT)
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
