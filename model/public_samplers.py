"""The released samplers of LLaDA-8B (`generate` of its repository) and Dream-7B (`diffusion_generate` of its
Hub code), re-implemented from docs/notes/public-diffusion-lms.md §4, returning this project's `Generation`.

Both start from the prompts left-padded with the pad id (EOS) to one width P, followed by `gen_length` mask
ids; padded keys are never attended to (DiffusionLM's key_mask). Nothing is excluded from the vocabulary: as
released, every embedding row can be drawn (a drawn mask id is written, and that position stays masked).

LLaDA: semi-autoregressive blocks, left to right; a block's masks are split over its steps with the
remainder on the first steps (`llada_counts`). Each step draws a token per position: argmax of the logits at
temperature 0, else argmax of exp(logits) / (−log u)^temperature in float64 (Gumbel-max: a sample from
softmax(logits / temperature)). Confidence is the softmax of the untempered logits at the drawn token
("low_confidence") or uniform ("random"); each row commits its most confident masked positions of the
current block. Classifier-free guidance (cfg_scale > 0) runs a second copy with the prompt and padding
masked and uses un + (cfg_scale + 1)·(cond − un). Positions are 0..T−1 in every row, as in the release.

Dream: timesteps linspace(1, eps, steps + 1). "origin" reveals each masked position with probability
1 − s/t (all at the last step); the other algs reveal int(M̄·(1 − s/t)) positions per row (M̄: the batch's
mean mask count; all at the last step) ranked by the drawn token's probability ("maskgit_plus"), the top-1 −
top-2 margin ("topk_margin") or the negative entropy ("entropy"), or sampled from softmax(confidence /
alg_temp). Tokens come from the logits / temperature, top-p filtered (the first token past the mass is
kept), then top-k filtered. Dream reads position i's prediction from the hidden state at i − 1; DiffusionLM's
logit shift already does that. Equal-length prompts are exactly Dream's; with left padding Dream also
renumbers positions (the first real token at 0) and blocks padded queries too: rotary attention depends on
position differences only, padded keys are masked and no real position reads a padded row, so that changes
floating-point rounding, not the function.

`Generation.probs` is the model's probability (softmax of its logits over every row, untempered and
unfiltered; LLaDA's guided logits under cfg_scale) of each committed token when it was committed.
Rows keep equal mask counts unless a mask id is drawn; Dream's count is the batch mean, so a row with fewer
masks then has an unmasked position picked and overwritten with the mask id, as released.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from core.files import UserError
from model.diffusion import DiffusionLM
from model.sampler import Generation, SamplerConfig

# (tokens (B, N), key mask (B, N) or None) → logits (B, L, V) of the last L positions (the continuation)
LogitsFn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def llada_counts(masked: int, steps: int) -> list[int]:
    """LLaDA's tokens per step for a block with `masked` masks: ⌊masked/steps⌋ each, one more on the first
    masked mod steps steps."""
    base, extra = divmod(masked, steps)
    return [base + (i < extra) for i in range(steps)]


def dream_timesteps(steps: int, eps: float) -> torch.Tensor:
    """Dream's t_0 = 1 > t_1 > … > t_steps = eps, evenly spaced, float32."""
    return torch.linspace(1, eps, steps + 1)


def dream_count(masked_total: int, rows: int, t: torch.Tensor, s: torch.Tensor, last: bool) -> int:
    """Dream's positions to reveal per row at a step from t to s: int(M̄·(1 − s/t)) with M̄ the mean mask
    count per row, all int(M̄) at the last step (float32 arithmetic, as released)."""
    mean = torch.tensor(masked_total, dtype=torch.long) / rows
    return int(mean) if last else int(mean * (1 - s / t))


def dream_counts(length: int, steps: int, eps: float = 1e-3) -> list[int]:
    """Dream's reveals per step for one row of `length` masks with a ranking alg (every reveal sticks)."""
    times, left, out = dream_timesteps(steps, eps), length, []
    for i in range(steps):
        n = dream_count(left, 1, times[i], times[i + 1], i == steps - 1)
        out.append(n)
        left -= n
    return out


def gumbel_argmax(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """LLaDA's draw: argmax at temperature 0, else argmax of exp(logits) / (−log u)^temperature in float64."""
    if temperature == 0:
        return logits.argmax(-1)
    z = logits.double()
    u = torch.rand(z.shape, dtype=torch.float64, generator=gen, device=z.device)
    return (z.exp() / (-torch.log(u)) ** temperature).argmax(-1)


def dream_filter(logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Dream's filters: top-p (drop a token once the mass before it exceeds p; the most probable stays), then
    top-k; dropped logits become the dtype's minimum."""
    low = torch.finfo(logits.dtype).min
    if top_p < 1:
        ranked, order = torch.sort(logits, descending=True)
        before = torch.softmax(ranked, -1).cumsum(-1)
        drop = torch.zeros_like(before, dtype=torch.bool)
        drop[..., 1:] = before[..., :-1] > top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), low)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, low)
    return logits


def dream_tokens(logits: torch.Tensor, cfg: SamplerConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, token) per row of (N, V) logits, as Dream's sample_tokens with cfg.alg's confidence."""
    if cfg.temperature > 0:
        logits = logits / cfg.temperature
    p = torch.softmax(dream_filter(logits, cfg.top_p, cfg.top_k), -1)
    if cfg.temperature > 0 and len(p):
        token = torch.multinomial(p, 1, generator=gen)[:, 0]
        conf = p.gather(-1, token[:, None])[:, 0]
    else:
        conf, token = p.max(-1)
    if cfg.alg == "topk_margin":
        top2 = torch.topk(p, 2).values
        conf = top2[:, 0] - top2[:, 1]
    elif cfg.alg == "entropy":
        conf = (p * torch.log(p + 1e-10)).sum(-1)
    return conf, token


class Batch:
    """The batch being sampled: x (B, P + L), its key mask, and the Generation's records."""

    def __init__(self, prompts: list[list[int]], length: int, pad_id: int, mask_id: int,
                 device: torch.device | str) -> None:
        B, P = len(prompts), max(len(p) for p in prompts)
        self.P, self.L, self.mask_id = P, length, mask_id
        self.x = torch.full((B, P + length), pad_id, dtype=torch.long, device=device)
        real = torch.ones_like(self.x, dtype=torch.bool)
        for b, p in enumerate(prompts):
            self.x[b, P - len(p):P] = torch.tensor(p, dtype=torch.long)
            real[b, :P - len(p)] = False
        self.x[:, P:] = mask_id
        self.key_mask = None if real.all() else real
        self.states = [self.x[:, P:].clone()]
        self.committed_at = torch.zeros(B, length, dtype=torch.long, device=device)
        self.probs = torch.zeros(B, length, device=device)

    def commit(self, chosen: torch.Tensor, tokens: torch.Tensor, logits: torch.Tensor, step: int) -> None:
        """Write tokens (B, N) at chosen (B, N) positions (all in the continuation) and record them."""
        self.x[chosen] = tokens[chosen]
        c = chosen[:, self.P:]
        p = torch.softmax(logits, -1).gather(-1, tokens[:, self.P:, None])[..., 0]
        self.committed_at[c] = step
        self.probs[c] = p[c].to(self.probs.dtype)

    def full(self, region: torch.Tensor, fill) -> torch.Tensor:
        """A (B, N) tensor: `fill` over the prompt, `region` (B, L) over the continuation."""
        out = torch.full(self.x.shape, fill, dtype=region.dtype, device=region.device)
        out[:, self.P:] = region
        return out

    def result(self) -> Generation:
        return Generation(self.x, self.P, self.states, self.committed_at, self.probs)


def llada_generate(logits_of: LogitsFn, run: Batch, cfg: SamplerConfig, gen: torch.Generator) -> Generation:
    """LLaDA's sampler over `run` (prompts and masks), reading logits from `logits_of`; randomness from `gen`."""
    x, P, mask_id = run.x, run.P, run.mask_id
    prompt_index = x != mask_id
    block = cfg.block_length or cfg.gen_length
    per_block = cfg.steps // (cfg.gen_length // block)
    step = 0
    for start in range(P, P + cfg.gen_length, block):
        counts = [llada_counts(int(n), per_block) for n in (x[:, start:start + block] == mask_id).sum(1)]
        for i in range(per_block):
            step += 1
            ks = [c[i] for c in counts]
            if any(ks):
                masked = x == mask_id
                if cfg.cfg_scale > 0:
                    un = x.masked_fill(prompt_index, mask_id)
                    km = None if run.key_mask is None else run.key_mask.repeat(2, 1)
                    cond, uncond = logits_of(torch.cat([x, un]), km).chunk(2)
                    logits = uncond + (cfg.cfg_scale + 1) * (cond - uncond)
                else:
                    logits = logits_of(x, run.key_mask)
                drawn = run.full(gumbel_argmax(logits, cfg.temperature, gen), 0)
                if cfg.remasking == "low_confidence":
                    conf = torch.softmax(logits, -1).gather(-1, drawn[:, P:, None])[..., 0]
                else:
                    conf = torch.rand(drawn[:, P:].shape, generator=gen, device=x.device)
                conf = run.full(conf, float("-inf"))
                conf[:, start + block:] = float("-inf")
                conf = conf.masked_fill(~masked, float("-inf"))
                chosen = torch.zeros_like(masked)
                for b, k in enumerate(ks):
                    chosen[b, torch.topk(conf[b], k).indices] = True
                run.commit(chosen, torch.where(masked, drawn, x), logits, step)
            run.states.append(x[:, P:].clone())
    return run.result()


def dream_generate(logits_of: LogitsFn, run: Batch, cfg: SamplerConfig, gen: torch.Generator) -> Generation:
    """Dream's sampler over `run`, reading logits (already shifted) from `logits_of`; randomness from `gen`."""
    x, P, mask_id = run.x, run.P, run.mask_id
    times = dream_timesteps(cfg.steps, cfg.eps)
    for i in range(cfg.steps):
        masked = x == mask_id
        t, s, last = times[i], times[i + 1], i == cfg.steps - 1
        if cfg.alg == "origin":
            reveal = 1 if last else 1 - s / t
            chosen = torch.zeros_like(masked)
            chosen[masked] = torch.rand(int(masked.sum()), generator=gen, device=x.device) < reveal
            if chosen.any():
                logits = logits_of(x, run.key_mask)
                drawn = torch.full_like(x, mask_id)
                drawn[chosen] = dream_tokens(logits[chosen[:, P:]], cfg, gen)[1]
                run.commit(chosen, drawn, logits, i + 1)
        else:
            n = dream_count(int(masked.sum()), x.shape[0], t, s, last)
            if n > 0:
                logits = logits_of(x, run.key_mask)
                here = masked[:, P:]
                conf, token = dream_tokens(logits[here], cfg, gen)
                full_conf = torch.full(x.shape, float("-inf"), dtype=conf.dtype, device=x.device)
                full_conf[masked] = conf
                if cfg.alg_temp == 0:
                    picked = torch.topk(full_conf, n).indices
                else:
                    picked = torch.multinomial(torch.softmax(full_conf / cfg.alg_temp, -1), n, generator=gen)
                chosen = torch.zeros_like(masked).scatter(1, picked, True)
                drawn = torch.full_like(x, mask_id)
                drawn[masked] = token
                run.commit(chosen, drawn, logits, i + 1)
        run.states.append(x[:, P:].clone())
    return run.result()


def check_prompts(prompts: list[list[int]], model: DiffusionLM) -> None:
    """One line for a batch the public samplers cannot take: no prompts, an empty prompt, an id outside the
    vocabulary, or the mask id inside a prompt."""
    mc = model.cfg
    if not prompts:
        raise UserError("no prompts to generate from")
    for p in prompts:
        if not p:
            raise UserError(f"an empty prompt: LLaDA and Dream continue at least one token (e.g. BOS {mc.bos_id})")
        if min(p) < 0 or max(p) >= mc.n_vocab:
            raise UserError(f"a prompt holds an id outside the vocabulary 0..{mc.n_vocab - 1}: {min(p)} or {max(p)}")
        if mc.mask_id in p:
            raise UserError(f"a prompt holds the mask id {mc.mask_id}")


@torch.no_grad()
def generate_public(model: DiffusionLM, prompts: list[list[int]], cfg: SamplerConfig) -> Generation:
    """LLaDA's or Dream's sampler (`cfg.rule(model.cfg)`) on a public model; prompts are the ids the model
    reads (chat template and BOS included), left-padded with its pad id."""
    rule = cfg.rule(model.cfg)
    if rule not in ("llada", "dream"):
        raise UserError(f"generate_public runs LLaDA's and Dream's samplers, not {rule!r}")
    check_prompts(prompts, model)
    device = next(model.parameters()).device
    run = Batch(prompts, cfg.gen_length, model.cfg.pad_id, model.cfg.mask_id, device)

    dtype = model.head.weight.dtype  # the released samplers compute confidences in the logits' dtype (bf16 on a card)

    def logits_of(x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        region = torch.zeros_like(x, dtype=torch.bool)
        region[:, run.P:] = True
        return model(x, select=region, key_mask=key_mask).logits.view(x.shape[0], run.L, -1).to(dtype)

    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    return (llada_generate if rule == "llada" else dream_generate)(logits_of, run, cfg, gen)
