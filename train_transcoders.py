"""Stage 3: a sparse TopK transcoder for every MLP of a trained diffusion model.

    python train_transcoders.py --train_folder experiments/X --checkpoint_name state_step020000.pt --train_seq_len 4_096 \\
        --train_steps 20_000 --grad_acc_steps 8 --num_layers 12 --num_heads 6 --model_dim 384 --save_model True --cuda 1 \\
        --val_loss_every 1_000 --save_every 2_000
    torchrun --nproc_per_node 8 train_transcoders.py ...same flags...

Writes experiments/X/transcoders/<checkpoint stem>/ (config.json, metrics, state_stepNNNNNN.pt and, per
layer, layer_XX/cfg.json + sae.safetensors in EleutherAI sparsify's layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cli
from cli import arg
from experiment import RunFlags, ShapeFlags


@dataclass
class TranscoderTrainConfig(ShapeFlags, RunFlags):
    """Train one sparse transcoder per MLP of a frozen diffusion model."""

    train_seq_len: int = arg(4096, "tokens per sequence")
    val_seq_len: Optional[int] = arg(None, "tokens per validation sequence (default: --train_seq_len)")
    batch_size: int = arg(1, "sequences per micro-batch (per process)")
    grad_acc_steps: int = arg(8, "micro-batches per optimizer step, over all processes")
    train_steps: int = arg(20_000, "optimizer steps")
    expansion_factor: int = arg(32, "latents per MLP = expansion_factor × model_dim")
    k: int = arg(32, "active latents per token (TopK)")
    layers: str = arg("all", "comma-separated layer indices, or all")
    lr: Optional[float] = arg(None, "Adam learning rate (default: 2e-4 / sqrt(latents / 16384), as in sparsify)")
    auxk_alpha: float = arg(1 / 32, "weight of the AuxK loss (dead latents predict the residual)")
    dead_tokens: int = arg(10_000_000, "tokens without firing after which a latent counts as dead")
    skip_connection: bool = arg(False, "add a linear skip connection from input to output")
    mask_ratio: str = arg("random", "noise on the base model's inputs: 'random' (the training process) or a fixed t")
    val_loss_every: int = arg(1000, "validate every N steps (0: only at the end)")
    val_tokens: int = arg(262_144, "validation tokens (the same ones every time)")
    save_every: int = arg(2000, "checkpoint every N steps (0: only at the end)")
    save_model: bool = arg(True, "write checkpoints and the per-layer transcoder files")
    log_every: int = arg(10, "log every N steps")
    seed: int = arg(0, "seed for initialisation, data order and noise")
    resume: str = arg("", "resume (an interrupted job also resumes without it: same folder, same settings)")
    overwrite: bool = arg(False, "replace existing transcoders for this checkpoint")

    def __post_init__(self) -> None:
        RunFlags.__post_init__(self)
        cli.require_positive(self, "train_seq_len", "batch_size", "grad_acc_steps", "train_steps", "expansion_factor",
                             "k", "dead_tokens", "val_tokens", "log_every")
        cli.require_non_negative(self, "val_loss_every", "save_every")
        if self.lr is not None and self.lr <= 0 or self.auxk_alpha < 0:
            raise ValueError("--lr must be positive and --auxk_alpha non-negative")
        cli.check_mask_ratio(self.mask_ratio)


def main(cfg: TranscoderTrainConfig):
    from model.transcoder_training import train_transcoders

    return train_transcoders(cfg)


if __name__ == "__main__":
    cli.run(main, TranscoderTrainConfig, description=TranscoderTrainConfig.__doc__)
