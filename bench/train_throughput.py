"""Training throughput of stage 1's own optimizer step (training.diffusion.train_step): masking, NELBO,
Muon + Adam, the batches made ahead in the background, the packing of micro-batches into forward passes.

    python bench/train_throughput.py                      # CUDA: the reference shape; CPU: a tiny one
    python bench/train_throughput.py --num_layers 12 --model_dim 384 --num_heads 6 --seq_len 4096 --batch_size 8

Builds a run folder with random weights and a prepared dataset (bench.common.fake_run) and the stage's Run
through its own `set_up`, at the bench's shape and the stage's defaults: one step is --batch_size sequences
in micro-batches of --micro_batch_size (the stage's --batch_size, 1 by default as on the reference command
line: --grad_acc_steps 8), packed into forward passes as the stage packs them (--forward_batch_size 0: up to
32,768 tokens per pass on CUDA), compiled where the stage compiles (CUDA). Prints the first step's time
(compilation included) apart from the steady-state tokens/s, MFU (model FLOPs per token = 6·N_matmul +
12·layers·d·T, over 989 TFLOP/s, the dense bf16 peak of an H100/H200) and peak memory.
"""
from __future__ import annotations

import argparse
import contextlib
import json
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
from experiment import CONFIG_FILE, use_compile  # noqa: E402
from model.distributed import Dist  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.diffusion import set_up, train_step  # noqa: E402

PEAK_FLOPS = 989e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape_args(p)
    p.add_argument("--micro_batch_size", type=int, default=1, help="the stage's --batch_size (divides --batch_size)")
    p.add_argument("--forward_batch_size", type=int, default=0, help="the stage's flag (0: its default)")
    p.add_argument("--steps", type=int, default=30 if cuda else 10, help="timed steps, after the first")
    p.add_argument("--warmup", type=int, default=3 if cuda else 1, help="untimed steps after the first")
    p.add_argument("--compile", choices=("default", "on", "off"), default="default", help="the stage's --compile")
    p.add_argument("--folder", type=Path, default=None, help="where the fake run is built (default: a temporary one)")
    args = p.parse_args()
    cached = load_compile_cache("train")  # torch's compile artifacts from an earlier run, if any
    if args.batch_size % args.micro_batch_size:
        p.error(f"--micro_batch_size {args.micro_batch_size} does not divide --batch_size {args.batch_size}")

    with contextlib.ExitStack() as stack:
        folder = args.folder or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        t0 = time.perf_counter()
        made = json.loads((fake_run(folder, args) / CONFIG_FILE).read_text())["train"]
        print(f"fake run: {time.perf_counter() - t0:.0f} s", flush=True)
        cfg = TrainConfig(
            dataset=made["dataset"], tokenizer=made["tokenizer"], synthetic_mb=made["synthetic_mb"],
            data_dir=made["data_dir"], experiments_dir=str(folder / "bench_runs"), device=str(device),
            compile={"default": None, "on": True, "off": False}[args.compile], num_layers=args.num_layers,
            num_heads=args.num_heads, model_dim=args.model_dim, train_seq_len=args.seq_len, val_seq_len=args.seq_len,
            val_tokens=args.seq_len, batch_size=args.micro_batch_size,
            grad_acc_steps=args.batch_size // args.micro_batch_size, forward_batch_size=args.forward_batch_size,
            train_steps=1 + args.warmup + args.steps, val_loss_every=0, save_every=0, save_model=False)
        run = set_up(cfg, None, Dist(), device, stack)
        stack.callback(run.close)
        n_matmul = run.model.n_params(matmul_only=True)
        flops_per_token = 6 * n_matmul + 12 * args.num_layers * args.model_dim * args.seq_len
        print(f"device {device_name()}; {args.num_layers} layers, d={args.model_dim}, {args.num_heads} heads, "
              f"T={args.seq_len}; {cfg.grad_acc_steps} micro-batches × {cfg.batch_size} sequences per step, "
              f"{run.group} micro-batch(es) per forward pass; {n_matmul / 1e6:.1f}M matmul params; "
              f"compiled: {use_compile(cfg.compile, device)}", flush=True)

        def synchronize() -> None:
            if cuda:
                torch.cuda.synchronize()

        t0 = time.perf_counter()
        sums = train_step(run, 0)
        first_loss = float(sums[0] / sums[2])  # waits for the device
        first = time.perf_counter() - t0
        for i in range(args.warmup):
            train_step(run, 1 + i)
        synchronize()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for i in range(args.steps):  # as the stage runs them between log lines: nothing read back
            sums = train_step(run, 1 + args.warmup + i)
        synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        tps = args.steps * run.tokens_per_step / dt
        save_compile_cache("train")
        print(f"first step (compilation{' from the cache' if cached else ''} included): {first:.1f} s, "
              f"loss {first_loss:.3f}")
        print(f"tokens/s: {tps:,.0f}   step: {dt / args.steps * 1e3:.1f} ms   "
              f"MFU: {tps * flops_per_token / PEAK_FLOPS:.1%}   peak memory: {peak:.2f} GiB   "
              f"final loss {float(sums[0] / sums[2]):.3f}")


if __name__ == "__main__":
    main()
