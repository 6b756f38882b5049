"""A checkpoint's transcoders in circuit-tracer's transcoder-set format: `python -m interp.exports.circuit_tracer`.

    python -m interp.exports.circuit_tracer --train_folder experiments/X [--checkpoint_name latest] [--output DIR]
        [--push_to_hub user/name]

Writes (default `experiments/X/exports/circuit-tracer/<checkpoint stem>/`) one `layer_{i}.safetensors` per
layer with circuit-tracer's names (`W_enc` (M, D), `b_enc`, `W_dec` (M, D), `b_dec`, and `W_skip` where the
transcoder has one) and `config.yaml` (`model_kind: transcoder_set`, the hook names, and the activation under
upstream circuit-tracer's keys: `activation: topk`, `k`). The folder is what circuit-tracer's cache and Hub
loaders read (`load_transcoder_from_hub`, `load_transcoders_from_cache`). Only this project's models have
those hooks: a run made from LLaDA or Dream is refused in one line (circuit-tracer would need a model_name it
can run and that model's hook names).

This project's activation is ReLU then TopK(k). Upstream's Hub loader (v0.5.0) builds `TopK(k)` alone from
config.yaml, which keeps negative latents where a token has fewer than k positive pre-activations. Its cache
loader, and every loader of PyPI's fork (circuit-tracer 0.5.0 on PyPI), build a ReLU. After loading, set each
transcoder's `activation_function` to ReLU then `TopK(k)` (docs/TOOLS.md): the outputs are then this project's
(tested with the PyPI package; upstream's checked by hand).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core import checks as c, cli
from core.cli import arg
from core.files import UserError, atomic_path, read_json, save_safetensors
from core.locks import hold
from experiment import (
    CONFIG_FILE,
    RunFlags,
    StagePaths,
    finished_transcoder_layers,
    load_transcoders,
    resolve_checkpoint,
)
from experiment.hub import UploadFlags, check_repo_id
from experiment.paths import export_folder, resolve_run_folder
from interp.exports import refuse_unhooked_family

EXPORT_NAME = "circuit-tracer"
# TransformerLens's names of the points a transcoder reads and writes: the MLP's input here is the
# normalised residual stream after attention (a norm without weights: ln2's output), its output the MLP's
INPUT_HOOK, OUTPUT_HOOK = "ln2.hook_normalized", "hook_mlp_out"


def circuit_tracer_tensors(tc) -> dict[str, torch.Tensor]:
    """One transcoder's weights under circuit-tracer's names (its encoder is (M, D), as ours)."""
    out = {"W_enc": tc.encoder.weight, "b_enc": tc.encoder.bias, "W_dec": tc.W_dec, "b_dec": tc.b_dec}
    if tc.W_skip is not None:
        out["W_skip"] = tc.W_skip
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def config_yaml(k: int, num_layers: int, num_latents: int, checkpoint: str) -> str:
    return (f"# {num_layers} per-layer TopK transcoders of {checkpoint}, {num_latents} latents each\n"
            "model_kind: transcoder_set\n"
            f"feature_input_hook: {INPUT_HOOK}\n"
            f"feature_output_hook: {OUTPUT_HOOK}\n"
            "module: blocks.{layer}.mlp  # the DiffusionLM module each transcoder reads and replaces\n"
            "# upstream circuit-tracer (v0.5.0) builds TopK(k) from these two keys on its Hub path; this project's\n"
            "# activation is ReLU then TopK(k): set activation_function to that after loading (docs/TOOLS.md)\n"
            "activation: topk\n"
            f"k: {k}\n")


def export(train_folder: str, checkpoint_name: str = "latest", output: str = "") -> Path:
    folder = resolve_run_folder(train_folder)
    ckpt = resolve_checkpoint(folder, checkpoint_name)
    tc_dir = StagePaths(folder, ckpt.name).transcoders
    model_cfg = read_json(folder / CONFIG_FILE)["model"]
    refuse_unhooked_family(model_cfg, "circuit-tracer",
                           "config.yaml's model_name, feature_input_hook and feature_output_hook")
    n = model_cfg["num_layers"]
    have = finished_transcoder_layers(tc_dir)
    if have != list(range(n)):
        raise UserError(f"circuit-tracer needs a transcoder for every layer 0..{n - 1}; {tc_dir} has "
                        f"{have or 'none'} (train_transcoders.py --layers all)")
    transcoders = load_transcoders(tc_dir, have, "cpu", model_cfg["model_dim"])
    ks = {tc.cfg.k for tc in transcoders.values()}
    widths = {tc.cfg.num_latents for tc in transcoders.values()}
    if len(ks) > 1 or len(widths) > 1:
        raise UserError(f"circuit-tracer's transcoder set needs one k and one width for all layers; these have k "
                        f"{sorted(ks)} and widths {sorted(widths)}")
    out = export_folder(folder, EXPORT_NAME, ckpt, output)
    with hold(out):  # one export at a time into a folder (released before any upload)
        for stale in [out / "config.yaml", *out.glob("layer_*.safetensors")]:  # an earlier export: incomplete until
            stale.unlink(missing_ok=True)  # config.yaml is written again, and no layer of a deeper model may linger
        for layer, tc in transcoders.items():
            save_safetensors(out / f"layer_{layer}.safetensors", circuit_tracer_tensors(tc))  # with their SHA-256
        with atomic_path(out / "config.yaml") as tmp:  # last: circuit-tracer takes its presence as complete
            tmp.write_text(config_yaml(ks.pop(), n, widths.pop(), ckpt.name))
    return out


@dataclass
class CircuitTracerExportConfig(UploadFlags, RunFlags):
    """Export a checkpoint's transcoders in circuit-tracer's format (and optionally upload them)."""

    output: str = arg("", "the folder to write (default: experiments/X/exports/circuit-tracer/<checkpoint stem>/)",
                      c.OUT_FOLDER)


def main(cfg: CircuitTracerExportConfig) -> Path:
    check_repo_id(cfg.push_to_hub)  # before anything is written
    return cfg.finish(export(cfg.train_folder, cfg.checkpoint_name, cfg.output))


if __name__ == "__main__":
    cli.run(main, CircuitTracerExportConfig, description=CircuitTracerExportConfig.__doc__)
