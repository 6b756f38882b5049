"""Bidirectional attention inside each document, or over the whole row: FlexAttention block masks on CUDA,
masked SDPA on the CPU.

Document ids come from BOS: every BOS starts a new document, and a position attends to exactly the
positions of its own document (both directions). Without document ids every position attends every position
of its row (the public LLaDA and Dream models). An optional key mask (False: padding) removes keys from both
kinds. The two paths are tested equal. Query heads may outnumber key/value heads (grouped-query attention:
each key/value head serves that many consecutive query heads).

The FlexAttention block mask is built from the document ids with a few tensor operations, without a
compiled `create_block_mask` and without reading anything on the host: since the ids never decrease along
a row, a block of positions holds the documents from its first position's to its last position's, so a
(query block, key block) pair is empty when those ranges do not meet, full when both blocks are complete
and lie in one and the same document, and partial (the mask_mod decides position by position) otherwise.
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


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, nq, nk) bool → (count per query block, key-block indices with the chosen ones first, in order),
    int32, as FlexAttention's BlockMask stores them."""
    dense = blocks.to(torch.int32)
    indices = torch.argsort(dense, dim=-1, descending=True, stable=True)
    return dense.sum(-1).to(torch.int32), indices.to(torch.int32)


def document_blocks(doc: torch.Tensor, block: int = FLEX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """doc (B, T), non-decreasing along each row → (partial, full), each (B, 1, nb, nb) bool with
    nb = ⌈T / block⌉: the (query block, key block) pairs that some but not all / all of their position pairs
    share a document. Positions past T (the last block's padding) belong to no document."""
    B, T = doc.shape
    nb = -(-T // block)
    starts = torch.arange(nb, device=doc.device) * block
    ends = torch.clamp(starts + block, max=T)
    first, last = doc[:, starts], doc[:, ends - 1]  # (B, nb): the documents a block spans
    meet = (first[:, :, None] <= last[:, None, :]) & (first[:, None, :] <= last[:, :, None])
    whole = (first == last) & (ends - starts == block)  # one document, no padding
    full = whole[:, :, None] & whole[:, None, :] & (first[:, :, None] == first[:, None, :])
    return (meet & ~full)[:, None], full[:, None]


def document_block_mask(doc: torch.Tensor) -> BlockMask:
    """FlexAttention's BlockMask for attention inside documents, from the document ids (B, T)."""
    from torch.nn.attention.flex_attention import BlockMask

    def same_doc(b, h, q, k):
        return doc[b, q] == doc[b, k]

    T = doc.shape[1]
    partial, full = document_blocks(doc)
    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=(FLEX_BLOCK, FLEX_BLOCK),
                                    mask_mod=same_doc, seq_lengths=(T, T))


def key_block_mask(doc: torch.Tensor, keys: torch.Tensor) -> BlockMask:
    """FlexAttention's BlockMask for attention inside documents (B, T) to the keys that are True in `keys` (B, T)."""
    from torch.nn.attention.flex_attention import BlockMask

    def same_doc_and_key(b, h, q, k):
        return (doc[b, q] == doc[b, k]) & keys[b, k]

    B, T = doc.shape
    nb = -(-T // FLEX_BLOCK)
    padded = F.pad(keys, (0, nb * FLEX_BLOCK - T), value=False).view(B, nb, FLEX_BLOCK)
    some, every = padded.any(-1)[:, None, None, :], padded.all(-1)[:, None, None, :]  # (B, 1, 1, nb) per key block
    partial, full = document_blocks(doc)
    full_keys = full & every
    return BlockMask.from_kv_blocks(*_ordered((partial | full) & some & ~full_keys), *_ordered(full_keys),
                                    BLOCK_SIZE=(FLEX_BLOCK, FLEX_BLOCK), mask_mod=same_doc_and_key,
                                    seq_lengths=(T, T))


class DocMask:
    """What one forward pass needs to restrict attention, built once for all layers: `doc` (B, T) document ids
    (None: the whole row is one document), `key_mask` (B, T) bool (None: every key; False keys are never
    attended). A query with no key left gets NaN from SDPA and zeros from FlexAttention."""

    def __init__(self, doc: torch.Tensor | None, impl: AttnImpl, key_mask: torch.Tensor | None = None) -> None:
        self.impl = impl
        self.dense: torch.Tensor | None = None
        self.block: BlockMask | None = None
        if impl == "sdpa":
            if doc is not None:
                self.dense = (doc[:, None, :, None] == doc[:, None, None, :])  # (B, 1, T, T)
            if key_mask is not None:
                keys = key_mask[:, None, None, :]  # (B, 1, 1, T)
                self.dense = keys if self.dense is None else self.dense & keys
        elif key_mask is not None:
            doc = torch.zeros_like(key_mask, dtype=torch.int32) if doc is None else doc
            self.block = key_block_mask(doc, key_mask)
        elif doc is not None:
            self.block = document_block_mask(doc)


_compiled_flex = None


def _flex(q, k, v, block_mask, gqa: bool):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type != "cuda" or torch.compiler.is_compiling():
        # inside a compiled block dynamo fuses it; on the CPU it runs unfused (tests only)
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocMask) -> torch.Tensor:
    """q: (B, H, T, Dh), k and v: (B, H_kv, T, Dh) with H a multiple of H_kv → (B, H, T, Dh)."""
    gqa = k.shape[1] != q.shape[1]
    if mask.impl == "sdpa":
        if gqa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)
    return _flex(q, k, v, mask.block, gqa)
