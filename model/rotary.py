"""Rotary position embeddings (half-split form), computed for the sequence length at hand."""
from __future__ import annotations

import torch


class Rotary(torch.nn.Module):
    inv_freq: torch.Tensor  # a buffer (declared for the type checker)

    def __init__(self, head_dim: int, base: float = 10_000.0) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim // 2, dtype=torch.float32) / (head_dim // 2))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # derived, so not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, Dh) → same shape, rotated by position."""
        T = x.shape[-2]
        angles = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), self.inv_freq)  # (T, Dh/2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
