"""Stage 4: every feature's top-activating contexts, statistics and a browsable page per layer.

    python get_topk_activations.py --train_folder experiments/X --checkpoint_name state_step020000.pt \\
        --train_seq_len 4_096 --train_steps 1_000 --grad_acc_steps 8 --num_layers 12 --num_heads 6 --model_dim 384 \\
        --save_model True --cuda 1 --val_loss_every 1_000 --save_every 2_000

Scans --scan_batches batches (or, in the shared command line's terms, --train_steps × --grad_acc_steps)
of --batch_size × --train_seq_len tokens through the base model and the transcoders of
experiments/X/transcoders/<checkpoint stem>/, and writes experiments/X/topk/<checkpoint stem>/.
"""
from __future__ import annotations

from interp.contexts.command import command, main
from interp.contexts.config import DEFAULT_SCAN_BATCHES, IGNORED, TopKConfig

__all__ = ["DEFAULT_SCAN_BATCHES", "IGNORED", "TopKConfig", "command", "main"]

if __name__ == "__main__":
    command()
