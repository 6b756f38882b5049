"""Stage 1's optimizer step (training.diffusion.train_step) and its loop on a tiny random model: no host reads
outside log steps, packed forward passes equal unpacked ones, a NaN loss stops the run at the next log step."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import training.diffusion as stage
from data.loader import Batch
from experiment.packing import micro_batches_per_forward
from experiment.record import RunLog
from model.diffusion import DiffusionLM, ModelConfig
from model.distributed import Dist
from model.objective import LossTerms, apply_noise
from model.optim import build_optimizers
from tests.helpers import tiny_train_config
from tests.syncs import syncing_ops

N_VOCAB = 61
MODEL = ModelConfig(n_vocab=N_VOCAB, vocab_size=64, mask_id=61, pad_id=62, bos_id=60, num_layers=2, num_heads=2,
                    model_dim=32)


class FakeLoader:
    """ShardLoader's slot layout (one process) over random windows that depend on their slot only, with a BOS
    about every 20 tokens."""

    def __init__(self, seq_len: int, batch_size: int) -> None:
        self.seq_len, self.batch_size = seq_len, batch_size

    def _windows(self, slots: np.ndarray) -> torch.Tensor:
        rows = []
        for slot in slots:
            g = torch.Generator().manual_seed(1000 + int(slot))
            row = torch.randint(0, N_VOCAB - 1, (self.seq_len,), generator=g)
            row[torch.rand(self.seq_len, generator=g) < 0.05] = MODEL.bos_id
            row[0] = MODEL.bos_id
            rows.append(row)
        return torch.stack(rows)

    def batch(self, micro_batch: int) -> Batch:
        slots = micro_batch * self.batch_size + np.arange(self.batch_size)
        return Batch(self._windows(slots), None, slots)

    def n_sequential(self, max_tokens: int | None = None) -> int:
        return max(1, (max_tokens or self.seq_len) // self.seq_len)

    def sequential(self, max_tokens: int | None = None):
        n = self.n_sequential(max_tokens)
        for i in range(0, n, self.batch_size):
            index = np.arange(i, min(n, i + self.batch_size))
            yield Batch(self._windows(index + 10**6), None, index)


def fake_run(tmp_path, fused: bool = False, **overrides) -> stage.Run:
    """A Run as set_up builds it on the CPU (one process, no folder), on a tiny random model and FakeLoader."""
    kw = dict(train_seq_len=64, val_seq_len=64, val_tokens=128, batch_size=2, grad_acc_steps=4, train_steps=3,
              log_every=10, val_loss_every=0, save_every=0, save_model=False)
    cfg = tiny_train_config(tmp_path, tmp_path, **{**kw, **overrides})
    torch.manual_seed(0)
    model = DiffusionLM(MODEL)
    for p in model.parameters():  # no zero-initialised projections: every matrix gets a gradient at once
        torch.nn.init.normal_(p, std=0.05)
    optimizers = build_optimizers(model, cfg.muon_lr, cfg.embed_lr, cfg.head_lr, fused=fused)
    group = micro_batches_per_forward(cfg.forward_batch_size, cfg.batch_size, cfg.grad_acc_steps, cfg.train_seq_len,
                                      torch.device("cpu"))
    return stage.Run(cfg, Dist(), torch.device("cpu"), None, model, model, optimizers,
                     FakeLoader(cfg.train_seq_len, cfg.batch_size), FakeLoader(cfg.val_seq_len, cfg.batch_size),
                     RunLog(None, enabled=False), 0, cfg.grad_acc_steps, None, group)


def dense_loss(model, tokens, t, u, n_masked=None) -> LossTerms:
    """diffusion_loss's terms with logits at every position (no boolean indexing): a forward and loss that read
    nothing on the host, so that what a step reads is the loop's and the optimizers' own."""
    cfg = model.cfg
    noised = apply_noise(tokens, t, u, cfg.mask_id, cfg.bos_id, cfg.pad_id)
    logits = model(noised.inputs).logits
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none").view_as(tokens)
    return LossTerms((ce * noised.mask / t[:, None]).sum(), noised.mask.sum(), noised.maskable.sum())


def test_a_step_reads_nothing_on_the_host(tmp_path, monkeypatch):
    """Every step of the real loop (the log step too: its reads are in the log, after the step) issues no
    syncing operation beyond fused Adam's own, which reads its step counts on the host on the CPU only (its
    CUDA kernel reads them on the device). The forward is a sync-free stand-in and the batches are made
    beforehand (the background thread's host work is not the device's)."""
    monkeypatch.setattr(stage, "diffusion_loss", dense_loss)
    run = fake_run(tmp_path, fused=True, train_steps=4, log_every=4)
    made = {i: stage.step_forwards(run, i) for i in range(4)}
    monkeypatch.setattr(stage, "step_forwards", lambda r, i: made[i])

    forward = dense_loss(run.model, *made[0][0]).weighted_ce
    assert syncing_ops(forward.backward) == Counter()  # the stand-in is sync-free, backward included
    adam = torch.optim.Adam([p.detach().clone().requires_grad_() for p in run.optimizers[0].param_groups[0]["params"]
                             + run.optimizers[0].param_groups[1]["params"]], fused=True)
    for p in adam.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    adam_own = syncing_ops(adam.step)

    counts, real = {}, stage.run_training_steps

    def spy(cfg, start, tokens, show, step, *rest):
        def counted(index):
            counts[index] = syncing_ops(lambda: step(index))
        real(cfg, start, tokens, show, counted, *rest)

    monkeypatch.setattr(stage, "run_training_steps", spy)
    stage.loop(run)
    assert counts == {i: adam_own for i in range(4)}


def _steps(run, n):
    losses = [stage.train_step(run, i) for i in range(n)]
    run.close()
    return torch.stack(losses)


@pytest.mark.parametrize("forward_batch_size,group", [(4, 2), (8, 4)])
def test_packed_forward_passes_equal_unpacked_ones(tmp_path, forward_batch_size, group):
    """--forward_batch_size packs consecutive micro-batches into one forward pass: the same sequences and
    noise (bit for bit), the same loss normalisation, so the same losses and weights up to float sums."""
    plain = fake_run(tmp_path, forward_batch_size=2)
    packed = fake_run(tmp_path, forward_batch_size=forward_batch_size)
    assert (plain.group, packed.group) == (1, group)
    for index in (0, 5):
        one, many = stage.step_forwards(plain, index), stage.step_forwards(packed, index)
        assert len(one) == 4 and len(many) == 4 // group
        for part in range(3):  # tokens, t, u
            assert torch.equal(torch.cat([f[part] for f in one]), torch.cat([f[part] for f in many]))
    torch.testing.assert_close(_steps(packed, 3), _steps(plain, 3), rtol=1e-6, atol=0)
    for (name, a), b in zip(packed.model.state_dict().items(), plain.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_steps_are_those_of_the_batches_in_order(tmp_path):
    """The background thread changes nothing: a run's steps equal steps on batches made in the foreground."""
    run, ref = fake_run(tmp_path), fake_run(tmp_path)
    got = _steps(run, 3)
    expected = []
    for index in range(3):
        ref.prefetch = None
        stage.set_lr(ref.optimizers, stage.lr_factor(index, ref.cfg.train_steps, ref.cfg.cooldown_frac))
        expected.append(stage.accumulate_gradients(ref.model, stage.step_forwards(ref, index), 8 * 64,
                                                   ref.device, stage.autocast_for(ref.device), ref.dist))
        for opt in ref.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert torch.equal(got, torch.stack(expected))
    for a, b in zip(run.model.parameters(), ref.model.parameters()):
        assert torch.equal(a, b)


def test_loss_sums_keep_the_first_bad_step_on_the_device():
    sums = stage.LossSums(torch.device("cpu"), saved=torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    sums.add(1, torch.tensor([3.0, 2.0, 4.0], dtype=torch.float64))
    assert sums.first_bad() is None
    sums.add(2, torch.tensor([float("inf"), 2.0, 4.0], dtype=torch.float64))
    sums.add(3, torch.tensor([float("nan"), 2.0, 4.0], dtype=torch.float64))
    assert sums.first_bad() == (2, float("inf"))
    sums = stage.LossSums(torch.device("cpu"))
    sums.add(1, torch.tensor([3.0, 2.0, 4.0], dtype=torch.float64))
    sums.add(2, torch.tensor([5.0, 2.0, 4.0], dtype=torch.float64))
    assert sums.take() == 1.0 and sums.take() != sums.take()  # (3 + 5) / (4 + 4); then nothing: nan


@pytest.mark.parametrize("log_every,val_every,stops_after", [(3, 0, 3), (5, 2, 2)])
def test_a_nan_loss_stops_the_run_at_the_next_log_or_check(tmp_path, monkeypatch, log_every, val_every,
                                                            stops_after):
    """The step reads no loss: a NaN at step 2 stops the run at the next log line, or before the next
    validation or checkpoint, whichever comes first, with the one-line error naming step 2."""
    real_loss, real_step, calls, steps, validated = stage.diffusion_loss, stage.train_step, [], [], []

    def poisoned(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        if torch.is_grad_enabled():  # training, not validation
            calls.append(1)
        return terms._replace(weighted_ce=terms.weighted_ce * float("nan")) if len(calls) == 5 else terms

    def counted_step(r, index):
        steps.append(index + 1)
        return real_step(r, index)

    real_evaluate = stage.evaluate
    monkeypatch.setattr(stage, "diffusion_loss", poisoned)  # 4 forward passes per step: the 5th is step 2's
    monkeypatch.setattr(stage, "train_step", counted_step)
    monkeypatch.setattr(stage, "evaluate", lambda *a: validated.append(1) or real_evaluate(*a))
    run = fake_run(tmp_path, train_steps=6, log_every=log_every, val_loss_every=val_every)
    with pytest.raises(stage.TrainingDiverged, match=r"^the loss became nan at step 2; stopped\. Last good "
                                                     r"checkpoint: none saved yet\. Try lower learning rates\.$"):
        stage.loop(run)
    assert steps == list(range(1, stops_after + 1))
    assert len(validated) == (1 if val_every else 0)  # the one before training, never one of NaN weights
    assert run.prefetch is None  # the background thread was stopped
