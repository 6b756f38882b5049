"""Counting the operations that make a GPU wait for the host (or the host for the GPU), on any device.

On a CPU nothing waits, but the operations that would are the same: reading a value on the host (`item`,
`float()`, `bool()`, `.tolist()`: `aten::_local_scalar_dense`), output shapes that depend on the data
(`nonzero`, boolean indexing and `masked_select`, which call it; `unique`; `bincount`, which reads the
maximum; `repeat_interleave` without its output size). The profiler records them by name whatever the device,
so a test on the CPU can say how many a training step or a scan batch would issue on a GPU. A CPU tensor's
`.tolist()`, `.numpy()` and `.cpu()` dispatch nothing, so those three methods are counted by wrapping them.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable
from unittest import mock

import torch

SYNCING = frozenset({
    "aten::_local_scalar_dense",  # item(), float(), int(), bool(), tolist()
    "aten::nonzero",  # also under boolean indexing, masked_select, index_put_ with a mask, torch.where(cond)
    "aten::masked_select",
    "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::bincount",
    "aten::repeat_interleave",
    "aten::is_nonzero",
    "aten::equal",
})


def syncing_ops(fn: Callable[[], object]) -> Counter:
    """Run `fn()` under the profiler; how many times each syncing operation ran (outermost calls and nested
    ones alike: boolean indexing shows as its `nonzero`)."""
    counts: Counter = Counter()

    def counted(name: str):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            counts[f"Tensor.{name}"] += 1
            return original(self, *args, **kwargs)
        return mock.patch.object(torch.Tensor, name, wrapper)

    with counted("tolist"), counted("numpy"), counted("cpu"), \
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    counts.update(e.name for e in prof.events() if e.name in SYNCING)
    return counts
