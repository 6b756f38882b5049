"""Exact streaming top-k per group (e.g. per feature) from sparse (group, value, id) triplets.

A buffer holds, for each of G groups, its K best (value, id) pairs so far (value -inf, id -1 where
empty). `merge` folds a batch of triplets in: entries that do not beat their group's K-th value are
dropped at once; the rest and their groups' current rows get one stable sort by value, one stable
sort by group, and each group keeps its first K. The result equals a brute-force top-k over everything seen (tested);
ties are broken by arrival order, deterministically.
"""
from __future__ import annotations

import torch


class TopKBuffer:
    """Per group, the K largest values seen, their ids, and an optional float payload carried along."""

    def __init__(self, n_groups: int, k: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.n_groups, self.k = n_groups, k
        self.values = torch.full((n_groups, k), float("-inf"), device=device, dtype=dtype)
        self.ids = torch.full((n_groups, k), -1, dtype=torch.long, device=device)
        self.payload = torch.zeros((n_groups, k), device=device)

    def merge(self, groups: torch.Tensor, values: torch.Tensor, ids: torch.Tensor,
              payload: torch.Tensor | None = None) -> None:
        """Fold in triplets (E,) each: group index, value, id (ids must be ≥ 0), and an optional payload."""
        values = values.to(self.values.dtype)
        payload = values.float() if payload is None else payload.float()
        # only entries that beat their group's current K-th value can enter; only their groups change
        enter = values > self.values[groups, -1]
        groups, values, ids, payload = groups[enter], values[enter], ids[enter], payload[enter]
        if not len(groups):
            return
        touched = torch.unique(groups)
        row_of = torch.full((self.n_groups,), -1, dtype=torch.long, device=groups.device)
        row_of[touched] = torch.arange(len(touched), device=groups.device)
        old_v, old_i, old_p = self.values[touched], self.ids[touched], self.payload[touched]  # (U, K)
        filled = old_i >= 0
        all_rows = torch.cat([torch.arange(len(touched), device=groups.device)[:, None].expand_as(old_i)[filled],
                              row_of[groups]])
        all_values = torch.cat([old_v[filled], values])
        all_ids = torch.cat([old_i[filled], ids])
        all_payload = torch.cat([old_p[filled], payload])
        order = torch.argsort(all_values, descending=True, stable=True)
        order = order[torch.argsort(all_rows[order], stable=True)]
        r = all_rows[order]
        counts = torch.bincount(r, minlength=len(touched))
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(r), device=r.device) - starts[r]
        keep = rank < self.k
        new_v = torch.full_like(old_v, float("-inf"))
        new_i = torch.full_like(old_i, -1)
        new_p = torch.zeros_like(old_p)
        new_v[r[keep], rank[keep]] = all_values[order][keep]
        new_i[r[keep], rank[keep]] = all_ids[order][keep]
        new_p[r[keep], rank[keep]] = all_payload[order][keep]
        self.values[touched], self.ids[touched], self.payload[touched] = new_v, new_i, new_p

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
        self.add_counts(*torch.unique(keys, return_counts=True))

    def add_counts(self, new_keys: torch.Tensor, new_counts: torch.Tensor) -> None:
        """Fold in distinct keys with their counts (another counter's state, for instance)."""
        new_keys, new_counts = new_keys.to(self.keys.device), new_counts.to(self.keys.device)
        merged, inverse = torch.unique(torch.cat([self.keys, new_keys]), return_inverse=True)
        counts = torch.zeros(len(merged), dtype=torch.long, device=merged.device)
        counts.scatter_add_(0, inverse, torch.cat([self.counts, new_counts]))
        self.keys, self.counts = merged, counts

    def top_per_group(self, n_groups: int, divisor: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For keys = group × divisor + item: the n most frequent items per group, (G, n) items (-1 when
        fewer) and counts."""
        groups, items = self.keys // divisor, self.keys % divisor
        buf = TopKBuffer(n_groups, n, self.keys.device, torch.float64)  # counts stay exact past 2**24
        buf.merge(groups, self.counts.double(), items)
        return buf.ids, buf.values.clamp_min(0).long()

    def state_dict(self) -> dict:
        return {"keys": self.keys.cpu(), "counts": self.counts.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.keys, self.counts = state["keys"].to(self.keys.device), state["counts"].to(self.keys.device)
