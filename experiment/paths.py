"""Every path and file name inside a run folder, and nowhere else.

    experiments/<stamp>_<name>/                 config.json, metadata.json, metrics.jsonl, log.txt, loss.png,
                                                tokenizer.json, state_stepNNNNNN.pt
                                                (a run made from a released model by experiment.init_base:
                                                config.json, metadata.json, tokenizer.json; its one checkpoint,
                                                "released", is the model folder config.json names)
        transcoders/<checkpoint stem>/          config.json, metrics.jsonl, metrics.json, transcoders.png,
                                                state_stepNNNNNN.pt, blocks.N.mlp/{cfg.json, sae.safetensors}
                                                (older runs: layer_XX/, still read)
        topk/<checkpoint stem>/                 config.json, index.json, index.html, scan_state.pt (while running),
                                                layer_XX/{features.jsonl, contexts.jsonl, arrays.safetensors,
                                                index.html, features.js}
        descriptions/<checkpoint stem>/         descriptions.jsonl, summary.json, scores.png
        explanations/<stamp>/                   explanations.json, report.html, graphs/ (one graph per step)
        hub/<checkpoint stem>/                  the model as a Hub folder (python -m experiment.hub)
        exports/circuit-tracer/<checkpoint stem>/  the transcoders for circuit-tracer (interp.exports.circuit_tracer)
        exports/delphi/<checkpoint stem>/       delphi's latent cache, explanations and scores (interp.exports.delphi)
        exports/neuronpedia/<checkpoint stem>/  Neuronpedia's import rows (interp.exports.neuronpedia)
        ground_truth.json
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path

from core.files import UserError, read_json
from model.transcoder import WEIGHTS_FILE

RUNS_DIR = "experiments"
CONFIG_FILE = "config.json"  # a run's, and each later stage's settings
METADATA_FILE = "metadata.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "log.txt"
LOSS_PLOT = "loss.png"
CHECKPOINT_RE = re.compile(r"^state_step(\d{6,})\.pt$")
RELEASED = "released"  # the one checkpoint name of a run made from a released model
BASE_MODEL_KEY = "base_model"  # config.json's record of that model: {"source": ..., "folder": ...}

TRANSCODERS_DIR = "transcoders"
TRANSCODER_SUMMARY_FILE = "metrics.json"  # the last validation, per layer
TRANSCODER_PLOT = "transcoders.png"

TOPK_DIR = "topk"
INDEX_FILE = "index.json"  # written last: its presence means the output is complete
SCAN_STATE_FILE = "scan_state.pt"
FEATURES_FILE = "features.jsonl"
CONTEXTS_FILE = "contexts.jsonl"
ARRAYS_FILE = "arrays.safetensors"
PAGE_FILE = "index.html"
PAGE_DATA_FILE = "features.js"

DESCRIPTIONS_DIR = "descriptions"
RECORDS_FILE = "descriptions.jsonl"
DESCRIPTIONS_SUMMARY_FILE = "summary.json"
SCORES_PLOT = "scores.png"

EXPLANATIONS_DIR = "explanations"
EXPLANATIONS_FILE = "explanations.json"
REPORT_FILE = "report.html"
GRAPHS_DIR = "graphs"  # one attribution graph per step, in circuit-tracer's frontend schema

GROUND_TRUTH_FILE = "ground_truth.json"
EXPORTS_DIR = "exports"


def export_folder(run: Path, tool: str, checkpoint: Path, output: str = "") -> Path:
    """Where an export for `tool` writes: `output` when given, else `<run>/exports/<tool>/<checkpoint stem>/`."""
    return Path(output) if output else run / EXPORTS_DIR / tool / checkpoint.stem


def layer_name(layer: int) -> str:
    """The folder of one layer's top-k output or pages."""
    return f"layer_{layer:02d}"


def hookpoint(layer: int) -> str:
    """The module a layer's transcoder reads, as `DiffusionLM.named_modules()` names it: the name of its
    folder, so sparsify's `load_many` keys by module path and delphi's hookpoint lookup finds the module."""
    return f"blocks.{layer}.mlp"


def transcoder_dir(tc_dir: Path, layer: int) -> Path:
    """A layer's transcoder folder: `blocks.N.mlp`, or a run's older `layer_XX` when only that exists."""
    new, old = tc_dir / hookpoint(layer), tc_dir / layer_name(layer)
    return old if not (new / WEIGHTS_FILE).exists() and (old / WEIGHTS_FILE).exists() else new


@dataclass(frozen=True)
class StagePaths:
    """The folders of the later stages that belong to one checkpoint of a run."""

    run: Path
    checkpoint: str  # the checkpoint's file name or stem

    @property
    def stem(self) -> str:
        return Path(self.checkpoint).stem

    @property
    def transcoders(self) -> Path:
        return self.run / TRANSCODERS_DIR / self.stem

    @property
    def topk(self) -> Path:
        return self.run / TOPK_DIR / self.stem

    @property
    def descriptions(self) -> Path:
        return self.run / DESCRIPTIONS_DIR / self.stem

    @property
    def records(self) -> Path:
        return self.descriptions / RECORDS_FILE

    def explanations(self, stamp: str) -> Path:
        return self.run / EXPLANATIONS_DIR / stamp

    def new_explanations(self) -> Path:
        """A new explanations/<stamp> folder, this run's alone even when another starts in the same second."""
        return new_folder(self.run / EXPLANATIONS_DIR, stamp_now())


def finished_transcoder_layers(tc_dir: Path) -> list[int]:
    """The layers whose transcoder files were written (at a checkpoint or at the end of training), in
    `blocks.N.mlp` folders or a run's older `layer_XX` ones."""
    pattern = re.compile(r"^(?:blocks\.(\d+)\.mlp|layer_(\d+))$")
    return sorted({int(m.group(1) or m.group(2)) for p in tc_dir.iterdir() if p.is_dir()
                   and (m := pattern.match(p.name)) and (p / WEIGHTS_FILE).exists()} if tc_dir.is_dir() else set())


def new_folder(parent: str | os.PathLike, name: str) -> Path:
    """Create `parent/name`, or `name_2`, `name_3`, ... when taken: the mkdir itself decides, so runs started
    in the same second (the names carry a stamp) never share a folder."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        folder = parent / (name if n == 1 else f"{name}_{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1


def stamp_now() -> str:
    return datetime.datetime.now().strftime("%Y%m%d_%H%M%S")


def new_run_folder(name: str, root: str | os.PathLike = RUNS_DIR) -> Path:
    return new_folder(root, f"{stamp_now()}_{name}")


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


def base_model(folder: str | os.PathLike) -> dict | None:
    """config.json's base_model record when the run was made from a released model, else None."""
    config = Path(folder) / CONFIG_FILE
    if not config.is_file():
        return None
    values = read_json(config)
    found = values.get(BASE_MODEL_KEY) if isinstance(values, dict) else None
    if found is not None and not (isinstance(found, dict) and isinstance(found.get("folder"), str)):
        raise UserError(f"{config}: {BASE_MODEL_KEY} must be an object with the model's folder, got {found!r}")
    return found


def resolve_checkpoint(folder: str | os.PathLike, name: str) -> Path:
    """`name` inside `folder`, or its newest checkpoint for `latest`; a missing one lists what exists. A run made
    from a released model has one checkpoint, `released` (also its `latest`): the path `<folder>/released`,
    which names the later stages' outputs; the weights stay in the model folder."""
    folder = Path(folder)
    base = base_model(folder)
    if base is not None:
        if name not in (RELEASED, "latest"):
            raise UserError(f"{folder} is the released model {base.get('source', base['folder'])}: its one checkpoint "
                            f"is {RELEASED!r} (or 'latest'), not {name!r}")
        return folder / RELEASED
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
