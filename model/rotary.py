"""Rotary position embeddings (half-split form), computed for the sequence length at hand.

`Rotary.tables` gives the cos/sin tables of a sequence length once (the model computes them once per forward
and every layer shares them); `rotate` applies them. `Rotary(x)` does both, for callers with one tensor.

The inverse frequencies are derived from the base on demand (they are no buffer, so a model built on the meta
device needs nothing restored after its weights are assigned). Two float32 forms of the same numbers exist:
θ^(−j/(Dh/2)) (this project's own models) and 1/θ^(2j/Dh) (the form of the released LLaDA and Dream code);
they differ in the last bits only, and `reciprocal` picks the second.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class RotaryTables(NamedTuple):
    cos: torch.Tensor  # (T, Dh/2) float32
    sin: torch.Tensor  # (T, Dh/2) float32


def rotate(x: torch.Tensor, tables: RotaryTables, fp32: bool = False) -> torch.Tensor:
    """x: (B, H, T, Dh) → same shape, rotated by position. The tables are cast to x's dtype; with `fp32`, x is
    rotated in float32 instead and the result cast back to its dtype."""
    if fp32 and x.dtype != torch.float32:
        return rotate(x.float(), tables).to(x.dtype)
    cos, sin = tables.cos.to(x.dtype), tables.sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Rotary(torch.nn.Module):
    def __init__(self, head_dim: int, base: float = 10_000.0, reciprocal: bool = False) -> None:
        super().__init__()
        self.head_dim, self.base, self.reciprocal = head_dim, base, reciprocal
        self._on: dict[torch.device, torch.Tensor] = {}  # the inverse frequencies copied to each device used

    def inverse_frequencies(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(Dh/2,) float32: the angle per position of each rotated pair. Always computed on the CPU (a device's
        pow may round differently in the last bit) and copied to `device` once."""
        device = torch.device(device)
        if device not in self._on:
            half = self.head_dim // 2
            j = torch.arange(0, half, dtype=torch.float32)
            inv = 1.0 / self.base ** (2 * j / self.head_dim) if self.reciprocal else self.base ** (-j / half)
            self._on[device] = inv.to(device)
        return self._on[device]

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.inverse_frequencies()

    def tables(self, T: int, device: torch.device) -> RotaryTables:
        """cos and sin of every position's angles, (T, Dh/2) each, in float32."""
        positions = torch.arange(T, device=device, dtype=torch.float32)
        angles = torch.outer(positions, self.inverse_frequencies(device))  # (T, Dh/2)
        return RotaryTables(angles.cos(), angles.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, Dh) → same shape, rotated by position."""
        return rotate(x, self.tables(x.shape[-2], x.device))
