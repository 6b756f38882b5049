"""A checkpoint's transcoders as SAELens SAE folders: `python -m interp.exports.saelens`.

    python -m interp.exports.saelens --train_folder experiments/X [--checkpoint_name latest] [--output DIR]
        [--push_to_hub user/name]

Writes (default `experiments/X/exports/saelens/<checkpoint stem>/`) one folder per finished layer,
`blocks.N.mlp/`, holding SAELens's native files: `sae_weights.safetensors` (`W_enc` (D, M), `b_enc`, `W_dec`
(M, D), `b_dec`) and `cfg.json` (`architecture: topk`, `k`, `apply_b_dec_to_input: false`), which
`sae_lens.SAE.load_from_disk` reads as a `TopKSAE` computing this project's latents and outputs (tested with
the real package). Nothing here imports sae_lens: the module only writes files.

What SAELens (6.54) can express, read from its code: its `topk` SAE is ReLU(TopK(W_enc x + b_enc)) W_dec +
b_dec, the same latents as this project's TopK(ReLU(...)) (the k largest stay, negatives become 0), so a
transcoder is exported as that SAE, reading the MLP's input and predicting its output. SAELens calls it an
SAE (one hook, reconstructing its input): nothing in the files but the metadata says the output belongs
elsewhere, and SAELens's hooked models do not know DiffusionLM's modules. Its transcoders (`transcoder`,
`skip_transcoder`, `jumprelu_*`) are ReLU or JumpReLU only, and its TopK SAE has no skip term, so a transcoder
trained with a skip connection (`W_skip`) has no SAELens equivalent: the export refuses it rather than drop
the skip term (the circuit-tracer export keeps it). Only this project's models have the hooks the metadata
names: a run made from LLaDA or Dream is refused in one line (SAELens would need a model_name it can run and
that model's hook names).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from core import checks as c, cli
from core.cli import arg
from core.files import UserError, read_json, save_safetensors, write_json_atomic
from core.locks import hold
from experiment import CONFIG_FILE, RunFlags, StagePaths, finished_transcoder_layers, hookpoint, load_transcoders
from experiment.hub import UploadFlags, check_repo_id
from experiment.paths import export_folder, resolve_checkpoint, resolve_run_folder
from interp.exports import refuse_unhooked_family
from model.transcoder import Transcoder

EXPORT_NAME = "saelens"
SAELENS_VERSION = "6.54.12"  # the version the files are written for and tested with
SAE_CFG_FILE, SAE_WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"  # sae_lens.constants' names
# TransformerLens's names of the points a transcoder reads and writes (as in the circuit-tracer export): the
# normalised residual stream after attention (a norm without weights), and the MLP's output
INPUT_HOOK, OUTPUT_HOOK = "blocks.{layer}.ln2.hook_normalized", "blocks.{layer}.hook_mlp_out"


def saelens_tensors(tc: Transcoder) -> dict[str, torch.Tensor]:
    """One transcoder's weights under SAELens's names and shapes (its encoder is (D, M), ours (M, D))."""
    out = {"W_enc": tc.encoder.weight.T, "b_enc": tc.encoder.bias, "W_dec": tc.W_dec, "b_dec": tc.b_dec}
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def saelens_cfg(tc: Transcoder, layer: int, model_name: str) -> dict:
    """cfg.json of SAELens's `topk` architecture (TopKSAEConfig's fields) for one layer's transcoder."""
    return {"architecture": "topk", "d_in": tc.cfg.d_in, "d_sae": tc.cfg.num_latents, "k": tc.cfg.k,
            "rescale_acts_by_decoder_norm": False, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {
                "sae_lens_version": SAELENS_VERSION, "model_name": model_name,
                "hook_name": INPUT_HOOK.format(layer=layer), "hook_name_out": OUTPUT_HOOK.format(layer=layer),
                "hf_hook_name": hookpoint(layer),
                "diffusion_interp": f"a TopK transcoder: reads the input of DiffusionLM's {hookpoint(layer)} and "
                                    "predicts its output (not a reconstruction of its input); SAELens loads it as "
                                    "an SAE, so splice its output in place of the MLP's output yourself"}}


def export(train_folder: str, checkpoint_name: str = "latest", output: str = "") -> Path:
    folder = resolve_run_folder(train_folder)
    ckpt = resolve_checkpoint(folder, checkpoint_name)
    tc_dir = StagePaths(folder, ckpt.name).transcoders
    model_cfg = read_json(folder / CONFIG_FILE)["model"]
    refuse_unhooked_family(model_cfg, "SAELens", "cfg.json's metadata.model_name, hook_name and hook_name_out")
    layers = finished_transcoder_layers(tc_dir)
    if not layers:
        raise UserError(f"no finished transcoders in {tc_dir}: run train_transcoders.py for this checkpoint first")
    transcoders = load_transcoders(tc_dir, layers, "cpu", model_cfg["model_dim"])
    skip = [layer for layer, tc in transcoders.items() if tc.W_skip is not None]
    if skip:
        raise UserError(f"the transcoders of layers {skip} have a skip connection (W_skip), which SAELens "
                        f"{SAELENS_VERSION} cannot express (its TopK SAE has no skip term, its skip transcoders are "
                        "ReLU or JumpReLU): export them with python -m interp.exports.circuit_tracer instead")
    out = export_folder(folder, EXPORT_NAME, ckpt, output)
    model_name = f"DiffusionLM {folder.name}/{ckpt.name}"
    with hold(out):  # one export at a time into a folder (released before any upload)
        for stale in out.glob("blocks.*.mlp"):  # an earlier export's layers: none of another model's may linger
            shutil.rmtree(stale)
        for layer, tc in transcoders.items():
            dst = out / hookpoint(layer)
            dst.mkdir()
            save_safetensors(dst / SAE_WEIGHTS_FILE, saelens_tensors(tc))  # SAELens ignores the checksum
            write_json_atomic(dst / SAE_CFG_FILE, saelens_cfg(tc, layer, model_name))  # last: the layer is complete
    print(f"{len(layers)} transcoder(s) ({', '.join(hookpoint(i) for i in layers)}) as SAELens TopK SAEs "
          "from each MLP's input to its output")
    return out


@dataclass
class SAELensExportConfig(UploadFlags, RunFlags):
    """Export a checkpoint's transcoders as SAELens TopK SAE folders (and optionally upload them)."""

    output: str = arg("", "the folder to write (default: experiments/X/exports/saelens/<checkpoint stem>/)",
                      c.OUT_FOLDER)


def main(cfg: SAELensExportConfig) -> Path:
    check_repo_id(cfg.push_to_hub)  # before anything is written
    return cfg.finish(export(cfg.train_folder, cfg.checkpoint_name, cfg.output))


if __name__ == "__main__":
    cli.run(main, SAELensExportConfig, description=SAELensExportConfig.__doc__)
