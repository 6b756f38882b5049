import json

import pytest
import torch

from interp.ground_truth.benchmark import GroundTruthConfig, run_ground_truth
from tests.helpers import assert_one_line_error, run_cli


@pytest.mark.parametrize("kw", [dict(noise_levels=[]), dict(noise_levels=[0.5, 1.5]), dict(probe_k=[0]),
                                dict(val_tokens=0), dict(shuffle_repeats=0)])
def test_bad_settings_are_refused(kw, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    GroundTruthConfig(train_folder=str(tmp_path))  # the run folder alone is fine
    with pytest.raises(ValueError, match="--(noise_levels|probe_k|val_tokens|shuffle_repeats)"):
        GroundTruthConfig(train_folder=str(tmp_path), **kw)


def test_benchmark_on_the_tiny_model(tiny_descriptions, tiny_run, tiny_transcoders):
    result = run_ground_truth(GroundTruthConfig(train_folder=str(tiny_run), device="cpu", val_tokens=3072,
                                                noise_levels=[0.0, 0.5]))
    saved = json.loads((tiny_run / "ground_truth.json").read_text())
    assert saved["benchmark_target"] == result["benchmark_target"]
    conds = {(c["t"], c["positions"]): c for c in result["conditions"]}
    assert set(conds) == {(0.0, "visible"), (0.5, "visible"), (0.5, "masked")}  # t = 0 masks nothing
    for (t, view), c in conds.items():
        assert len(c["categories"]) == 17
        # naming is checked where the table prints it: clean text and the target (masked, t = 0.5)
        assert set(c.get("named_among_recovered", {})) == ({"tokens"} if (t, view) != (0.5, "visible") else set())
        assert c["mean_f1_heldout"] <= c["mean_f1_selection"] + 1e-9  # chosen where it looks best
        for r in c["categories"]:
            assert 0 <= r["f1_heldout"] <= 1 and 0 <= r["lookup"] <= 1 and set(r["probe"]) == {"1", "2", "5"}
            assert r["random_feature"]["p95"] <= r["random_feature"]["p99"] + 1e-6
            assert (r["ceiling"] is None) == (view == "visible")
            assert r["credited"] == (r["recovered"] and r["beats_controls"])
            if view == "masked":  # every input is [MASK]: the lookup can only predict the category everywhere
                n, total = r["tokens_heldout"], c["positions_heldout"]
                assert r["lookup"] == pytest.approx(2 * n / (total + n), rel=1e-5)
    # on clean text a token-id lookup does what the best features do: detection is not inference
    assert conds[(0.0, "visible")]["mean_lookup"] > 0.8
    target = result["benchmark_target"]
    assert target["t"] == 0.5 and set(target["credited_either"]) <= set(target["eligible"])
    assert result["naming_not_evidence"] == ["tokens"]
    assert result["fact_completion"]["by_phrasing"]["seen"]["accuracy"] > 0.15

    # brute force: the masked view's best feature for the most frequent category, its held-out F1 recomputed
    # from dense latents, the noise drawn again, and the labels of the hidden tokens
    from data.loader import ShardLoader
    from experiment import load_run
    from model.hooks import capture_mlps
    from model.objective import apply_noise, val_noise
    from model.transcoder import Transcoder

    config, model, _, _ = load_run(tiny_run, "latest", "cpu")
    mc, data = model.cfg, config["data"]["folder"]
    concepts = json.loads(open(f"{data}/concepts.json").read())
    best = max(conds[(0.5, "masked")]["categories"], key=lambda r: r["tokens_heldout"])
    ids = {c["id"] for c in concepts if c["category"] == best["category"]}
    tc = Transcoder.load(tiny_transcoders / f"blocks.{best['layer']}.mlp")
    loader = ShardLoader(data, "val", config["train"]["train_seq_len"], 8)
    fires, member = [], []
    for b, batch in enumerate(loader.sequential(4096)):
        if b % 2 == 0:
            continue  # the half where features are chosen; the held-out F1 comes from the other
        _, u = val_noise(batch.index, loader.n_sequential(4096), 99, loader.seq_len)
        noised = apply_noise(batch.tokens, torch.full((len(u),), 0.5), u, mc.mask_id, mc.bos_id, mc.pad_id)
        with torch.no_grad(), capture_mlps(model, [best["layer"]]) as seen:
            model(noised.inputs)
            dense = tc.dense_latents(seen[best["layer"]][0].reshape(-1, mc.model_dim))
        at = noised.mask.reshape(-1)
        fires.append(dense[at, best["feature"]] > 0)
        member.append(torch.tensor([int(x) in ids for x in batch.labels.reshape(-1)[at]]))
    fires, member = torch.cat(fires), torch.cat(member)
    assert member.sum().item() == best["tokens_heldout"] > 0
    tp = (fires & member).sum().item()
    assert best["f1_heldout"] == pytest.approx(2 * tp / (fires.sum().item() + member.sum().item()), rel=1e-5)


def test_refuses_a_run_without_concept_labels(tmp_path, tiny_run):
    assert_one_line_error(run_cli(["-m", "interp.ground_truth", "--train_folder", str(tmp_path / "none")]),
                          "does not exist")
