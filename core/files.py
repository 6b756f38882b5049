"""Files a run is made of, written so that a kill never leaves half of one: atomic writes, JSON,
checkpoints (tensors only), and `UserError`, the one-line error a user can fix.

The bottom of the project: `data/`, `model/` and everything above import it; it imports nothing of
the project's own.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping


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
        with contextlib.suppress(OSError):  # e.g. a folder made read-only: the writer's own error is the one to see
            tmp.unlink(missing_ok=True)


TEMPORARY_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")  # atomic_path's temporaries


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (OverflowError, ValueError):  # not a process id at all
        return False
    return True


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = True, held: bool = False) -> list[Path]:
    """Remove the temporary files `.<name>.<pid>.tmp` (see `atomic_path`) that a killed writer left in `folder`
    (and, with `recursive`, its subfolders): those whose process is no longer alive, or, when the caller `held`
    the folder (no other process writes there), every one but its own. Returns the removed files.

    Each writing stage calls it when it opens (resumes) its output folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")):
        m = TEMPORARY_RE.match(p.name)
        if not m or not p.is_file():
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and (held or not _alive(pid)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


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
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid JSON (not UTF-8 text at byte {e.start})") from None


def _jsonl(path: str | os.PathLike, appended: bool, remedy: str) -> tuple[list[dict], int | None]:
    """The records of a JSON-lines file (one object per line, blank lines skipped) and, for an `appended` file,
    the byte offset of a torn last line (None when there is none). Read as bytes, decoded line by line."""
    def damaged(n: int, why: str) -> UserError:
        return UserError(f"{path} line {n} is damaged ({why})" + (f"; {remedy}" if remedy else ""))

    records: list[dict] = []
    pending = None  # (line number, offset, what is wrong) of a line that is only torn if it is the last one
    offset = 0
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    with fh:
        for n, raw in enumerate(fh, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            if pending is not None:
                raise damaged(*pending[::2])
            why: str | None = None
            record: Any = None
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict):
                    why = f"a JSON {type(record).__name__}, not an object"
            except UnicodeDecodeError as e:
                why = f"not UTF-8 text at byte {e.start + 1} of the line"
            except json.JSONDecodeError as e:
                why = f"not valid JSON: {e.msg}, column {e.colno}"
            if why is None and (raw.endswith(b"\n") or not appended):
                records.append(record)
            else:
                pending = (n, start, why or "no newline at its end")
    if pending is not None and not appended:
        raise damaged(*pending[::2])
    return records, None if pending is None else pending[1]


def read_jsonl(path: str | os.PathLike, appended: bool = False, remedy: str = "") -> list[dict]:
    """Every record of a JSON-lines file, read only (the file is never changed).

    A file written whole (atomically) must be intact: any damaged line is a `UserError` naming the file and
    the line (`remedy` says what to do). An `appended` file (one record appended at a time, so a kill can cut
    the last one) may end in a torn line: no newline at its end, or bytes that are not UTF-8 or not JSON. That
    line is left out here, and only the file's own writer drops it, with `resume_jsonl`; a damaged line before
    the last is still an error."""
    return _jsonl(path, appended, remedy)[0]


def resume_jsonl(path: str | os.PathLike, remedy: str = "") -> list[dict]:
    """For the writer of an appended JSON-lines file, when it resumes: its records (none if it does not exist),
    with a torn last line cut off the file, so that the next record starts on a line of its own and the torn
    one is redone. Nothing else may call it: a reader never changes another stage's file."""
    if not Path(path).exists():
        return []
    records, torn = _jsonl(path, True, remedy)
    if torn is not None:
        os.truncate(path, torn)
    return records


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    import torch  # heavy, and the tokenizer's worker processes, which import this module, never need it

    with atomic_path(path) as tmp:
        torch.save({**state, CHECKSUM_KEY: state_sha256(state)}, tmp)


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
    expected = state.pop(CHECKSUM_KEY, None)  # absent in checkpoints of older versions: nothing to check
    if expected is not None and expected != state_sha256(state):
        raise UserError(f"checkpoint {path} is damaged: its contents do not match the SHA-256 saved with them")
    return state


# A file's checksum: in a checkpoint, an entry beside the state; in a safetensors file, its header's metadata.
CHECKSUM_KEY = "sha256"


def _tensor_view(t: Any) -> tuple[str, list[int], Any]:
    """A torch tensor's or numpy array's dtype name ("float32", as both name it), shape and bytes."""
    if hasattr(t, "detach"):
        import torch

        t = t.detach().cpu().contiguous()
        return str(t.dtype).removeprefix("torch."), list(t.shape), t.reshape(-1).view(torch.uint8).numpy()
    import numpy as np

    a = np.ascontiguousarray(t)
    return str(a.dtype), list(a.shape), a.reshape(-1).view(np.uint8)


def _hash_tensor(h: Any, name: str, t: Any) -> None:
    dtype, shape, data = _tensor_view(t)
    h.update(json.dumps([name, dtype, shape]).encode() + b"\0")
    h.update(data)


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """SHA-256 of named tensors (torch or numpy), by name: each one's name, dtype and shape (as JSON, then a
    zero byte), then its bytes in C order. Stored as `CHECKSUM_KEY` in a safetensors file's metadata."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        _hash_tensor(h, name, tensors[name])
    return h.hexdigest()


def state_sha256(state: Any) -> str:
    """SHA-256 of a checkpoint's state: its structure (dicts in order, lists, tuples), every tensor's dtype,
    shape and bytes, and every other value's repr."""
    h = hashlib.sha256()

    def walk(obj: Any, where: str) -> None:
        if hasattr(obj, "detach") and hasattr(obj, "dtype") or hasattr(obj, "__array_interface__"):  # torch, numpy
            _hash_tensor(h, where, obj)
        elif isinstance(obj, dict):
            h.update(f"{{{len(obj)}".encode())
            for k, v in obj.items():
                h.update(repr(k).encode() + b"\0")
                walk(v, f"{where}/{k!r}")
        elif isinstance(obj, (list, tuple)):
            h.update(f"{'[' if isinstance(obj, list) else '('}{len(obj)}".encode())
            for i, v in enumerate(obj):
                walk(v, f"{where}/{i}")
        elif isinstance(obj, (set, frozenset)):
            h.update(("s" + repr(sorted(repr(v) for v in obj))).encode() + b"\0")
        else:
            h.update(b"=" + repr(obj).encode() + b"\0")

    walk(state, "")
    return h.hexdigest()


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: dict | None = None) -> None:
    """Torch tensors in the safetensors format, written atomically, with `tensors_sha256` of them in the
    header's metadata (other readers, sparsify's included, ignore it; `load_safetensors` checks it)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**(metadata or {}), CHECKSUM_KEY: tensors_sha256(tensors)})


def load_safetensors(path: str | os.PathLike, device: Any = "cpu") -> dict:
    """The tensors of a safetensors file, checked against the checksum in its metadata when it has one (a
    file of an older version or another tool has none and loads as it is)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise UserError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a damaged header, a file cut short
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise UserError(f"cannot read {path}: {type(e).__name__}: {first}") from None
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and expected != tensors_sha256(tensors):
        raise UserError(f"{path} is damaged: its tensors do not match the SHA-256 saved with them")
    return tensors
