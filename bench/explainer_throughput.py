"""Explainer throughput: descriptions/s and detection judgements/s for a model of Flan-T5-XXL's shape.

    python bench/explainer_throughput.py                 # CUDA: random weights, Flan-T5-XXL's exact shape, bf16
    python bench/explainer_throughput.py --compare       # CPU: Flan-T5-small's shape; --compare: the levers
    python bench/explainer_throughput.py --tiny          # a tiny T5 (a quick check of the script)

No weights are downloaded: a randomly initialised T5 of the same shape does the same compute. Each
description is a batched greedy generation of exactly --new_tokens tokens (EOS suppressed) from
--prompt_tokens-token prompts; a judgement is one encoder pass over --judge_tokens tokens plus one
decoder step (model.explainer.Explainer.yes_probability's work).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiment import resolve_device  # noqa: E402
from model.precision import describe  # noqa: E402

XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_decoder_layers=24, num_heads=64,
           feed_forward_proj="gated-gelu", tie_word_embeddings=False)
SMALL = dict(vocab_size=32128, d_model=512, d_ff=1024, d_kv=64, num_layers=8, num_decoder_layers=8, num_heads=6,
             feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # Flan-T5-small's shape
TINY = dict(vocab_size=512, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--judge_batch_size", type=int, default=256)
    p.add_argument("--prompt_tokens", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=20)
    p.add_argument("--judge_tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compare", action="store_true", help="also time the levers against plain transformers")
    p.add_argument("--features_per_call", type=int, default=32, help="features whose questions share a judge call")
    p.add_argument("--n_score", type=int, default=10, help="held-out contexts per class (4 × n_score questions)")
    args = p.parse_args()
    device = resolve_device()  # the stages' default: the first GPU when there is one
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = TINY if args.tiny else XXL if cuda else SMALL
    with torch.device(device):
        model = T5ForConditionalGeneration(T5Config(**shape, decoder_start_token_id=0, pad_token_id=0,
                                                    eos_token_id=1)).to(dtype).eval()
    V = shape["vocab_size"]
    B, J = (args.batch_size, args.judge_batch_size) if cuda else (8, 16)
    print(f"device {describe(device)}; T5 d_model={shape['d_model']}, "
          f"{shape['num_layers']}+{shape['num_decoder_layers']} layers, {dtype}", flush=True)

    def timed(fn):
        fn()  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.rounds

    prompts = torch.randint(2, V, (B, args.prompt_tokens), device=device)
    mask = torch.ones_like(prompts)
    gen = lambda: model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=args.new_tokens,  # noqa: E731
                                 min_new_tokens=args.new_tokens, do_sample=False, num_beams=1)
    with torch.no_grad():
        dt = timed(gen)
        print(f"descriptions/s: {B / dt:,.1f} (batch {B}, {args.prompt_tokens}-token prompts, "
              f"{args.new_tokens} new tokens)")
        judge_in = torch.randint(2, V, (J, args.judge_tokens), device=device)
        start = torch.zeros((J, 1), dtype=torch.long, device=device)
        dt = timed(lambda: model(input_ids=judge_in, attention_mask=torch.ones_like(judge_in), decoder_input_ids=start))
        print(f"judgements/s: {J / dt:,.1f} (batch {J}, {args.judge_tokens}-token inputs, one decoder step)")
        if args.compare:
            compare_levers(model, device, V, args, timed, J if cuda else 16)
    if cuda:
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def judge_lengths(n_features: int, per_feature: int, seed: int = 0) -> list[list[int]]:
    """Prompt lengths of a stage's judge questions: per feature, detection and fuzzing prompts of 70–150
    tokens (a description, a 31-token window and the template; marks make fuzzing's longer)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(70, 151, (per_feature,), generator=g).tolist() for _ in range(n_features)]


def run_judge(model, device, V: int, groups: list[list[int]], batch: int) -> int:
    """Judge every group's prompts: each group on its own (one call per feature: the plain path) when
    `groups` holds one feature each, or all together; sorted by length and cut into batches, as
    interp.descriptions.stage.batched does. Returns the number of judgements."""
    n = 0
    for lengths in groups:
        order = sorted(lengths)
        for i in range(0, len(order), batch):
            chunk = order[i:i + batch]
            width = max(chunk)
            ids = torch.randint(2, V, (len(chunk), width), device=device)
            mask = (torch.arange(width, device=device)[None] < torch.tensor(chunk, device=device)[:, None]).long()
            start = torch.zeros((len(chunk), 1), dtype=torch.long, device=device)
            model(input_ids=ids, attention_mask=mask, decoder_input_ids=start)
            n += len(chunk)
    return n


def compare_levers(model, device, V: int, args, timed, batch: int) -> None:
    """The explainer's levers against plain `transformers`, on the same model in the same run."""
    feats = judge_lengths(args.features_per_call, 4 * args.n_score)
    per_feature = sum(map(len, feats))
    plain = timed(lambda: run_judge(model, device, V, feats, batch))
    together = timed(lambda: run_judge(model, device, V, [[x for f in feats for x in f]], batch))
    print(f"judge, one call per feature (plain): {per_feature / plain:,.1f} judgements/s")
    print(f"judge, all questions of {args.features_per_call} features per call (this project): "
          f"{per_feature / together:,.1f} judgements/s, ratio {plain / together:.2f}×")
    B = 8 if device.type == "cpu" else args.batch_size
    prompts = torch.randint(2, V, (B, args.prompt_tokens), device=device)
    mask = torch.ones_like(prompts)

    def gen(**kw):
        return model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, num_beams=1, **kw)

    a, b = gen(), gen(cache_implementation="static")
    dynamic, static = timed(gen), timed(lambda: gen(cache_implementation="static"))
    print(f"generation, dynamic cache (plain): {B / dynamic:,.1f} descriptions/s; static cache"
          f"{' (compiled by transformers on CUDA)' if device.type == 'cuda' else ''}: {B / static:,.1f}, "
          f"ratio {dynamic / static:.2f}×; same tokens: {torch.equal(a, b)}")


if __name__ == "__main__":
    main()
