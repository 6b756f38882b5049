"""The flag groups the stage configs combine (mixins of dataclass fields, each with its own checks).

Every group's `__post_init__` runs its checks and passes on along the method resolution order, so a
stage's config is `class XConfig(GroupA, GroupB, ...)` with its own fields and checks on top.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from core import checks as c
from core.cli import Flags, arg
from core.files import UserError
from data.chat import chat_template, render_chat, special_tokens
from experiment.paths import BASE_MODEL_KEY
from model.sampler import SamplerConfig

SHAPE_FLAGS = ("num_layers", "num_heads", "model_dim")
EXAMPLE_PROMPTS = ["The capital of France is", "Once upon a time,", "The chemical symbol for oxygen is",
                   "Photosynthesis is the process by which"]


class FlagGroup(Flags):
    """The end of the chain of checks: every field's type and declared check (core.checks)."""


@dataclass
class RunFlags(FlagGroup):
    """Which trained run and checkpoint a later stage works on, and on which device."""

    train_folder: str = arg("", "the run folder (experiments/<run>)", c.RUN_FOLDER)
    checkpoint_name: str = arg("latest", "checkpoint in the run folder, or 'latest'", c.CHECKPOINT)
    cuda: Optional[int] = arg(None, "CUDA device index", c.CUDA)
    device: Optional[str] = arg(None, "cpu, cuda or cuda:N", c.DEVICE)



@dataclass
class ShapeFlags(FlagGroup):
    """Shape flags after training: optional, and checked against the run's config.json."""

    num_layers: Optional[int] = arg(None, "optional; must match the run's config.json", c.COUNT)
    num_heads: Optional[int] = arg(None, "optional; must match the run's config.json", c.COUNT)
    model_dim: Optional[int] = arg(None, "optional; must match the run's config.json", c.COUNT)

    def shape_flags(self) -> dict:
        return {name: getattr(self, name) for name in SHAPE_FLAGS}


def check_shape_flags(model_config: dict, given: dict) -> None:
    """Later stages read shapes from config.json; a shape flag typed anyway must agree with it."""
    for name in SHAPE_FLAGS:
        if given.get(name) is not None and given[name] != model_config[name]:
            raise UserError(f"--{name} {given[name]} disagrees with the run's config.json "
                            f"({name}={model_config[name]}); shape flags are optional after training, drop it or "
                            "fix it")


@dataclass
class BatchFlags(FlagGroup):
    """The shape of a batch of data, and the seed of its order."""

    train_seq_len: int = arg(4096, "tokens per sequence", c.COUNT)
    batch_size: int = arg(1, "sequences per micro-batch (per process)", c.COUNT)
    grad_acc_steps: int = arg(8, "micro-batches per optimizer step, over all processes", c.COUNT)
    seed: int = arg(0, "seed for initialisation, data order and noise", c.SEED)
    forward_batch_size: int = arg(0, "sequences per forward pass (per process), a multiple of --batch_size: only how "
                                     "the micro-batches are packed, the data, noise and result stay those of "
                                     "--batch_size; 0: on a GPU as many as fit 32,768 tokens, elsewhere --batch_size",
                                  c.COUNT_OR_ZERO)


@dataclass
class LoopFlags(FlagGroup):
    """How long a training stage runs, and how often it logs, validates and saves."""

    train_steps: int = arg(20_000, "optimizer steps", c.COUNT)
    val_loss_every: int = arg(1000, "validate every N steps (0: only at the end)", c.COUNT_OR_ZERO)
    val_tokens: int = arg(262_144, "validation tokens (the same ones every time)", c.COUNT)
    save_every: int = arg(2000, "checkpoint every N steps (0: only at the end)", c.COUNT_OR_ZERO)
    save_model: bool = arg(True, "write checkpoints")
    log_every: int = arg(10, "log the training loss every N steps", c.COUNT)


WANDB_PROJECT = "diffusion-interp"


@dataclass
class WandbFlags(FlagGroup):
    """Logging a training stage to Weights & Biases as well."""

    wandb: bool = arg(False, "also log to Weights & Biases (needs the wandb package; a resumed run or job continues "
                             "its W&B run)")
    wandb_project: str = arg(WANDB_PROJECT, "the W&B project it logs into (with --wandb True)", c.NAME)


@dataclass
class LayersFlag(FlagGroup):
    layers: str = arg("all", "comma-separated layer indices, or all", c.LAYERS)


@dataclass
class NoiseFlag(FlagGroup):
    mask_ratio: str = arg("random", "noise on the base model's inputs: 'random' (the training process) or a fixed t",
                          c.MASK_RATIO)


@dataclass
class ScanFlags(NoiseFlag):
    """What the top-k scan keeps of every feature."""

    n_top: int = arg(50, "top-activating examples kept per feature", c.count(runs=("1_000_000_000",)))
    context_before: int = arg(20, "tokens of context before the activating token",
                             c.count(0, runs=("1_000_000_000",)))
    context_after: int = arg(10, "tokens of context after it (the model is bidirectional)", c.COUNT_OR_ZERO)
    n_quantile: int = arg(20, "activating examples spread over the activation range (half held out for scoring)",
                     c.COUNT_OR_ZERO)
    n_random: int = arg(20, "non-activating contexts per feature (half held out for scoring)", c.COUNT_OR_ZERO)
    checkpoint_every: int = arg(200, "save the scan's state at most every N batches (an interrupted scan resumes)",
                                c.COUNT)
    checkpoint_minutes: float = arg(10.0, "and only once this many minutes have passed since the last save "
                                          "(0: every N batches)", c.Range(0.0, 1e6))


@dataclass
class SamplingFlags(FlagGroup):
    """The prompts, and how the diffusion sampler unmasks their continuations."""

    prompt: list[str] = arg([], "a prompt (repeat the flag for several); a released model reads it as its tokenizer "
                                "encodes it, without BOS: a Base model continues plain text, an Instruct model "
                                "expects its chat template (--chat, or written out in the prompt)", c.TEXT)
    prompts_file: str = arg("", "a text file with one prompt per line", c.TEXT_FILE)
    chat: bool = arg(False, "a run made from a released Instruct model: each prompt becomes a user message in the "
                            "model's own chat template (from its folder), the assistant's turn opened")
    gen_length: int = arg(32, "tokens to generate after each prompt", c.COUNT)
    num_generate_steps: int = arg(32, "denoising steps", c.COUNT)
    block_length: Optional[int] = arg(None, "semi-autoregressive block length (this project's and LLaDA's samplers); "
                                            "default one block", c.COUNT)
    remasking: Literal["low_confidence", "random"] = arg("low_confidence", "which positions to commit each step (this "
                                                                           "project's and LLaDA's samplers)")
    temperature: float = arg(0.0, "sampling temperature (0: the most probable token)", c.Range(0.0, 100.0))
    top_k: int = arg(0, "sample among the k most probable tokens (0: off; this project's and Dream's samplers)",
                     c.COUNT_OR_ZERO)
    top_p: float = arg(1.0, "nucleus sampling mass (1: off; this project's and Dream's samplers)",
                       c.fraction(low_open=True))
    seed: int = arg(0, "random seed", c.SEED)
    max_seq_len: Optional[int] = arg(None, "longest prompt + continuation allowed (default: the run's train_seq_len, "
                                           "or the released model's stated maximum)", c.COUNT)
    sampler: Literal["auto", "diffusionlm", "llada", "dream"] = arg(
        "auto", "the sampler: auto (the model's own), diffusionlm (this project's, for its models), llada or dream "
                "(the released samplers, for a run made from LLaDA or Dream)")
    cfg_scale: float = arg(0.0, "LLaDA's sampler: classifier-free guidance scale (0: off)", c.Range(0.0, 1e6))
    alg: Literal["origin", "maskgit_plus", "topk_margin", "entropy"] = arg(
        "origin", "Dream's sampler: how it picks the positions to commit")
    alg_temp: float = arg(0.0, "Dream's sampler: 0 commits the most confident positions, > 0 samples them at this "
                               "temperature", c.Range(0.0, 100.0))
    eps: float = arg(1e-3, "Dream's sampler: the last of its timesteps linspace(1, eps, steps + 1)",
                     c.Range(0.0, 1.0))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sampler_config()  # validates the sampling flags

    def sampler_config(self) -> SamplerConfig:
        return SamplerConfig(gen_length=self.gen_length, steps=self.num_generate_steps, block_length=self.block_length,
                             remasking=self.remasking, temperature=self.temperature, top_k=self.top_k,
                             top_p=self.top_p, seed=self.seed, sampler=self.sampler, cfg_scale=self.cfg_scale,
                             alg=self.alg, alg_temp=self.alg_temp, eps=self.eps)

    def prompts(self) -> list[str]:
        """--prompt, then --prompts_file's lines; a few example prompts when neither is given."""
        prompts = list(self.prompt)
        if self.prompts_file:
            path = Path(self.prompts_file)
            if not path.is_file():
                raise UserError(f"--prompts_file {path} does not exist")
            prompts += [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return prompts or EXAMPLE_PROMPTS

    def model_prompts(self, config: dict) -> list[str]:
        """`prompts()`, each rendered in the run's chat template with --chat (a run made from a released model
        whose folder has one; anything else is refused in one line)."""
        prompts = self.prompts()
        if not self.chat:
            return prompts
        base = config.get(BASE_MODEL_KEY)
        if base is None:
            raise UserError("--chat: this run's model was trained here and has no chat template (the flag is for a "
                            "run made from a released Instruct model by python -m experiment.init_base)")
        template = chat_template(base["folder"])
        if template is None:
            raise UserError(f"--chat: {base['folder']} has no chat template (no chat_template in "
                            "tokenizer_config.json, no chat_template.jinja): a Base model continues plain text")
        tokens = special_tokens(base["folder"])
        return [render_chat(template, p, tokens) for p in prompts]

    def check_lengths(self, prompts: list[str], tok, run_len: int | None, adds_bos: bool) -> None:
        """Every prompt (with the BOS this project's sampler adds, `adds_bos`) and its continuation must fit
        --max_seq_len (default `run_len`: the training length, or the released model's stated maximum). The
        refusal names the prompt as typed (with --chat, `prompts` are their renderings)."""
        limit = self.max_seq_len or run_len
        if limit is None:
            raise UserError("the released model states no maximum sequence length: give --max_seq_len")
        for p, typed in zip(prompts, self.prompts(), strict=True):
            n = int(adds_bos) + len(tok.encode_prompt(p)) + self.gen_length
            if n > limit:
                raise UserError(f"prompt {typed[:40]!r}... needs {n} tokens with its continuation"
                                f"{' in the chat template' if self.chat else ''}, more than --max_seq_len {limit}")
