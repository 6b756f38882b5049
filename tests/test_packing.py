"""--forward_batch_size: how many micro-batches one forward pass holds."""
from __future__ import annotations

import pytest
import torch

from core.files import UserError
from experiment.packing import micro_batches_per_forward

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_auto_packs_on_gpus_only():
    assert micro_batches_per_forward(0, 1, 8, 4096, CPU) == 1
    assert micro_batches_per_forward(0, 1, 8, 4096, CUDA) == 8  # the reference lines: 8 × 1 × 4,096 in one pass
    assert micro_batches_per_forward(0, 1, 8, 8192, CUDA) == 4
    assert micro_batches_per_forward(0, 2, 6, 4096, CUDA) == 3  # 4 would fit but does not divide 6
    assert micro_batches_per_forward(0, 1, 8, 65_536, CUDA) == 1  # never less than one micro-batch
    assert micro_batches_per_forward(0, 4, 3, 128, CUDA) == 3


def test_explicit_size():
    assert micro_batches_per_forward(4, 1, 8, 4096, CPU) == 4
    assert micro_batches_per_forward(2, 2, 8, 4096, CUDA) == 1
    for bad in (3, 5, 12, 32):  # not a multiple of --batch_size 2, or not dividing the step's 8 micro-batches
        with pytest.raises(UserError, match="--forward_batch_size"):
            micro_batches_per_forward(bad, 2, 8, 4096, CPU)
