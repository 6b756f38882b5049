"""Stage 4: every feature's top-activating contexts, statistics and a browsable page per layer.

    python get_topk_activations.py --train_folder experiments/X --checkpoint_name state_step020000.pt --train_seq_len 4_096 \\
        --train_steps 1_000 --grad_acc_steps 8 --num_layers 12 --num_heads 6 --model_dim 384 --save_model True --cuda 1 \\
        --val_loss_every 1_000 --save_every 2_000

Scans --train_steps × --grad_acc_steps batches of --batch_size × --train_seq_len tokens through the base
model and the transcoders of experiments/X/transcoders/<checkpoint stem>/, and writes
experiments/X/topk/<checkpoint stem>/.
"""
from __future__ import annotations

from dataclasses import dataclass

import cli
from cli import arg
from experiment import RunFlags, ShapeFlags

IGNORED = ("save_model", "val_loss_every", "save_every")


@dataclass
class TopKConfig(ShapeFlags, RunFlags):
    """Collect each feature's top-activating contexts, statistics and scoring samples."""

    train_seq_len: int = arg(4096, "tokens per scanned sequence")
    train_steps: int = arg(1000, "scan train_steps × grad_acc_steps batches")
    grad_acc_steps: int = arg(8, "see --train_steps")
    batch_size: int = arg(1, "sequences per batch")
    top_k: int = arg(50, "top-activating examples kept per feature")
    context_before: int = arg(20, "tokens of context before the activating token")
    context_after: int = arg(10, "tokens of context after it (the model is bidirectional)")
    n_quantile: int = arg(20, "activating examples spread over the activation range (half held out for scoring)")
    n_random: int = arg(20, "non-activating contexts per feature (half held out for scoring)")
    mask_ratio: str = arg("random", "noise on the inputs: 'random' (the training process) or a fixed t")
    layers: str = arg("all", "comma-separated layer indices, or all (those with transcoders)")
    seed: int = arg(0, "seed for the data order, the noise and the samples")
    checkpoint_every: int = arg(200, "save the scan's state every N batches (an interrupted scan resumes)")
    overwrite: bool = arg(False, "replace an existing finished output")

    def __post_init__(self) -> None:
        RunFlags.__post_init__(self)
        cli.require_positive(self, "train_seq_len", "train_steps", "grad_acc_steps", "batch_size", "top_k",
                             "checkpoint_every")
        cli.require_non_negative(self, "context_before", "context_after", "n_quantile", "n_random")
        cli.check_mask_ratio(self.mask_ratio)


def main(cfg: TopKConfig):
    from interp.topk_stage import run_topk

    return run_topk(cfg)


if __name__ == "__main__":
    cli.run(main, TopKConfig, description=TopKConfig.__doc__, ignored=IGNORED)
