"""The layers of DESIGN.md hold: scripts/check.sh (and so CI) fails on an upward import or a cycle, naming it.

The contracts are in pyproject.toml ([tool.importlinter]); these tests break a copy of the
package the ways a change could, and check that the check says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of what scripts/check.sh's first step reads: the package, pyproject.toml and the script."""
    for part in ("alexnet_lab", "scripts"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def check(tree: Path) -> subprocess.CompletedProcess[str]:
    # the copy first on the path, so that import-linter reads the copy, not the installed package
    bin_dir = str(Path(sys.executable).parent)  # lint-imports of this environment
    env = {**os.environ, "PYTHONPATH": str(tree), "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    return subprocess.run(["bash", "scripts/check.sh"], cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def add_line(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_package_keeps_every_contract():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "named"),
    [
        # an upward import: the model importing the task
        ("model.py", "import alexnet_lab.train", "alexnet_lab.model is not allowed to import alexnet_lab.train"),
        # the cycle issue 24 removed: train took load and write_json from cli, which imports train back
        ("train.py", "from alexnet_lab.cli import load", "alexnet_lab.train is not allowed to import alexnet_lab.cli"),
        # parts that stay apart: the module knowing how data is preprocessed
        (
            "module.py",
            "from alexnet_lab.data.preprocess import PREPROCESS_VERSION",
            "alexnet_lab.module is not allowed to import alexnet_lab.data",
        ),
        # train imports inference (load_weights); inference importing train back is a cycle in one layer
        ("inference.py", "import alexnet_lab.train", "No import cycles among the modules of a package BROKEN"),
    ],
)
def test_an_import_across_the_layers_fails_the_check_and_is_named(tree, module, line, named):
    add_line(tree / "alexnet_lab" / module, f"{line}  # noqa")
    result = check(tree)
    assert result.returncode != 0
    assert named in result.stdout


def test_a_new_module_must_be_given_a_layer(tree):
    (tree / "alexnet_lab" / "newthing.py").write_text('"""Not yet placed in a layer."""\n')
    result = check(tree)
    assert result.returncode != 0
    assert "alexnet_lab.newthing" in result.stdout
