"""Transcoder training throughput: the stage's own optimizer step, every layer's transcoder trained from one
frozen base pass per --forward_batch_size.

    python bench/transcoder_throughput.py      # CUDA: 12 layers, d=384, expansion 32, k 32, 8 × 4096 tokens; CPU: tiny

Builds a run folder with random weights (bench.common.fake_run) and the stage's Run through its own `set_up`,
so the step is the stage's: its compile setting (losses and base blocks compiled on CUDA), its AuxK decision
(off until a latent has been silent for --dead_tokens tokens), its packing and its optimizer. One step is
--batch_size micro-batches of one sequence (as the reference command line: --grad_acc_steps 8). Prints the
first step's time (compilation included) apart from the steady-state tokens/s (tokens of base-model input per
second, all layers together) and the peak memory.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    CUDA as cuda,
    DEVICE as device,
    device_name,
    fake_run,
    load_compile_cache,
    save_compile_cache,
    shape_args,
)
from model.distributed import Dist  # noqa: E402
from model.precision import autocast as autocast_for  # noqa: E402
from training.config import TranscoderTrainConfig  # noqa: E402
from training.transcoders import any_dead, optimizer_step, set_up  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape_args(p, transcoder=True)
    p.add_argument("--steps", type=int, default=20 if cuda else 5, help="timed steps, after the first")
    p.add_argument("--warmup", type=int, default=2 if cuda else 1, help="untimed steps after the first")
    p.add_argument("--dead_tokens", type=int, default=10_000_000, help="the stage's flag (1: AuxK from step 2 on)")
    p.add_argument("--forward_batch_size", type=int, default=0, help="the stage's flag (0: its default)")
    p.add_argument("--compile", choices=("default", "on", "off"), default="default", help="the stage's --compile")
    p.add_argument("--folder", type=Path, default=None, help="where the fake run is built (default: a temporary one)")
    args = p.parse_args()
    cached = load_compile_cache("transcoders")  # torch's compile artifacts from an earlier run, if any
    with contextlib.ExitStack() as stack:
        folder = args.folder or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        t0 = time.perf_counter()
        run = fake_run(folder, args)
        print(f"fake run: {time.perf_counter() - t0:.0f} s", flush=True)
        cfg = TranscoderTrainConfig(
            train_folder=str(run), device=str(device), train_seq_len=args.seq_len, batch_size=1,
            grad_acc_steps=args.batch_size, forward_batch_size=args.forward_batch_size,
            expansion_factor=args.expansion_factor, k=args.k, dead_tokens=args.dead_tokens,
            train_steps=1 + args.warmup + args.steps, val_loss_every=0, save_every=0, save_model=False,
            val_tokens=args.seq_len, overwrite=True,
            compile={"default": None, "on": True, "off": False}[args.compile])
        r, _ = set_up(cfg, Dist(), device, stack)
        assert r is not None
        autocast = autocast_for(device)
        print(f"device {device_name()}; {args.num_layers} layers, d={args.model_dim}, "
              f"{args.expansion_factor * args.model_dim} latents, k={args.k}; {args.batch_size}×{args.seq_len} tokens "
              f"per step, {r.group} micro-batch(es) per forward pass; compiled: {r.compiled}", flush=True)

        def step(index: int) -> list[float]:
            fvu = optimizer_step(r, index, autocast).tolist()  # reading the FVU waits for the device
            if cuda:
                torch.cuda.synchronize()
            return fvu

        t0 = time.perf_counter()
        step(0)
        first = time.perf_counter() - t0
        for i in range(args.warmup):
            step(1 + i)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        auxk = []
        for i in range(args.steps):
            auxk.append(any_dead(r.dead, cfg.dead_tokens))  # the step's own decision
            fvu = step(1 + args.warmup + i)
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        save_compile_cache("transcoders")
        print(f"first step (compilation{' from the cache' if cached else ''} included): {first:.1f} s")
        print(f"tokens/s: {args.steps * args.batch_size * args.seq_len / dt:,.0f}   "
              f"step: {dt / args.steps * 1e3:.0f} ms   peak memory: {peak:.2f} GiB   "
              f"mean FVU {sum(fvu) / len(fvu):.3f}   AuxK in {sum(auxk)} of the {args.steps} timed steps")


if __name__ == "__main__":
    main()
