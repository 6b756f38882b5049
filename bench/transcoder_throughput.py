"""Transcoder training throughput: every layer's transcoder trained from one frozen base forward pass.

    python bench/transcoder_throughput.py      # CUDA: 12 layers, d=384, expansion 32, k 32, T=4096, B=8; CPU: tiny

Prints tokens/s (tokens of base-model input per second, all layers together) and peak memory. Random
weights and tokens: the compute is the same as for a trained model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CUDA as cuda, DEVICE as device, device_name, measure, random_model, shape_args  # noqa: E402
from model.distributed import Dist  # noqa: E402
from model.objective import train_noise  # noqa: E402
from model.precision import autocast as autocast_for  # noqa: E402
from model.transcoder import Transcoder, TranscoderConfig, Transcoders  # noqa: E402
from training.transcoders import LayerPairs, train_step  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape_args(p, transcoder=True)
    p.add_argument("--steps", type=int, default=20 if cuda else 5)
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    args = p.parse_args()
    model = random_model(args)
    mc, n = model.cfg, args.n_vocab
    layers = list(range(args.num_layers))
    tcfg = TranscoderConfig(args.model_dim, args.expansion_factor * args.model_dim, args.k)
    transcoders = Transcoders({str(i): Transcoder(tcfg) for i in layers}).to(device)
    optimizer = torch.optim.Adam(transcoders.parameters(), lr=1e-4)
    dead = {i: torch.zeros(tcfg.num_latents, dtype=torch.long, device=device) for i in layers}
    cfg = SimpleNamespace(dead_tokens=10_000_000, auxk_alpha=1 / 32)
    autocast = autocast_for(device)
    B, T = args.batch_size, args.seq_len

    def batches(step):
        tokens = torch.randint(0, n - 1, (B, T))
        tokens[:, 0] = mc.bos_id
        yield tokens, *train_noise(step * B + torch.arange(B).numpy(), step, B, 0, T)

    first = LayerPairs(model, layers, *(v.to(device) for v in next(batches(0))), autocast)
    scales = {i: float(y.pow(2).mean()) ** 0.5 for i, (x, y) in first.pairs.items()}  # as training does
    print(f"device {device_name()}; {args.num_layers} layers, d={args.model_dim}, "
          f"{tcfg.num_latents} latents, k={args.k}; {B}×{T} tokens per step", flush=True)
    fvus = []
    dt, peak = measure(lambda i: fvus.append(train_step(model, transcoders, layers, batches(i), 1, scales, dead, cfg,
                                                        optimizer, Dist(), autocast, device)), args.warmup, args.steps)
    fvu = fvus[-1]
    print(f"tokens/s: {args.steps * B * T / dt:,.0f}   step: {dt / args.steps * 1e3:.0f} ms   "
          f"peak memory: {peak:.2f} GiB   mean FVU {sum(fvu) / len(fvu):.3f}")


if __name__ == "__main__":
    main()
