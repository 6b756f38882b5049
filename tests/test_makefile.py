"""The Makefile's promises, read from its dry runs and its first checks (nothing is installed): `make demo`
from a clean clone needs only the runtime (no Node.js, dev tools or side folders), and a missing npm or a
Python older than requires-python stops `make` with one line."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.helpers import ROOT
from tests.test_dependencies import minimum_python

MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None or shutil.which("sed") is None, reason="needs make and sed")
# what only `make test` and `make lint` install
DEV_ONLY = ("npm", "node", "esbuild", "requirements-dev.txt", "circuit-tracer", "delphi", "saelens", "viewer-js")


def make(*args: str, path: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """`make args` in the repository, with the environment of a user's shell (not an enclosing make's)."""
    base = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "PY"}}
    if path is not None:
        base["PATH"] = path
    return subprocess.run([MAKE, "--no-print-directory", *args], cwd=ROOT, env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    """stderr without make's own closing line ("make: *** [...] Error 1")."""
    return [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("make: ***")]


def test_demo_from_a_clean_clone_installs_only_the_runtime(tmp_path):
    """Every step `make demo` would take from a clean clone (-B: nothing is built yet), without running any."""
    proc = make("-n", "-B", f"VENV={tmp_path / 'venv'}", "demo")
    assert proc.returncode == 0, proc.stderr
    steps = proc.stdout
    assert "-m venv" in steps and "-r requirements.txt" in steps and steps.rstrip().endswith("demo.py")
    used = [word for word in DEV_ONLY if re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", steps)]
    assert not used, f"make demo would use {used}:\n{steps}"
    assert "Python %d.%d or newer" % minimum_python() in steps  # the version check, from requires-python


def test_make_test_without_npm_is_one_line(tmp_path):
    """Where npm is missing, `make test` (its development install) stops before installing anything."""
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "sed").symlink_to(shutil.which("sed"))  # make reads requires-python with it; no npm, no python
    venv = tmp_path / "venv"
    proc = make(f"VENV={venv}", "-o", f"{venv}/bin/.runtime", f"{venv}/bin/.installed", path=str(tools))
    assert proc.returncode != 0
    assert errors(proc) == [errors(proc)[0]] and errors(proc)[0].startswith("error: make test and make lint need "
                                                                           "Node.js and npm"), proc.stderr
    assert proc.stdout == "" and not venv.exists()


def test_an_older_python_is_one_line(tmp_path):
    """A Python older than requires-python stops the install with one line, before .venv is created."""
    fake = tmp_path / "python3.9"
    fake.write_text(f'#!/bin/sh\n[ "$1" = -c ] || {{ echo "fake python: unexpected $*" >&2; exit 3; }}\n'
                    f'exec {shutil.which("python3") or "python3"} -c '
                    '"import sys; sys.version_info = (3, 9, 1, \\"final\\", 0); exec(sys.argv[1])" "$2"\n')
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    proc = make(f"VENV={venv}", f"PY={fake}", f"{venv}/bin/.runtime")
    assert proc.returncode != 0 and not venv.exists()
    needed = "%d.%d" % minimum_python()
    assert errors(proc) == [f"error: {fake} is Python 3.9; this project needs Python {needed} or newer "
                            f"(requires-python in pyproject.toml): install python{needed}, or run make "
                            "PY=/path/to/python3.x"], proc.stderr
    missing = make(f"VENV={venv}", "PY=no-such-python3", f"{venv}/bin/.runtime")
    assert missing.returncode != 0 and len(errors(missing)) == 1, missing.stderr
    assert errors(missing)[0].startswith("error: no no-such-python3 on PATH; this project needs Python")


def test_test_fast_leaves_out_only_the_slow_tests():
    proc = make("-n", "test-fast")
    assert re.search(r'-m pytest .*-m "not slow"', proc.stdout), proc.stdout + proc.stderr
    assert 'not slow' not in make("-n", "test").stdout
