"""What a flag's value may be: numeric ranges and kinds of text (paths, names, devices, lists).

Every field of a stage's config declares one check in its metadata (`arg(default, help, check=...)`).
A check raises ValueError with one line naming the flag; `core.cli` runs them on the command line's
values and on a `--config` file's alike, before a stage writes anything. Each check also lists the bad
values the fuzz test (tests/test_flag_fuzz.py) tries on every flag that uses it; placeholders in braces
({missing}, {file}, {dir}, {nonutf8}) are files the test makes.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

MAX_COUNT = 2**31 - 1  # sizes and counts: far above any real run, small enough for every tensor index
MAX_SEED = 2**32 - 1  # numpy's and torch's generators both take [0, 2**32)
MAX_NAME = 100  # characters of a run-folder name
REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """A finite number in [low, high] (an end is open when `low_open`/`high_open`)."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    runs: tuple[str, ...] = ()  # values inside the range that only the stage can refuse (they need the run)

    def check(self, flag: str, value: Any) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{flag} must be a finite number, got {value}")
        if value < self.low or self.low_open and value == self.low:
            if self.low == 0:
                need = "positive" if self.low_open else "0 or positive"
            elif self.low == 1 and not self.low_open and isinstance(value, int):
                need = "positive"
            else:
                need = f"{'above' if self.low_open else 'at least'} {_num(self.low)}"
            raise ValueError(f"--{flag} must be {need}, got {value}")
        if value > self.high or self.high_open and value == self.high:
            raise ValueError(f"--{flag} must be {'below' if self.high_open else 'at most'} {_num(self.high)}, "
                             f"got {value}")

    def bad(self, integer: bool) -> tuple[str, ...]:
        """Values just outside the range, and the ones no number flag takes."""
        step = 1 if integer else max(abs(self.low), abs(self.high), 1) * 1e-3
        below = self.low if self.low_open else self.low - step
        above = self.high if self.high_open else self.high + step
        out = [_num(below), _num(above), "inf", "-inf", "nan", "1e400", "abc", ""]
        if integer:
            out += ["1.5", "99999999999999999999999"]
        return tuple(out)


def count(low: int = 1, high: int = MAX_COUNT, runs: tuple[str, ...] = ()) -> Range:
    """An integer size or count: positive by default."""
    return Range(low, high, runs=runs)


def fraction(low_open: bool = False, high_open: bool = False) -> Range:
    """A number in [0, 1]."""
    return Range(0.0, 1.0, low_open, high_open)


def positive(high: float) -> Range:
    """A finite number above 0 and at most `high`."""
    return Range(0.0, high, low_open=True)


SEED = Range(0, MAX_SEED)
COUNT = count()
COUNT_OR_ZERO = count(0)


@dataclass(frozen=True)
class Kind:
    """A kind of text (or any value) a flag takes: a check, and the bad values the fuzz test tries."""

    name: str
    test: Callable[[str, Any], object]  # (flag, value) → raises ValueError; what it returns is ignored
    bad: tuple[str, ...] = ()
    numbers_as_text: bool = False  # a --config file may give a number for it (written back as text)
    runs: tuple[str, ...] = field(default=())  # bad values only the stage itself can refuse (they need the run)

    def check(self, flag: str, value: Any) -> None:
        self.test(flag, value)


def _any(flag: str, value: Any) -> None:
    pass


def _name(flag: str, value: str) -> None:
    if not value or len(value) > MAX_NAME or not NAME_RE.match(value) or ".." in value:
        raise ValueError(f"--{flag} {value[:40]!r}: a name of 1 to {MAX_NAME} letters, digits, '.', '_' or '-' "
                         "(no path separators, no '..'), starting with a letter or digit")


def _existing(flag: str, value: str, what: str) -> Path:
    if not value:
        raise ValueError(f"--{flag} is empty: give {what}")
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError(f"--{flag} {value} does not exist")
    if not os.access(path, os.R_OK):
        raise ValueError(f"--{flag} {value}: not readable (permission denied)")
    return path


def _in_folder(flag: str, value: str) -> None:
    path = _existing(flag, value, "a folder")
    if not path.is_dir():
        raise ValueError(f"--{flag} {value}: a file, not a folder")


def _run_folder(flag: str, value: str) -> None:
    _in_folder(flag, value)
    if not (Path(value) / "config.json").is_file():
        raise ValueError(f"--{flag} {value} is not a run folder (no config.json); point it at experiments/<run>")


def _text_file(flag: str, value: str) -> None:
    if not value:
        return
    path = _existing(flag, value, "a text file")
    if path.is_dir():
        raise ValueError(f"--{flag} {value}: a folder, not a file")
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--{flag} {value}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"--{flag} {value}: cannot read it ({e.strerror})") from None


def _writable_parent(flag: str, path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"--{flag} {path}: its folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--{flag} {path}: its folder {parent} is not writable")


def _out_file(flag: str, value: str) -> None:
    """A file to (over)write: not a folder, in a folder that exists."""
    if not value:
        return
    path = Path(value).expanduser()
    if path.is_dir():
        raise ValueError(f"--{flag} {value}: a folder; give a file name")
    if len(path.name) > 255:
        raise ValueError(f"--{flag}: the file name is longer than 255 characters")
    _writable_parent(flag, path)


def _out_folder(flag: str, value: str) -> None:
    """A folder to write into (made when missing): not a file, in a folder that exists."""
    if not value:
        return
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--{flag} {value}: a file, not a folder")
    if len(path.name) > 255:
        raise ValueError(f"--{flag}: the folder name is longer than 255 characters")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"--{flag} {value}: not writable")
        return
    _writable_parent(flag, path)


def _root_folder(flag: str, value: str) -> None:
    """A folder that holds runs or datasets (made with its parents when missing): no part of it is a file."""
    if not value:
        raise ValueError(f"--{flag} is empty: give a folder")
    path = Path(value).expanduser()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"--{flag} {value}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ValueError(f"--{flag} {value}: {p} is not writable")
            return


def _checkpoint(flag: str, value: str) -> None:
    if value != "latest" and (not value or Path(value).name != value or value in (".", "..")):
        raise ValueError(f"--{flag} {value!r}: 'latest' or a checkpoint's file name inside the run folder "
                         "(state_stepNNNNNN.pt), without a path")


def device_index(flag: str, value: Any) -> int | None:
    """The one parser of --device and --cuda: cpu → None; cuda → the current CUDA device's index; cuda:N or
    --cuda's int N → N. A CUDA device must exist (ValueError naming the flag otherwise)."""
    index: int | None
    if isinstance(value, int):
        Range(0, 1023).check(flag, value)
        index, shown = value, f"cuda:{value}"
    elif value == "cpu":
        return None
    else:
        m = re.fullmatch(r"cuda(?::(\d{1,4}))?", value or "")
        if not m:
            raise ValueError(f"--{flag} {value!r}: use cpu, cuda or cuda:N")
        index, shown = (int(m.group(1)) if m.group(1) else None), value
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have == 0 or index is not None and index >= have:
        listed = ", ".join(f"cuda:{i}" for i in range(have)) or "none (this machine has no usable CUDA GPU)"
        raise ValueError(f"--{flag}: device {shown} does not exist; CUDA devices here: {listed}; use --device cpu "
                         "to run on the CPU")
    return torch.cuda.current_device() if index is None else index


def _device(flag: str, value: Any) -> None:
    device_index(flag, value)


def index_list(flag: str, value: str, allow_all: bool = False) -> list[int] | None:
    """'' (None), 'all' (None, where allowed) or comma-separated indices ≥ 0."""
    if not value.strip() or allow_all and value == "all":
        if allow_all and not value.strip():
            raise ValueError(f"--{flag} is empty: give 'all' or comma-separated indices")
        return None
    parts = [x.strip() for x in value.split(",")]
    if not all(re.fullmatch(r"\d{1,9}", x) for x in parts):
        raise ValueError(f"--{flag} {value!r}: give comma-separated indices ≥ 0" + (" or 'all'" if allow_all else ""))
    return sorted({int(x) for x in parts})


def _repo_id(flag: str, value: str) -> None:
    if value and not (REPO_ID_RE.match(value) and "--" not in value and ".." not in value
                      and not value.endswith((".", "-"))):
        raise ValueError(f"--{flag} {value!r}: not a Hub repository id (user/name: letters, digits, '.', '_', '-')")


def _model_ref(flag: str, value: str) -> None:
    """'tokens', a local model folder, or a Hub model id."""
    if value == "tokens":
        return
    path = Path(value).expanduser()
    if path.is_dir():
        return _in_folder(flag, value)
    looks_local = value.startswith(("/", ".", "~")) or value.count("/") > 1 or os.sep in value and "/" not in value
    if looks_local or path.is_file():
        raise ValueError(f"--{flag} {value} does not exist: give 'tokens', a model folder or a Hub id (org/name)")
    if not REPO_ID_RE.match(value):
        raise ValueError(f"--{flag} {value!r}: neither 'tokens', a local model folder nor a Hub model id (org/name)")


def _mask_ratio(flag: str, value: str) -> None:
    """'random' (the training noise process) or a fixed t in [0, 1]."""
    if value == "random":
        return
    try:
        t = float(value)
    except ValueError:
        raise ValueError(f"--{flag} must be 'random' or a number in [0, 1], got {value!r}") from None
    if not 0 <= t <= 1:  # nan fails this too
        raise ValueError(f"--{flag} must lie in [0, 1], got {value}")


def _resume(flag: str, value: str) -> None:
    if value and value != "latest":
        _existing(flag, value, "a run folder or checkpoint")


TEXT = Kind("text", _any)
MASK_RATIO = Kind("noise level", _mask_ratio, ("x", "-0.5", "1.5", "nan", "inf", ""), numbers_as_text=True)
NAME = Kind("name", _name, ("", "../escape", "a/b", ".", "x" * 300, "with space"))
IN_PATH = Kind("file or folder", lambda flag, v: _existing(flag, v, "a file or folder"), ("", "{missing}"))
IN_FOLDER = Kind("folder", _in_folder, ("", "{missing}", "{file}"))
RUN_FOLDER = Kind("run folder", _run_folder, ("", "{missing}", "{file}", "{dir}"))
TEXT_FILE = Kind("text file", _text_file, ("{missing}", "{dir}", "{nonutf8}"))
OUT_FILE = Kind("output file", _out_file, ("{dir}", "{missing}/out.json", "{file}/out.json", "x" * 300))
OUT_FOLDER = Kind("output folder", _out_folder, ("{file}", "{missing}/sub", "x" * 300))
ROOT_FOLDER = Kind("folder of runs", _root_folder, ("", "{file}", "{file}/sub"))
RESUME = Kind("resume", _resume, ("{missing}",))
CHECKPOINT = Kind("checkpoint", _checkpoint, ("", "../../etc/passwd", "a/b.pt", ".."),
                  runs=("state_step999999.pt",))
DEVICE = Kind("device", _device, ("gpu", "cuda:abc", "cuda:-1", "cuda:99", "", "CPU"))
CUDA = Kind("cuda index", _device, ("-1", "99", "1024", "inf", "nan", "abc", "1.5", ""))
REPO_ID = Kind("Hub repository", _repo_id, ("bad name with spaces", "a/b/c", "/x", "-x/y", "x" * 300))
MODEL = Kind("model", _model_ref, ("", "{missing}", "{file}", "bad name with spaces", "a/b/c"))
OPTIONAL_MODEL = Kind("model or nothing", lambda flag, v: _model_ref(flag, v) if v else None, MODEL.bad[1:])
INDICES = Kind("indices", index_list, ("x", "-1", "1,,x", "1.5", "9999999999"),
               runs=("99999",))
LAYERS = Kind("layers", lambda flag, v: index_list(flag, v, allow_all=True),
              ("", "x", "-1", "0,,x", "9999999999"), runs=("99",))


def choices(name: str, allowed: tuple[str, ...], empty_ok: bool = False) -> Kind:
    """Comma-separated names from `allowed` (at least one unless `empty_ok`)."""

    def test(flag: str, value: str) -> None:
        parts = [x.strip() for x in value.split(",") if x.strip()]
        unknown = [x for x in parts if x not in allowed]
        if unknown or not parts and not empty_ok:
            raise ValueError(f"--{flag} {value!r}: comma-separated, from {', '.join(allowed)}")

    return Kind(name, test, ("bogus", f"{allowed[0]},bogus") + (() if empty_ok else ("",)))
