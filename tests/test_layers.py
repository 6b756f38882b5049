"""The layer contract for the top-level scripts (import-linter checks the packages; see pyproject.toml),
and what a run records about the code that made it."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiment.record import source_state
from tests.helpers import ROOT

PACKAGES = {"core", "data", "model", "experiment", "training", "interp"}
STAGES = ["train_diffusion", "generate", "train_transcoders", "get_topk_activations", "get_activation_descriptions",
          "generate_descriptions"]


def project_imports(path) -> set[str]:
    """The project's top-level names a file imports anywhere in it, inside functions too."""
    project = PACKAGES | set(STAGES) | {"demo", "tests", "bench"}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & project


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_script_imports_only_the_library(stage):
    assert project_imports(ROOT / f"{stage}.py") <= PACKAGES


def test_the_demo_sits_on_top():
    assert project_imports(ROOT / "demo.py") <= PACKAGES | set(STAGES)


def test_the_import_checker_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def main():\n    from generate import main\n    import interp.contexts.scan\n")
    assert project_imports(f) == {"generate", "interp"}


def test_no_test_edits_sys_path():
    for path in (ROOT / "tests").glob("*.py"):
        assert "sys.path" not in path.read_text(encoding="utf-8").replace('"sys.path"', ""), path.name


def _git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_source_state_records_a_dirty_tree_and_a_hash_of_the_difference(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("ignored.txt\n")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    clean = source_state(tmp_path)
    assert len(clean["git_commit"]) == 40 and clean["git_dirty"] is False and clean["git_diff_sha256"] is None
    (tmp_path / "ignored.txt").write_text("not source")
    assert source_state(tmp_path) == clean  # ignored files are not the code
    (tmp_path / "a.py").write_text("x = 2\n")
    edited = source_state(tmp_path)
    assert edited["git_dirty"] is True and len(edited["git_diff_sha256"]) == 64
    assert edited["git_commit"] == clean["git_commit"]
    assert source_state(tmp_path) == edited  # the same difference, the same hash
    (tmp_path / "a.py").write_text("x = 3\n")
    assert source_state(tmp_path)["git_diff_sha256"] != edited["git_diff_sha256"]
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "new.py").write_text("y = 1\n")  # an untracked file is part of the code that ran
    untracked = source_state(tmp_path)
    assert untracked["git_dirty"] is True and untracked["git_diff_sha256"] not in (None, edited["git_diff_sha256"])
    (tmp_path / "new.py").write_text("y = 2\n")
    assert source_state(tmp_path)["git_diff_sha256"] != untracked["git_diff_sha256"]


def test_outside_a_repository_nothing_is_claimed(tmp_path):
    assert source_state(tmp_path) == {"git_commit": None, "git_dirty": None, "git_diff_sha256": None}


def _lint_imports(tree):
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the copy, ahead of the editable install
    return subprocess.run([str(exe), "--config", str(tree / "pyproject.toml")], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module,line,broken", [
    (None, None, None),
    ("data/loader.py", "from experiment import paths", "data is not allowed to import experiment"),
    ("model/hooks.py", "def _f():\n    from interp import scan", "model is not allowed to import interp"),
    ("interp/contexts/buffers.py", "import training.loop", "interp is not allowed to import training"),
    ("core/files.py", "from core import cli", "core.files is not allowed to import core.cli"),
    ("experiment/paths.py", "import generate", "experiment is not allowed to import generate"),
])
def test_an_import_that_breaks_a_layer_fails_the_contract(tmp_path, module, line, broken):
    """The contracts of pyproject.toml, checked on a copy of the packages with one upward import added."""
    for name in [*PACKAGES, "pyproject.toml"]:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    if module:
        with open(tmp_path / module, "a", encoding="utf-8") as f:
            f.write(f"\n{line}  # noqa\n")
    proc = _lint_imports(tmp_path)
    if broken is None:
        assert proc.returncode == 0, proc.stdout[-2000:]
    else:
        assert proc.returncode != 0 and broken in proc.stdout, proc.stdout[-2000:]


def private_imports_across_packages(root: Path) -> list[str]:
    """`from a.b import _name` where `_name` belongs to another package than the importing file's
    (interp.contexts and interp.explanations are different packages; a module's own package is not)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        package = ".".join(path.relative_to(root.parent).parent.parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                source = node.module.rsplit(".", 1)[0] if (root.parent / node.module.replace(".", "/")).with_suffix(
                    ".py").exists() else node.module
                found += [f"{path.relative_to(root.parent)}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and source != package]
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_package_imports_another_ones_private_names(package):
    assert private_imports_across_packages(ROOT / package) == []


def test_the_private_import_check_sees_one(tmp_path):
    (tmp_path / "pkg" / "a").mkdir(parents=True)
    (tmp_path / "pkg" / "b").mkdir()
    (tmp_path / "pkg" / "a" / "scan.py").write_text("def _active(): pass\n")
    (tmp_path / "pkg" / "a" / "stage.py").write_text("from pkg.a.scan import _active\n")
    (tmp_path / "pkg" / "b" / "export.py").write_text("from pkg.a.scan import _active, public\n")
    assert private_imports_across_packages(tmp_path / "pkg") == ["pkg/b/export.py: from pkg.a.scan import _active"]
