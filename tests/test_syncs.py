"""The sync counter itself: it sees each kind of syncing operation and nothing in sync-free code."""
from __future__ import annotations

import torch

from tests.syncs import syncing_ops


def test_sees_each_kind_of_sync():
    x = torch.randn(64)
    assert syncing_ops(lambda: x[x > 0])["aten::nonzero"] >= 1  # boolean indexing
    assert syncing_ops(lambda: float(x.sum()))["aten::_local_scalar_dense"] == 1
    assert syncing_ops(lambda: (x > 0).any().item())["aten::_local_scalar_dense"] == 1
    assert syncing_ops(lambda: x.tolist())["Tensor.tolist"] == 1
    assert syncing_ops(lambda: x.cpu())["Tensor.cpu"] == 1
    assert syncing_ops(lambda: torch.unique(x.long()))
    assert syncing_ops(lambda: torch.bincount(x.abs().long()))["aten::bincount"] == 1


def test_sync_free_code_counts_nothing():
    x = torch.randn(64, 8)
    idx = torch.randint(0, 64, (16,))

    def work():
        y = torch.where(x > 0, x, 0).topk(3, dim=1).values
        z = torch.zeros(64).index_add_(0, idx, x[idx, 0])
        return torch.nonzero_static(x[:, 0] > 0, size=64), y.sum() + z.sum()

    assert sum(syncing_ops(work).values()) == 0
