"""Step-by-step diffusion sampling: start fully masked, commit a scheduled number of tokens per step.

`generate` runs the sampler `SamplerConfig.sampler` names; "auto" is the model's own: this project's rule
below for this project's models, the released LLaDA or Dream rule (model/public_samplers.py) for those.

This project's rule: at each step the model predicts every masked position of the current block; a token
is drawn for each (temperature, top-k, top-p; or argmax at temperature 0) and the positions to commit are
chosen by the model's probability of the drawn token (LLaDA's low-confidence remasking: the least confident
stay masked) or at random (MDLM's ancestral order). Committed and prompt tokens never change. Semi-
autoregressive blocks (LLaDA) fill `block_length` positions at a time, left to right.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from core.files import UserError
from model.diffusion import DiffusionLM, ModelConfig

SAMPLERS = ("auto", "diffusionlm", "llada", "dream")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


@dataclass
class SamplerConfig:
    """Every sampler's knobs. A knob the chosen sampler does not have must keep its default (`generate`
    refuses it otherwise): cfg_scale is LLaDA's; alg, alg_temp and eps are Dream's; top_k and top_p are this
    project's and Dream's; block_length and remasking are this project's and LLaDA's."""

    gen_length: int = 32
    steps: int = 32
    block_length: int | None = None  # None: one block
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    sampler: Literal["auto", "diffusionlm", "llada", "dream"] = "auto"  # auto: the model family's own
    cfg_scale: float = 0.0  # LLaDA's classifier-free guidance (0: off)
    alg: Literal["origin", "maskgit_plus", "topk_margin", "entropy"] = "origin"  # Dream's choice of positions
    alg_temp: float = 0.0  # Dream: 0 commits the most confident positions, > 0 samples them at this temperature
    eps: float = 1e-3  # Dream: the last of the timesteps linspace(1, eps, steps + 1)

    def __post_init__(self) -> None:
        if self.gen_length <= 0 or self.steps <= 0:
            raise ValueError(f"--gen_length and --num_generate_steps must be positive, got {self.gen_length}, "
                             f"{self.steps}")
        block = self.block_length or self.gen_length
        if block <= 0 or self.gen_length % block:
            raise ValueError(f"--block_length {block} must divide --gen_length {self.gen_length}")
        if self.steps % (self.gen_length // block):
            raise ValueError(f"--num_generate_steps {self.steps} must be a multiple of the {self.gen_length // block} "
                             "blocks")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("--temperature and --top_k must be ≥ 0 and --top_p in (0, 1]")
        if self.sampler not in SAMPLERS or self.alg not in DREAM_ALGS:
            raise ValueError(f"--sampler must be one of {SAMPLERS} and --alg one of {DREAM_ALGS}, got "
                             f"{self.sampler!r}, {self.alg!r}")
        if self.cfg_scale < 0 or self.alg_temp < 0 or not 0 < self.eps < 1:
            raise ValueError("--cfg_scale and --alg_temp must be ≥ 0 and --eps in (0, 1)")

    def rule(self, model: ModelConfig) -> str:
        """The sampler that runs for `model`: `sampler`, or the model family's own for "auto". This project's
        sampler needs this project's models; LLaDA's and Dream's need a public model (either of them)."""
        rule = model.family if self.sampler == "auto" else self.sampler
        if (rule == "diffusionlm") != (model.family == "diffusionlm"):
            raise UserError(f"--sampler {rule} cannot sample a {model.family} model (this project's sampler is for "
                            "this project's models, LLaDA's and Dream's for the public ones)")
        foreign = [name for name, owners in KNOB_OWNERS.items()
                   if rule not in owners and getattr(self, name) != getattr(DEFAULTS, name)]
        if foreign:
            raise UserError(f"--{foreign[0]} {getattr(self, foreign[0])} is not a knob of the {rule} sampler "
                            f"(it belongs to {' and '.join(KNOB_OWNERS[foreign[0]])})")
        return rule


# the knobs that belong to some samplers only (the others must keep the default)
KNOB_OWNERS = {"block_length": ("diffusionlm", "llada"), "remasking": ("diffusionlm", "llada"),
               "top_k": ("diffusionlm", "dream"), "top_p": ("diffusionlm", "dream"), "cfg_scale": ("llada",),
               "alg": ("dream",), "alg_temp": ("dream",), "eps": ("dream",)}
DEFAULTS = SamplerConfig()


def commit_schedule(length: int, steps: int) -> list[int]:
    """Tokens committed at each step: after step s, floor(length·s/steps) are committed (the expected
    fraction of a linear schedule), so after the last step all are. Steps > length commit 0 sometimes."""
    done = [length * s // steps for s in range(steps + 1)]
    return [b - a for a, b in zip(done, done[1:])]


class Generation(NamedTuple):
    tokens: torch.Tensor  # (B, P + L) final rows, prompts left-padded: [PAD]* [BOS] prompt continuation (this
    # project's), pad* prompt continuation (LLaDA's and Dream's samplers: the prompts as given, pad = EOS)
    prompt_width: int  # P: the continuation starts at this column in every row
    states: list[torch.Tensor]  # steps + 1 tensors (B, L): the continuation before step 1 and after each step
    committed_at: torch.Tensor  # (B, L) the step (1-based) at which each position was committed
    probs: torch.Tensor  # (B, L) the model's probability of each committed token when it was committed


def exclude_bos(logits: torch.Tensor, bos_id: int) -> torch.Tensor:
    """The logits as the sampler draws from them, in place: BOS excluded (a continuation never starts a
    new document)."""
    logits[..., bos_id] = float("-inf")
    return logits


def as_sampled(logits: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """The logits whose softmax `Generation.probs` holds, in place: this project's sampler excludes BOS,
    LLaDA's and Dream's exclude nothing (LLaDA's guided logits under cfg_scale are not these)."""
    return exclude_bos(logits, model.bos_id) if model.family == "diffusionlm" else logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top-k logits and the smallest set whose probability reaches top-p; the rest → -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already ≥ p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(model: DiffusionLM, prompts: list[list[int]], cfg: SamplerConfig) -> Generation:
    """Generate `cfg.gen_length` tokens after each prompt, batched, with the sampler `cfg.rule` picks. A prompt
    is a list of text ids: without BOS for this project's sampler (it adds BOS), exactly the ids the model
    reads for LLaDA's and Dream's (chat template and BOS included, as their tokenizers give them)."""
    if cfg.rule(model.cfg) != "diffusionlm":
        from model.public_samplers import generate_public  # it imports this module

        return generate_public(model, prompts, cfg)
    mc, device = model.cfg, next(model.parameters()).device
    B, L = len(prompts), cfg.gen_length
    P = 1 + max(len(p) for p in prompts)
    x = torch.full((B, P + L), mc.pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):  # left padding: [PAD] lies outside the document, so it is invisible
        x[b, P - len(p) - 1] = mc.bos_id
        x[b, P - len(p):P] = torch.tensor(p, dtype=torch.long)
    x[:, P:] = mc.mask_id
    region = torch.zeros_like(x, dtype=torch.bool)
    region[:, P:] = True
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    block = cfg.block_length or L
    steps_per_block = cfg.steps // (L // block)
    committed_at = torch.zeros(B, L, dtype=torch.long, device=device)
    probs = torch.zeros(B, L, device=device)
    states, step = [x[:, P:].clone()], 0
    for start in range(0, L, block):
        in_block = torch.zeros(L, dtype=torch.bool, device=device)
        in_block[start:start + block] = True
        for k in commit_schedule(block, steps_per_block):
            step += 1
            cont = x[:, P:]
            if k:
                logits = model(x, select=region).logits.view(B, L, -1)  # (B, L, n_vocab)
                exclude_bos(logits, mc.bos_id)
                p_model = torch.softmax(logits, dim=-1)
                if cfg.temperature == 0:
                    draw = logits.argmax(-1)
                else:
                    filtered = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
                    draw = torch.multinomial(torch.softmax(filtered, -1).view(B * L, -1), 1, generator=gen).view(B, L)
                p_draw = p_model.gather(-1, draw[..., None])[..., 0]  # (B, L)
                eligible = (cont == mc.mask_id) & in_block
                score = p_draw if cfg.remasking == "low_confidence" else torch.rand(B, L, generator=gen, device=device)
                score = score.masked_fill(~eligible, float("-inf"))
                chosen = torch.zeros_like(eligible).scatter(1, torch.topk(score, k, dim=1).indices, True) & eligible
                cont[chosen] = draw[chosen]
                committed_at[chosen] = step
                probs[chosen] = p_draw[chosen]
            states.append(cont.clone())
    return Generation(x, P, states, committed_at, probs)
