"""The run folder: above `data/` and `model/`, below `interp/`, `training/` and the stage scripts.

    paths    every path and file name of a run, run-folder creation, checkpoint listing and `latest`
    record   metadata (command, versions, commit, dirty tree and diff hash), log.txt, metrics.jsonl
    devices  --cuda/--device, and one device per process under torchrun
    flags    the flag groups the stage configs combine
    runs     opening a trained run: model, tokenizer, data, transcoders

The names most stages need are re-exported here.
"""
from experiment.devices import resolve_device, setup_distributed, to_device, use_compile
from experiment.flags import (
                              BatchFlags,
                              LayersFlag,
                              LoopFlags,
                              NoiseFlag,
                              RunFlags,
                              SamplingFlags,
                              ScanFlags,
                              ShapeFlags,
                              check_shape_flags,
)
from experiment.paths import (
                              CONFIG_FILE,
                              METADATA_FILE,
                              StagePaths,
                              checkpoint_name,
                              finished_transcoder_layers,
                              hookpoint,
                              layer_name,
                              list_checkpoints,
                              new_run_folder,
                              resolve_checkpoint,
                              resolve_run_folder,
                              transcoder_dir,
)
from experiment.record import RunLog, metadata, read_metrics, truncate_metrics
from experiment.runs import load_run, load_transcoders, open_base_run, open_data, parse_layers, transcoder_layers

__all__ = ["BatchFlags", "CONFIG_FILE", "LayersFlag", "LoopFlags", "METADATA_FILE", "NoiseFlag", "RunFlags", "RunLog",
           "SamplingFlags", "ScanFlags", "ShapeFlags", "StagePaths", "check_shape_flags", "checkpoint_name",
           "finished_transcoder_layers", "hookpoint", "layer_name", "list_checkpoints", "load_run", "load_transcoders",
           "metadata", "new_run_folder", "open_base_run", "open_data", "parse_layers", "read_metrics",
           "resolve_checkpoint", "resolve_device", "resolve_run_folder", "setup_distributed", "transcoder_dir",
           "to_device", "transcoder_layers", "truncate_metrics", "use_compile"]
