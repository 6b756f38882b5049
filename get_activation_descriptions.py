"""Stage 5: an LLM describes every feature, and every description is scored on held-out contexts.

    python get_activation_descriptions.py --train_folder experiments/X --checkpoint_name state_step020000.pt \\
        --train_seq_len 4_096 --train_steps 1_000 --grad_acc_steps 8 --num_layers 12 --num_heads 6 --model_dim 384 \\
        --save_model True --cuda 1 --val_loss_every 1_000 --save_every 2_000
    python get_activation_descriptions.py --train_folder experiments/X --checkpoint_name latest --explainer tokens \\
        --device cpu

Reads experiments/X/topk/<checkpoint stem>/ and appends to experiments/X/descriptions/<checkpoint stem>/.
"""
from __future__ import annotations

from interp.descriptions.command import command, main
from interp.descriptions.config import IGNORED, SCORERS, DescriptionsConfig

__all__ = ["IGNORED", "SCORERS", "DescriptionsConfig", "command", "main"]

if __name__ == "__main__":
    command()
