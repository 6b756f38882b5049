"""Shared fixtures: a small prepared synthetic dataset, and a runner for the command-line contract."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """The synthetic corpus (0.3 MB) prepared with a BPE trained on it."""
    from data.prepare import PrepareConfig, prepare_dataset

    cfg = PrepareConfig(dataset="synthetic", data_dir=str(tmp_path_factory.mktemp("data")), synthetic_mb=0.3,
                        workers=1)
    return prepare_dataset(cfg)


def run_cli(args: list[str], env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `python args...` from the repository root, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """The contract for a user's mistake: non-zero exit, one line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("tokenizing", "\r"))]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle.lower() in errors[0].lower(), errors[0]
