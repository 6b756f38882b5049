"""The run folder: paths, config and checkpoint save/load (atomic), metadata, logging, device choice.

Every stage reads and writes inside one folder `experiments/<stamp>_<name>/`; the file names are
constants here and nowhere else.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

from cli import UserError, arg

RUNS_DIR = "experiments"
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "log.txt"
LOSS_PLOT = "loss.png"
CHECKPOINT_RE = re.compile(r"^state_step(\d{6,})\.pt$")


# ---- atomic writes ---------------------------------------------------------------------------------

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


# ---- run folders and checkpoints ---------------------------------------------------------------------

def new_run_folder(name: str, root: str | os.PathLike = RUNS_DIR) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    folder = Path(root) / f"{stamp}_{name}"
    n = 1
    while folder.exists():  # two runs started within the same second
        n += 1
        folder = Path(root) / f"{stamp}_{name}_{n}"
    folder.mkdir(parents=True)
    return folder


def checkpoint_name(step: int) -> str:
    return f"state_step{step:06d}.pt"


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The checkpoints in `folder`, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(folder).iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_run_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"run folder {folder} does not exist")
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{folder} is not a run folder (no {CONFIG_FILE}); point --train_folder at experiments/<run>")
    return folder


def resolve_checkpoint(folder: str | os.PathLike, name: str) -> Path:
    """`name` inside `folder`, or its newest checkpoint for `latest`; a missing one lists what exists."""
    folder = Path(folder)
    available = list_checkpoints(folder)
    if name == "latest":
        if not available:
            raise UserError(f"{folder} has no checkpoints yet (state_stepNNNNNN.pt)")
        return available[-1]
    path = folder / name
    if not path.is_file():
        names = ", ".join(p.name for p in available) or "none"
        raise UserError(f"checkpoint {path} does not exist; available: {names}")
    return path


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    import torch

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
        raise UserError(f"cannot load checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    if not isinstance(state, dict) or (require_model and "model" not in state):
        raise UserError(f"{path} is not a checkpoint of this project (no 'model' entry)")
    return state


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


# ---- metadata and logging ----------------------------------------------------------------------------

def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def metadata(extra: dict | None = None) -> dict:
    import torch

    return {"command": " ".join([Path(sys.executable).name, *sys.argv]), "start_time": datetime.datetime.now().isoformat(),
            "host": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "git_commit": git_commit(), **(extra or {})}


class RunLog:
    """Prints to the console and appends to log.txt; metrics go to metrics.jsonl. Silent on ranks > 0."""

    def __init__(self, folder: Path | None, enabled: bool = True) -> None:
        self.folder, self.enabled = folder, enabled

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        tqdm.write(message)  # keeps an active progress bar intact
        if self.folder is not None:
            with open(self.folder / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(message + "\n")

    def metrics(self, record: dict) -> None:
        if self.enabled and self.folder is not None:
            with open(self.folder / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def due(done: int, every: int, total: int) -> bool:
    """Whether a periodic event (logging, validation, checkpoint) happens after step `done`: every
    `every` steps (0: never periodically) and always after the last step."""
    return (every > 0 and done % every == 0) or done == total


def read_metrics(folder: Path) -> list[dict]:
    path = folder / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(folder: Path, last_step: int) -> None:
    """Drop events after `last_step` (a resumed run replays them), so the curve has no duplicates."""
    kept = [r for r in read_metrics(folder) if r.get("step", 0) <= last_step]
    write_text_atomic(folder / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))


# ---- devices -------------------------------------------------------------------------------------------

def resolve_device(cuda: int | None = None, device: str | None = None) -> "Any":
    """--cuda N or --device cpu|cuda|cuda:N; default cuda:0 when CUDA exists, else the CPU."""
    import torch

    if cuda is not None and device not in (None, "", f"cuda:{cuda}"):
        raise UserError(f"--cuda {cuda} and --device {device} disagree; give one of them")
    name = f"cuda:{cuda}" if cuda is not None else (device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    if name == "cuda":
        name = "cuda:0"
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda:(\d+)", name)
    if not m:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(m.group(1)) >= count:
        have = ", ".join(f"cuda:{i}" for i in range(count)) or "none (this machine has no usable CUDA GPU)"
        raise UserError(f"device {name} does not exist; CUDA devices here: {have}; use --device cpu to run on the CPU")
    return torch.device(name)


# ---- later stages: rebuild a trained run from its folder ----------------------------------------------

SHAPE_FLAGS = ("num_layers", "num_heads", "model_dim")


def check_shape_flags(model_config: dict, given: dict) -> None:
    """Later stages read shapes from config.json; a shape flag typed anyway must agree with it."""
    for name in SHAPE_FLAGS:
        if given.get(name) is not None and given[name] != model_config[name]:
            raise UserError(f"--{name} {given[name]} disagrees with the run's config.json ({name}={model_config[name]}); "
                            "shape flags are optional after training, drop it or fix it")


def load_run(train_folder: str | os.PathLike, checkpoint: str, device: Any, shape_flags: dict | None = None):
    """(config, model, tokenizer, checkpoint path) of a trained run; the model loads strictly."""
    from data.tokenizer import load_tokenizer
    from model.diffusion import DiffusionLM, ModelConfig

    folder = resolve_run_folder(train_folder)
    config = read_json(folder / CONFIG_FILE)
    check_shape_flags(config["model"], shape_flags or {})
    path = resolve_checkpoint(folder, checkpoint)
    model = DiffusionLM.load(path, device, expected=ModelConfig(**config["model"]))
    model.eval()
    return config, model, load_tokenizer(config["tokenizer"], folder), path


# ---- flags every later stage shares -------------------------------------------------------------------

@dataclasses.dataclass
class RunFlags:
    """Which trained run and checkpoint a later stage works on, and on which device."""

    train_folder: str = arg("", "the run folder (experiments/<run>)")
    checkpoint_name: str = arg("latest", "checkpoint in the run folder, or 'latest'")
    cuda: Optional[int] = arg(None, "CUDA device index")
    device: Optional[str] = arg(None, "cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        if not self.train_folder:
            raise ValueError("--train_folder is required (experiments/<run>)")


@dataclasses.dataclass
class ShapeFlags:
    """Shape flags after training: optional, and checked against the run's config.json."""

    num_layers: Optional[int] = arg(None, "optional; must match the run's config.json")
    num_heads: Optional[int] = arg(None, "optional; must match the run's config.json")
    model_dim: Optional[int] = arg(None, "optional; must match the run's config.json")

    def shape_flags(self) -> dict:
        return {name: getattr(self, name) for name in SHAPE_FLAGS}
