"""Forward hooks on the diffusion model's MLPs: read what each MLP sees and says, or replace what it says."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from model.diffusion import DiffusionLM


@contextlib.contextmanager
def capture_mlps(model: DiffusionLM, layers: list[int]) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Inside the block, each forward pass fills {layer: (MLP input (B, T, D), MLP output (B, T, D))}."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for layer in layers:
        def hook(module, args, output, layer=layer):
            seen[layer] = (args[0].detach(), output.detach())
        handles.append(model.block(layer).mlp.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replace_mlps(model: DiffusionLM, replacements: dict[int, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Inside the block, layer l's MLP output is `replacements[l](MLP input)` (e.g. its transcoder)."""
    handles = []
    for layer, fn in replacements.items():
        def hook(module, args, output, fn=fn):
            x = args[0]
            return fn(x.reshape(-1, x.shape[-1])).reshape(output.shape).to(output.dtype)
        handles.append(model.block(layer).mlp.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
