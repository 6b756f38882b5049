"""Exact streaming top-k per group (e.g. per feature) from sparse (group, value, id) triplets.

A buffer holds, for each of G groups, its K best (value, id) pairs so far (value -inf, id -1 where
empty). `merge` folds a batch of triplets in: one stable sort by value, one stable sort by group, and
each group keeps its first K. The result equals a brute-force top-k over everything seen (tested);
ties are broken by arrival order, deterministically.
"""
from __future__ import annotations

import torch


class TopKBuffer:
    """Per group, the K largest values seen, their ids, and an optional float payload carried along."""

    def __init__(self, n_groups: int, k: int, device: torch.device | str = "cpu") -> None:
        self.n_groups, self.k = n_groups, k
        self.values = torch.full((n_groups, k), float("-inf"), device=device)
        self.ids = torch.full((n_groups, k), -1, dtype=torch.long, device=device)
        self.payload = torch.zeros((n_groups, k), device=device)

    def merge(self, groups: torch.Tensor, values: torch.Tensor, ids: torch.Tensor,
              payload: torch.Tensor | None = None) -> None:
        """Fold in triplets (E,) each: group index, value, id (ids must be ≥ 0), and an optional payload."""
        filled = self.ids >= 0
        all_groups = torch.cat([torch.arange(self.n_groups, device=groups.device)[:, None].expand_as(self.ids)[filled],
                                groups])
        all_values = torch.cat([self.values[filled], values.float()])
        all_ids = torch.cat([self.ids[filled], ids])
        all_payload = torch.cat([self.payload[filled], values.float() if payload is None else payload.float()])
        order = torch.argsort(all_values, descending=True, stable=True)
        order = order[torch.argsort(all_groups[order], stable=True)]
        g = all_groups[order]
        counts = torch.bincount(g, minlength=self.n_groups)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(g), device=g.device) - starts[g]
        keep = rank < self.k
        self.values.fill_(float("-inf"))
        self.ids.fill_(-1)
        self.payload.zero_()
        self.values[g[keep], rank[keep]] = all_values[order][keep]
        self.ids[g[keep], rank[keep]] = all_ids[order][keep]
        self.payload[g[keep], rank[keep]] = all_payload[order][keep]

    def state_dict(self) -> dict:
        return {"values": self.values.cpu(), "ids": self.ids.cpu(), "payload": self.payload.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.values.copy_(state["values"])
        self.ids.copy_(state["ids"])
        self.payload.copy_(state["payload"])


class PairCounter:
    """Exact counts of integer keys (e.g. feature × vocabulary + token), merged batch by batch."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.keys = torch.zeros(0, dtype=torch.long, device=device)
        self.counts = torch.zeros(0, dtype=torch.long, device=device)

    def add(self, keys: torch.Tensor) -> None:
        new_keys, new_counts = torch.unique(keys, return_counts=True)
        merged, inverse = torch.unique(torch.cat([self.keys, new_keys]), return_inverse=True)
        counts = torch.zeros(len(merged), dtype=torch.long, device=merged.device)
        counts.scatter_add_(0, inverse, torch.cat([self.counts, new_counts]))
        self.keys, self.counts = merged, counts

    def top_per_group(self, n_groups: int, divisor: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For keys = group × divisor + item: the n most frequent items per group, (G, n) items (-1 when
        fewer) and counts."""
        groups, items = self.keys // divisor, self.keys % divisor
        buf = TopKBuffer(n_groups, n, self.keys.device)
        buf.merge(groups, self.counts.float(), items)
        return buf.ids, buf.values.clamp_min(0).long()

    def state_dict(self) -> dict:
        return {"keys": self.keys.cpu(), "counts": self.counts.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.keys, self.counts = state["keys"].to(self.keys.device), state["counts"].to(self.keys.device)
