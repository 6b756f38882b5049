"""Stage 3: a sparse TopK transcoder for every MLP of a trained diffusion model.

    python train_transcoders.py --train_folder experiments/X --checkpoint_name state_step020000.pt \\
        --train_seq_len 4_096 --train_steps 20_000 --grad_acc_steps 8 --num_layers 12 --num_heads 6 --model_dim 384 \\
        --save_model True --cuda 1 --val_loss_every 1_000 --save_every 2_000
    torchrun --nproc_per_node 8 train_transcoders.py ...same flags...

Writes experiments/X/transcoders/<checkpoint stem>/ (config.json, metrics, state_stepNNNNNN.pt and, per
layer, blocks.N.mlp/cfg.json + sae.safetensors in EleutherAI sparsify's layout, named by module path).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from core import checks as c, cli
from core.cli import arg
from experiment import BatchFlags, LayersFlag, LoopFlags, NoiseFlag, RunFlags, ShapeFlags
from training.transcoders import train_transcoders


@dataclass
class TranscoderTrainConfig(BatchFlags, LoopFlags, LayersFlag, NoiseFlag, ShapeFlags, RunFlags):
    """Train one sparse transcoder per MLP of a frozen diffusion model."""

    val_seq_len: Optional[int] = arg(None, "tokens per validation sequence (default: --train_seq_len)", c.COUNT)
    save_model: bool = arg(True, "write checkpoints and the per-layer transcoder files")
    expansion_factor: int = arg(32, "latents per MLP = expansion_factor × model_dim", c.count(1, 4096))
    k: int = arg(32, "active latents per token (TopK)", c.count(runs=("100_000",)))
    lr: Optional[float] = arg(None, "Adam learning rate (default: 2e-4 / sqrt(latents / 16384), as in sparsify)",
                              c.positive(100.0))
    auxk_alpha: float = arg(1 / 32, "weight of the AuxK loss (dead latents predict the residual)", c.Range(0.0, 1000.0))
    dead_tokens: int = arg(10_000_000, "tokens without firing after which a latent counts as dead", c.count(1, 2**62))
    skip_connection: bool = arg(False, "add a linear skip connection from input to output")
    compile: Optional[bool] = arg(None, "torch.compile each transcoder's loss (default: on for CUDA, off on the CPU)")
    resume: str = arg("", "resume (an interrupted job also resumes without it: same folder, same settings)",
                      c.RESUME)
    overwrite: bool = arg(False, "replace existing transcoders for this checkpoint")
    wandb: bool = arg(False, "also log to Weights & Biases (needs the wandb package; a resumed job continues its run)")


def main(cfg: TranscoderTrainConfig):
    return train_transcoders(cfg)


if __name__ == "__main__":
    cli.run(main, TranscoderTrainConfig, description=TranscoderTrainConfig.__doc__)
