"""Who is writing an output, and replacing a finished output only once its successor is complete.

A stage holds `<output folder>/.lock` while it writes there (`hold`). The file is created atomically
(O_CREAT | O_EXCL) and holds the holder's pid, host, command and start time as JSON, so a second run
on the same output ends in one `UserError` line naming the holder. A lock left by a process that died
without releasing it (SIGKILL, power loss: same host, that pid no longer running) is reported in one
line and taken over. An output that is one file, or a folder that appears by rename, is locked by a
sibling `.<name>.lock` instead (`hold_output`).

`Replacement` writes the new version of a finished output folder in `<output>.new` and swaps it in at
the end (`<output>` → `<output>.old`, `<output>.new` → `<output>`, then `<output>.old` deleted): a run
that fails or is interrupted before that leaves the old output as it was, and the next one starts the
staging folder over.

Standard library and `core.files` only: every layer above locks its outputs with it.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

from core.files import UserError

LOCK_FILE = ".lock"
STAGING_SUFFIX = ".new"  # <output>.new: a replacement being written
OLD_SUFFIX = ".old"  # <output>.old: the replaced output, for the instant of the swap
_UNREADABLE_GRACE_S = 5.0  # an empty lock file younger than this is a holder still writing it


def _process_start(pid: int) -> str | None:
    """When `pid` started (clock ticks after boot, from /proc; None elsewhere): a pid reused by another
    process since the lock was written has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the command name


def _command() -> str:
    text = shlex.join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])
    text = " ".join(text.split())  # one line, whatever the arguments hold
    return text if len(text) <= 160 else text[:157] + "..."


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "process_start": _process_start(os.getpid()), "token": uuid.uuid4().hex}


def _read(path: Path) -> dict | None:
    """The holder recorded in a lock file; None if it is gone, empty or unreadable."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def _running(info: dict) -> bool:
    """Whether the holder may still run: False only when it is known dead (same host, pid gone or reused)."""
    if info.get("host") != socket.gethostname():
        return True  # another machine's process: nothing here can tell
    pid = info["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    started = _process_start(pid)
    return not (info.get("process_start") and started and started != info["process_start"])


def describe(info: dict) -> str:
    return (f"pid {info.get('pid')} on {info.get('host')} ({info.get('command', '?')!r}, since "
            f"{info.get('since', '?')})")


class Lock:
    """A held lock file; `release` removes it (only if it is still this holder's)."""

    def __init__(self, path: Path, token: str) -> None:
        self.path, self.token = path, token

    def moved_to(self, folder: Path) -> None:
        """The folder holding the lock file was renamed to `folder`."""
        self.path = Path(folder) / self.path.name

    def release(self) -> None:
        info = _read(self.path)
        if info is not None and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)


def _take_over(path: Path, stale: dict) -> None:
    """Move a dead holder's lock aside; if a live one replaced it meanwhile, put that one back."""
    aside = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another run took it over first
    try:
        if (_read(aside) or {}).get("token") != stale.get("token"):
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
    finally:
        aside.unlink(missing_ok=True)


def acquire(path: str | os.PathLike, what: str | None = None) -> Lock:
    """Create the lock file `path` for this process, or raise a UserError naming its live holder."""
    path = Path(path)
    what = what or str(path.parent)
    holder = _holder()
    for _ in range(100):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = _read(path)
            if info is None:  # being written this instant, or torn by a kill between create and write
                try:
                    age = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < _UNREADABLE_GRACE_S:
                    time.sleep(0.05)
                    continue
                print(f"note: {path} is an unreadable lock file older than {_UNREADABLE_GRACE_S:g} s; taking it over")
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            if _running(info):
                raise UserError(f"{what} is in use by {describe(info)}: wait for that run to end (or, if it is no "
                                f"longer running, delete {path})")
            print(f"note: taking over {path}, left by {describe(info)}, which is no longer running")
            _take_over(path, info)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(holder) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return Lock(path, holder["token"])
    raise UserError(f"cannot take the lock {path}: it keeps changing hands")


@contextlib.contextmanager
def hold(folder: str | os.PathLike, name: str = LOCK_FILE, what: str | None = None,
         remove_empty: bool = False) -> Iterator[Lock]:
    """Hold `folder/name` (creating `folder` if needed) for the block. Folders this created (and `folder`
    itself with `remove_empty`) are removed again at the end if nothing was written in them: a run that
    failed on its inputs leaves no trace."""
    folder = Path(folder)
    if name == LOCK_FILE:  # an output folder, which a `Replacement` may have been swapping
        _restore_interrupted_swap(folder)
    created = folder if remove_empty else None
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        created = p
    folder.mkdir(parents=True, exist_ok=True)
    lock = None
    try:
        lock = acquire(folder / name, what)
        yield lock
    finally:
        if lock is not None:
            lock.release()
        if created is not None and lock is not None and lock.path.parent == folder:
            _remove_empty(folder, created)


def hold_output(path: str | os.PathLike, what: str | None = None) -> contextlib.AbstractContextManager[Lock]:
    """Hold the lock of an output that is one file, or a folder that appears whole by rename: the sibling
    `.<name>.lock`."""
    path = Path(path)
    return hold(path.parent, f".{path.name}.lock", what or str(path))


def _remove_empty(folder: Path, top: Path) -> None:
    for p in [folder, *folder.parents]:
        try:
            p.rmdir()
        except OSError:
            return
        if p == top:
            return


def has_output(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds anything besides a lock file."""
    folder = Path(folder)
    return folder.is_dir() and any(p.name != LOCK_FILE for p in folder.iterdir())


def staging_path(out: str | os.PathLike) -> Path:
    """Where a replacement of the output folder `out` is written (every process of a job agrees)."""
    out = Path(out)
    return out.with_name(out.name + STAGING_SUFFIX)


def _restore_interrupted_swap(out: Path) -> None:
    """A swap killed between its two renames left `<out>.old` and no `<out>`: the old output comes back."""
    old = out.with_name(out.name + OLD_SUFFIX)
    if not out.exists() and old.is_dir():
        print(f"note: restoring {out} from {old} (a replacement was interrupted)")
        os.rename(old, out)


class Replacement:
    """Write a new version of the finished output folder `out` in `<out>.new` (locked), and swap it in with
    `commit()`. Leaving the block without committing deletes the staging folder; the old output stays. The
    caller holds `out`'s own lock, so no other run writes the staging folder meanwhile."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.work = staging_path(self.out)
        self.lock: Lock | None = None
        self.committed = False

    def __enter__(self) -> Replacement:
        if self.work.exists():
            print(f"note: removing {self.work}, an unfinished replacement of {self.out}")
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        self.lock = acquire(self.work / LOCK_FILE, str(self.work))
        return self

    def commit(self) -> None:
        """Swap the staging folder in for the old output, then delete the old one."""
        old = self.out.with_name(self.out.name + OLD_SUFFIX)
        if old.exists():
            shutil.rmtree(old)
        if self.out.exists():
            os.rename(self.out, old)
        try:
            os.rename(self.work, self.out)
        except OSError as e:
            if old.exists():
                os.rename(old, self.out)
            raise UserError(f"cannot move {self.work} into place as {self.out} ({e.strerror or e}); the old "
                            "output is kept") from None
        self.committed = True
        if self.lock is not None:
            self.lock.moved_to(self.out)
        shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()
        if not self.committed:
            shutil.rmtree(self.work, ignore_errors=True)
