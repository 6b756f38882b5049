"""The scan's streaming summaries against brute force and against the merge they replaced (kept here as
`OldTopKBuffer`): top-k with ties, payloads, the process merge, the pair counter, the power-of-two histogram."""
import collections

import pytest
import torch

from interp.contexts.buffers import (
    PairCounter,
    Pow2Histogram,
    TopKBuffer,
    group_topk,
    merge_histograms,
    merge_topk_states,
    order_keys,
)
from tests.syncs import syncing_ops


class OldTopKBuffer:
    """The merge the scan used before (boolean filtering, unique, bincount): the reference for ties."""

    def __init__(self, n_groups, k):
        self.n_groups, self.k = n_groups, k
        self.values = torch.full((n_groups, k), float("-inf"))
        self.ids = torch.full((n_groups, k), -1, dtype=torch.long)
        self.payload = torch.zeros((n_groups, k))

    def merge(self, groups, values, ids, payload):
        enter = values > self.values[groups, -1]
        groups, values, ids, payload = groups[enter], values[enter], ids[enter], payload[enter]
        if not len(groups):
            return
        touched = torch.unique(groups)
        row_of = torch.full((self.n_groups,), -1, dtype=torch.long)
        row_of[touched] = torch.arange(len(touched))
        old_v, old_i, old_p = self.values[touched], self.ids[touched], self.payload[touched]
        filled = old_i >= 0
        all_rows = torch.cat([torch.arange(len(touched))[:, None].expand_as(old_i)[filled], row_of[groups]])
        all_values, all_ids = torch.cat([old_v[filled], values]), torch.cat([old_i[filled], ids])
        all_payload = torch.cat([old_p[filled], payload])
        order = torch.argsort(all_values, descending=True, stable=True)
        order = order[torch.argsort(all_rows[order], stable=True)]
        r = all_rows[order]
        counts = torch.bincount(r, minlength=len(touched))
        rank = torch.arange(len(r)) - (torch.cumsum(counts, 0) - counts)[r]
        keep = rank < self.k
        new_v, new_i, new_p = torch.full_like(old_v, float("-inf")), torch.full_like(old_i, -1), torch.zeros_like(old_p)
        new_v[r[keep], rank[keep]] = all_values[order][keep]
        new_i[r[keep], rank[keep]] = all_ids[order][keep]
        new_p[r[keep], rank[keep]] = all_payload[order][keep]
        self.values[touched], self.ids[touched], self.payload[touched] = new_v, new_i, new_p


def _batches(seed, G, n_batches=8, quantised=True):
    g = torch.Generator().manual_seed(seed)
    out, next_id = [], 0
    for _ in range(n_batches):
        n = int(torch.randint(0, 500, (1,), generator=g))
        gr = torch.randint(0, G, (n,), generator=g)
        va = torch.randint(0, 6, (n,), generator=g).float() if quantised else torch.randn(n, generator=g)
        valid = torch.rand(n, generator=g) < 0.8
        out.append((gr, va, torch.arange(next_id, next_id + n), valid))
        next_id += n
    return out


def test_order_keys_sort_floats_descending():
    v = torch.tensor([3.0, -1.0, 0.0, -0.0, float("inf"), float("-inf"), 1e-30, -2.5, 3.0])
    keys = order_keys(v)
    order = torch.sort(keys, stable=True).indices
    assert v[order].tolist() == sorted(v.tolist(), reverse=True)
    assert keys[2] == keys[3] and keys[0] == keys[8] and (keys >= 0).all() and (keys < 2**32).all()


@pytest.mark.parametrize("quantised", [True, False])
def test_topk_buffer_equals_brute_force_and_the_old_merge_ties_included(quantised):
    G, K = 23, 4
    buf, old = TopKBuffer(G, K), OldTopKBuffer(G, K)
    batches = _batches(0, G, quantised=quantised)
    for gr, va, ids, valid in batches:
        buf.merge(gr, va, ids, payload=va * 2 + ids, valid=valid)
        old.merge(gr[valid], va[valid], ids[valid], (va * 2 + ids)[valid])
    values, ids_, payload = buf.ordered()
    assert torch.equal(values, old.values) and torch.equal(ids_, old.ids)
    assert torch.equal(payload["payload"], old.payload)
    gr, va, ids, valid = (torch.cat(x) for x in zip(*batches))
    for grp in range(G):  # brute force: a stable sort of everything seen (arrival order breaks ties)
        sel = (gr == grp) & valid
        order = torch.sort(va[sel], descending=True, stable=True).indices[:K]
        n = len(order)
        assert ids_[grp, :n].tolist() == ids[sel][order].tolist()
        assert (ids_[grp, n:] == -1).all() and torch.isinf(values[grp, n:]).all()


def test_topk_merge_and_group_topk_issue_no_syncing_ops():
    G, K = 50, 5
    buf = TopKBuffer(G, K, spec={"win": ((3,), torch.int32, -1), "act": ((), torch.float32, 0.0)})
    gr, va, ids, valid = _batches(1, G, 1)[0]
    wins = torch.stack([ids, ids + 1, ids + 2], 1).int()
    counts = syncing_ops(lambda: buf.merge(gr, va, ids, payload={"win": wins, "act": va}, valid=valid))
    assert not counts, counts
    top = group_topk(gr, order_keys(va), valid, G, K)
    assert top.shape == (G, K)
    filled = buf.ids >= 0
    assert torch.equal(buf.payload["win"][filled][:, 0].long(), buf.ids[filled])


def test_process_merge_equals_one_process():
    G, K = 17, 5
    batches = _batches(2, G, 9)
    whole, parts = TopKBuffer(G, K), [TopKBuffer(G, K) for _ in range(3)]
    for i, (gr, va, ids, valid) in enumerate(batches):
        whole.merge(gr, va, ids, payload=ids.float(), valid=valid)
        parts[i % 3].merge(gr, va, ids, payload=ids.float(), valid=valid)
    merged = merge_topk_states([p.state_dict() for p in parts], K)
    values, ids_, payload = whole.ordered()
    assert torch.equal(merged["values"], values) and torch.equal(merged["ids"], ids_)
    assert torch.equal(merged["payload"]["payload"], payload["payload"])


@pytest.mark.parametrize("dense_bytes", [2**30, 0])
def test_pair_counter_is_exact_resumable_and_mergeable(dense_bytes):
    g = torch.Generator().manual_seed(1)
    make = lambda: PairCounter(60, dense_bytes=dense_bytes, min_pending=500)  # noqa: E731
    counter, halves, truth = make(), [make(), make()], collections.Counter()
    for i in range(12):
        keys = torch.randint(0, 60, (300,), generator=g)
        valid = torch.rand(300, generator=g) < 0.7
        counter.add(keys, valid)
        halves[i % 2].add(keys, valid)
        truth.update(keys[valid].tolist())
        if i == 5:  # a resumed counter
            restored = make()
            restored.load_state_dict(counter.state_dict())
            counter = restored
    keys, counts = counter.items()
    assert dict(zip(keys.tolist(), counts.tolist())) == dict(truth)
    merged = make()
    for h in halves:
        merged.add_counts(h.state_dict()["keys"], h.state_dict()["counts"])
    assert merged.state_dict()["keys"].tolist() == keys.tolist()
    assert merged.state_dict()["counts"].tolist() == counts.tolist()
    items, top = counter.top_per_group(6, 10, 3)  # keys = group * 10 + item; equal counts: the smaller item
    for grp in range(6):
        expected = sorted(((-c, k % 10) for k, c in truth.items() if k // 10 == grp))[:3]
        assert top[grp].tolist()[:len(expected)] == [-c for c, _ in expected]
        assert items[grp].tolist()[:len(expected)] == [i for _, i in expected]


def test_sparse_pair_counter_work_per_batch_does_not_grow_with_the_batches_before():
    """New keys in every batch (the hard case: nothing repeats). The elements sorted or scattered so far stay
    within a constant times the elements added, at every point of the scan: a batch costs, amortised, the same
    late as early. The old counter re-sorted every distinct key on every batch: it breaks the bound (checked)."""
    g = torch.Generator().manual_seed(3)
    counter = PairCounter(2**40, dense_bytes=0, min_pending=1)
    n, old_work, distinct = 1024, 0, 0
    for b in range(1, 257):
        counter.add(torch.randint(0, 2**40, (n,), generator=g))
        assert counter.processed <= 4 * n * b, (b, counter.processed)
        old_work += distinct + n  # torch.unique(cat([keys so far, new keys])) on every batch
        distinct += n
    assert old_work > 4 * n * 256
    assert counter.items()[1].sum() == 256 * n


def test_dense_pair_counter_lists_its_table_in_chunks():
    """The dense table is listed a chunk at a time (CUDA's nonzero takes under 2**31 elements): chunks that do not
    divide the table give the same keys and counts as one pass."""
    counter = PairCounter(1000)
    keys = torch.randint(0, 1000, (3000,), generator=torch.Generator().manual_seed(5))
    counter.add(keys)
    whole = counter.items()
    counter.chunk = 7
    chunked = counter.items()
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    assert whole[0].tolist() == sorted(set(keys.tolist())) and int(whole[1].sum()) == 3000


def test_dense_pair_counter_adds_without_syncing():
    counter = PairCounter(1000)
    keys, valid = torch.randint(0, 1000, (5000,)), torch.rand(5000) < 0.5
    assert not syncing_ops(lambda: counter.add(keys, valid))


def test_pow2_histogram_equals_brute_force_on_the_final_grid():
    g = torch.Generator().manual_seed(4)
    G, bins = 7, 16
    hist, parts = Pow2Histogram(G, bins), [Pow2Histogram(G, bins), Pow2Histogram(G, bins)]
    everything = []
    for i in range(10):
        gr = torch.randint(0, G - 1, (200,), generator=g)  # group G-1 never sees a value
        scale = 2.0 ** torch.randint(-3, i + 1, (200,), generator=g).float()
        va = torch.rand(200, generator=g) * scale
        va[:5] = scale[:5]  # values exactly on power-of-two edges
        valid = (torch.rand(200, generator=g) < 0.8) & (va > 0)
        hist.add(gr, va, valid)
        parts[i % 2].add(gr, va, valid)
        everything.append((gr[valid], va[valid]))
    gr, va = (torch.cat(x) for x in zip(*everything))
    top = hist.top()
    assert top[G - 1] == 0 and (hist.counts[G - 1] == 0).all()
    for grp in range(G - 1):
        v = va[gr == grp].double()
        P = float(top[grp])
        assert P >= v.max() and P / 2 < v.max()
        bin_of = (torch.ceil(v / P * bins) - 1).long()
        assert hist.counts[grp].tolist() == torch.bincount(bin_of, minlength=bins).tolist()
    merged = merge_histograms([p.state_dict() for p in parts])
    assert torch.equal(merged["counts"], hist.counts) and torch.equal(merged["exp"], hist.exp)
    assert not syncing_ops(lambda: hist.add(gr, va, va > 0))
