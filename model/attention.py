"""Bidirectional attention inside each document: FlexAttention block masks on CUDA, masked SDPA on the CPU.

Document ids come from BOS: every BOS starts a new document, and a position attends to exactly the
positions of its own document (both directions). The two paths are tested equal.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

AttnImpl = Literal["sdpa", "flex"]
FLEX_BLOCK = 128  # FlexAttention's block size: CUDA sequence lengths must be a multiple of it


def document_ids(tokens: torch.Tensor, bos_id: int) -> torch.Tensor:
    """(B, T) → (B, T) int32: the index of each position's document within its row."""
    return torch.cumsum((tokens == bos_id).to(torch.int32), dim=1)


class DocMask:
    """What one forward pass needs to restrict attention to documents, built once for all layers."""

    def __init__(self, doc: torch.Tensor, impl: AttnImpl) -> None:
        self.impl = impl
        self.dense: torch.Tensor | None
        self.block: BlockMask | None
        if impl == "sdpa":
            self.dense = (doc[:, None, :, None] == doc[:, None, None, :])  # (B, 1, T, T)
            self.block = None
        else:
            from torch.nn.attention.flex_attention import create_block_mask

            def same_doc(b, h, q, k):
                return doc[b, q] == doc[b, k]

            B, T = doc.shape
            self.dense = None
            # _compile builds the block mask without materialising (B, T, T) on the GPU
            self.block = create_block_mask(same_doc, B, None, T, T, device=doc.device, _compile=doc.is_cuda)


_compiled_flex = None


def _flex(q, k, v, block_mask):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type != "cuda" or torch.compiler.is_compiling():
        # inside a compiled block dynamo fuses it; on the CPU it runs unfused (tests only)
        return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocMask) -> torch.Tensor:
    """q, k, v: (B, H, T, Dh) → (B, H, T, Dh)."""
    if mask.impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)
    return _flex(q, k, v, mask.block)
