import math

import pytest
import torch

from model.attention import DocMask, attend, document_ids
from model.diffusion import DiffusionLM, ModelConfig
from model.objective import T_MIN, apply_noise, diffusion_loss, train_noise, val_noise
from model.optim import build_optimizers

BOS, MASK, PAD, N_VOCAB = 0, 96, 97, 96


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_vocab=N_VOCAB, vocab_size=128, mask_id=MASK, pad_id=PAD, bos_id=BOS, num_layers=2,
                                 num_heads=2, model_dim=32), **kw})


def randomised(model: DiffusionLM) -> DiffusionLM:
    """Fill the zero-initialised projections so outputs depend on every weight."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model


def docs_batch(B=3, T=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, N_VOCAB, (B, T), generator=g)
    x[:, 0] = BOS
    x[0, 17] = BOS
    x[1, 5] = BOS
    x[1, 30] = BOS
    return x


def test_masking_replaces_inputs_and_follows_t():
    tokens = docs_batch(4, 2000)
    t = torch.tensor([T_MIN, 0.3, 0.7, 1.0])
    u = torch.rand(4, 2000, generator=torch.Generator().manual_seed(0))
    noised = apply_noise(tokens, t, u, MASK, BOS, PAD)
    assert (noised.inputs[noised.mask] == MASK).all()
    assert torch.equal(noised.inputs[~noised.mask], tokens[~noised.mask])
    assert not noised.mask[tokens == BOS].any()  # document boundaries stay visible
    frac = noised.mask.sum(1) / noised.maskable.sum(1)
    assert frac[0] < 0.01 and abs(frac[1] - 0.3) < 0.05 and abs(frac[2] - 0.7) < 0.05 and frac[3] == 1.0


def test_train_noise_is_stratified_and_depends_only_on_the_slot():
    t, u = train_noise(torch.arange(16, 32).numpy(), step=1, per_step=16, seed=0, seq_len=10)
    gaps = torch.diff(torch.sort(t).values)
    assert torch.allclose(gaps, torch.full_like(gaps, (1 - T_MIN) / 16), atol=1e-5)  # one t per stratum
    t2, u2 = train_noise(torch.arange(24, 32).numpy(), step=1, per_step=16, seed=0, seq_len=10)  # another rank's half
    assert torch.equal(t2, t[8:]) and torch.equal(u2, u[8:])
    tv, uv = val_noise(torch.arange(4).numpy(), 4, 0, 10)
    assert torch.allclose(tv, T_MIN + (1 - T_MIN) * torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert torch.equal(uv, val_noise(torch.arange(4).numpy(), 4, 0, 10)[1])


@pytest.mark.parametrize("random_head", [False, True])
def test_untrained_nelbo_is_ln_vocab(random_head):
    torch.manual_seed(0)
    model = DiffusionLM(tiny_cfg())
    if random_head:
        torch.nn.init.normal_(model.head.weight, std=0.002)
    tokens = torch.randint(1, N_VOCAB, (1024, 128))  # the 1/t weights are noisy at small t: use many sequences
    tokens[:, 0] = BOS
    t, u = train_noise(torch.arange(1024).numpy(), 0, 1024, 0, 128)
    with torch.no_grad():
        terms = diffusion_loss(model, tokens, t, u)
    nelbo = float(terms.weighted_ce / terms.n_maskable)
    assert abs(nelbo - math.log(N_VOCAB)) < 0.03 * math.log(N_VOCAB), nelbo


def test_never_predicts_mask_or_padding():
    model = randomised(DiffusionLM(tiny_cfg()))
    logits = model(docs_batch()).logits
    assert logits.shape[-1] == N_VOCAB  # ids ≥ n_vocab ([MASK], [PAD], padding rows) have no logit


def _fit(model, make_batch, steps, lr_scale=1.0):
    """`steps` optimizer steps, the learning rates cooled down linearly over the last 30% (as a real schedule
    does): at a constant rate the last weights are a random point of a noisy trajectory, and the final NELBO
    then depends on float rounding (it ranged from 0.02 to 0.4 over seeds and summation orders)."""
    opts = build_optimizers(model, 0.02 * lr_scale, 0.3 * lr_scale, 0.02 * lr_scale)
    base = [[group["lr"] for group in o.param_groups] for o in opts]
    losses = []
    for step in range(steps):
        for o, lrs in zip(opts, base):
            for group, lr in zip(o.param_groups, lrs):
                group["lr"] = lr * min(1.0, (steps - step) / (0.3 * steps))
        tokens = make_batch(step)
        slots = torch.arange(len(tokens)).numpy() + step * len(tokens)
        t, u = train_noise(slots, step, len(tokens), 0, tokens.shape[1])
        terms = diffusion_loss(model, tokens, t, u)
        (terms.weighted_ce / tokens.numel()).backward()
        for o in opts:
            o.step()
            o.zero_grad()
        losses.append(float(terms.weighted_ce.detach() / terms.n_maskable))
    return losses


@torch.no_grad()
def _nelbo(model, tokens, draws=32):
    """A low-variance NELBO: `draws` noise draws over a fixed grid of t."""
    rows = tokens.repeat(draws, 1)
    t, u = val_noise(torch.arange(len(rows)).numpy(), len(rows), 0, tokens.shape[1])
    terms = diffusion_loss(model, rows, t, u)
    return float(terms.weighted_ce / terms.n_maskable)


@pytest.mark.slow
def test_tiny_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    # one sequence: with everything masked, several sequences of one batch would look alike, so only a
    # single one can be memorised to a NELBO near zero
    fixed = docs_batch(2, 32)[:1]
    model = DiffusionLM(tiny_cfg(model_dim=64))
    before = _nelbo(model, fixed)
    _fit(model, lambda s: fixed.repeat(8, 1), 250, lr_scale=3)  # 8 noise draws of it per step
    after = _nelbo(model, fixed)
    assert before > 0.95 * math.log(N_VOCAB) and after < 0.05, (before, after)


@pytest.mark.slow
def test_random_tokens_cannot_be_learned():
    """If the model could see its targets (the old bug: no masking), this loss would fall towards 0."""
    torch.manual_seed(0)

    def fresh(step):
        x = torch.randint(1, N_VOCAB, (8, 32), generator=torch.Generator().manual_seed(step))
        x[:, 0] = BOS
        return x

    model = DiffusionLM(tiny_cfg(model_dim=64))
    _fit(model, fresh, 150)
    assert _nelbo(model, fresh(10_000)) > 0.95 * math.log(N_VOCAB - 1)


@torch.no_grad()  # FlexAttention has no backward on the CPU
def test_flex_attention_equals_sdpa():
    model = randomised(DiffusionLM(tiny_cfg()))
    x = docs_batch(2, 128)
    torch.testing.assert_close(model(x, attn_impl="flex").logits, model(x, attn_impl="sdpa").logits,
                               atol=1e-5, rtol=1e-4)
    q, k, v = torch.randn(3, 2, 2, 128, 16).unbind(0)
    doc = document_ids(x, BOS)
    torch.testing.assert_close(attend(q, k, v, DocMask(doc, "flex")), attend(q, k, v, DocMask(doc, "sdpa")),
                               atol=1e-5, rtol=1e-4)


def random_layouts(n: int):
    """(B, T) tokens with BOS at random: long and short documents, none, rows that start inside one, sequence
    lengths on and off the 128-position block grid."""
    g = torch.Generator().manual_seed(0)
    for trial in range(n):
        B = int(torch.randint(1, 4, (1,), generator=g))
        blocks, length = (int(x) for x in torch.randint(1, 600, (2,), generator=g))
        T = 128 * (blocks % 4 + 1) if trial % 3 else length
        rate = (0.0, 0.002, 0.01, 0.05, 0.5)[trial % 5]
        tokens = torch.where(torch.rand(B, T, generator=g) < rate, BOS, 1)
        if trial % 2:
            tokens[:, 0] = BOS
        yield tokens


def test_document_block_mask_equals_create_block_mask():
    """Built from the document ids with tensor ops: the same partial and full blocks, in the same order, as
    create_block_mask evaluating the mask position by position."""
    from torch.nn.attention.flex_attention import create_block_mask

    from model.attention import document_block_mask

    for tokens in random_layouts(40):
        doc = document_ids(tokens, BOS)
        B, T = doc.shape
        ref = create_block_mask(lambda b, h, q, k: doc[b, q] == doc[b, k], B, None, T, T, device="cpu")
        got = document_block_mask(doc)
        assert got.seq_lengths == ref.seq_lengths and got.BLOCK_SIZE == ref.BLOCK_SIZE
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                     "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
            a, b = getattr(got, name), getattr(ref, name)
            assert a.dtype == b.dtype and torch.equal(a, b), (tokens.shape, name)


def test_document_block_mask_never_waits_for_the_host():
    from model.attention import document_block_mask
    from tests.syncs import syncing_ops

    doc = document_ids(next(iter(random_layouts(4))), BOS)
    assert not syncing_ops(lambda: document_block_mask(doc))


@torch.no_grad()
def test_flex_attention_with_the_block_mask_equals_sdpa_for_random_layouts():
    g = torch.Generator().manual_seed(1)
    for tokens in random_layouts(10):
        doc = document_ids(tokens, BOS)
        q, k, v = torch.randn(3, tokens.shape[0], 2, tokens.shape[1], 16, generator=g).unbind(0)
        torch.testing.assert_close(attend(q, k, v, DocMask(doc, "flex")), attend(q, k, v, DocMask(doc, "sdpa")),
                                   atol=1e-5, rtol=1e-4)


def test_documents_never_see_each_other():
    model = randomised(DiffusionLM(tiny_cfg()))
    x = docs_batch()
    changed = x.clone()
    changed[0, 20:] = torch.randint(1, N_VOCAB, (20,))  # the second document of row 0
    changed[1, 10:25] = MASK  # the second document of row 1
    a, b = model(x).logits, model(changed).logits
    torch.testing.assert_close(a[0, :17], b[0, :17])  # row 0, first document: untouched
    torch.testing.assert_close(a[1, :5], b[1, :5])
    torch.testing.assert_close(a[1, 30:], b[1, 30:])
    torch.testing.assert_close(a[2], b[2])
    assert not torch.allclose(a[0, 17:], b[0, 17:])  # the changed document did change


def test_save_load_round_trip(tmp_path):
    model = randomised(DiffusionLM(tiny_cfg()))
    model.save(tmp_path / "m.pt")
    again = DiffusionLM.load(tmp_path / "m.pt", "cpu")
    x = docs_batch()
    assert torch.equal(model(x).logits, again(x).logits)
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(not k.startswith("_orig_mod") and "module." not in k for k in raw["model"])


def test_load_refuses_another_shape(tmp_path):
    from core.files import UserError

    DiffusionLM(tiny_cfg()).save(tmp_path / "m.pt")
    with pytest.raises(UserError, match="another shape"):
        DiffusionLM.load(tmp_path / "m.pt", "cpu", expected=tiny_cfg(model_dim=64))
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    del state["model"]["blocks.1.mlp.fc.weight"]
    torch.save(state, tmp_path / "damaged.pt")  # its saved SHA-256 no longer matches
    with pytest.raises(UserError, match="is damaged"):
        DiffusionLM.load(tmp_path / "damaged.pt", "cpu")
    state.pop("sha256")  # a file written by another tool, without one: the strict load refuses it
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(UserError, match="does not match"):
        DiffusionLM.load(tmp_path / "broken.pt", "cpu")


@pytest.mark.parametrize("kw,msg", [(dict(model_dim=30, num_heads=4), "not divisible"),
                                    (dict(num_layers=0), "must be positive"), (dict(mask_id=5), "outside the text")])
def test_bad_shapes(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_cfg(**kw)
