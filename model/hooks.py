"""Forward hooks on the diffusion model's MLPs: read what each MLP sees and says, or replace what it says."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Callable, Iterator

import torch

from model.diffusion import DiffusionLM


def _keep_io(module: torch.nn.Module, args, output: torch.Tensor) -> None:
    """The capture hook: keep the module's input and output on the module (`captured_io`). One function for every
    layer, so that compiled blocks share one graph whichever layer they are (a hook per layer, closing over its
    layer number, would compile a graph per layer and run eagerly past dynamo's limit of 8)."""
    module.captured_io = (args[0].detach(), output.detach())  # type: ignore[assignment]


class Captured(Mapping):
    """{layer: (MLP input (B, T, D), MLP output (B, T, D))} of the latest forward pass, read from the MLPs while
    the capture lasts and kept once it ends."""

    def __init__(self, mlps: Mapping[int, torch.nn.Module]) -> None:
        self._mlps = mlps
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _current(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        if self._kept is not None:
            return self._kept
        return {layer: mlp.__dict__["captured_io"] for layer, mlp in self._mlps.items()
                if "captured_io" in mlp.__dict__}

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._current()[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())

    def end(self) -> None:
        """Keep what the MLPs hold and take it off them."""
        self._kept = {layer: mlp.__dict__.pop("captured_io") for layer, mlp in self._mlps.items()
                      if "captured_io" in mlp.__dict__}


@contextlib.contextmanager
def capture_mlps(model: DiffusionLM, layers: list[int]) -> Iterator[Captured]:
    """Inside the block, each forward pass fills {layer: (MLP input (B, T, D), MLP output (B, T, D))}; it keeps
    the last pass's pairs after the block."""
    mlps = {layer: model.block(layer).mlp for layer in layers}
    seen = Captured(mlps)
    handles = [mlp.register_forward_hook(_keep_io) for mlp in mlps.values()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
        seen.end()


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
