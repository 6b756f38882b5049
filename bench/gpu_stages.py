"""The six stage scripts as a user runs them, on one card, at the reference lines' shape with few steps, offline.

    python bench/gpu_stages.py                 # CUDA: the reference shape; elsewhere a tiny one (a check of the script)
    python bench/gpu_stages.py --steps 20 --explainer_shape small

Every stage runs its reference command line (../shared/DESIGN.md) with `--cuda 0` and fewer steps, as its own
process under a time limit, in one work folder (--work, default a temporary one; the logs go to $OUT/stages/ when
OUT is set). Nothing is downloaded: the data is the synthetic corpus tokenized with a byte-level BPE of exactly
gpt2's 50,257 ids (trained on random words, bench/fake_run.py), and the explainer is a randomly initialised T5 of
Flan-T5-XXL's shape saved with save_pretrained and loaded back by stage 5 through the same path as the real one.
A random explainer's descriptions come out empty, so stage 5 also runs the `tokens` baseline, whose
descriptions stage 6 explains with. The table gives each stage's wall time (compilation included), its steady
throughput where it logs one (the last interval of its metrics.jsonl), its headline lines, and how it ended.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_suite import run, table  # noqa: E402

CUDA = torch.cuda.is_available()
GPT2_VOCAB = 50_257
REFERENCE_SHAPE = ["--num_layers", "12", "--num_heads", "6", "--model_dim", "384"]
TINY_SHAPE = ["--num_layers", "2", "--num_heads", "2", "--model_dim", "64"]
# the T5 shapes of bench/explainer_throughput.py, by name
T5_SHAPES = {
    "xxl": dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_decoder_layers=24, num_heads=64),
    "small": dict(d_model=512, d_ff=1024, d_kv=64, num_layers=8, num_decoder_layers=8, num_heads=6),
    "tiny": dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4),
}


def stage_lines(work: Path, tokenizer: Path, explainer: Path, steps: int, scan_steps: int, tiny: bool,
                cuda: bool = CUDA, run_folder: str = "{run}",
                checkpoint: str = "{ckpt}") -> list[tuple[str, list[str]]]:
    """(stage script, its flags): the reference lines with --cuda 0 (or the CPU), `steps` training steps,
    `scan_steps` × 8 scanned batches, the offline data and explainer (stage 5 twice: the random explainer,
    then the `tokens` baseline that stage 6 uses). {run} and {ckpt} are filled in once
    stage 1 has made them."""
    shape = TINY_SHAPE if tiny else REFERENCE_SHAPE
    seq = "256" if tiny else "4096"
    device = ["--cuda", "0"] if cuda else ["--device", "cpu"]
    base = ["--train_folder", run_folder, "--checkpoint_name", checkpoint]
    loop = ["--save_model", "True", "--val_loss_every", str(steps), "--save_every", str(steps), "--log_every", "5"]
    data = ["--dataset", "synthetic", "--tokenizer", str(tokenizer), "--synthetic_mb", "1" if tiny else "8",
            "--data_dir", str(work / "data"), "--experiments_dir", str(work / "experiments")]
    sample = ["--max_seq_len", seq]
    topk = [*base, "--train_seq_len", seq, "--train_steps", str(scan_steps), "--grad_acc_steps", "8", *shape,
            "--save_model", "True", *device, "--val_loss_every", "1_000", "--save_every", "2_000"]
    small_describe = ["--max_features_per_layer", "4" if tiny else "32", "--n_score", "5", "--batch_size", "8" if tiny
                      else "64"]
    return [
        ("train_diffusion.py", ["--train_seq_len", seq, "--val_seq_len", seq, "--train_steps", str(steps),
                                "--grad_acc_steps", "8", *shape, *device, *loop, *data,
                                "--val_tokens", str(8 * int(seq))]),
        ("generate.py", [*base, *device, *shape, *sample]),
        ("train_transcoders.py", [*base, "--train_seq_len", seq, "--train_steps", str(steps), "--grad_acc_steps", "8",
                                  *shape, *device, *loop, "--val_tokens", str(8 * int(seq))]),
        ("get_topk_activations.py", topk),
        ("get_activation_descriptions.py", [*topk, "--explainer", str(explainer), *small_describe]),
        # a random explainer writes nothing usable (its descriptions come out empty), so stage 6 explains with
        # the `tokens` baseline's descriptions; its graphs, the GPU's work, are the same
        ("get_activation_descriptions.py", [*topk, "--explainer", "tokens"]),
        # one prompt and 8 denoising steps (the defaults: 4 prompts × 32 steps, a graph each)
        ("generate_descriptions.py", [*base, *device, *shape, *sample, "--prompt", "The capital of France is",
                                      "--num_generate_steps", "8", "--explainer", "tokens"]),
    ]


def make_explainer(folder: Path, shape: str) -> Path:
    """A randomly initialised T5 of `shape` (bf16 on CUDA) and a 32,000-id tokenizer trained on random words,
    saved with save_pretrained: stages 5 and 6 load it as they would load google/flan-t5-xxl."""
    if (folder / "config.json").exists():
        return folder
    import itertools
    import random
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    rng = random.Random(0)
    answers = ["yes no Yes No 0 1 2 3 4 5 6 7 8 9"] * 200  # the judge's answers must be tokens of their own
    words = (" ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))
                      for _ in range(100)) for _ in range(20_000))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=32_000 if shape != "tiny" else 512,
                                  special_tokens=["<pad>", "</s>", "<unk>"])
    tok.train_from_iterator(itertools.chain(answers, words), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = T5Config(vocab_size=len(fast), **T5_SHAPES[shape], feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False, decoder_start_token_id=fast.pad_token_id,
                      pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if CUDA else "cpu"):
        model = T5ForConditionalGeneration(config).to(torch.bfloat16 if CUDA else torch.float32)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    del model
    if CUDA:
        torch.cuda.empty_cache()
    return folder


def steady_throughput(paths: list[Path]) -> list[str]:
    """The first and the last logged tokens/s of each training stage's metrics.jsonl (the first interval holds
    the compilation, the last is the steady state)."""
    out = []
    for path in paths:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        speeds = [r["tokens_per_s"] for r in rows if r.get("event") == "train" and "tokens_per_s" in r]
        if speeds:
            out.append(f"tokens/s: {speeds[-1]:,.0f} steady (first log interval, with compilation: {speeds[0]:,.0f})")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", default=not CUDA, help="tiny shapes (the default on a CPU)")
    p.add_argument("--steps", type=int, default=None, help="training steps of stages 1 and 3 (default 30; tiny 10)")
    p.add_argument("--scan_steps", type=int, default=2, help="stage 4 scans this many × 8 batches")
    p.add_argument("--explainer_shape", choices=sorted(T5_SHAPES), default=None,
                   help="the random explainer's shape (default: xxl on CUDA, tiny elsewhere)")
    p.add_argument("--work", default="", help="work folder (default: a temporary one)")
    p.add_argument("--limit", type=int, default=300, help="time limit of each stage, seconds")
    args = p.parse_args()
    steps = args.steps or (10 if args.tiny else 30)
    logs = Path(os.environ["OUT"]) / "stages" if os.environ.get("OUT") else None
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        from bench.fake_run import sized_tokenizer

        t0 = time.perf_counter()
        tokenizer = sized_tokenizer(work / "tokenizer" / "tokenizer.json", 1317 if args.tiny else GPT2_VOCAB)
        explainer = make_explainer(work / "explainer", args.explainer_shape or ("tiny" if args.tiny else "xxl"))
        print(f"set-up (tokenizer, explainer): {time.perf_counter() - t0:.0f} s", flush=True)
        rows: list[dict] = []
        fill: dict[str, str] = {}
        for script, flags in stage_lines(work, tokenizer, explainer, steps, args.scan_steps, args.tiny):
            flags = [f.format(**fill) if "{" in f else f for f in flags]
            print(f"== {script} {' '.join(flags)}", flush=True)
            name = Path(script).stem + ("_tokens" if flags[-2:] == ["--explainer", "tokens"] else "")
            row = run(name, args.limit, [script, *flags], logs)
            if script == "train_diffusion.py":
                runs = sorted((work / "experiments").glob("*"))
                if not runs:
                    rows.append(row)
                    break
                fill = {"run": str(runs[-1]), "ckpt": f"state_step{steps:06d}.pt"}
            if script == "train_diffusion.py":
                row["lines"] += steady_throughput([Path(fill["run"]) / "metrics.jsonl"])
            if script == "train_transcoders.py":
                row["lines"] += steady_throughput([m for m in Path(fill["run"]).rglob("metrics.jsonl")
                                                   if m.parent != Path(fill["run"])])
            rows.append(row)
            print(f"stage {row['name']}: {row['status']}, {row['wall']:.0f} s" +
                  "".join(f"; {line}" for line in row["lines"]), flush=True)
        print()
        print(table(rows).replace("| benchmark |", "| stage |"))


if __name__ == "__main__":
    main()
