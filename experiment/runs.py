"""Opening what earlier stages left in a run folder: the trained model (or, for a run made from a released
model by experiment.init_base, that model read from its own folder), its tokenizer and data, and the
transcoders of one of its checkpoints. Everything loads strictly."""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch

from core.checks import index_list
from core.files import UserError, read_json
from data.prepare import PrepareConfig, PreparedData, prepare_dataset
from data.tokenizer import load_tokenizer
from experiment.flags import check_shape_flags
from experiment.paths import (
    BASE_MODEL_KEY,
    CONFIG_FILE,
    finished_transcoder_layers,
    resolve_checkpoint,
    resolve_run_folder,
    transcoder_dir,
)
from model.diffusion import DiffusionLM, ModelConfig
from model.public_models import load_public_model
from model.transcoder import Transcoder


def check_released_length(config: dict, lengths: dict[str, int | None]) -> None:
    """A run made from a released model refuses sequences longer than the maximum its config.json states
    (`lengths`: flag name → tokens per sequence, None where unset); a trained run takes any length."""
    limit = config[BASE_MODEL_KEY].get("max_seq_len") if BASE_MODEL_KEY in config else None
    for flag, n in lengths.items():
        if limit is not None and n is not None and n > limit:
            raise UserError(f"--{flag} {n} is longer than the {limit:,} tokens the released model states as its "
                            f"maximum ({config[BASE_MODEL_KEY]['folder']}/config.json)")


def run_config(train_folder: str | os.PathLike) -> dict:
    """A run folder's config.json, read without loading anything (UserError when it is no run folder)."""
    return read_json(resolve_run_folder(train_folder) / CONFIG_FILE)


def _open_model(train_folder: str | os.PathLike, checkpoint: str, device: Any, shape_flags: dict,
                lengths: dict[str, int | None] | None = None) -> tuple[Path, dict, Path, DiffusionLM]:
    """(run folder, run config, checkpoint path, model in eval mode), loaded strictly; the shape flags and the
    sequence `lengths` (`check_released_length`) are checked before anything is loaded."""
    folder = resolve_run_folder(train_folder)
    config = run_config(folder)
    check_shape_flags(config["model"], shape_flags)
    check_released_length(config, lengths or {})
    path = resolve_checkpoint(folder, checkpoint)
    if BASE_MODEL_KEY in config:
        return folder, config, path, open_released(config, device)
    model = DiffusionLM.load(path, device, expected=ModelConfig(**config["model"])).eval()
    return folder, config, path, model


def run_seq_len(config: dict) -> int | None:
    """The sequence length a run's model was made for: the training length of a trained run, the released
    config's stated maximum for a run made by experiment.init_base (None when it states none)."""
    if BASE_MODEL_KEY in config:
        return config[BASE_MODEL_KEY].get("max_seq_len")
    return config["train"]["train_seq_len"]


def open_released(config: dict, device: Any) -> DiffusionLM:
    """The released model a run made by experiment.init_base names (float32 on the CPU, bfloat16 on CUDA), in
    eval mode, checked to be the model its config.json records."""
    model = load_public_model(config[BASE_MODEL_KEY]["folder"], device)
    if asdict(model.cfg) != config["model"]:
        raise UserError(f"the model in {config[BASE_MODEL_KEY]['folder']} is no longer the one this run was made "
                        "from (its config.json changed): make a new run with python -m experiment.init_base")
    return model


def load_run(train_folder: str | os.PathLike, checkpoint: str, device: Any, shape_flags: dict | None = None):
    """(config, model, tokenizer, checkpoint path) of a trained run; the model loads strictly, in eval mode."""
    folder, config, path, model = _open_model(train_folder, checkpoint, device, shape_flags or {})
    return config, model, load_tokenizer(config["tokenizer"], folder), path


class BaseRunFlags(Protocol):
    """What `open_base_run` reads of a stage's config (its RunFlags and ShapeFlags)."""

    train_folder: str
    checkpoint_name: str

    def shape_flags(self) -> dict: ...


def open_base_run(cfg: BaseRunFlags, device) -> tuple[Path, dict, Path, DiffusionLM]:
    """(run folder, run config, checkpoint path, frozen base model) for a stage with RunFlags and ShapeFlags;
    a released model's run first checks the stage's --train_seq_len and --val_seq_len, where it has them,
    against its stated maximum."""
    lengths = {flag: getattr(cfg, flag, None) for flag in ("train_seq_len", "val_seq_len")}
    folder, run_cfg, path, model = _open_model(cfg.train_folder, cfg.checkpoint_name, device, cfg.shape_flags(),
                                               lengths)
    model.requires_grad_(False)
    return folder, run_cfg, path, model


def open_data(run_cfg: dict) -> PreparedData:
    """The base run's prepared dataset (prepared again from its recorded settings if it is gone)."""
    data = run_cfg["data"]
    params = {k: v for k, v in data["params"].items() if k in PrepareConfig.__dataclass_fields__}
    return prepare_dataset(PrepareConfig(**params, data_dir=str(Path(data["folder"]).parent)))


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """--layers: 'all' or comma-separated indices of the model's layers (the one parser every stage uses)."""
    try:
        found = index_list("layers", spec, allow_all=True)
    except ValueError as e:
        raise UserError(str(e)) from None
    layers = list(range(num_layers)) if found is None else found
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad or not layers:
        raise UserError(f"--layers {spec}: the model has layers 0..{num_layers - 1}")
    return layers


def transcoder_layers(tc_dir: Path, spec: str, num_layers: int) -> list[int]:
    """The layers of --layers that have finished transcoders in `tc_dir` (all of them for 'all')."""
    if not tc_dir.is_dir():
        raise UserError(f"no transcoders in {tc_dir}: run train_transcoders.py for this checkpoint first")
    available = finished_transcoder_layers(tc_dir)
    if not available:
        raise UserError(f"{tc_dir} has no finished transcoder (blocks.N.mlp/sae.safetensors); train_transcoders.py "
                        "writes them at its checkpoints and at the end")
    if spec == "all":
        return available
    wanted = parse_layers(spec, num_layers)
    missing = [x for x in wanted if x not in available]
    if missing:
        raise UserError(f"no transcoder for layer(s) {missing} in {tc_dir} (have {available})")
    return wanted


def load_transcoders(tc_dir: Path, layers: list[int], device: torch.device | str,
                     model_dim: int) -> dict[int, Transcoder]:
    """Each layer's transcoder, checked to read the model's width."""
    transcoders = {layer: Transcoder.load(transcoder_dir(tc_dir, layer), device) for layer in layers}
    for layer, tc in transcoders.items():
        if tc.cfg.d_in != model_dim:
            raise UserError(f"the transcoder of layer {layer} expects width {tc.cfg.d_in}, the model has {model_dim}")
    return transcoders
