"""Rotary position embeddings (half-split form), computed for the sequence length at hand.

`Rotary.tables` gives the cos/sin tables of a sequence length once (the model computes them once per forward
and every layer shares them); `rotate` applies them. `Rotary(x)` does both, for callers with one tensor.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class RotaryTables(NamedTuple):
    cos: torch.Tensor  # (T, Dh/2) float32
    sin: torch.Tensor  # (T, Dh/2) float32


def rotate(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """x: (B, H, T, Dh) → same shape, rotated by position (the tables cast to x's dtype)."""
    cos, sin = tables.cos.to(x.dtype), tables.sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Rotary(torch.nn.Module):
    inv_freq: torch.Tensor  # a buffer (declared for the type checker)

    def __init__(self, head_dim: int, base: float = 10_000.0) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim // 2, dtype=torch.float32) / (head_dim // 2))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # derived, so not in the state dict

    def tables(self, T: int, device: torch.device) -> RotaryTables:
        """cos and sin of every position's angles, (T, Dh/2) each, in float32."""
        angles = torch.outer(torch.arange(T, device=device, dtype=torch.float32), self.inv_freq)  # (T, Dh/2)
        return RotaryTables(angles.cos(), angles.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, Dh) → same shape, rotated by position."""
        return rotate(x, self.tables(x.shape[-2], x.device))
