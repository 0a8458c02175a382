"""The layering in pyproject.toml is enforced: the real tree passes `lint-imports`,
and the same tree with one upward import does not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml")],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    shutil.copytree(
        ROOT / "extproc", tmp_path / "extproc", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_its_layers(tree_copy: Path) -> None:
    result = _lint(tree_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "upward_import"),
    [
        ("capacity/static.py", "from extproc.flowcontrol import queue as _upward"),
        ("registry/memory.py", "from extproc.service import metrics as _upward"),
        ("contracts.py", "from extproc.registry import rate as _upward"),
        ("tools/fairness.py", "from extproc.service import auth as _upward"),
    ],
)
def test_an_upward_import_fails_the_lint(tree_copy: Path, module: str, upward_import: str) -> None:
    path = tree_copy / "extproc" / module
    path.write_text(path.read_text() + f"\n{upward_import}  # noqa\n")
    result = _lint(tree_copy)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout.upper()
    assert upward_import.split()[1] in result.stdout
