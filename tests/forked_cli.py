"""Running a command line in a process forked from a server that has already imported torch.

A fresh interpreter spends about 4 s of this CPU importing torch before a stage can even read its flags, and
the suite runs over a hundred command lines. `run_forked` runs `python script.py ...` or `python -m module ...`
in a child of multiprocessing's fork server, which imported torch and a few other third-party libraries
(PRELOAD) once and never ran a torch operation, so its children start with no thread pool to inherit. The
child is a process of its own with the caller's working directory and environment, its own stdout, stderr and
exit code, and every module of this project imported fresh when the script imports it. This module imports
nothing of the project, so the child starts without any.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

PRELOAD = ["torch", "numpy", "huggingface_hub", "safetensors.torch", "tqdm"]  # third-party only
_context = None
_server_env: dict[str, str] = {}  # what the server imported PRELOAD with, of the variables below
# the variables torch, numpy and the other preloaded libraries (and the C libraries under them) may read when
# imported; the child's own environment is the caller's in full either way
IMPORT_TIME = ("OMP_", "MKL_", "KMP_", "OPENBLAS_", "GOMP_", "TORCH", "PYTORCH_", "CUDA_", "NVIDIA_", "HF_",
               "HUGGINGFACE_", "TQDM_", "NUMPY_", "LD_", "PYTHON")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(IMPORT_TIME)}


def _server():
    global _context, _server_env
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
        _server_env = _env()
    return _context


def _exit_code(code) -> int:
    """What the interpreter makes of SystemExit's code: None → 0, an int as it is, anything else printed → 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _child(args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """In the forked child: the command line with fds 1 and 2 on the files `out` and `err`. The import path is
    the fork server's, which is the caller's: the repository root first, where the scripts are, as an
    interpreter started on one of them would have it."""
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    code = 0
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [args[0], *args[1:]]
            runpy.run_path(str(Path(cwd) / args[0]), run_name="__main__")
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:  # as the interpreter does: the traceback on stderr, exit code 1
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # as at interpreter exit: wait for non-daemon threads
        atexit._run_exitfuncs()  # what the script registered, as at a normal interpreter exit
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def forkable(args: list[str], env: dict | None) -> bool:
    """Whether `run_forked` gives what a fresh interpreter would: a script or module (not torchrun, whose own
    launcher should be seen as a user starts it), no environment variables of the caller's own, and the values
    the server imported its libraries with of the variables they may read then (IMPORT_TIME)."""
    same_env = _context is None or _env() == _server_env
    return not env and same_env and bool(args) and (
        args[0].endswith(".py") or (args[0] == "-m" and len(args) > 1 and not args[1].startswith("torch.")))


def run_forked(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`python *args` in `cwd`, as a forked child of the fork server; the result as subprocess.run's."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = f"{tmp}/out", f"{tmp}/err"
        child = _server().Process(target=_child, args=(args, str(cwd), dict(os.environ), out, err))
        child.start()
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired([sys.executable, *args], timeout)
        read = lambda p: Path(p).read_text(encoding="utf-8", errors="replace") if Path(p).exists() else ""  # noqa: E731
        return subprocess.CompletedProcess([sys.executable, *args], child.exitcode, read(out), read(err))
