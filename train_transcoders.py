"""Stage 3: a sparse TopK transcoder for every MLP of a trained diffusion model.

    python train_transcoders.py --train_folder experiments/X --checkpoint_name state_step020000.pt \\
        --train_seq_len 4_096 --train_steps 20_000 --grad_acc_steps 8 --num_layers 12 --num_heads 6 --model_dim 384 \\
        --save_model True --cuda 1 --val_loss_every 1_000 --save_every 2_000
    torchrun --nproc_per_node 8 train_transcoders.py ...same flags...

Writes experiments/X/transcoders/<checkpoint stem>/ (config.json, metrics, state_stepNNNNNN.pt and, per
layer, blocks.N.mlp/cfg.json + sae.safetensors in EleutherAI sparsify's layout, named by module path).
"""
from __future__ import annotations

from training.config import TranscoderTrainConfig
from training.transcoders_command import command, main

__all__ = ["TranscoderTrainConfig", "command", "main"]

if __name__ == "__main__":
    command()
