"""What a run records about itself: metadata (command, versions, the exact source), the log and the
metrics stream."""
from __future__ import annotations

import datetime
import hashlib
import json
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from core.files import read_jsonl, write_text_atomic
from experiment.paths import LOG_FILE, METRICS_FILE

SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _git(root: Path, *args: str) -> bytes | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, timeout=10, cwd=root)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def source_state(root: Path = SOURCE_ROOT) -> dict:
    """The commit, whether the working tree differs from it, and (when it does) a SHA-256 of the
    difference: the tracked changes (`git diff HEAD`) and the untracked, not ignored files' names
    and contents. Two runs with the same commit and hash ran the same code."""
    head = _git(root, "rev-parse", "HEAD")
    if head is None:
        return {"git_commit": None, "git_dirty": None, "git_diff_sha256": None}
    diff = _git(root, "diff", "HEAD", "--binary") or b""
    untracked = sorted((_git(root, "ls-files", "--others", "--exclude-standard", "-z") or b"").split(b"\0"))
    untracked = [name for name in untracked if name]
    dirty = bool(diff) or bool(untracked)
    digest = None
    if dirty:
        h = hashlib.sha256(diff)
        for name in untracked:
            h.update(b"\0" + name + b"\0")
            try:
                h.update((root / name.decode()).read_bytes())
            except OSError:  # vanished or unreadable since it was listed
                h.update(b"(unreadable)")
        digest = h.hexdigest()
    return {"git_commit": head.decode().strip() or None, "git_dirty": dirty, "git_diff_sha256": digest}


def metadata(extra: dict | None = None) -> dict:
    return {"command": " ".join([Path(sys.executable).name, *sys.argv]),
            "start_time": datetime.datetime.now().isoformat(), "host": socket.gethostname(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            **source_state(), **(extra or {})}


class RunLog:
    """Prints to the console and appends to log.txt; metrics go to metrics.jsonl. Silent on ranks > 0."""

    def __init__(self, folder: Path | None, enabled: bool = True) -> None:
        self.folder, self.enabled = folder, enabled

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        tqdm.write(message)  # keeps an active progress bar intact
        if self.folder is not None:
            with open(self.folder / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(message + "\n")

    def metrics(self, record: dict) -> None:
        if self.enabled and self.folder is not None:
            with open(self.folder / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(folder: Path) -> list[dict]:
    """The metrics a run has logged, read only (a last line cut short by a kill is left out;
    `truncate_metrics`, run by the writer when it resumes, drops it from the file)."""
    path = folder / METRICS_FILE
    if not path.exists():
        return []
    return read_jsonl(path, appended=True, remedy="delete that line (it only feeds the plots)")


def truncate_metrics(folder: Path, last_step: int) -> None:
    """Drop events after `last_step` (a resumed run replays them), so the curve has no duplicates."""
    kept = [r for r in read_metrics(folder) if r.get("step", 0) <= last_step]
    write_text_atomic(folder / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))
