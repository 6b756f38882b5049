"""Stage 1: train a masked-diffusion language model.

    python train_diffusion.py --train_seq_len 4_096 --val_seq_len 4_096 --train_steps 20_000 --grad_acc_steps 8 \\
        --num_layers 12 --num_heads 6 --model_dim 384 --save_model True --cuda 3 --val_loss_every 1_000 \\
        --save_every 2_000
    torchrun --nproc_per_node 8 train_diffusion.py ...same flags...
    python train_diffusion.py --dataset synthetic --device cpu --num_layers 2 --model_dim 64 --num_heads 2 \\
        --train_seq_len 256 --train_steps 200
"""
from __future__ import annotations

from training.config import TrainConfig
from training.diffusion_command import command, main

__all__ = ["TrainConfig", "command", "main"]

if __name__ == "__main__":
    command()
