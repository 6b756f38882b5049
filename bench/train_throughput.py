"""Training throughput of the real objective (masking, NELBO, Muon + Adam), on random tokens.

    python bench/train_throughput.py                      # CUDA: the reference shape; CPU: a tiny one
    python bench/train_throughput.py --num_layers 12 --model_dim 384 --num_heads 6 --seq_len 4096 --batch_size 8

Prints tokens/s, MFU (model FLOPs per token = 6·N_matmul + 12·layers·d·T, over 989 TFLOP/s, the dense
bf16 peak of an H100/H200) and peak memory. Needs no dataset (the GPU image has no `datasets`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CUDA as cuda, DEVICE as device, device_name, measure, random_model, shape_args  # noqa: E402
from model.distributed import Dist  # noqa: E402
from model.objective import train_noise  # noqa: E402
from model.optim import build_optimizers  # noqa: E402
from model.precision import autocast as autocast_for  # noqa: E402
from training.diffusion import accumulate_gradients  # noqa: E402

PEAK_FLOPS = 989e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape_args(p)
    p.add_argument("--grad_acc_steps", type=int, default=1)
    p.add_argument("--doc_len", type=int, default=1000, help="mean document length (BOS spacing)")
    p.add_argument("--steps", type=int, default=30 if cuda else 10)
    p.add_argument("--warmup", type=int, default=5 if cuda else 2)
    p.add_argument("--compile", type=int, default=int(cuda))
    args = p.parse_args()

    model = random_model(args, frozen=False)  # the real initialisation: it trains
    cfg = model.cfg
    if args.compile:
        for block in model.blocks:
            block.compile()
    optimizers = build_optimizers(model, 0.02, 0.3, 0.008)
    autocast = autocast_for(device)
    B, T, acc = args.batch_size, args.seq_len, args.grad_acc_steps
    gen = torch.Generator().manual_seed(0)

    def batches(step):
        for micro in range(acc):
            tokens = torch.randint(0, args.n_vocab - 1, (B, T), generator=gen)
            tokens[torch.rand(B, T, generator=gen) < 1 / args.doc_len] = cfg.bos_id
            tokens[:, 0] = cfg.bos_id
            slots = (step * acc + micro) * B + torch.arange(B).numpy()
            yield tokens, *train_noise(slots, step, acc * B, 0, T)

    n_matmul = model.n_params(matmul_only=True)
    flops_per_token = 6 * n_matmul + 12 * args.num_layers * args.model_dim * T
    print(f"device {device_name()}; {args.num_layers} layers, d={args.model_dim}, "
          f"{args.num_heads} heads, T={T}, {B} sequences × {acc} micro-batches; {n_matmul / 1e6:.1f}M matmul params; "
          f"compile={bool(args.compile)}", flush=True)
    tokens_per_step = B * T * acc
    losses = []

    def step(i):
        sums = accumulate_gradients(model, batches(i), acc, device, autocast, Dist())
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(float(sums[0] / sums[2]))
        if i < args.warmup:
            print(f"warm-up step {i}: loss {losses[-1]:.3f}", flush=True)

    dt, peak = measure(step, args.warmup, args.steps)
    tps = args.steps * tokens_per_step / dt
    print(f"tokens/s: {tps:,.0f}   step: {dt / args.steps * 1e3:.1f} ms   "
          f"MFU: {tps * flops_per_token / PEAK_FLOPS:.1%}   peak memory: {peak:.2f} GiB   final loss {losses[-1]:.3f}")


if __name__ == "__main__":
    main()
