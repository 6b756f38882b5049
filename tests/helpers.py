"""Helpers the tests share: running a script as a user would, the one-line error contract, tiny configs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from get_topk_activations import TopKConfig
from tests.forked_cli import forkable, run_forked
from train_diffusion import TrainConfig
from train_transcoders import TranscoderTrainConfig

ROOT = Path(__file__).resolve().parent.parent
ERROR_LINE = re.compile(r"^(?:[\w.\- ]+: )?error: ")  # "error: ..." or "<program>: error: ..."


def run_cli(args: list[str], env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `python args...` from the repository root, as a user would: in a process forked from a server that
    imported torch already (tests/forked_cli.py), or a fresh interpreter where that could differ (`env` given,
    torchrun)."""
    if forkable(args, env):
        return run_forked(args, ROOT, timeout)
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """The contract for a user's mistake: non-zero exit, one line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("tokenizing", "\r"))]
    errors = [line for line in lines if ERROR_LINE.search(line)]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle.lower() in errors[0].lower(), errors[0]


def tiny_train_config(tmp_path, data_dir, **overrides):
    """A tiny diffusion run on the (0.3 MB) synthetic corpus, on the CPU."""
    kw = dict(dataset="synthetic", synthetic_mb=0.3, data_dir=str(data_dir), experiments_dir=str(tmp_path / "exp"),
              device="cpu", num_layers=2, num_heads=2, model_dim=64, train_seq_len=128, val_seq_len=128,
              batch_size=8, grad_acc_steps=1, train_steps=300, val_loss_every=0, val_tokens=16_384, save_every=0,
              log_every=50, muon_lr=0.02, embed_lr=0.3, head_lr=0.02)
    kw.update(overrides)
    return TrainConfig(**kw)


def tiny_transcoder_config(train_folder, **overrides):
    kw = dict(train_folder=str(train_folder), device="cpu", train_seq_len=128, batch_size=8, grad_acc_steps=1,
              train_steps=400, expansion_factor=4, k=8, val_loss_every=0, val_tokens=8192, save_every=0, log_every=50,
              dead_tokens=50_000)
    kw.update(overrides)
    return TranscoderTrainConfig(**kw)


def tiny_topk_config(train_folder, **overrides):
    kw = dict(train_folder=str(train_folder), device="cpu", train_seq_len=128, batch_size=8, scan_batches=6,
              n_top=10, context_before=8, context_after=4, n_quantile=6, n_random=6)
    kw.update(overrides)
    return TopKConfig(**kw)


def side_package_python(target: str, code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `code` in a Python whose path starts with `.venv/<target>`, a folder `make venv` fills with a
    package of the field and the versions it pins (it would clash with the project's), or skip where it is
    missing outside CI. The project's own modules stay importable."""
    import pytest

    folder = Path(sys.prefix) / target
    if not folder.is_dir():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{folder}: `make venv` installs it")
        pytest.skip(f"{folder} is missing (make venv installs it)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def circuit_tracer_module(relative: str):
    """A module of circuit-tracer 0.5.0 loaded from its file (the Makefile installs the package without its
    dependencies into .venv/circuit-tracer), or a skip where it is missing outside CI."""
    import importlib.util

    import pytest

    path = Path(sys.prefix) / "circuit-tracer" / "circuit_tracer" / relative
    if not path.exists():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{path}: `make venv` installs circuit-tracer there")
        pytest.skip("circuit-tracer is not installed (make venv installs it)")
    spec = importlib.util.spec_from_file_location(f"ct_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
