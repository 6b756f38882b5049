"""LLaDA's and Dream's samplers (model/public_samplers.py) against references written here from the notes'
description of the released code (docs/notes/public-diffusion-lms.md §4), on tiny random public models."""
import pytest
import torch

from core.files import UserError
from model.diffusion import DiffusionLM
from model.public_models import load_public_model
from model.public_samplers import (
    Batch,
    dream_counts,
    dream_generate,
    generate_public,
    llada_counts,
    llada_generate,
)
from model.sampler import SamplerConfig, as_sampled, generate
from tests.public_fixtures import write_public_folder
from tests.test_diffusion_model import randomised, tiny_cfg

INF = float("inf")


def trained_like(model: DiffusionLM) -> DiffusionLM:
    """Zero the head rows of the mask id and the unused ids, as a trained model never predicts them: random
    weights would draw them as often as any token (the released samplers exclude nothing)."""
    with torch.no_grad():
        model.head.weight[model.cfg.text_size:] = 0
        model.head.weight[model.cfg.mask_id] = 0
    return model


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    return trained_like(load_public_model(write_public_folder(tmp_path_factory.mktemp("llada"), "llada")))


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    return trained_like(load_public_model(write_public_folder(tmp_path_factory.mktemp("dream"), "dream", seed=1)))


# --- the references: the released algorithms over the released forward (every position, Dream unshifted) -----

def released_logits(model: DiffusionLM, x: torch.Tensor, key_mask=None) -> torch.Tensor:
    """The released forward's logits at every position: for Dream the unshifted head output (its consumer
    shifts them)."""
    return model.logits(model(x, key_mask=key_mask).hidden)


def left_padded(prompts, pad, mask, gen_length):
    P = max(len(p) for p in prompts)
    x = torch.full((len(prompts), P + gen_length), mask)
    attention = torch.ones_like(x, dtype=torch.bool)
    for b, p in enumerate(prompts):
        x[b, :P - len(p)] = pad
        x[b, P - len(p):P] = torch.tensor(p)
        attention[b, :P - len(p)] = False
    return x, P, None if attention.all() else attention


def reference_llada(model, prompts, steps, gen_length, block_length, cfg_scale=0.0):
    mc = model.cfg
    x, P, attention = left_padded(prompts, mc.pad_id, mc.mask_id, gen_length)
    prompt_index = x != mc.mask_id
    blocks = gen_length // block_length
    per_block = steps // blocks
    for n in range(blocks):
        end = P + (n + 1) * block_length
        masks = (x[:, P + n * block_length:end] == mc.mask_id).sum(1, keepdim=True)
        transfer = (masks // per_block).repeat(1, per_block)
        for row in range(len(prompts)):
            transfer[row, :int(masks[row, 0] % per_block)] += 1
        for i in range(per_block):
            mask_index = x == mc.mask_id
            if cfg_scale > 0:
                un = x.clone()
                un[prompt_index] = mc.mask_id
                both = released_logits(model, torch.cat([x, un]),
                                       None if attention is None else torch.cat([attention, attention]))
                cond, uncond = both.chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = released_logits(model, x, attention)
            x0 = logits.argmax(-1)
            x0_p = torch.softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
            x0_p[:, end:] = -INF
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -INF)
            chosen = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(len(prompts)):
                chosen[row, torch.topk(confidence[row], int(transfer[row, i])).indices] = True
            x[chosen] = x0[chosen]
    return x


def reference_tokens(logits, alg, top_p=None, top_k=None):
    """Dream's sample_tokens at temperature 0."""
    if top_p is not None and top_p < 1:
        ranked, order = torch.sort(logits, descending=True)
        remove = torch.softmax(ranked, -1).cumsum(-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), torch.finfo(logits.dtype).min)
    if top_k is not None:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[..., -1:], torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, -1)
    confidence, x0 = probs.max(-1)
    if alg == "topk_margin":
        ranked = torch.sort(probs, descending=True).values
        confidence = ranked[:, 0] - ranked[:, 1]
    if alg == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    return confidence, x0


def reference_dream(model, prompts, steps, gen_length, alg, eps=1e-3, top_p=None, top_k=None, seed=0):
    mc = model.cfg
    x, P, attention = left_padded(prompts, mc.pad_id, mc.mask_id, gen_length)
    assert attention is None  # equal lengths: Dream's "full" attention and positions 0..N-1
    timesteps = torch.linspace(1, eps, steps + 1)
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        mask_index = x == mc.mask_id
        logits = released_logits(model, x)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.full((len(mask_logits),), mc.mask_id)
            revealed = torch.rand(x0.shape, generator=g) < p_transfer
            x0[revealed] = reference_tokens(mask_logits[revealed], alg, top_p, top_k)[1]
            x[mask_index] = x0
        else:
            confidence, x0 = reference_tokens(mask_logits, alg, top_p, top_k)
            mean = mask_index.sum() / mask_index.shape[0]
            n = int(mean * (1 - s / t)) if i < steps - 1 else int(mean)
            full = torch.full(x.shape, -INF, dtype=logits.dtype)
            full[mask_index] = confidence
            if n > 0:
                index = torch.topk(full, n).indices
                x_ = torch.full_like(x, mc.mask_id)
                x_[mask_index] = x0
                rows = torch.arange(x.shape[0])[:, None].expand_as(index)
                x[rows, index] = x_[rows, index]
    return x


# --- schedules -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("masked,steps,counts", [
    (32, 10, [4, 4, 3, 3, 3, 3, 3, 3, 3, 3]), (5, 3, [2, 2, 1]), (3, 5, [1, 1, 1, 0, 0]), (8, 4, [2, 2, 2, 2])])
def test_llada_gives_the_remainder_to_the_first_steps(masked, steps, counts):
    assert llada_counts(masked, steps) == counts


@pytest.mark.parametrize("length,steps,counts", [
    (6, 6, [0, 1, 1, 1, 1, 2]), (4, 2, [1, 3]), (10, 4, [2, 2, 2, 4]), (3, 5, [0, 0, 0, 1, 2])])
def test_dream_truncates_and_reveals_the_rest_at_the_last_step(length, steps, counts):
    assert dream_counts(length, steps) == counts


# --- greedy equality with the references -------------------------------------------------------------------------

def check_records(out, model):
    """States, committed_at and probs agree with each other and with the model."""
    mask = model.cfg.mask_id
    assert (out.states[-1] != mask).all()
    for s in range(1, len(out.states)):
        new = (out.states[s - 1] == mask) & (out.states[s] != mask)
        assert torch.equal(new, out.committed_at == s)
        assert torch.equal(out.states[s][~new], out.states[s - 1][~new])
    assert torch.equal(out.states[-1], out.tokens[:, out.prompt_width:])
    assert ((out.probs > 0) & (out.probs <= 1))[out.committed_at > 0].all()


@pytest.mark.parametrize("prompts,steps,gen_length,block,cfg_scale", [
    ([[5, 6, 7, 8]], 8, 8, 8, 0.0),
    ([[5, 6, 7], [9, 10, 11]], 6, 12, 6, 0.0),  # 2 blocks, 3 steps each: 6 masks → 2, 2, 2
    ([[5, 6, 7, 8, 9], [12, 13]], 10, 14, 7, 0.0),  # 2 blocks of 7 in 5 steps (2, 2, 1, 1, 1); left padding
    ([[5, 6, 7], [20, 21, 22]], 4, 8, 4, 1.5),  # classifier-free guidance
    ([[5, 6, 7, 8], [30]], 6, 6, 6, 0.5),  # guidance over a padded batch
])
def test_llada_greedy_equals_the_reference(llada, prompts, steps, gen_length, block, cfg_scale):
    cfg = SamplerConfig(gen_length, steps, block_length=block, cfg_scale=cfg_scale)
    out = generate(llada, prompts, cfg)
    assert torch.equal(out.tokens, reference_llada(llada, prompts, steps, gen_length, block, cfg_scale))
    check_records(out, llada)
    if block < gen_length:  # blocks fill left to right
        assert (out.committed_at[:, block:].min(1).values > out.committed_at[:, :block].max(1).values).all()


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("steps,gen_length,top_p,top_k", [(6, 6, 1.0, 0), (4, 10, 1.0, 0), (5, 8, 0.3, 4)])
def test_dream_greedy_equals_the_reference(dream, alg, steps, gen_length, top_p, top_k):
    prompts = [[5, 6, 7, 8], [40, 41, 42, 43]]
    cfg = SamplerConfig(gen_length, steps, top_p=top_p, top_k=top_k, alg=alg, seed=3)
    out = generate(dream, prompts, cfg)
    expected = reference_dream(dream, prompts, steps, gen_length, alg, top_p=top_p, top_k=top_k or None, seed=3)
    assert torch.equal(out.tokens, expected)
    check_records(out, dream)
    if alg != "origin":  # the counts the schedule says, in every row
        revealed = [(out.committed_at == s).sum(1).tolist() for s in range(1, steps + 1)]
        assert revealed == [[n] * len(prompts) for n in dream_counts(gen_length, steps)]


def test_dreams_shift_is_the_released_one(dream):
    """DiffusionLM's logits[:, i] are the released cat([logits[:, :1], logits[:, :-1]])."""
    x = torch.randint(0, 170, (2, 9), generator=torch.Generator().manual_seed(0))
    raw = released_logits(dream, x)
    assert torch.equal(dream(x).logits, torch.cat([raw[:, :1], raw[:, :-1]], 1))


def test_dream_left_padding_changes_rounding_only(dream):
    """Unequal prompts: padded keys masked, positions not renumbered; rotary scores depend on differences only, so
    each row's output is the one it gets alone."""
    prompts = [[5, 6, 7, 8, 9, 10], [40, 41], [70, 71, 72, 73]]
    cfg = SamplerConfig(8, 4, alg="entropy")
    together = generate(dream, prompts, cfg)
    for b, p in enumerate(prompts):
        alone = generate(dream, [p], cfg)
        assert torch.equal(alone.states[-1][0], together.states[-1][b])
        torch.testing.assert_close(alone.probs[0], together.probs[b], rtol=1e-4, atol=1e-6)


def test_a_drawn_mask_id_is_written_and_stays_masked():
    """As released, nothing is excluded: a drawn mask id is committed (LLaDA's schedule then leaves it)."""
    mask = len(LOGITS) - 1
    run = Batch([[0]], 1, pad_id=0, mask_id=mask, device="cpu")
    favour_mask = LOGITS.clone()
    favour_mask[mask] = 9.0
    out = llada_generate(lambda x, key_mask: favour_mask.expand(1, 1, -1), run, SamplerConfig(1, 2),
                         torch.Generator())
    assert out.states[-1].tolist() == [[mask]] and out.committed_at.tolist() == [[1]]
    torch.testing.assert_close(out.probs[0, 0], torch.softmax(favour_mask, -1)[mask])


# --- sampling -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,knobs", [
    ("llada", dict(temperature=1.0)), ("llada", dict(temperature=0.7, remasking="random", cfg_scale=1.0)),
    ("dream", dict(temperature=0.8, top_p=0.9, alg="entropy", alg_temp=0.5)),
    ("dream", dict(temperature=1.0, top_k=20)),
])
def test_same_seed_same_output(llada, dream, family, knobs):
    model = llada if family == "llada" else dream
    prompts = [[5, 6, 7], [9, 10, 11]]
    a, b = (generate(model, prompts, SamplerConfig(8, 4, seed=5, **knobs)) for _ in range(2))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs)
    assert torch.equal(a.committed_at, b.committed_at)
    assert not torch.equal(a.tokens, generate(model, prompts, SamplerConfig(8, 4, seed=6, **knobs)).tokens)
    check_records(a, model)


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])  # the last id is the mask (never drawn in practice)
ROWS = 4000


def frequencies(sampler, cfg: SamplerConfig) -> torch.Tensor:
    """How often each id is drawn at the one generated position of ROWS rows whose logits are LOGITS."""
    run = Batch([[0]] * ROWS, 1, pad_id=0, mask_id=len(LOGITS) - 1, device="cpu")
    out = sampler(lambda x, key_mask: LOGITS.expand(x.shape[0], 1, -1), run, cfg, torch.Generator().manual_seed(0))
    return torch.bincount(out.states[-1][:, 0], minlength=len(LOGITS)).float() / ROWS


@pytest.mark.parametrize("sampler,knobs,kept", [
    (llada_generate, dict(temperature=2.0), None),
    (llada_generate, dict(temperature=0.5), None),
    (dream_generate, dict(temperature=2.0, alg="maskgit_plus"), None),
    (dream_generate, dict(temperature=1.5, alg="origin", top_k=3), 3),
    # top-p keeps the first token past the mass: probabilities 0.56, 0.21, 0.13, …
    (dream_generate, dict(temperature=1.0, alg="entropy", top_p=0.8), 3),
    (dream_generate, dict(temperature=1.0, alg="topk_margin", top_p=0.6), 2),
    (dream_generate, dict(temperature=1.0, alg="maskgit_plus", top_p=0.5), 1),
])
def test_the_sampled_distribution_is_the_tempered_softmax(sampler, knobs, kept):
    cfg = SamplerConfig(1, 1, **knobs)
    logits = LOGITS / cfg.temperature
    if cfg.top_p < 1:  # the first token whose cumulative probability passes top_p is the last kept
        assert kept == int((torch.softmax(logits, -1).cumsum(-1) <= cfg.top_p).sum()) + 1
    if kept is not None:
        logits = torch.cat([logits[:kept], torch.full((len(LOGITS) - kept,), -INF)])
    torch.testing.assert_close(frequencies(sampler, cfg), torch.softmax(logits, -1), atol=0.025, rtol=0)


def test_alg_temp_samples_the_positions_by_their_tempered_confidence():
    """Dream with alg_temp > 0: the one position revealed first (3 masks in 2 steps: 1, then 2) is drawn from
    softmax(confidence / alg_temp) over the masked positions."""
    logits = torch.full((3, len(LOGITS)), 0.0)
    logits[:, 0] = torch.tensor([2.0, 1.0, 0.5])
    logits[:, -1] = -30.0
    run = Batch([[0]] * ROWS, 3, pad_id=0, mask_id=len(LOGITS) - 1, device="cpu")
    cfg = SamplerConfig(3, 2, alg="maskgit_plus", alg_temp=0.1)
    out = dream_generate(lambda x, key_mask: logits.expand(x.shape[0], -1, -1), run, cfg,
                         torch.Generator().manual_seed(0))
    assert (out.committed_at == 1).sum(1).eq(1).all()
    first = (out.committed_at == 1).float().mean(0)
    expected = torch.softmax(torch.softmax(logits, -1).max(-1).values / cfg.alg_temp, -1)
    torch.testing.assert_close(first, expected, atol=0.025, rtol=0)


# --- the dispatch and its refusals -----------------------------------------------------------------------------------

def test_auto_runs_the_familys_own_sampler(llada, dream):
    prompts = [[5, 6, 7]]
    for model, rule in ((llada, "llada"), (dream, "dream")):
        auto = generate(model, prompts, SamplerConfig(6, 3))
        assert torch.equal(auto.tokens, generate_public(model, prompts, SamplerConfig(6, 3, sampler=rule)).tokens)
    other = generate(dream, prompts, SamplerConfig(6, 3, sampler="llada"))  # either public rule on either model
    assert other.tokens.shape == (1, 9) and (other.states[-1] != dream.cfg.mask_id).all()


@pytest.mark.parametrize("family,knobs,needle", [
    ("ours", dict(sampler="llada"), "cannot sample a diffusionlm model"),
    ("llada", dict(sampler="diffusionlm"), "cannot sample a llada model"),
    ("ours", dict(cfg_scale=1.0), "--cfg_scale 1.0 is not a knob of the diffusionlm sampler"),
    ("llada", dict(alg="entropy"), "--alg entropy is not a knob of the llada sampler"),
    ("llada", dict(top_k=5), "--top_k 5 is not a knob of the llada sampler"),
    ("dream", dict(cfg_scale=2.0), "--cfg_scale"),
    ("dream", dict(block_length=4), "--block_length 4 is not a knob of the dream sampler"),
    ("dream", dict(remasking="random"), "--remasking"),
    ("dream", dict(prompts=[[5], []]), "an empty prompt"),
    ("llada", dict(prompts=[[5, 150]]), "the mask id 150"),
    ("llada", dict(prompts=[[5, 160]]), "outside the vocabulary"),
])
def test_refusals_are_one_line(llada, dream, family, knobs, needle):
    model = {"llada": llada, "dream": dream, "ours": randomised(DiffusionLM(tiny_cfg()))}[family]
    prompts = knobs.pop("prompts", [[5, 6]])
    with pytest.raises(UserError, match=needle) as err:
        generate(model, prompts, SamplerConfig(8, 8, **knobs))
    assert "\n" not in str(err.value)


def test_bad_public_knobs_are_refused():
    for kw in (dict(sampler="mdlm"), dict(alg="greedy"), dict(cfg_scale=-1.0), dict(alg_temp=-0.1), dict(eps=0.0),
               dict(eps=1.0)):
        with pytest.raises(ValueError):
            SamplerConfig(8, 8, **kw)


@pytest.mark.parametrize("family,knobs", [("llada", dict(block_length=3)), ("dream", dict(alg="entropy")),
                                          ("dream", dict(alg="origin", temperature=1.0)), ("ours", {})])
def test_probs_are_the_models_probabilities_as_sampled(llada, dream, family, knobs):
    """Generation.probs at each step: the softmax of as_sampled(the model's logits for that step's input)."""
    model = {"llada": llada, "dream": dream, "ours": randomised(DiffusionLM(tiny_cfg()))}[family]
    out = generate(model, [[5, 6, 7]], SamplerConfig(6, 4, **knobs))
    prefix = out.tokens[:, :out.prompt_width]
    for s in range(1, len(out.states)):
        new = out.committed_at[0] == s
        if new.any():
            logits = model(torch.cat([prefix, out.states[s - 1]], 1)).logits[0, out.prompt_width:][new]
            p = torch.softmax(as_sampled(logits, model.cfg), -1).gather(-1, out.states[s][0, new, None])[:, 0]
            torch.testing.assert_close(out.probs[0][new], p, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_confidences_are_computed_in_the_models_dtype(family, llada, dream, monkeypatch):
    """The released samplers rank positions by confidences computed in the logits' dtype (bf16 for a bf16 model),
    which decides ties and near-ties: the sampler sees the bf16 model's logits in bf16."""
    import copy

    import model.public_samplers as ps

    model = copy.deepcopy(llada if family == "llada" else dream).to(torch.bfloat16)
    seen = []
    real = ps.llada_generate if family == "llada" else ps.dream_generate

    def spy(logits_of, run, cfg, gen):
        seen.append(logits_of(run.x, run.key_mask).dtype)
        return real(logits_of, run, cfg, gen)

    monkeypatch.setattr(ps, f"{family}_generate", spy)
    generate(model, [[5, 6, 7]], SamplerConfig(gen_length=4, steps=4, sampler=family))
    assert seen == [torch.bfloat16]
