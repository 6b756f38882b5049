"""Context windows around a token that stop at its document's edges and the sequence's edges."""
from __future__ import annotations

import torch


def document_bounds(tokens: torch.Tensor, bos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) → (first, last) (B, T) each: the first and last column of each position's document, the
    document's BOS excluded (a BOS is its own one-token span; text before a row's first BOS is a
    document cut at the sequence's start)."""
    B, T = tokens.shape
    cols = torch.arange(T, device=tokens.device).expand(B, T)
    is_bos = tokens == bos_id
    last_bos = torch.where(is_bos, cols, torch.full_like(cols, -1)).cummax(dim=1).values  # (B, T)
    first = torch.where(is_bos, cols, last_bos + 1)
    next_bos = torch.where(is_bos, cols, torch.full_like(cols, T)).flip(1).cummin(dim=1).values.flip(1)
    after = torch.cat([next_bos[:, 1:], torch.full_like(next_bos[:, :1], T)], dim=1)  # next BOS after each column
    last = torch.where(is_bos, cols, after - 1)
    return first, last


def window_columns(col: torch.Tensor, first: torch.Tensor, last: torch.Tensor, before: int, after: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """For centres `col` (E,) with their document bounds (E,): the window's columns (E, before+1+after),
    -1 outside the clipped window, and the centre's index in the window (always `before`)."""
    offsets = torch.arange(-before, after + 1, device=col.device)
    cols = col[:, None] + offsets  # (E, C)
    inside = (cols >= torch.maximum(col - before, first)[:, None]) & (cols <= torch.minimum(col + after, last)[:, None])
    return torch.where(inside, cols, torch.full_like(cols, -1)), torch.full_like(col, before)
