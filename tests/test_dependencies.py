"""Every third-party import is declared, and the declarations agree with each other.

The imports are read with `ast` from the packages and the scripts at the top of the repository, at the top
of a file as inside a function: each must come from a distribution of pyproject.toml's `dependencies`, or
of an optional extra and then only inside a function, under a `try` that catches ImportError (the project
runs without it). requirements.txt pins exactly the runtime dependencies, requirements-dev.txt exactly the
`dev` extra, and the tests and benchmarks import nothing beyond the two. pyproject.toml's requires-python
is the one place the Python version is stated (the Makefile reads it; ruff infers its target from it)."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from dataclasses import dataclass
from importlib.metadata import packages_distributions
from pathlib import Path

from tests.helpers import ROOT

PACKAGES = ("core", "data", "model", "experiment", "training", "interp")
OWN = {*PACKAGES, "bench", "tests", *(p.stem for p in ROOT.glob("*.py"))}
# import name → distribution, where the two differ (otherwise the same name: huggingface_hub, safetensors, ...)
DISTRIBUTION = {"yaml": "PyYAML", "sparsify": "eai-sparsify", "importlinter": "import-linter"}
# runtime dependencies the project's code does not import itself, and why they are declared
DECLARED_NOT_IMPORTED = {"pyarrow": "`datasets` reads a local .parquet input with it (data/sources.py)"}
# the extras of pyproject.toml that are not runtime features
TOOL_EXTRAS = {"dev"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    return normalized(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1))


def distribution(module: str) -> str:
    return normalized(DISTRIBUTION.get(module, module))


@dataclass(frozen=True)
class Import:
    module: str  # the top-level name: `yaml` for `import yaml.loader`
    line: int
    lazy: bool  # inside a function
    guarded: bool  # inside the body of a `try` that catches ImportError


def _catches_import_error(handler_type) -> bool:
    if handler_type is None:  # a bare except
        return True
    if isinstance(handler_type, ast.Tuple):
        return any(_catches_import_error(t) for t in handler_type.elts)
    name = handler_type.id if isinstance(handler_type, ast.Name) else getattr(handler_type, "attr", "")
    return name in {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


class _Imports(ast.NodeVisitor):
    """Every absolute import, and the module names given to importlib.import_module / pytest.importorskip."""

    def __init__(self):
        self.found: list[Import] = []
        self.functions = 0
        self.guards = 0

    def add(self, name: str, node) -> None:
        self.found.append(Import(name.split(".")[0], node.lineno, self.functions > 0, self.guards > 0))

    def visit_FunctionDef(self, node):
        self.functions += 1
        self.generic_visit(node)
        self.functions -= 1

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_Try(self, node):
        guard = any(_catches_import_error(h.type) for h in node.handlers)
        self.guards += guard
        for stmt in node.body:
            self.visit(stmt)
        self.guards -= guard
        for stmt in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(stmt)

    visit_TryStar = visit_Try

    def visit_Import(self, node):
        for alias in node.names:
            self.add(alias.name, node)

    def visit_ImportFrom(self, node):
        if node.level == 0 and node.module:
            self.add(node.module, node)

    def visit_Call(self, node):
        callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if callee in {"import_module", "importorskip"} and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and not node.args[0].value.startswith("."):
            self.add(node.args[0].value, node)
        self.generic_visit(node)


def third_party_imports(source: str) -> list[Import]:
    visitor = _Imports()
    visitor.visit(ast.parse(source))
    return [i for i in visitor.found if i.module not in sys.stdlib_module_names and i.module not in OWN]


def undeclared(sources: dict[str, str], runtime: set[str], optional: set[str]) -> list[str]:
    """What a file imports that `runtime` (distributions) does not declare; an `optional` one only inside a
    function, under a try that catches ImportError."""
    problems = []
    for where, source in sources.items():
        for imp in third_party_imports(source):
            dist = distribution(imp.module)
            if dist in runtime:
                continue
            if dist in optional:
                if not (imp.lazy and imp.guarded):
                    problems.append(f"{where}:{imp.line}: {imp.module} is an optional extra, imported "
                                    f"{'outside a function' if not imp.lazy else 'without a try/except ImportError'}")
                continue
            problems.append(f"{where}:{imp.line}: imports {imp.module} (distribution {dist}), which pyproject.toml "
                            f"does not declare")
    return problems


def project_sources() -> dict[str, str]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))] + sorted(ROOT.glob("*.py"))
    return {str(p.relative_to(ROOT)): p.read_text() for p in files}


def runtime_dependencies() -> set[str]:
    return {requirement_name(d) for d in PYPROJECT["project"]["dependencies"]}


def extras() -> dict[str, set[str]]:
    return {name: {requirement_name(d) for d in deps}
            for name, deps in PYPROJECT["project"].get("optional-dependencies", {}).items()}


def optional_dependencies() -> set[str]:
    return {d for name, deps in extras().items() if name not in TOOL_EXTRAS for d in deps}


def requirements(path: Path) -> dict[str, str]:
    """name → the line, for every requirement of a requirements file (not its -r includes)."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {requirement_name(line): line for line in lines if line and not line.startswith("-")}


def test_every_import_of_the_project_is_declared():
    sources = project_sources()
    assert len(sources) > 50 and "core/cli.py" in sources and "train_diffusion.py" in sources
    problems = undeclared(sources, runtime_dependencies(), optional_dependencies())
    assert not problems, "\n".join(problems)


def test_every_runtime_dependency_is_imported_or_says_why_it_is_declared():
    imported = {distribution(i.module) for source in project_sources().values() for i in third_party_imports(source)}
    unused = runtime_dependencies() - imported - {normalized(d) for d in DECLARED_NOT_IMPORTED}
    assert not unused, f"declared in pyproject.toml but imported nowhere: {sorted(unused)}"
    assert not {normalized(d) for d in DECLARED_NOT_IMPORTED} & imported  # the list stays true


def test_the_tests_and_benchmarks_import_only_declared_packages():
    sources = {str(p.relative_to(ROOT)): p.read_text() for folder in ("tests", "bench")
               for p in sorted((ROOT / folder).rglob("*.py"))}
    problems = undeclared(sources, runtime_dependencies() | extras()["dev"], optional_dependencies())
    assert not problems, "\n".join(problems)


def test_the_import_names_map_to_the_installed_distributions():
    """DISTRIBUTION covers every import whose distribution has another name (checked where it is installed)."""
    installed = packages_distributions()
    sources = {**project_sources(), **{str(p): p.read_text() for p in (ROOT / "tests").rglob("*.py")}}
    modules = {i.module for source in sources.values() for i in third_party_imports(source)}
    wrong = {m: installed[m] for m in modules
             if m in installed and distribution(m) not in {normalized(d) for d in installed[m]}}
    assert not wrong, f"add these to DISTRIBUTION: {wrong}"


def test_requirements_txt_pins_every_runtime_dependency():
    pinned = requirements(ROOT / "requirements.txt")
    assert set(pinned) == runtime_dependencies(), "requirements.txt and pyproject.toml's dependencies differ"
    loose = [line for line in pinned.values() if not re.search(r"(==|>=|~=)\s*\d", line)]
    assert not loose, f"without a version: {loose}"
    assert re.search(r"==\s*\d", pinned["torch"])  # the one exact pin (the CPU build of the project machines)


def test_requirements_dev_txt_is_the_dev_extra():
    text = (ROOT / "requirements-dev.txt").read_text()
    assert "-r requirements.txt" in text.splitlines()
    dev = requirements(ROOT / "requirements-dev.txt")
    assert set(dev) == extras()["dev"], "requirements-dev.txt and pyproject.toml's `dev` extra differ"
    loose = [line for line in dev.values() if not re.search(r"(==|>=|~=)\s*\d", line)]
    assert not loose, f"without a version: {loose}"


def minimum_python() -> tuple[int, ...]:
    spec = PYPROJECT["project"]["requires-python"]
    match = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec)
    assert match, f"requires-python {spec!r}: the Makefile reads a plain lower bound, >=3.N"
    return tuple(map(int, match.groups()))


def test_the_python_version_is_stated_once():
    """requires-python is the source: this interpreter meets it, ruff infers its target from it, and a
    type checker's own setting, where there is one, repeats it."""
    assert sys.version_info[:2] >= minimum_python()
    assert "target-version" not in PYPROJECT["tool"]["ruff"], "ruff reads the version from requires-python"
    mypy = PYPROJECT["tool"].get("mypy", {})
    if "python_version" in mypy:
        assert mypy["python_version"] == "%d.%d" % minimum_python()
    assert not (ROOT / ".python-version").exists(), "a second statement of the version"


def test_a_made_up_source_fails_the_check():
    source = ("import os\nimport yaml.loader\nfrom . import sibling\nfrom core import cli\nimport numpy as np\n"
              "import wandb\n"
              "def lazy():\n    import sklearn.linear_model\n    try:\n        import wandb\n"
              "    except ImportError:\n        wandb = None\n    try:\n        import tiktoken\n"
              "    except ValueError:\n        pass\n"
              "def tool():\n    import importlib\n    return importlib.import_module('faiss')\n")
    imports = third_party_imports(source)
    assert [(i.module, i.lazy, i.guarded) for i in imports] == [
        ("yaml", False, False), ("numpy", False, False), ("wandb", False, False), ("sklearn", True, False),
        ("wandb", True, True), ("tiktoken", True, False), ("faiss", True, False)]
    problems = undeclared({"x.py": source}, {"pyyaml", "numpy"}, {"wandb", "tiktoken"})
    assert problems == [
        "x.py:6: wandb is an optional extra, imported outside a function",
        "x.py:8: imports sklearn (distribution sklearn), which pyproject.toml does not declare",
        "x.py:14: tiktoken is an optional extra, imported without a try/except ImportError",
        "x.py:19: imports faiss (distribution faiss), which pyproject.toml does not declare",
    ]
    assert undeclared({"x.py": source}, {"pyyaml", "numpy", "wandb", "tiktoken", "sklearn", "faiss"}, set()) == []
