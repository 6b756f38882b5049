"""How many sequences one forward pass holds: the stages' micro-batches (--batch_size sequences each, with
their own data slots and noise) packed into fewer, larger forward passes on a GPU.

Packing changes only how the work is split: which sequences a step sees, their noise, and the loss's
normalisation stay those of --batch_size × --grad_acc_steps, so a packed run computes the same result up
to the order of floating-point sums (tested).
"""
from __future__ import annotations

import torch

from core.files import UserError

TOKEN_BUDGET = 32_768  # tokens per forward pass that --forward_batch_size 0 packs up to on a GPU


def micro_batches_per_forward(forward_batch_size: int, batch_size: int, micro_batches: int, seq_len: int,
                              device: torch.device) -> int:
    """How many consecutive micro-batches (of `batch_size` sequences) one forward pass holds, a divisor of the
    `micro_batches` this process runs per step. `forward_batch_size` > 0 asks for that many sequences (a multiple
    of `batch_size` that divides the step, else UserError); 0: on CUDA the most that stay within TOKEN_BUDGET
    tokens (at least one micro-batch), elsewhere one (a CPU gains nothing from larger matmuls, and the tests'
    numbers stay those of unpacked runs)."""
    if forward_batch_size:
        group, rest = divmod(forward_batch_size, batch_size)
        if rest or micro_batches % group:
            raise UserError(f"--forward_batch_size {forward_batch_size} must be a multiple of --batch_size "
                            f"{batch_size} that divides the {micro_batches * batch_size} sequences this process runs "
                            "per step (in the scan: per --checkpoint_every batches)")
        return group
    if device.type != "cuda":
        return 1
    fit = max(1, TOKEN_BUDGET // (batch_size * seq_len))
    return max(g for g in range(1, micro_batches + 1) if micro_batches % g == 0 and g <= fit)
