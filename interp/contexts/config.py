"""Stage 4's flags (get_topk_activations.py): `TopKConfig`, from the flag groups of `experiment.flags`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from core import checks as c
from core.cli import arg
from experiment import BatchFlags, LayersFlag, RunFlags, ScanFlags, ShapeFlags

IGNORED = ("save_model", "val_loss_every", "save_every")
DEFAULT_SCAN_BATCHES = 8000


@dataclass
class TopKConfig(BatchFlags, ScanFlags, LayersFlag, ShapeFlags, RunFlags):
    """Collect each feature's top-activating contexts, statistics and scoring samples."""

    train_seq_len: int = arg(4096, "tokens per scanned sequence", c.COUNT)
    batch_size: int = arg(1, "sequences per batch", c.COUNT)
    seed: int = arg(0, "seed for the data order, the noise and the samples", c.SEED)
    scan_batches: Optional[int] = arg(None, f"batches to scan (default {DEFAULT_SCAN_BATCHES:,}, or --train_steps × "
                                            "--grad_acc_steps when those are given)", c.COUNT)
    train_steps: Optional[int] = arg(None, "the shared command line's way to say --scan_batches: scan train_steps × "
                                           "grad_acc_steps batches", c.COUNT)
    grad_acc_steps: int = arg(8, "see --train_steps", c.COUNT)
    layers: str = arg("all", "comma-separated layer indices, or all (those with transcoders)", c.LAYERS)
    overwrite: bool = arg(False, "replace an existing finished output")
    compile: Optional[bool] = arg(None, "torch.compile the model's blocks for the scan (default: on for CUDA)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scan_batches is not None and self.train_steps is not None \
                and self.scan_batches != self.train_steps * self.grad_acc_steps:
            raise ValueError(f"--scan_batches {self.scan_batches} disagrees with --train_steps {self.train_steps} × "
                             f"--grad_acc_steps {self.grad_acc_steps}; give one of them")

    def n_batches(self) -> int:
        if self.scan_batches is not None:
            return self.scan_batches
        if self.train_steps is not None:
            return self.train_steps * self.grad_acc_steps
        return DEFAULT_SCAN_BATCHES
