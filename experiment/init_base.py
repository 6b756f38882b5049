"""python -m experiment.init_base: a run folder made from a released LLaDA-8B or Dream-7B, so that the later
stages (train_transcoders.py, get_topk_activations.py, ...) work on it as on a run of train_diffusion.py.

    python -m experiment.init_base --model GSAI-ML/LLaDA-8B-Base --num_shards 2
    python -m experiment.init_base --model path/to/Dream-v0-Base-7B --dataset synthetic

It writes experiments/<stamp>_<family>/ with config.json ("base_model": the source, its absolute folder and
the longest sequence its config states, experiment.runs.run_seq_len; "model": the ModelConfig of
model.public_models.public_config; "tokenizer": the spec of the model's own tokenizer,
data.tokenizer.ModelTokenizer, kept beside it as tokenizer.json; "data": the prepared dataset), metadata.json
and tokenizer.json. No weights are copied: the run's one checkpoint, "released", is the model folder itself
(experiment.paths.resolve_checkpoint, experiment.runs.open_released). The dataset is
prepared with the model's tokenizer and ids (data.prepare, --tokenizer hf:<folder>), in a folder of its own
per tokenizer, [BOS] before every document as for this project's models. Everything is checked before the
run folder appears: the config (one line naming an unsupported flag), the weights' names and shapes (read
from the safetensors headers), the tokenizer's ids against the model's.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from core import checks as c, cli
from core.cli import Flags, arg
from core.files import UserError, read_json, write_json_atomic
from data.prepare import DATASET, SYNTHETIC_MB, PrepareConfig, prepare_dataset
from data.tokenizer import HF_PREFIX, ModelTokenizer
from experiment.paths import BASE_MODEL_KEY, CONFIG_FILE, METADATA_FILE, new_run_folder
from experiment.record import metadata
from model.diffusion import DiffusionLM, ModelConfig
from model.public_models import key_map, public_config, resolve
from model.safetensors_folder import tensor_files, tensor_shapes


def _source(flag: str, value: str) -> None:
    """A model folder or a Hub id: not empty, not a file (a missing folder or an unknown id is refused by
    model.public_models.resolve, in one line)."""
    if not value:
        raise ValueError(f"--{flag} is empty: give a released model's folder or Hub id (owner/name)")
    if Path(value).expanduser().is_file():
        raise ValueError(f"--{flag} {value} is a file: give a released model's folder or Hub id (owner/name)")


MODEL_SOURCE = c.Kind("model folder or Hub id", _source, ("", "{file}"))


@dataclass
class InitBaseConfig(Flags):
    """Make a run folder from a released LLaDA or Dream model: its config, its own tokenizer, and a dataset
    tokenized with that tokenizer (no weights are copied)."""

    model: str = arg("", "the released LLaDA or Dream model: a local folder or a Hugging Face Hub id (owner/name)",
                     MODEL_SOURCE)
    dataset: str = arg("fineweb-edu", "fineweb-edu, synthetic, or a path to .txt/.jsonl/.parquet files", DATASET)
    data_dir: str = arg("data_cache", "where prepared datasets live", c.ROOT_FOLDER)
    synthetic_mb: float = arg(4.0, "size of the synthetic corpus (MB of text)", SYNTHETIC_MB)
    num_shards: Optional[int] = arg(None, "FineWeb-edu training shards to prepare (default 8)", c.count(1, 100_000))
    workers: int = arg(os.cpu_count() or 1, "tokenizer worker processes", c.count(1, 1024))
    model_name: Optional[str] = arg(None, "suffix of the run folder's name (default: the family, llada or dream)",
                                    c.NAME)
    experiments_dir: str = arg("experiments", "where run folders are created", c.ROOT_FOLDER)


def check_weights(folder: Path, cfg: ModelConfig) -> None:
    """Every tensor the config implies is in the folder's safetensors with its shape, and nothing else (headers
    only: nothing is loaded)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DiffusionLM(cfg).state_dict().items()}
    names = key_map(cfg)
    files = tensor_files(folder)
    missing = [k for k in names if k not in files]
    extra = sorted(k for k in files if k not in names)
    if missing or extra:
        what = f"{len(missing)} weight(s) missing, the first {missing[0]}" if missing else \
            f"{len(extra)} unexpected weight(s), the first {extra[0]}"
        raise UserError(f"{folder}: {what}")
    shapes = tensor_shapes(files)
    wrong = [k for k in names if tuple(shapes[k]) != expected[names[k]]]
    if wrong:
        raise UserError(f"{folder}: {len(wrong)} weight(s) of the wrong shape, the first {wrong[0]} "
                        f"{list(shapes[wrong[0]])} (config.json implies {list(expected[names[wrong[0]]])})")


def check_tokenizer(tok: ModelTokenizer, cfg: ModelConfig, folder: Path) -> None:
    """The tokenizer's ids are the model's (both read from the folder, by data/ and model/ separately)."""
    want = {"n_vocab": cfg.n_vocab, "vocab_size": cfg.vocab_size, "bos_id": cfg.bos_id, "mask_id": cfg.mask_id,
            "pad_id": cfg.pad_id, "n_text": cfg.text_size}
    got = {k: getattr(tok, k) for k in want}
    if got != want:
        k = next(k for k in want if got[k] != want[k])
        raise UserError(f"{folder}: the tokenizer's {k} is {got[k]}, the model's {want[k]}")


def max_seq_len(folder: Path) -> int | None:
    """The longest sequence the released config states (LLaDA's max_sequence_length, Dream's
    max_position_embeddings), or None."""
    values = read_json(folder / "config.json")
    found = next((values[k] for k in ("max_sequence_length", "max_position_embeddings") if k in values), None)
    return found if isinstance(found, int) and not isinstance(found, bool) and found > 0 else None


def main(cfg: InitBaseConfig) -> Path:
    """Check the model, prepare the data, write the run folder (config.json last); its path."""
    folder = resolve(cfg.model).resolve()
    mcfg = public_config(folder)
    check_weights(folder, mcfg)
    tok = ModelTokenizer.from_model_folder(folder)
    check_tokenizer(tok, mcfg, folder)
    data = prepare_dataset(PrepareConfig(
        dataset=cfg.dataset, tokenizer=f"{HF_PREFIX}{folder}", data_dir=cfg.data_dir, synthetic_mb=cfg.synthetic_mb,
        num_shards=cfg.num_shards if cfg.dataset == "fineweb-edu" else None, workers=cfg.workers))
    if data.tokenizer.spec() != tok.spec():
        raise UserError(f"{data.folder} holds another tokenizer ({data.tokenizer.spec()}) than {folder}'s")
    train_files = [s["file"] for s in data.meta["shards"] if s["split"] == "train"]
    run = new_run_folder(cfg.model_name or mcfg.family, cfg.experiments_dir)
    tok.save(run)
    write_json_atomic(run / METADATA_FILE, metadata({"base_model": str(folder)}))
    base = {"source": cfg.model, "folder": str(folder), "max_seq_len": max_seq_len(folder)}
    data_record = {"folder": str(data.folder), "params": data.meta["params"], "train_files": train_files}
    write_json_atomic(run / CONFIG_FILE, {BASE_MODEL_KEY: base, "init": asdict(cfg), "model": asdict(mcfg),
                                          "tokenizer": tok.spec(), "data": data_record})
    print(f"run folder: {run} ({mcfg.family} from {folder}; its checkpoint is 'released')")
    return run


if __name__ == "__main__":
    cli.run(main, InitBaseConfig, description=InitBaseConfig.__doc__)
