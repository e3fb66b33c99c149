"""The import layering in pyproject.toml ([tool.importlinter]) holds, and a new violation fails the suite.

``lint-imports`` reads every import, function-local ones included, so hiding an upward import
inside a function does not get it past the check.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="install the test extra: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(cwd: Path, *config: str) -> subprocess.CompletedProcess[str]:
    """Run the ``lint-imports`` command of this interpreter's environment in ``cwd``."""
    cmd = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
           "sys.exit(lint_imports_command())", "--no-cache", "--no-logo", *config]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def copy_sources(dest: Path) -> None:
    """The Python files of cag, evaluation and experiments, laid out as importable packages under ``dest``."""
    for package, src in (("cag", ROOT / "src" / "cag"), ("evaluation", ROOT / "evaluation"),
                         ("experiments", ROOT / "experiments")):
        for path in src.rglob("*.py"):
            if "results" in path.relative_to(src).parts:
                continue
            target = dest / package / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    shutil.copyfile(ROOT / "pyproject.toml", dest / "pyproject.toml")


def test_the_project_keeps_its_import_contracts():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "added", "reported"),
    [
        # the data layer reaching up into the models, hidden in a function
        ("cag/data/sample.py", "def _late():\n    from cag.models import cag_model\n", "cag.data.sample -> cag.models.cag_model"),
        # the package importing the evaluation code built on it
        ("cag/sampling.py", "import evaluation.aggregate\n", "cag.sampling -> evaluation.aggregate"),
        # a cycle inside the data package
        ("cag/data/batching.py", "import cag.data.datamodule\n", "cag.data.batching -> cag.data.datamodule"),
    ],
)
def test_a_new_upward_import_breaks_the_contract(tmp_path, module, added, reported):
    copy_sources(tmp_path)
    target = tmp_path / module
    target.write_text(target.read_text() + "\n\n" + added)
    proc = lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "BROKEN" in proc.stdout and reported in proc.stdout, proc.stdout
    target.write_text(target.read_text().replace(added, ""))
    assert lint_imports(tmp_path).returncode == 0, "the copy itself keeps the contracts: only the added import broke them"
