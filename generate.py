"""Stage 2: step-by-step diffusion sampling from a trained checkpoint.

    python generate.py --train_folder experiments/X --checkpoint_name state_step020000.pt --cuda 1 \\
        --num_layers 12 --num_heads 6 --model_dim 384 --max_seq_len 4_096
    python generate.py --train_folder experiments/X --checkpoint_name latest --device cpu \\
        --prompt "The capital of France is" --gen_length 8 --num_generate_steps 8 --output gen.json
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import cli
from cli import UserError, arg
from experiment import RunFlags, ShapeFlags

EXAMPLE_PROMPTS = ["The capital of France is", "Once upon a time,", "The chemical symbol for oxygen is",
                   "Photosynthesis is the process by which"]
MASK_SHOWN = " _"  # how a still-masked position is printed


@dataclass
class GenerateConfig(ShapeFlags, RunFlags):
    """Generate continuations step by step and show every intermediate state."""

    prompt: list[str] = arg([], "a prompt (repeat the flag for several)")
    prompts_file: str = arg("", "a text file with one prompt per line")
    gen_length: int = arg(32, "tokens to generate after each prompt")
    num_generate_steps: int = arg(32, "denoising steps")
    block_length: Optional[int] = arg(None, "semi-autoregressive block length (LLaDA); default one block")
    remasking: Literal["low_confidence", "random"] = arg("low_confidence", "which positions to commit each step")
    temperature: float = arg(0.0, "sampling temperature (0: the most probable token)")
    top_k: int = arg(0, "sample among the k most probable tokens (0: off)")
    top_p: float = arg(1.0, "nucleus sampling mass (1: off)")
    seed: int = arg(0, "random seed")
    batch_size: int = arg(16, "prompts per forward pass")
    max_seq_len: Optional[int] = arg(None, "longest prompt + continuation allowed (default: the run's train_seq_len)")
    output: str = arg("", "write every state as JSON here")
    quiet: bool = arg(False, "print only the final texts")

    def __post_init__(self) -> None:
        RunFlags.__post_init__(self)
        cli.require_positive(self, "batch_size")
        self.sampler()  # validates the sampling flags

    def sampler(self):
        from model.sampler import SamplerConfig

        return SamplerConfig(self.gen_length, self.num_generate_steps, self.block_length, self.remasking,
                             self.temperature, self.top_k, self.top_p, self.seed)


def read_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompt)
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts_file {path} does not exist")
        prompts += [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts or EXAMPLE_PROMPTS


def run_generation(cfg: GenerateConfig, model, tok, prompts: list[str]) -> list[dict]:
    """Generate for every prompt (in batches); one JSON-ready record per prompt."""
    from tqdm import tqdm

    from model.precision import autocast
    from model.sampler import generate

    records = []
    for i in tqdm(range(0, len(prompts), cfg.batch_size), desc="generating", disable=cfg.quiet or len(prompts) <= cfg.batch_size):
        batch = prompts[i:i + cfg.batch_size]
        ids = [tok.encode(p) for p in batch]
        with autocast(next(model.parameters()).device):
            out = generate(model, ids, cfg.sampler())
        for b, (prompt, pid) in enumerate(zip(batch, ids)):
            states = [s[b].tolist() for s in out.states]
            records.append({
                "prompt": prompt, "prompt_ids": pid,
                "states": [{"step": s, "ids": st, "text": tok.decode(st, mask_text=MASK_SHOWN)} for s, st in enumerate(states)],
                "committed_at": out.committed_at[b].tolist(), "token_probs": out.probs[b].tolist(),
                "completion_ids": states[-1], "completion": tok.decode(states[-1]),
            })
    return records


def print_record(rec: dict, tok, quiet: bool) -> None:
    if quiet:
        print(rec["prompt"] + rec["completion"])
        return
    print(f"input: {rec['prompt']}")
    for state in rec["states"][1:]:
        print(f"iteration: {state['step']}")
        print(f"        continuation={rec['prompt']}{state['text']}")
    print(f"final: {rec['prompt']}{rec['completion']}\n")


def main(cfg: GenerateConfig) -> list[dict]:
    from experiment import load_run, resolve_device, write_json_atomic

    device = resolve_device(cfg.cuda, cfg.device)
    config, model, tok, path = load_run(cfg.train_folder, cfg.checkpoint_name, device, cfg.shape_flags())
    prompts = read_prompts(cfg)
    limit = cfg.max_seq_len or config["train"]["train_seq_len"]
    for p in prompts:
        n = 1 + len(tok.encode(p)) + cfg.gen_length
        if n > limit:
            raise UserError(f"prompt {p[:40]!r}... needs {n} tokens with its continuation, more than --max_seq_len {limit}")
    if not cfg.quiet:
        print(f"model: {path} ({model.n_params():,} parameters); {cfg.gen_length} tokens in {cfg.num_generate_steps} "
              f"steps, {cfg.remasking} remasking, temperature {cfg.temperature}\n")
    records = run_generation(cfg, model, tok, prompts)
    for rec in records:
        print_record(rec, tok, cfg.quiet)
    if cfg.output:
        write_json_atomic(cfg.output, {"checkpoint": str(path), "sampler": dataclasses.asdict(cfg.sampler()),
                                       "mask_shown_as": MASK_SHOWN, "generations": records})
        if not cfg.quiet:
            print(f"wrote {cfg.output}")
    return records


if __name__ == "__main__":
    cli.run(main, GenerateConfig, description=GenerateConfig.__doc__)
