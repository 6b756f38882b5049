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
from typing import Optional

import cli
from cli import arg

IGNORED = ("save_model", "val_loss_every", "save_every")


@dataclass
class TopKConfig:
    """Collect each feature's top-activating contexts, statistics and scoring samples."""

    train_folder: str = arg("", "the base run's folder (experiments/<run>)")
    checkpoint_name: str = arg("latest", "the base checkpoint whose transcoders to read, or 'latest'")
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
    num_layers: Optional[int] = arg(None, "optional; must match the base run's config.json")
    num_heads: Optional[int] = arg(None, "optional; must match the base run's config.json")
    model_dim: Optional[int] = arg(None, "optional; must match the base run's config.json")
    cuda: Optional[int] = arg(None, "CUDA device index")
    device: Optional[str] = arg(None, "cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        if not self.train_folder:
            raise ValueError("--train_folder is required (experiments/<run>)")
        cli.require_positive(self, "train_seq_len", "train_steps", "grad_acc_steps", "batch_size", "top_k",
                             "checkpoint_every")
        cli.require_non_negative(self, "context_before", "context_after", "n_quantile", "n_random")
        if self.mask_ratio != "random":
            try:
                ok = 0 <= float(self.mask_ratio) <= 1
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"--mask_ratio must be 'random' or a number in [0, 1], got {self.mask_ratio!r}")


def main(cfg: TopKConfig):
    from interp.topk_stage import run_topk

    return run_topk(cfg)


if __name__ == "__main__":
    cli.run(main, TopKConfig, description=TopKConfig.__doc__, ignored=IGNORED)
