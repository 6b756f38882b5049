import collections
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from core import cli
from get_topk_activations import IGNORED, TopKConfig, main
from interp.contexts.buffers import PairCounter, TopKBuffer
from interp.contexts.scan import Batch, ScanSettings
from interp.contexts.windows import document_bounds, window_columns
from model.transcoder import Transcoder
from tests.helpers import assert_one_line_error, run_cli, tiny_topk_config

REFERENCE = ("--train_folder experiments/X --checkpoint_name state_step020000.pt --train_seq_len 4_096 --train_steps "
             "1_000 --grad_acc_steps 8 --num_layers 12 --num_heads 6 --model_dim 384 --save_model True --cuda 1 "
             "--val_loss_every 1_000 --save_every 2_000").split()


def test_streaming_topk_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    G, K = 37, 5
    buf = TopKBuffer(G, K)
    groups, values, ids = [], [], []
    for batch in range(6):
        n = int(torch.randint(0, 400, (1,), generator=g))
        gr = torch.randint(0, G, (n,), generator=g)
        va = torch.randn(n, generator=g)
        idx = torch.arange(n) + 10_000 * batch
        buf.merge(gr, va, idx, payload=va * 2)
        groups.append(gr), values.append(va), ids.append(idx)
    groups, values, ids = torch.cat(groups), torch.cat(values), torch.cat(ids)
    for grp in range(G):
        mine = values[groups == grp]
        best = mine.topk(min(K, len(mine)))
        n = len(best.values)
        got_values, got_ids, got_payload = buf.ordered()
        torch.testing.assert_close(got_values[grp, :n], best.values)
        assert got_ids[grp, :n].tolist() == ids[groups == grp][best.indices].tolist()
        torch.testing.assert_close(got_payload["payload"][grp, :n], best.values * 2)
        assert (got_ids[grp, n:] == -1).all()


def test_pair_counter_is_exact():
    g = torch.Generator().manual_seed(1)
    counter, truth = PairCounter(60), collections.Counter()
    for _ in range(5):
        keys = torch.randint(0, 60, (300,), generator=g)
        counter.add(keys)
        truth.update(keys.tolist())
    assert dict(zip(*(x.tolist() for x in counter.items()))) == dict(truth)
    items, counts = counter.top_per_group(6, 10, 3)  # keys = group * 10 + item
    for grp in range(6):
        expected = sorted(((c, k % 10) for k, c in truth.items() if k // 10 == grp), key=lambda x: -x[0])[:3]
        assert counts[grp].tolist() == [c for c, _ in expected]


def test_windows_stop_at_documents_and_edges():
    BOS = 0
    tokens = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 4],
                           [0, 1, 2, 3, 4, 5, 6, 7]])
    first, last = document_bounds(tokens, BOS)
    assert first[0].tolist() == [0, 0, 2, 3, 3, 3, 6, 7] and last[0].tolist() == [1, 1, 2, 5, 5, 5, 6, 7]
    assert first[1].tolist() == [0] + [1] * 7 and last[1].tolist() == [0] + [7] * 7
    col = torch.tensor([4, 0, 7])
    rows = torch.tensor([0, 0, 1])
    cols, center = window_columns(col, first[rows, col], last[rows, col], 2, 2)
    assert cols.tolist() == [[-1, 3, 4, 5, -1], [-1, -1, 0, 1, -1], [5, 6, 7, -1, -1]]
    assert center.tolist() == [2, 2, 2]


def _all_latents(tiny_run, tiny_transcoders, cfg, layer):
    """Brute force: every scanned token's dense latents for one layer, in scan order."""
    from data.loader import ShardLoader
    from experiment import load_run

    config, model, _, _ = load_run(tiny_run, "latest", "cpu")
    tc = Transcoder.load(tiny_transcoders / f"blocks.{layer}.mlp")
    loader = ShardLoader(config["data"]["folder"], "train", cfg.train_seq_len, cfg.batch_size, cfg.seed)
    s = ScanSettings(n_batches=cfg.n_batches(), seed=cfg.seed, mask_ratio=cfg.mask_ratio)
    fp32 = torch.autocast("cpu", enabled=False)
    batches = [Batch(model, loader, b, s, [layer], "cpu", fp32) for b in range(s.n_batches)]
    with torch.no_grad():
        dense = torch.cat([tc.dense_latents(b.x[layer]) for b in batches])
    return dense, batches


def test_topk_equals_brute_force_on_the_tiny_model(tiny_topk, tiny_run, tiny_transcoders):
    cfg = tiny_topk_config(tiny_run)
    dense, batches = _all_latents(tiny_run, tiny_transcoders, cfg, layer=1)
    arrays = load_file(str(tiny_topk / "layer_01" / "arrays.safetensors"))
    best = dense.T.topk(cfg.n_top, dim=1)  # (M, K)
    fired = best.values > 0
    torch.testing.assert_close(arrays["top_values"][fired], best.values[fired])
    assert torch.equal(arrays["top_position"][fired], best.indices[fired])
    assert (arrays["top_position"][~fired] == -1).all()
    assert torch.equal(arrays["fire_count"], (dense > 0).sum(0))
    stats = [json.loads(line) for line in open(tiny_topk / "layer_01" / "features.jsonl")]
    assert [s["dead"] for s in stats] == ((dense > 0).sum(0) == 0).tolist()
    tokens = torch.cat([b.tokens.reshape(-1) for b in batches])
    masked = torch.cat([b.masked for b in batches])
    for s in stats[:40]:
        f = s["feature"]
        on = dense[:, f] > 0
        assert s["mean_activation"] == pytest.approx(float(dense[on, f].mean()) if on.any() else 0.0, rel=1e-5)
        if on.any():
            assert s["masked_fraction"] == pytest.approx(float(masked[on].float().mean()))
            top_token, count = collections.Counter(tokens[on].tolist()).most_common(1)[0]
            assert s["top_tokens"][0][1] == count
            assert sum(s["histogram"]["counts"]) == int(on.sum())


def test_examples_windows_masks_and_halves(tiny_topk, tiny_run, tiny_transcoders):
    cfg = tiny_topk_config(tiny_run)
    dense, batches = _all_latents(tiny_run, tiny_transcoders, cfg, layer=0)
    tokens = torch.cat([b.tokens.reshape(-1) for b in batches])
    masked = torch.cat([b.masked for b in batches])
    t_of = torch.cat([b.t.repeat_interleave(b.T) for b in batches])
    N, T = batches[0].N, batches[0].T
    bos = json.loads((tiny_run / "config.json").read_text())["model"]["bos_id"]
    records = [json.loads(line) for line in open(tiny_topk / "layer_00" / "contexts.jsonl")]
    checked = 0
    for r in records:
        f = r["feature"]
        splits = collections.defaultdict(set)
        for cat in ("top", "quantile", "random"):
            for ex in r[cat]:
                pos, c = ex["position"], ex["center"]
                assert ex["tokens"][c] == tokens[pos] and ex["masked"] == bool(masked[pos])
                assert ex["t"] == pytest.approx(float(t_of[pos]), abs=1e-5)
                assert ex["acts"][c] == pytest.approx(float(dense[pos, f]), abs=1e-4)
                start = pos - c  # the window is contiguous, inside one row and one document
                assert (start // T) == ((start + len(ex["tokens"]) - 1) // T) == pos // T and start // N == pos // N
                assert tokens[start:start + len(ex["tokens"])].tolist() == ex["tokens"]
                assert bos not in ex["tokens"] or ex["tokens"] == [bos] or ex["tokens"][c] == bos
                if len(ex["tokens"]) < cfg.context_before + 1 + cfg.context_after:  # clipped: at a boundary
                    right = start + len(ex["tokens"])
                    assert (c < cfg.context_before and (start % T == 0 or tokens[start - 1] == bos or
                                                        tokens[start] == bos)) or \
                        (len(ex["tokens"]) - 1 - c < cfg.context_after and (right % T == 0 or tokens[right] == bos))
                if cat == "random":
                    assert max(ex["acts"]) == 0 and float(dense[pos, f]) == 0
                else:
                    assert ex["activation"] > 0
                splits[ex["split"]].add(pos)
                checked += 1
        assert not splits["explain"] & splits["score"]
        quant = [ex["activation"] for ex in r["quantile"]]
        assert quant == sorted(quant, reverse=True)
        if r["top"] and r["quantile"]:
            assert min(ex["activation"] for ex in r["top"]) >= max(quant) - 1e-6
    assert checked > 1000


def test_pages_show_highlighted_tokens(tiny_topk):
    page = (tiny_topk / "layer_00" / "index.html").read_text()
    assert 'class="tok center' in page and "rgba(255,136,0,1.000)" in page  # the top token, full strength
    assert '<script src="features.js">' in page and (tiny_topk / "layer_00" / "chunks" / "chunk_0000.js").exists()
    root = (tiny_topk / "index.html").read_text()
    assert 'href="layer_00/index.html"' in root and 'href="layer_01/index.html"' in root
    index = json.loads((tiny_topk / "index.json").read_text())
    assert index["complete"] and index["n_tokens"] == 6 * 8 * 128 and index["layers"] == [0, 1]


def test_interrupted_scan_resumes_to_identical_output(tiny_run, tiny_transcoders, tmp_path, monkeypatch):
    import interp.contexts.scan as scan_mod

    runs = []
    for name in ("a", "b"):
        dst = tmp_path / name
        shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns("topk"))
        runs.append(dst)
    kw = dict(checkpoint_every=2, checkpoint_minutes=0, scan_batches=5)
    a = main(tiny_topk_config(runs[0], **kw))
    real, saves = scan_mod.save_checkpoint, []

    def save_then_die(path, state):
        real(path, state)
        saves.append(state["next_batch"])
        if state["next_batch"] == 4:
            raise KeyboardInterrupt  # killed after its second checkpoint

    monkeypatch.setattr(scan_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_topk_config(runs[1], **kw))
    monkeypatch.setattr(scan_mod, "save_checkpoint", real)
    assert saves == [2, 4]
    b = main(tiny_topk_config(runs[1], **kw))
    for layer in ("layer_00", "layer_01"):
        for name in ("features.jsonl", "contexts.jsonl"):
            assert (a / layer / name).read_text() == (b / layer / name).read_text()
    assert not (b / "scan_state.pt").exists()


def test_reference_command_line_parses(capsys, reference_machine):
    cfg = cli.parse_config(TopKConfig, REFERENCE, ignored=IGNORED)
    assert (cfg.n_batches(), cfg.train_seq_len, cfg.n_top) == (8000, 4096, 50)  # --train_steps 1_000 × 8
    assert capsys.readouterr().out.strip() == "ignored by this stage: --save_model, --val_loss_every, --save_every"


def test_bad_inputs(tiny_run, tmp_path):
    fresh = tmp_path / "run"
    shutil.copytree(tiny_run, fresh, ignore=shutil.ignore_patterns("transcoders", "topk"))
    assert_one_line_error(run_cli(["get_topk_activations.py", "--train_folder", str(fresh), "--device", "cpu"]),
                          "no transcoders")
    assert_one_line_error(run_cli(["get_topk_activations.py", "--train_folder", str(tiny_run), "--device", "cpu",
                                   "--checkpoint_name", "state_step000007.pt"]), "does not exist; available")
    assert_one_line_error(run_cli(["get_topk_activations.py", "--train_folder", str(tmp_path / "nowhere")]),
                          "does not exist")


@pytest.mark.parametrize("argv,batches", [
    ([], 8000),  # the default: the reference command's 1_000 × 8
    (["--scan_batches", "37"], 37),
    (["--train_steps", "5", "--grad_acc_steps", "3"], 15),  # the shared command line's spelling
    (["--scan_batches", "15", "--train_steps", "5", "--grad_acc_steps", "3"], 15),
])
def test_scan_batches_and_its_train_steps_alias(argv, batches, reference_machine):
    cfg = cli.parse_config(TopKConfig, ["--train_folder", "experiments/X", *argv])
    assert cfg.n_batches() == batches


@pytest.mark.parametrize("argv,needle", [
    (["--scan_batches", "10", "--train_steps", "5", "--grad_acc_steps", "3"], "disagrees"),
    (["--scan_batches", "0"], "must be positive"),
])
def test_scan_batches_contradictions_are_refused(argv, needle, reference_machine):
    with pytest.raises(cli.UserError, match=needle):
        cli.parse_config(TopKConfig, ["--train_folder", "experiments/X", *argv])


def test_an_output_made_before_scan_batches_and_n_top_still_counts_as_finished(tiny_run, tiny_topk, tmp_path, capsys):
    """Top-k outputs written before --scan_batches existed recorded train_steps × grad_acc_steps; those written
    before --n_top recorded it as top_k (in config.json and in the index's settings, which the delphi export
    reads again)."""
    from interp.contexts.scan import scan_inputs

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    out = run / "topk" / "state_step000400"
    saved = json.loads((out / "config.json").read_text())
    saved.pop("scan_batches")
    saved.update(train_steps=3, grad_acc_steps=2)  # 6 batches, as tiny_topk_config scans
    saved.update(checkpoint_name="latest")  # older outputs also kept the checkpoint as typed
    saved["top_k"] = saved.pop("n_top")
    (out / "config.json").write_text(json.dumps(saved))
    before = (out / "layer_00" / "contexts.jsonl").read_text()
    assert main(tiny_topk_config(run, checkpoint_name="state_step000400.pt")) == out
    assert "is complete" in capsys.readouterr().out
    assert (out / "layer_00" / "contexts.jsonl").read_text() == before
    settings = json.loads((out / "index.json").read_text())["settings"]
    settings["top_k"] = settings.pop("n_top")
    _, s = scan_inputs(settings, json.loads((run / "config.json").read_text()))
    assert s.n_top == 10


def _window(position, center=2, width=5, tokens=None, masked_at=()):
    return {"position": position, "center": center, "tokens": tokens or list(range(position, position + width)),
            "masked_at": list(masked_at), "acts": [0.0] * width}


def _span(e):
    start = e["position"] - e["center"]
    return set(range(start, start + len(e["tokens"])))


def test_splits_share_no_token_position_on_adjacent_top_activations():
    """Top activations on neighbouring tokens of one passage (what templated text produces): the halves
    must still share no position, and repeated windows are dropped."""
    seq_len = 100
    record = {"top": [_window(p) for p in (10, 11, 12, 13, 250, 251, 410, 530)],  # runs of adjacent centres
              "quantile": [_window(p) for p in (14, 252, 620, 731)],
              "random": [_window(p) for p in (15, 840, 950, 960)]}
    record["top"].append(_window(90, tokens=record["top"][0]["tokens"]))  # the same text again, elsewhere
    from interp.contexts.store import assign_splits

    assign_splits(record, seq_len)
    examples = [e for c in ("top", "quantile", "random") for e in record[c]]
    assert len(record["top"]) == 8  # the repeated window is gone
    halves = {h: set().union(*(_span(e) for e in examples if e["split"] == h)) for h in ("explain", "score")}
    assert halves["explain"] and halves["score"] and not halves["explain"] & halves["score"]
    by_seq = {}
    for e in examples:
        by_seq.setdefault(e["position"] // seq_len, set()).add(e["split"])
    assert all(len(s) == 1 for s in by_seq.values())  # one sequence, one half
    counts = collections.Counter(e["split"] for e in record["top"])
    assert abs(counts["explain"] - counts["score"]) <= 4


def test_matched_keys_follow_the_activating_examples_noise():
    from interp.contexts.scan import T_BINS, matched_keys

    gen = torch.Generator().manual_seed(0)
    pool_bins = torch.arange(1000) % T_BINS  # a pool spread evenly over the noise levels
    positive_bins = torch.tensor([[2, 2, 3, -1], [-1, -1, -1, -1]])  # feature 0 fires at t in bins 2–3; 1 never
    eligible = torch.ones(1000, 2, dtype=torch.bool)
    keys = matched_keys(positive_bins, pool_bins, eligible, torch.rand(1000, 2, generator=gen))
    chosen = keys.topk(30, dim=0).indices  # (30, 2)
    picked = pool_bins[chosen[:, 0]]
    assert set(picked.tolist()) <= {2, 3} and (picked == 2).sum() > (picked == 3).sum()
    assert len(set(pool_bins[chosen[:, 1]].tolist())) > 5  # nothing to match: drawn from everywhere
    few = keys[:, 0].clone()
    few[pool_bins != 5] = float("-inf")  # only windows of a bin the feature never fired in are left
    assert torch.isfinite(few.topk(3).values).all()  # they are used rather than nothing
    # eligible windows thin out where the feature fires (bin 2 here): the draw must still follow 2:1
    eligible[:, 0] = (pool_bins != 2) | (torch.arange(1000) % 50 == 2)  # 10% of bin 2 left, all of bin 3
    counts = collections.Counter()
    for seed in range(200):
        u = torch.rand(1000, 2, generator=torch.Generator().manual_seed(seed))
        top = matched_keys(positive_bins, pool_bins, eligible, u)[:, 0].topk(6).indices
        counts.update(pool_bins[top].tolist())
    assert set(counts) <= {2, 3} and 1.6 < counts[2] / counts[3] < 2.5
    assert not torch.isfinite(matched_keys(positive_bins, pool_bins, eligible, u)[~eligible]).any()


def test_topk_examples_carry_their_mask_pattern_split_apart_and_noise_matched(tiny_topk, tiny_run):
    positive_t, negative_t = [], []
    for layer in ("layer_00", "layer_01"):
        for line in open(tiny_topk / layer / "contexts.jsonl"):
            r = json.loads(line)
            examples = [e for c in ("top", "quantile", "random") for e in r[c]]
            for e in examples:
                assert all(0 <= i < len(e["tokens"]) for i in e["masked_at"])
                assert e["masked"] == (e["center"] in e["masked_at"])
            halves = {h: set().union(*(_span(e) for e in examples if e["split"] == h)) for h in ("explain", "score")}
            assert not halves["explain"] & halves["score"], r["feature"]
            assert len({tuple(e["tokens"]) for e in examples}) == len(examples)  # no passage twice
            positive_t += [e["t"] for c in ("top", "quantile") for e in r[c] if e["split"] == "score"]
            negative_t += [e["t"] for e in r["random"] if e["split"] == "score"]  # the held-out ones, as scored
    assert positive_t and negative_t
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert abs(mean(positive_t) - mean(negative_t)) < 0.05, (mean(positive_t), mean(negative_t))


def test_the_audit_finds_no_leak_in_a_new_output(tiny_topk, tiny_run):
    from interp.descriptions.audit import AuditConfig, main as audit

    result = audit(AuditConfig(train_folder=str(tiny_run)))
    for layer in (0, 1):
        a = result[layer]
        assert a["scored_activating"] > 0 and a["overlap_explain"] == 0 and a["identical_to_explain"] == 0
        assert a["hidden_trigger_shown"] == 0 and a["mask_state_unknown"] == 0


def test_an_output_of_the_older_protocol_is_refused_not_reused(tiny_run, tiny_topk, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    index = run / "topk" / "state_step000400" / "index.json"
    old = json.loads(index.read_text())
    old.pop("protocol")  # written before windows carried their mask pattern
    index.write_text(json.dumps(old))
    with pytest.raises(cli.UserError, match="older protocol.*--overwrite True"):
        main(tiny_topk_config(run))



def test_a_window_read_again_in_a_later_epoch_stays_in_one_half():
    """A scan longer than the corpus reads the same data window at two scan positions: by scan sequence
    the two copies could land in different halves; by data window they cannot."""
    from interp.contexts.store import assign_splits

    seq_len = 100
    window_of = [7, 8, 9, 7]  # scan sequence 3 is data window 7 again
    record = {"top": [_window(10, tokens=[1, 2, 3, 4, 5]), _window(120), _window(230),
                      _window(312, tokens=[3, 4, 5, 6, 7])],  # overlaps the first window's text
              "quantile": [], "random": []}
    assign_splits(record, seq_len, window_of)
    halves = {e["position"] // seq_len: e["split"] for e in record["top"]}
    assert halves[0] == halves[3]


def test_decoder_logits_match_the_models_own_readout(tiny_transcoders, tiny_run):
    from experiment import load_run
    from interp.contexts.logits import decoder_logits
    from model.diffusion import norm

    _, model, tok, _ = load_run(tiny_run, "latest", "cpu")
    tc = Transcoder.load(tiny_transcoders / "blocks.1.mlp")
    pieces = [f"p{i}" for i in range(model.cfg.n_vocab)]
    lens = decoder_logits(model, tc, pieces, k=5, chunk=100)  # chunks that do not divide the 512 features
    assert len(lens) == tc.cfg.num_latents
    for f in (0, 137, 511):
        with torch.no_grad():
            ref = model.logits(norm(tc.W_dec[f:f + 1]))[0]  # the model's own readout of a write along the row
        assert [p for p, _ in lens[f]["promotes"]] == [f"p{i}" for i in ref.topk(5).indices.tolist()]
        assert [p for p, _ in lens[f]["suppresses"]] == [f"p{i}" for i in (-ref).topk(5).indices.tolist()]
        values = [v for _, v in lens[f]["promotes"]]
        assert values == sorted(values, reverse=True) and lens[f]["suppresses"][0][1] < 0
