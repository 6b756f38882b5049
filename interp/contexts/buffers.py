"""Exact streaming summaries per group (a group: one feature of one layer), with shapes that never depend on
the data, so that folding a batch in makes no device wait for the host.

`TopKBuffer`: per group, the K largest values seen, their ids and a payload (any per-entry tensors). `merge`
takes a batch of (group, value, id) triplets with a validity mask: one stable sort of (group, −value) keys
puts each group's entries first-best, a rank within the group places each group's best K into a fixed
(G, K) candidate block, and one stable sort of [buffer | candidates] per row keeps the best K. Ties fall to
the smaller id; the scan's ids are global positions, which grow with arrival, so that is the earlier arrival,
as a brute-force stable top-k over everything seen would choose (tested).

`PairCounter`: exact counts of integer keys (feature × vocabulary + token): a dense table where it fits the
memory given, else keys appended as they come and consolidated (sorted, summed) only when the pending keys
outnumber the consolidated ones, so each key is sorted a bounded number of times on average and a batch costs
the same late in a scan as early.

`Pow2Histogram`: exact per-group histograms of positive values over (0, P], P the power of two at or above
the group's largest value so far, in a power-of-two number of bins (lo, hi]; when P doubles, bins merge in
pairs, which is exact because every bin edge is a power-of-two fraction of P.
"""
from __future__ import annotations

from typing import Callable

import torch

NO_EXP = -(2**40)  # a histogram's exponent before its group's first value


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2**32) ascending where the float32 `values` descend (equal values, equal keys; −0.0 as 0.0)."""
    bits = values.float().contiguous().view(torch.int32).long()
    mono = torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))
    return (2**31 - 1) - mono


def group_topk(groups: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, n_groups: int, k: int) -> torch.Tensor:
    """(G, k) indices of each group's first k valid entries by `keys` (ascending; `order_keys` of the values),
    ties in arrival order; −1 where a group has fewer. Fixed shapes: a stable sort, a rank, a scatter."""
    g = torch.where(valid, groups, torch.full_like(groups, n_groups))  # invalid entries: a spare group
    order = torch.sort(g * 2**32 + keys, stable=True).indices
    gs = g[order]
    counts = torch.zeros(n_groups + 1, dtype=torch.long, device=g.device).index_add_(0, g, torch.ones_like(g))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(g), device=g.device) - starts[gs]
    slot = torch.where((rank < k) & (gs < n_groups), gs * k + rank, torch.full_like(gs, n_groups * k))
    out = torch.full((n_groups * k + 1,), -1, dtype=torch.long, device=g.device).scatter_(0, slot, order)
    return out[:-1].view(n_groups, k)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (G, W, *rest) gathered along dim 1 by index (G, K)."""
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


def best_first(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row, the order (G, W) of entries by value (descending), then id (ascending; −1, empty, last)."""
    by_id = torch.sort(torch.where(ids >= 0, ids, torch.full_like(ids, 2**62)), dim=1, stable=True).indices
    return by_id.gather(1, torch.sort(values.gather(1, by_id), dim=1, descending=True, stable=True).indices)


class Merged:
    """What a merge took in: per candidate slot (G, K), whether it entered (`new`), from which triplet (`src`)
    and into which of its group's slots (`slot`)."""

    def __init__(self, new: torch.Tensor, src: torch.Tensor, slot: torch.Tensor) -> None:
        self.new, self.src, self.slot = new, src, slot


class TopKBuffer:
    """Per group, the K largest values seen (−inf where empty), their ids (−1 where empty) and a payload: named
    tensors (G, K, ...) that start at their fill value. `spec`: name → (trailing shape, dtype, fill); by default
    one float payload, "payload" (0).

    A group's K slots are in no particular order: an entry that enters takes the slot of one that leaves, and
    nothing else moves, so a merge writes only the new entries' payload. `ordered()` sorts them (by value, then
    id: arrival order when ids grow with arrival, as a scan's positions do)."""

    def __init__(self, n_groups: int, k: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 spec: dict[str, tuple[tuple[int, ...], torch.dtype, float]] | None = None) -> None:
        self.n_groups, self.k = n_groups, k
        self.spec = {"payload": ((), torch.float32, 0.0)} if spec is None else spec
        self.values = torch.full((n_groups, k), float("-inf"), device=device, dtype=dtype)
        self.ids = torch.full((n_groups, k), -1, dtype=torch.long, device=device)
        # one spare row at the end takes the writes of padding entries
        self.store = {name: torch.full((n_groups * k + 1, *shape), fill, dtype=dt, device=device)
                      for name, (shape, dt, fill) in self.spec.items()}

    @property
    def payload(self) -> dict[str, torch.Tensor]:
        return {name: x[:-1].view(self.n_groups, self.k, *x.shape[1:]) for name, x in self.store.items()}

    def select(self, groups: torch.Tensor, values: torch.Tensor, ids: torch.Tensor,
               valid: torch.Tensor | None = None) -> Merged:
        """Fold triplets (E,) in (value and id; only `valid` ones count) and say which entered where; their
        payload is left for `fill` (only the entries that enter are made, a group range at a time)."""
        G, K = self.n_groups, self.k
        values = values.to(self.values.dtype)
        valid = torch.ones_like(groups, dtype=torch.bool) if valid is None else valid
        cand = group_topk(groups, order_keys(values), valid, G, K)
        has, c = cand >= 0, cand.clamp_min(0)
        cand_v = torch.where(has, values[c], torch.full_like(values[c], float("-inf")))
        cand_i = torch.where(has, ids[c], torch.full_like(cand, -1))
        order = best_first(torch.cat([self.values, cand_v], 1), torch.cat([self.ids, cand_i], 1))
        kept = torch.zeros(G, 2 * K, dtype=torch.bool, device=cand.device).scatter_(
            1, order[:, :K], torch.ones_like(order[:, :K], dtype=torch.bool))
        new = kept[:, K:] & has
        freed = ~kept[:, :K]  # as many slots leave as entries enter
        free_rank = torch.cumsum(freed.long(), 1) - 1
        slots = torch.arange(K, device=cand.device).expand(G, K)
        by_rank = torch.full((G, K + 2), K, dtype=torch.long, device=cand.device).scatter_(
            1, torch.where(freed, free_rank, K + 1), slots)  # column K stays K (spare); K + 1 takes the rest
        slot = by_rank.gather(1, torch.where(new, torch.cumsum(new.long(), 1) - 1, K))  # K where not new
        spare = torch.full((G, 1), float("-inf"), dtype=self.values.dtype, device=cand.device)
        self.values = torch.cat([self.values, spare], 1).scatter_(1, slot, cand_v)[:, :K]
        no_id = torch.full((G, 1), -1, dtype=torch.long, device=cand.device)
        self.ids = torch.cat([self.ids, no_id], 1).scatter_(1, slot, cand_i)[:, :K]
        return Merged(new, torch.where(new, cand, -1), slot)

    def fill(self, merged: Merged, rows: slice, capacity: int,
             make: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]) -> None:
        """The payload of the entries that entered groups `rows` (at most `capacity` of them, e.g. the triplets
        of those groups): `make(src, group)` (R,) each (group relative to rows.start; padding: src −1) returns
        their payload, name → (R, ...)."""
        new, src, slot = merged.new[rows], merged.src[rows], merged.slot[rows]
        n = new.numel()
        capacity = min(capacity, n)
        flat = torch.arange(n, device=new.device)
        at = torch.where(new.reshape(-1), torch.cumsum(new.reshape(-1).long(), 0) - 1, capacity)
        picked = torch.full((capacity + 1,), n, dtype=torch.long, device=new.device).scatter_(0, at, flat)[:-1]
        real = picked < n
        p = picked.clamp_max(n - 1)
        group = p // self.k
        target = torch.where(real, (rows.start + group) * self.k + slot.reshape(-1)[p], self.n_groups * self.k)
        made = make(torch.where(real, src.reshape(-1)[p], -1), group)
        for name, x in self.store.items():
            x.index_copy_(0, target, made[name].to(x.dtype))

    def merge(self, groups: torch.Tensor, values: torch.Tensor, ids: torch.Tensor,
              payload: torch.Tensor | dict[str, torch.Tensor] | None = None, valid: torch.Tensor | None = None) -> None:
        """Fold triplets in with their payload: per-entry tensors (E, ...) (a tensor alone is "payload"; none:
        the values)."""
        merged = self.select(groups, values, ids, valid)
        per_entry = payload if isinstance(payload, dict) else {
            "payload": (values if payload is None else payload).float()}
        self.fill(merged, slice(0, self.n_groups), len(groups),
                  lambda src, group: {name: p[src.clamp_min(0)] for name, p in per_entry.items()})

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(values, ids, payload) with each group's entries best first (by value, then id)."""
        order = best_first(self.values, self.ids)
        return (self.values.gather(1, order), self.ids.gather(1, order),
                {name: _gather_rows(x, order) for name, x in self.payload.items()})

    def state_dict(self) -> dict:
        return {"values": self.values.cpu(), "ids": self.ids.cpu(),
                "payload": {k: v.cpu() for k, v in self.payload.items()}}

    def load_state_dict(self, state: dict) -> None:
        device = self.values.device
        self.values, self.ids = state["values"].to(device), state["ids"].to(device)
        for name, x in self.store.items():
            x[:-1].copy_(state["payload"][name].reshape(x[:-1].shape))


def merge_topk_states(parts: list[dict], k: int) -> dict:
    """Buffers (state dicts) of processes that saw disjoint data → the one buffer one process would hold after
    seeing it all, when its arrival order is id order: per group the best k by value, ties to the smaller id."""
    values = torch.cat([p["values"] for p in parts], dim=1)
    ids = torch.cat([p["ids"] for p in parts], dim=1)
    take = best_first(values, ids)[:, :k]
    payload = {name: _gather_rows(torch.cat([p["payload"][name] for p in parts], dim=1), take)
               for name in parts[0]["payload"]}
    return {"values": values.gather(1, take), "ids": ids.gather(1, take), "payload": payload}


class PairCounter:
    """Exact counts of integer keys in [0, n_keys). Dense (one counter per possible key) when that takes at most
    `dense_bytes`; otherwise sparse: sorted distinct keys with their counts, plus the keys added since, which are
    consolidated (one sort) once they outnumber the consolidated keys (and `min_pending`). `processed` counts the
    elements scattered or sorted: the counter's work, which tests compare early and late in a scan."""

    def __init__(self, n_keys: int, device: torch.device | str = "cpu", dense_bytes: int = 2**30,
                 max_total: int = 2**62, min_pending: int = 2**16) -> None:
        self.n_keys, self.device, self.min_pending = n_keys, torch.device(device), min_pending
        self.chunk = 2**30  # elements per nonzero call when listing the dense table
        dtype = torch.int32 if max_total < 2**31 else torch.long
        self.dense = n_keys * dtype.itemsize <= dense_bytes
        self.table = torch.zeros(n_keys if self.dense else 0, dtype=dtype, device=device)
        self.keys = torch.zeros(0, dtype=torch.long, device=device)
        self.counts = torch.zeros(0, dtype=torch.long, device=device)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.n_pending = 0
        self.processed = 0

    def add(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Count `keys` (E,) where `valid` (all by default). No data-dependent shapes (no host sync) unless the
        sparse counter consolidates."""
        weights = torch.ones_like(keys) if valid is None else valid.long()
        self.add_counts(keys, weights)

    def add_counts(self, keys: torch.Tensor, counts: torch.Tensor) -> None:
        """Add `counts` to `keys` (E,) each (keys may repeat)."""
        keys, counts = keys.to(self.device).long(), counts.to(self.device).long()
        self.processed += len(keys)
        if self.dense:
            self.table.index_add_(0, keys, counts.to(self.table.dtype))
            return
        self.pending.append((keys, counts))
        self.n_pending += len(keys)
        if self.n_pending >= max(self.min_pending, len(self.keys)):
            self.consolidate()

    def consolidate(self) -> None:
        """Sparse: the pending keys summed into the sorted distinct keys (one sort; syncs, for the new size)."""
        if self.dense or not self.pending:
            return
        keys = torch.cat([self.keys, *(k for k, _ in self.pending)])
        counts = torch.cat([self.counts, *(c for _, c in self.pending)])
        self.processed += len(keys)
        merged, inverse = torch.unique(keys, return_inverse=True)
        summed = torch.zeros(len(merged), dtype=torch.long, device=keys.device).index_add_(0, inverse, counts)
        keep = summed > 0
        self.keys, self.counts = merged[keep], summed[keep]
        self.pending, self.n_pending = [], 0

    def items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(distinct keys ascending, their counts), the keys counted at least once."""
        if self.dense:  # in chunks under 2**31 elements (the reference shape's table has 7.4 G)
            keys = torch.cat([torch.nonzero(self.table[lo:lo + self.chunk])[:, 0] + lo
                              for lo in range(0, max(self.n_keys, 1), self.chunk)])
            return keys, self.table[keys].long()
        self.consolidate()
        return self.keys, self.counts

    def top_per_group(self, n_groups: int, divisor: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For keys = group × divisor + item: the n most frequent items per group, (G, n) items (−1 when fewer)
        and counts (0 there); equal counts in item order."""
        if self.dense:
            item_parts, count_parts = [], []
            table = self.table.view(n_groups, divisor)
            for lo in range(0, n_groups, 1024):
                part = table[lo:lo + 1024].long()
                order = torch.sort(part, dim=1, descending=True, stable=True)
                c, i = order.values[:, :n], order.indices[:, :n]
                item_parts.append(torch.where(c > 0, i, torch.full_like(i, -1)))
                count_parts.append(c)
            return torch.cat(item_parts), torch.cat(count_parts)
        keys, cnt = self.items()
        every = torch.ones_like(keys, dtype=torch.bool)
        best = group_topk(keys // divisor, (2**32 - 1) - cnt.clamp_max(2**32 - 1), every, n_groups, n)
        has = best >= 0
        items = torch.where(has, keys[best.clamp_min(0)] % divisor, torch.full_like(best, -1))
        return items, torch.where(has, cnt[best.clamp_min(0)], torch.zeros_like(best))

    def state_dict(self) -> dict:
        keys, counts = self.items()
        return {"keys": keys.cpu(), "counts": counts.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if self.dense:
            self.table.zero_()
        self.keys = torch.zeros(0, dtype=torch.long, device=self.device)
        self.counts = torch.zeros(0, dtype=torch.long, device=self.device)
        self.pending, self.n_pending = [], 0
        processed = self.processed
        self.add_counts(state["keys"], state["counts"])
        self.consolidate()
        self.processed = processed


def ceil_log2(values: torch.Tensor) -> torch.Tensor:
    """For positive floats: the smallest integer e with 2**e ≥ value (exact, from the float's exponent)."""
    mantissa, exponent = torch.frexp(values.float())
    return torch.where(mantissa == 0.5, exponent - 1, exponent).long()


class Pow2Histogram:
    """Per group, exact counts of positive values in `bins` (a power of two) equal bins (lo, hi] over (0, P],
    P = 2**exp the power of two at or above the group's largest value (exp NO_EXP before any value)."""

    def __init__(self, n_groups: int, bins: int = 32, device: torch.device | str = "cpu") -> None:
        if bins & (bins - 1):
            raise ValueError(f"bins must be a power of two, not {bins}")
        self.bins, self.shift_max = bins, bins.bit_length() - 1
        self.counts = torch.zeros(n_groups, bins, dtype=torch.long, device=device)
        self.exp = torch.full((n_groups,), NO_EXP, dtype=torch.long, device=device)

    def regrid(self, exp: torch.Tensor) -> None:
        """Counts re-binned for exponents `exp` ≥ the current ones (bins merged in pairs per doubling)."""
        shift = (exp - self.exp).clamp(0, self.shift_max)
        target = torch.arange(self.bins, device=exp.device) >> shift[:, None]
        self.counts = torch.zeros_like(self.counts).scatter_add_(1, target, self.counts)
        self.exp = exp

    def add(self, groups: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Count `values` (E,) of `groups` where `valid` (values > 0 there). Fixed shapes, no host sync."""
        e = torch.where(valid, ceil_log2(values.clamp_min(1e-30)), torch.full_like(groups, NO_EXP))
        self.regrid(self.exp.scatter_reduce(0, groups, e, reduce="amax"))
        scale = torch.exp2((self.shift_max - self.exp[groups]).clamp(-1000, 1000).double())
        v = torch.where(valid, values.double(), torch.ones_like(values, dtype=torch.float64))
        b = (torch.ceil(v * scale) - 1).clamp(0, self.bins - 1).long()
        self.counts.view(-1).index_add_(0, groups * self.bins + b, valid.long())

    def top(self) -> torch.Tensor:
        """P per group (float64; 0 for a group without values)."""
        return torch.where(self.exp > NO_EXP, torch.exp2(self.exp.clamp(-1000, 1000).double()),
                           torch.zeros_like(self.exp, dtype=torch.float64))

    def state_dict(self) -> dict:
        return {"counts": self.counts.cpu(), "exp": self.exp.cpu()}

    def load_state_dict(self, state: dict) -> None:
        device = self.counts.device
        self.counts, self.exp = state["counts"].to(device), state["exp"].to(device)


def merge_histograms(parts: list[dict]) -> dict:
    """Histogram states of disjoint data → the histogram of all of it (each re-binned to the largest P)."""
    first = parts[0]
    out = Pow2Histogram(first["counts"].shape[0], first["counts"].shape[1])
    out.exp = torch.stack([p["exp"] for p in parts]).amax(0)
    total = torch.zeros_like(out.counts)
    for p in parts:
        h = Pow2Histogram(p["counts"].shape[0], p["counts"].shape[1])
        h.load_state_dict(p)
        h.regrid(out.exp)
        total += h.counts
    out.counts = total
    return out.state_dict()
