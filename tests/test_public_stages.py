"""Runs made from the public models (LLaDA, Dream): the NELBO against a plain cross-entropy of the model's own
logits, what the noise may mask, stage 3 (transcoders) and stage 4 (the scan) on tiny released-style runs,
and the exports."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.diffusion import DiffusionLM
from model.objective import (
    LossTerms,
    count_masked,
    diffusion_loss,
    noise_for_model,
    train_noise,
    unmaskable_ids,
)
from model.public_models import load_public_model
from tests.public_fixtures import (
    DREAM_TINY,
    DREAM_TINY_TEXT,
    LLADA_TINY,
    LLADA_TINY_BOS,
    LLADA_TINY_TEXT,
    write_public_folder,
)
from tests.test_diffusion_model import BOS, PAD, randomised, tiny_cfg

FAMILIES = ["ours", "llada", "dream"]


def tiny_model(family: str, tmp_path: Path) -> DiffusionLM:
    """This project's tiny model, or a tiny released LLaDA / Dream with random weights."""
    if family == "ours":
        return randomised(DiffusionLM(tiny_cfg()))
    return load_public_model(write_public_folder(tmp_path / family, family, shards=0))


def text_batch(model: DiffusionLM, B: int = 3, T: int = 24, seed: int = 0):
    """(tokens, t, u): predictable ids, a BOS at each row's start and inside row 1, the pad id (the public
    models' EOS) inside rows 0 and 2."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(cfg.text_size) if i not in unmaskable_ids(cfg)])
    tokens = allowed[torch.randint(0, len(allowed), (B, T), generator=g)]
    tokens[:, 0] = cfg.bos_id
    tokens[1, 9] = cfg.bos_id
    if cfg.pad_id < cfg.n_vocab:  # a text token of the public models: mid-row EOS
        tokens[0, 5] = tokens[2, 11] = cfg.pad_id
    t, u = train_noise(torch.arange(B).numpy(), 0, B, 0, T)
    return tokens, t, u


def reference_loss(model: DiffusionLM, tokens, t, u) -> LossTerms:
    """The NELBO's terms from the model's own logits: cross-entropy at the masked positions, weighted 1/t."""
    noised = noise_for_model(tokens, t, u, model.cfg)
    logits = model(noised.inputs).logits  # (B, T, n_vocab): logits[:, i] predict token i
    ce = F.cross_entropy(logits[noised.mask], tokens[noised.mask], reduction="none")
    weights = (1.0 / t)[:, None].expand_as(tokens)[noised.mask]
    return LossTerms((ce * weights).sum(), noised.mask.sum(), noised.maskable.sum())


def grads(model: DiffusionLM, loss_fn) -> tuple[LossTerms, dict[str, torch.Tensor]]:
    model.zero_grad()
    terms = loss_fn()
    terms.weighted_ce.backward()
    return terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_loss_equals_the_cross_entropy_of_the_models_logits(family, tmp_path):
    """Values and every gradient: no soft cap (cap 0) for the public models, Dream's logit shift."""
    model = tiny_model(family, tmp_path).train()
    for p in model.parameters():
        p.requires_grad_(True)
    tokens, t, u = text_batch(model)
    ref, ref_grads = grads(model, lambda: reference_loss(model, tokens, t, u))
    got, got_grads = grads(model, lambda: diffusion_loss(model, tokens, t, u))
    assert 0 < int(ref.n_masked) < tokens.numel() and torch.isfinite(ref.weighted_ce)
    assert torch.equal(got.n_masked, ref.n_masked) and torch.equal(got.n_maskable, ref.n_maskable)
    torch.testing.assert_close(got.weighted_ce, ref.weighted_ce, rtol=1e-5, atol=0)
    assert set(got_grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-5 * float(g.abs().max()) + 1e-8, rtol=1e-4,
                                   msg=name)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_the_loss_follows_the_logits_of_the_public_models(family, tmp_path):
    """Scaling the head changes the logits, so the NELBO must change with it (their cap of 0 means no cap: a
    cap of 0 applied as a cap would make every logit 0 and the NELBO a constant)."""
    model = tiny_model(family, tmp_path)
    tokens, t, u = text_batch(model)
    with torch.no_grad():
        before = float(diffusion_loss(model, tokens, t, u).weighted_ce)
        model.head.weight.mul_(3)
        after = float(diffusion_loss(model, tokens, t, u).weighted_ce)
    assert abs(after - before) > 1e-2 * abs(before)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_the_public_loss_never_waits_for_the_host(family, tmp_path):
    """With the count from `count_masked` on the host, noise, loss and backward issue no syncing operation."""
    from collections import Counter

    from tests.syncs import syncing_ops

    model = tiny_model(family, tmp_path).train()
    for p in model.parameters():
        p.requires_grad_(True)
    tokens, t, u = text_batch(model)
    n_masked = count_masked(tokens, t, u, *unmaskable_ids(model.cfg))
    assert syncing_ops(lambda: diffusion_loss(model, tokens, t, u, n_masked).weighted_ce.backward()) == Counter()


def test_our_models_never_mask_bos_or_padding():
    assert unmaskable_ids(tiny_cfg()) == (BOS, PAD)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_the_public_models_mask_their_eos_and_never_their_specials(family, tmp_path):
    model = tiny_model(family, tmp_path)
    cfg = model.cfg
    tiny = {"llada": LLADA_TINY, "dream": DREAM_TINY}[family]
    n_text = {"llada": LLADA_TINY_TEXT, "dream": DREAM_TINY_TEXT}[family]
    eos, mask = tiny["eos_token_id"], tiny["mask_token_id"]
    unused = tuple(range(n_text, cfg.n_vocab))
    want = {"llada": (LLADA_TINY_BOS, mask, *unused), "dream": (mask, *unused)}[family]
    assert unmaskable_ids(cfg) == tuple(sorted(want)) and eos not in unmaskable_ids(cfg)
    tokens = torch.tensor([[cfg.bos_id, 3, eos, 4, eos, eos, n_text - 1, n_text, n_text + 1, cfg.n_vocab - 1]])
    t, u = torch.ones(1), torch.zeros(1, 10)  # t = 1: every maskable position is masked
    noised = noise_for_model(tokens, t, u, cfg)
    last_text_masked = n_text - 1 != mask  # the tokenizer's last id is Dream's [MASK]
    # position 0: LLaDA's BOS; for Dream (BOS = EOS, maskable) the first column, which no prediction reads
    assert noised.mask[0].tolist() == [False, True, True, True, True, True, last_text_masked, False, False, False]
    assert (noised.inputs[noised.mask] == mask).all() and torch.equal(noised.inputs[~noised.mask], tokens[~noised.mask])
    text_first = tokens.clone()
    text_first[0, 0] = 3
    assert noise_for_model(text_first, t, u, cfg).mask[0, 0] == (family == "llada")  # Dream's shift: never column 0
    if family == "llada":  # stage 1's host count (this project's models; no shift) counts the same positions
        assert count_masked(tokens, t, u, *unmaskable_ids(cfg)) == int(noised.mask.sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_only_a_pad_outside_the_text_is_padding(family, tmp_path):
    """The transcoder stage drops padding positions: [PAD] of this project's models; nothing of the public
    models, whose [PAD] is their EOS (and Dream's BOS), a text token."""
    from model.objective import is_padding

    cfg = tiny_model(family, tmp_path).cfg
    tokens = torch.tensor([[cfg.bos_id, 3, cfg.pad_id, 4]])
    assert is_padding(tokens, cfg)[0].tolist() == [False, False, family == "ours", False]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_decoder_logits_are_the_models_readout_of_the_write(family, tmp_path):
    """A feature's promoted and suppressed tokens: the model's own logits of its decoder row through the final
    norm (gain included), over the ids the tokenizer has, [MASK] left out."""
    from interp.contexts.logits import decoder_logits, listed_ids
    from model.transcoder import Transcoder, TranscoderConfig

    model = tiny_model(family, tmp_path)
    cfg = model.cfg
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(cfg.model_dim, 16, 4))
    with torch.no_grad():
        tc.W_dec.normal_()
    ids = listed_ids(model)
    assert cfg.mask_id not in ids and ids == [i for i in range(cfg.text_size) if i != cfg.mask_id]
    pieces = [f"p{i}" for i in range(cfg.n_vocab)]
    lens = decoder_logits(model, tc, pieces, k=5, chunk=7)
    for f in range(16):
        with torch.no_grad():
            ref = model.logits(model.final_norm(tc.W_dec[f:f + 1]))[0, ids]
        assert [p for p, _ in lens[f]["promotes"]] == [f"p{ids[i]}" for i in ref.topk(5).indices.tolist()]
        assert [p for p, _ in lens[f]["suppresses"]] == [f"p{ids[i]}" for i in (-ref).topk(5).indices.tolist()]


# ---- stage 3, stage 4 and the exports on tiny runs made by experiment.init_base ----

@pytest.fixture(scope="module", params=["llada", "dream"])
def staged(request, tmp_path_factory) -> tuple[str, Path, Path, Path]:
    """(family, run folder, transcoders folder, scan folder): init_base on a tiny released-style folder with a
    byte-level BPE tokenizer, then stage 3 (40 steps) and stage 4 (4 batches) with tiny flags."""
    from experiment.init_base import InitBaseConfig, main as init_base
    from interp.contexts.command import main as topk
    from tests.helpers import tiny_topk_config, tiny_transcoder_config
    from tests.public_tokenizers import write_bpe_public_folder
    from training.transcoders_command import main as transcoders

    tmp = tmp_path_factory.mktemp(request.param)
    model = write_bpe_public_folder(tmp / "model", request.param)
    run = init_base(InitBaseConfig(model=str(model), dataset="synthetic", synthetic_mb=0.02, workers=1,
                                   data_dir=str(tmp / "data"), experiments_dir=str(tmp / "exp")))
    tc = transcoders(tiny_transcoder_config(run, train_seq_len=64, batch_size=4, train_steps=40, val_loss_every=20,
                                            val_tokens=512, log_every=10, expansion_factor=2, k=4))
    scan = topk(tiny_topk_config(run, train_seq_len=64, batch_size=4, scan_batches=4, n_top=5, context_before=6,
                                 context_after=3, n_quantile=4, n_random=4))
    return request.param, run, tc, scan


def val_records(tc: Path) -> list[dict]:
    rows = [json.loads(line) for line in (tc / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == "val"]


@pytest.mark.slow
def test_transcoder_stage_fvu_falls_and_its_nelbo_is_the_models(staged):
    """FVU finite and falling; the base NELBO is the plain cross-entropy of the model's logits over the same
    validation batches and noise; replacing MLPs (which changes the logits) changes the NELBO."""
    from data.loader import ShardLoader
    from experiment.runs import load_run, open_data
    from model.objective import VAL_SEED, at_mask_ratio, val_noise

    _, run, tc, _ = staged
    vals = val_records(tc)
    assert [r["step"] for r in vals] == [0, 20, 40]
    for layer in ("0", "1"):
        fvu = [r["layers"][layer]["fvu"] for r in vals]
        assert all(math.isfinite(f) for f in fvu) and fvu[-1] < 0.9 * fvu[0], fvu
    last = vals[-1]
    nelbos = [last["base_nelbo"], last["all_nelbo"], *(v["spliced_nelbo"] for v in last["layers"].values())]
    assert all(math.isfinite(n) for n in nelbos) and len({round(n, 6) for n in nelbos}) == len(nelbos), nelbos
    config, model, _, _ = load_run(run, "latest", "cpu")
    loader = ShardLoader(open_data(config).folder, "val", 64, 4)
    n_total = loader.n_sequential(512)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader.sequential(512):
            t, u = at_mask_ratio(val_noise(batch.index, n_total, VAL_SEED, 64), "random")
            terms = reference_loss(model, batch.tokens, t, u)
            total, count = total + float(terms.weighted_ce), count + int(terms.n_maskable)
    assert last["base_nelbo"] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.slow
def test_scan_reads_the_models_vocabulary_and_tokenizer(staged):
    """Contexts decode with the model's tokenizer; the (feature, token) counts name tokens of the model's
    vocabulary; the promoted tokens are never [MASK] or an unused row."""
    from experiment.runs import load_run

    family, run, _, scan = staged
    _, model, tok, _ = load_run(run, "latest", "cpu")
    cfg = model.cfg
    index = json.loads((scan / "index.json").read_text())
    assert index["complete"] and index["n_tokens"] == 4 * 4 * 64
    pieces = {tok.decode([i]) for i in range(cfg.text_size)}
    n_contexts = 0
    for layer in ("layer_00", "layer_01"):
        features = [json.loads(line) for line in (scan / layer / "features.jsonl").read_text().splitlines()]
        live = [f for f in features if not f["dead"]]
        assert live and 0 < sum(f["fire_count"] for f in features) <= 4 * 4 * 64 * 4  # k = 4 per token
        for f in live:
            assert sum(n for _, n in f["top_tokens"]) <= f["fire_count"]
            assert {p for p, _ in f["top_tokens"]} <= pieces
            never = {tok.decode([i]) for i in (cfg.mask_id, *range(cfg.text_size, cfg.n_vocab))} - pieces
            assert not never & {p for p, _ in f["promotes"] + f["suppresses"]}
        for line in (scan / layer / "contexts.jsonl").read_text().splitlines():
            for example in json.loads(line)["top"]:
                assert all(0 <= i < cfg.text_size for i in example["tokens"])
                assert example["pieces"] == [tok.decode([i]) for i in example["tokens"]]
                n_contexts += 1
    assert n_contexts > 0


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["sparsify", "delphi", "neuronpedia", "circuit_tracer", "saelens"])
def test_exports_of_a_public_run_work_or_refuse_in_one_line(staged, tool, tmp_path):
    import importlib

    from core.files import UserError

    family, run, _, _ = staged
    module = importlib.import_module(f"interp.exports.{tool}")
    config = next(v for k, v in vars(module).items() if k.endswith("ExportConfig"))
    cfg = config(train_folder=str(run), output=str(tmp_path / tool))
    if tool in ("circuit_tracer", "saelens"):
        with pytest.raises(UserError) as e:
            module.main(cfg)
        message = str(e.value)
        assert "\n" not in message and family in message and "interp.exports.sparsify" in message
        assert ("model_name" in message and "hook" in message), message
        assert not (tmp_path / tool).exists()  # refused before anything is written
    else:
        out = module.main(cfg)
        assert out == tmp_path / tool and any(out.iterdir())


def test_a_released_run_refuses_sequences_past_its_stated_maximum():
    """The check on the config alone: over the stated maximum is refused in one line naming flag and file; at
    it, unset, without a stated maximum, or in a trained run, anything goes."""
    from core.files import UserError
    from experiment.paths import BASE_MODEL_KEY
    from experiment.runs import check_released_length

    released = {BASE_MODEL_KEY: {"folder": "/models/LLaDA", "max_seq_len": 4096}}
    check_released_length(released, {"train_seq_len": 4096, "val_seq_len": None})
    with pytest.raises(UserError) as e:
        check_released_length(released, {"train_seq_len": 4096, "val_seq_len": 8192})
    assert str(e.value) == ("--val_seq_len 8192 is longer than the 4,096 tokens the released model states as its "
                            "maximum (/models/LLaDA/config.json)")
    check_released_length({BASE_MODEL_KEY: {"folder": "/m", "max_seq_len": None}}, {"train_seq_len": 10**6})
    check_released_length({"train": {"train_seq_len": 256}}, {"train_seq_len": 4096})


@pytest.mark.slow
def test_stages_3_and_4_refuse_a_length_past_the_released_maximum(staged, monkeypatch):
    """The tiny configs state 64 tokens: 128 is refused by both stages before the model is read."""
    import experiment.runs
    from core.files import UserError

    def never(*args, **kwargs):
        raise AssertionError("the released model was read before the length was checked")
    monkeypatch.setattr(experiment.runs, "open_released", never)
    from interp.contexts.command import main as topk
    from tests.helpers import tiny_topk_config, tiny_transcoder_config
    from training.transcoders_command import main as transcoders

    _, run, _, _ = staged
    attempts = [("train_seq_len", lambda: transcoders(tiny_transcoder_config(run, train_seq_len=128, batch_size=4))),
                ("val_seq_len", lambda: transcoders(tiny_transcoder_config(run, train_seq_len=64, val_seq_len=128,
                                                                           batch_size=4))),
                ("train_seq_len", lambda: topk(tiny_topk_config(run, train_seq_len=128, batch_size=4)))]
    for flag, attempt in attempts:
        with pytest.raises(UserError, match=f"^--{flag} 128 is longer than the 64 tokens the released model"):
            attempt()
