"""Stage 2 (generate.py): step-by-step diffusion sampling from a trained checkpoint, or from the released
LLaDA or Dream model of a run made by experiment.init_base (with that model's own sampler, on the prompt's ids
as its tokenizer encodes them, no BOS added), every intermediate state printed and, with --output, written as
JSON. Its flags (`GenerateConfig`), its work, `main(cfg)` and
the console script `diffusion-interp-generate` (also what `python generate.py` and `python -m
interp.generation` run)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from core import checks as c, cli
from core.cli import arg
from core.files import write_json_atomic
from core.progress import progress
from experiment import RunFlags, SamplingFlags, ShapeFlags, load_run, resolve_device
from experiment.runs import run_config, run_seq_len
from model.precision import autocast
from model.sampler import generate

MASK_SHOWN = " _"  # how a still-masked position is printed


@dataclass
class GenerateConfig(SamplingFlags, ShapeFlags, RunFlags):
    """Generate continuations step by step and show every intermediate state."""

    batch_size: int = arg(16, "prompts per forward pass", c.count(1, 65_536))
    output: str = arg("", "write every state as JSON here", c.OUT_FILE)
    quiet: bool = arg(False, "print only the final texts")


def run_generation(cfg: GenerateConfig, model, tok, prompts: list[str]) -> list[dict]:
    """Generate for every prompt (in batches); one JSON-ready record per prompt."""
    records = []
    quiet = cfg.quiet or len(prompts) <= cfg.batch_size
    for i in progress(range(0, len(prompts), cfg.batch_size), desc="generating", show=not quiet):
        batch = prompts[i:i + cfg.batch_size]
        ids = [tok.encode_prompt(p) for p in batch]
        with autocast(next(model.parameters()).device):
            out = generate(model, ids, cfg.sampler_config())
        for b, (prompt, pid) in enumerate(zip(batch, ids)):
            states = [s[b].tolist() for s in out.states]
            records.append({
                "prompt": prompt, "prompt_ids": pid,
                "states": [{"step": s, "ids": st, "text": tok.decode(st, mask_text=MASK_SHOWN)}
                           for s, st in enumerate(states)],
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
    device = resolve_device(cfg.cuda, cfg.device)
    prompts = cfg.model_prompts(run_config(cfg.train_folder))  # --chat refused before the model loads
    config, model, tok, path = load_run(cfg.train_folder, cfg.checkpoint_name, device, cfg.shape_flags())
    rule = cfg.sampler_config().rule(model.cfg)
    cfg.check_lengths(prompts, tok, run_seq_len(config), adds_bos=rule == "diffusionlm")
    how = f"{cfg.alg} order" if rule == "dream" else f"{cfg.remasking} remasking"
    if not cfg.quiet:
        print(f"model: {path} ({model.n_params():,} parameters); {cfg.gen_length} tokens in {cfg.num_generate_steps} "
              f"steps, the {rule} sampler ({how}), temperature {cfg.temperature}\n")
    records = run_generation(cfg, model, tok, prompts)
    if cfg.chat:  # the prompt as typed beside its rendering in the chat template
        records = [{"typed_prompt": typed, **rec} for typed, rec in zip(cfg.prompts(), records)]
    for rec in records:
        print_record(rec, tok, cfg.quiet)
    if cfg.output:
        write_json_atomic(cfg.output, {"checkpoint": str(path), "sampler": dataclasses.asdict(cfg.sampler_config()),
                                       "mask_shown_as": MASK_SHOWN, "generations": records})
        if not cfg.quiet:
            print(f"wrote {cfg.output}")
    return records


def command(argv: Sequence[str] | None = None) -> None:
    """Parse the command line (`argv`, default sys.argv[1:]) and generate; a mistake is one line, exit 2."""
    cli.run(main, GenerateConfig, argv, description=GenerateConfig.__doc__)


if __name__ == "__main__":
    command()
