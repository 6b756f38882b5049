"""Files a run is made of, written so that a kill never leaves half of one: atomic writes, JSON,
checkpoints (tensors only), and `UserError`, the one-line error a user can fix.

The bottom of the project: `data/`, `model/` and everything above import it; it imports nothing of
the project's own.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing folder, corrupt file): one line, no traceback."""


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; it replaces `path` only if the block finishes.

    An interrupted writer therefore leaves either the old file or nothing, never half a file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if tmp.exists():  # some writers (safetensors) create files readable by the owner only
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    import torch  # heavy, and the tokenizer's worker processes, which import this module, never need it

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, device: Any = "cpu", require_model: bool = True) -> dict:
    """Load tensors only (`weights_only=True`: a checkpoint never runs code) onto `device`."""
    import torch

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # unpickling errors, truncated zips, refused globals
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise UserError(f"cannot load checkpoint {path}: {type(e).__name__}: {first}") from None
    if not isinstance(state, dict) or (require_model and "model" not in state):
        raise UserError(f"{path} is not a checkpoint of this project (no 'model' entry)")
    return state
