"""A checkpoint's transcoders as a clean sparsify folder, to share: `python -m interp.exports.sparsify`.

    python -m interp.exports.sparsify --train_folder experiments/X [--checkpoint_name latest] [--output DIR]
        [--push_to_hub user/name]

The transcoders folder `experiments/X/transcoders/<checkpoint stem>/` is already in sparsify's layout, but it
also holds what only training needs (the resumable `state_stepNNNNNN.pt` with the optimizer's state, log.txt,
metrics.jsonl, the plot). This writes (default `experiments/X/exports/sparsify/<checkpoint stem>/`) only
`blocks.N.mlp/cfg.json` and `blocks.N.mlp/sae.safetensors` for every finished layer (the files as trained,
byte for byte), config.json (how they were trained) and metrics.json (their last validation), so
`SparseCoder.load_many(DIR, local=True)` loads them and the folder can go to the Hub as it is.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from core import checks as c, cli
from core.cli import arg
from core.files import UserError, atomic_path
from core.locks import hold
from experiment import CONFIG_FILE, RunFlags, StagePaths, finished_transcoder_layers, hookpoint, transcoder_dir
from experiment.hub import UploadFlags, check_repo_id
from experiment.paths import TRANSCODER_SUMMARY_FILE, export_folder, resolve_checkpoint, resolve_run_folder
from model.transcoder import CFG_FILE, WEIGHTS_FILE

EXPORT_NAME = "sparsify"


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def export(train_folder: str, checkpoint_name: str = "latest", output: str = "") -> Path:
    folder = resolve_run_folder(train_folder)
    ckpt = resolve_checkpoint(folder, checkpoint_name)
    tc_dir = StagePaths(folder, ckpt.name).transcoders
    layers = finished_transcoder_layers(tc_dir)
    if not layers:
        raise UserError(f"no finished transcoders in {tc_dir}: run train_transcoders.py for this checkpoint first")
    out = export_folder(folder, EXPORT_NAME, ckpt, output)
    with hold(out):  # one export at a time into a folder (released before any upload)
        for stale in [*out.glob("blocks.*.mlp"), out / CONFIG_FILE, out / TRANSCODER_SUMMARY_FILE]:
            if stale.is_dir():  # an earlier export's layers: none of another model's may linger
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
        for layer in layers:
            src, dst = transcoder_dir(tc_dir, layer), out / hookpoint(layer)  # older runs' layer_XX too
            dst.mkdir()
            for name in (CFG_FILE, WEIGHTS_FILE):
                _copy(src / name, dst / name)
        for name in (TRANSCODER_SUMMARY_FILE, CONFIG_FILE):  # config.json last: the export is then complete
            if (tc_dir / name).is_file():
                _copy(tc_dir / name, out / name)
    print(f"{len(layers)} transcoder(s) ({', '.join(hookpoint(i) for i in layers)}) from {tc_dir}")
    return out


@dataclass
class SparsifyExportConfig(UploadFlags, RunFlags):
    """Export a checkpoint's transcoders as a clean sparsify folder, without training state (and upload it)."""

    output: str = arg("", "the folder to write (default: experiments/X/exports/sparsify/<checkpoint stem>/)",
                      c.OUT_FOLDER)


def main(cfg: SparsifyExportConfig) -> Path:
    check_repo_id(cfg.push_to_hub)  # before anything is written
    return cfg.finish(export(cfg.train_folder, cfg.checkpoint_name, cfg.output))


if __name__ == "__main__":
    cli.run(main, SparsifyExportConfig, description=SparsifyExportConfig.__doc__)
