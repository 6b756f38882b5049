"""Generation throughput: generated tokens/s at 16, 64 and 256 denoising steps, batch 1 and 32.

    python bench/generate_throughput.py            # CUDA: the reference shape (12 layers, d=384); CPU: tiny

An untrained model of the right shape does the same compute as a trained one. 256 tokens are
generated after a 32-token prompt; bf16 autocast on CUDA, as generate.py uses.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CUDA as cuda, DEVICE, device_name, random_model, shape_args  # noqa: E402
from model.precision import autocast as autocast_for  # noqa: E402
from model.sampler import SamplerConfig, generate  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape_args(p)
    p.add_argument("--gen_length", type=int, default=256 if cuda else 64)
    p.add_argument("--steps", default="16,64,256" if cuda else "16,64")
    p.add_argument("--batch_sizes", default="1,32" if cuda else "1,8")
    args = p.parse_args()
    model = random_model(args)
    autocast = autocast_for(DEVICE)
    print(f"device {device_name()}; {args.num_layers} layers, d={args.model_dim}; "
          f"{args.gen_length} tokens after a 32-token prompt")
    for B in (int(b) for b in args.batch_sizes.split(",")):
        prompts = [list(range(1, 33))] * B
        for steps in (int(s) for s in args.steps.split(",")):
            sampler = SamplerConfig(args.gen_length, steps)
            with autocast:
                generate(model, prompts, SamplerConfig(args.gen_length, 2))  # warm-up
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                generate(model, prompts, sampler)
                if cuda:
                    torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            print(f"batch {B:3d}, {steps:4d} steps: {B * args.gen_length / dt:10,.0f} generated tokens/s "
                  f"({dt * 1e3 / steps:.1f} ms per step)", flush=True)


if __name__ == "__main__":
    main()
