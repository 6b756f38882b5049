"""The one-pass scan on a tiny random model, against brute force over every token's dense latents: top-k
and their windows, the sample, counts, (feature, token) pairs, histograms, pool windows; packed forward
passes equal to unpacked ones; no syncing operation in a scan batch; old state files refused."""
import collections
import contextlib
import json

import numpy as np
import pytest
import torch

from core.files import UserError, save_checkpoint
from data.loader import ShardLoader
from data.shards import write_shard
from interp.contexts.scan import HIST_BINS, Batch, ScanJob, ScanSettings, read_batches, scan
from model.diffusion import DiffusionLM, ModelConfig
from model.distributed import Dist
from model.transcoder import Transcoder, TranscoderConfig
from tests.syncs import syncing_ops

N_VOCAB, SEQ, BATCH = 61, 32, 4
FP32 = contextlib.nullcontext()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer model, a transcoder per layer, and a fake shard dataset with documents."""
    folder = tmp_path_factory.mktemp("data")
    cfg = ModelConfig(n_vocab=N_VOCAB, vocab_size=64, mask_id=N_VOCAB, pad_id=N_VOCAB + 1, bos_id=N_VOCAB - 1,
                      num_layers=2, num_heads=2, model_dim=32)
    torch.manual_seed(0)
    model = DiffusionLM(cfg).eval().requires_grad_(False)
    for prm in model.parameters():
        torch.nn.init.normal_(prm, std=0.05)
    tcs = {layer: Transcoder(TranscoderConfig(32, 48, 4)).requires_grad_(False) for layer in (0, 1)}
    rng = np.random.default_rng(0)
    shards = []
    for i, split in enumerate(("val", "train")):
        tokens = rng.integers(0, 12, size=40 * SEQ)  # a small alphabet: (feature, token) pairs repeat
        tokens[rng.random(len(tokens)) < 0.04] = cfg.bos_id
        write_shard(folder / f"s_{split}.bin", tokens, cfg.vocab_size, 0, 1)
        shards.append({"file": f"s_{split}.bin", "split": split, "n_tokens": len(tokens)})
    (folder / "meta.json").write_text(json.dumps({"complete": True, "shards": shards, "labels": False}))
    return model, tcs, ShardLoader(folder, "train", SEQ, BATCH, seed=0)


def settings(**kw):
    base = dict(n_batches=7, n_top=5, context_before=3, context_after=2, n_quantile=4, n_random=4, sample_size=12,
                pool_size=40, checkpoint_every=3, checkpoint_minutes=0)
    return ScanSettings(**{**base, **kw})


def test_one_pass_equals_brute_force(tiny, tmp_path):
    model, tcs, loader = tiny
    s = settings()
    states, n_tokens = scan(model, tcs, loader, s, "cpu", tmp_path / "state.pt")
    batches = [Batch(model, loader, b, s, [0, 1], "cpu", FP32) for b in range(s.n_batches)]
    tokens = torch.cat([b.tokens.reshape(-1) for b in batches])
    masked = torch.cat([b.masked for b in batches])
    t_of = torch.cat([b.t[:, None].expand(b.B, b.T).reshape(-1) for b in batches])
    win = torch.cat([torch.where(w >= 0, w + i * b.N, w) for i, b in enumerate(batches)
                     for w in [b.windows(torch.arange(b.N), s)]])
    assert n_tokens == len(tokens)
    for layer in (0, 1):
        dense = torch.cat([tcs[layer].dense_latents(b.x[layer]) for b in batches])  # (tokens, M)
        st = states[layer]
        on = dense > 0
        assert torch.equal(st.fire_count, on.sum(0))
        assert torch.equal(st.masked_count, (on & masked[:, None]).sum(0))
        torch.testing.assert_close(st.act_sum, dense.double().sum(0))
        order = torch.sort(dense.T, dim=1, descending=True, stable=True)  # ties: the earlier position
        k = s.n_top
        live = order.values[:, :k] > 0
        assert torch.equal(st.top.ids, torch.where(live, order.indices[:, :k], -1))
        for f in range(dense.shape[1]):
            pairs = collections.Counter(tokens[on[:, f]].tolist())
            expected = sorted(pairs.items(), key=lambda x: (-x[1], x[0]))[:10]
            got = [(int(i), int(c)) for i, c in zip(st.top_tokens[0][f], st.top_tokens[1][f]) if i >= 0]
            assert got == expected
            v = dense[on[:, f], f].double()
            if len(v):
                P = float(st.hist_max[f])
                assert P >= v.max() > P / 2
                bins = (torch.ceil(v / P * HIST_BINS) - 1).long()
                assert st.hist[f].tolist() == torch.bincount(bins, minlength=HIST_BINS).tolist()
            else:
                assert st.hist_max[f] == 0 and st.hist[f].sum() == 0
        for cat in ("top", "quantile", "random"):
            chosen = st.chosen[cat]
            for f, slot in zip(*torch.nonzero(chosen >= 0, as_tuple=True)):
                pos = int(chosen[f, slot])
                w = win[pos]
                inside = w >= 0
                assert st.win_tokens[cat][f, slot].tolist() == torch.where(inside, tokens[w.clamp_min(0)], -1).tolist()
                assert torch.equal(st.win_acts[cat][f, slot], torch.where(inside, dense[w.clamp_min(0), f], 0.0))
                assert torch.equal(st.win_masked[cat][f, slot], masked[w.clamp_min(0)] & inside)
                assert bool(st.masked[cat][f, slot]) == bool(masked[pos]) and st.t[cat][f, slot] == t_of[pos]
                if cat == "random":
                    assert not (dense[w[inside], f] > 0).any()
                else:
                    assert dense[pos, f] > 0
            empty = chosen < 0
            assert (st.win_tokens[cat][empty] == -1).all() and torch.isnan(st.t[cat][empty]).all()
        assert (st.chosen["random"] >= 0).sum() > 0 and (st.chosen["quantile"] >= 0).sum() > 0


def _same(a, b):
    for layer in a:
        x, y = a[layer], b[layer]
        for name in ("fire_count", "masked_count", "hist", "hist_max"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert torch.equal(x.top.values, y.top.values) and torch.equal(x.top.ids, y.top.ids)
        assert all(torch.equal(p, q) for p, q in zip(x.top_tokens, y.top_tokens))
        torch.testing.assert_close(x.act_sum, y.act_sum, rtol=1e-12, atol=0)
        for name in ("chosen", "win_tokens", "win_acts", "t", "masked", "win_masked"):
            for cat in ("top", "quantile", "random"):
                torch.testing.assert_close(getattr(x, name)[cat], getattr(y, name)[cat], rtol=0, atol=0,
                                           equal_nan=True, msg=f"{name} {cat}")


def test_packed_forward_passes_equal_unpacked_ones(tiny, tmp_path):
    model, tcs, loader = tiny
    one, _ = scan(model, tcs, loader, settings(forward_batch_size=BATCH), "cpu", tmp_path / "a.pt")
    packed, _ = scan(model, tcs, loader, settings(forward_batch_size=3 * BATCH), "cpu", tmp_path / "b.pt")
    _same(one, packed)
    job = ScanJob(model, tcs, loader, settings(forward_batch_size=3 * BATCH), "cpu", tmp_path / "c.pt", FP32, Dist())
    assert job.per_forward == 3


def test_a_killed_scan_resumes_to_the_same_result(tiny, tmp_path, monkeypatch):
    import interp.contexts.scan as scan_mod

    model, tcs, loader = tiny
    whole, _ = scan(model, tcs, loader, settings(), "cpu", tmp_path / "a.pt")
    real, saves = scan_mod.save_checkpoint, []

    def save_then_die(path, state):
        real(path, state)
        saves.append(state["next_batch"])
        raise KeyboardInterrupt

    monkeypatch.setattr(scan_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        scan(model, tcs, loader, settings(), "cpu", tmp_path / "b.pt")
    monkeypatch.setattr(scan_mod, "save_checkpoint", real)
    assert saves == [3]
    resumed, _ = scan(model, tcs, loader, settings(forward_batch_size=3 * BATCH), "cpu", tmp_path / "b.pt")
    _same(whole, resumed)


def test_a_state_file_of_the_two_pass_scan_is_refused(tiny, tmp_path):
    model, tcs, loader = tiny
    save_checkpoint(tmp_path / "state.pt", {"phase": 2, "next_batch": 1, "seq_t": torch.zeros(1), "layers": {}})
    with pytest.raises(UserError, match="older \\(two-pass\\) version of the scan") as err:
        scan(model, tcs, loader, settings(), "cpu", tmp_path / "state.pt")
    assert "\n" not in str(err.value)


def test_a_scan_batch_issues_no_syncing_operation(tiny, tmp_path):
    """All layers of a (packed) forward pass into the state: buffers, windows, counts, histograms, pool."""
    model, tcs, loader = tiny
    s = settings(pool_size=200)
    job = ScanJob(model, tcs, loader, s, "cpu", tmp_path / "state.pt", FP32, Dist())
    for b in (0, 2):  # the first batch fills empty buffers; a later one merges into full ones
        host = read_batches(loader, [b, b + 1], s)  # the data and its noise: the host's own work
        counts = syncing_ops(lambda: job.collect(Batch(model, loader, [b, b + 1], s, job.layers, "cpu", FP32,
                                                       host=host)))
        assert not counts, counts


def test_processes_states_merge_into_one_process_state(tiny, tmp_path, monkeypatch):
    """What torchrun's processes do, without torchrun: each scans the batches b ≡ rank (mod 2), packed, saves its
    state, and rank 0 folds the other's state file into its own: one process's result (act_sum: up to summation
    order). The other process ends with its own state, unmerged."""
    model, tcs, loader = tiny
    monkeypatch.setattr(Dist, "barrier", lambda self: None)  # the processes run one after the other here
    s = settings(forward_batch_size=2 * BATCH, checkpoint_every=2)
    whole, _ = scan(model, tcs, loader, settings(), "cpu", tmp_path / "a.pt")
    jobs = [ScanJob(model, tcs, loader, s, "cpu", tmp_path / "b.pt", FP32, Dist(rank=r, world=2)) for r in (0, 1)]
    for job in jobs:
        job.run(0)
    assert all(job.per_forward == 2 for job in jobs)
    own = jobs[1].full_state()
    for job in reversed(jobs):  # rank 1 saves its state; rank 0 saves its own and merges
        job.merge()
    assert sorted(p.name for p in tmp_path.glob("b.rank*")) == ["b.rank0of2.pt", "b.rank1of2.pt"]
    assert torch.allclose(jobs[1].full_state()["seq_t"], own["seq_t"], equal_nan=True)
    _same(whole, jobs[0].results())
