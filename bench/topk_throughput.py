"""Top-k scan throughput: the stage's own one-pass scan (its loader, its settings at the stage's defaults)
through the base model and every layer's transcoder.

    python bench/topk_throughput.py     # CUDA: 12 layers, d=384, expansion 32, k 32, 8 × 4,096 tokens; CPU: tiny

A run folder from bench.common.fake_run (random weights, the synthetic corpus), random transcoders. Prints the
first forward pass's time (compilation, first allocations) apart from the steady state's tokens/s, and the
cost of a forward pass early in the scan against late in it (a scan's work per batch should not grow with the
batches before it: the late/early ratio should stay near 1).
"""
from __future__ import annotations

import argparse
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
from experiment import open_base_run, use_compile  # noqa: E402
from interp.contexts.config import TopKConfig  # noqa: E402
from interp.contexts.scan import ScanJob, scan, scan_inputs  # noqa: E402
from interp.contexts.stage import scan_settings  # noqa: E402
from model.precision import autocast as autocast_for  # noqa: E402
from model.transcoder import Transcoder, TranscoderConfig  # noqa: E402


def timed_collect(ends: list[float]):
    """ScanJob.collect, recording when each forward pass's work ends (the device synchronised, for the clock
    only): the time between two ends is a whole forward pass, data, model, transcoders and state."""
    collect = ScanJob.collect

    def wrapper(self, batch):
        collect(self, batch)
        if cuda:
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape_args(p, transcoder=True)
    p.add_argument("--batches", type=int, default=60 if cuda else 40, help="scan batches (of --batch_size sequences)")
    args = p.parse_args()
    cached = load_compile_cache("topk")  # torch's compile artifacts from an earlier run, if any
    with tempfile.TemporaryDirectory() as tmp:
        run = fake_run(Path(tmp), args)
        cfg = TopKConfig(train_folder=str(run), train_seq_len=args.seq_len, batch_size=args.batch_size,
                         scan_batches=args.batches, device=device.type)
        folder, run_cfg, ckpt, model = open_base_run(cfg, device)
        layers = list(range(args.num_layers))
        loader, s = scan_inputs(scan_settings(cfg, ckpt.name, layers), run_cfg, cfg.checkpoint_every,
                                cfg.forward_batch_size)
        if use_compile(cfg.compile, device):
            model.compile_blocks()
        tcfg = TranscoderConfig(args.model_dim, args.expansion_factor * args.model_dim, args.k)
        torch.manual_seed(0)
        transcoders = {i: Transcoder(tcfg).to(device).requires_grad_(False) for i in layers}
        print(f"device {device_name()}; {args.num_layers} layers, d={args.model_dim}, {tcfg.num_latents} features "
              f"per layer, k={args.k}; {args.batches} batches of {args.batch_size}×{args.seq_len}; the stage's "
              f"defaults: n_top {s.n_top}, window {s.width}, sample {s.sample_size}", flush=True)
        ends: list[float] = []
        ScanJob.collect = timed_collect(ends)  # type: ignore[method-assign]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        scan(model, transcoders, loader, s, device, Path(tmp) / "state.pt", autocast_for(device))
        total = time.perf_counter() - t0
    times = [b - a for a, b in zip([t0, *ends], ends)]
    per_forward = len(times) and args.batches / len(times)
    tokens = args.batch_size * args.seq_len * per_forward  # per forward pass
    steady = times[1:]
    quarter = max(1, len(steady) // 4)
    early, late = sum(steady[:quarter]) / quarter, sum(steady[-quarter:]) / quarter
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    save_compile_cache("topk")
    print(f"first forward pass (compilation{' from the cache' if cached else ''}, allocations): "
          f"{times[0]:.2f} s; {len(times)} forward passes of "
          f"{per_forward:g} batches")
    print(f"steady state: {tokens * len(steady) / sum(steady):,.0f} tokens/s; the whole scan "
          f"{args.batches * args.batch_size * args.seq_len / total:,.0f} tokens/s in {total:.1f} s")
    print(f"per forward pass early (first {quarter} after the first) {early * 1e3:.1f} ms, late (last {quarter}) "
          f"{late * 1e3:.1f} ms: late/early {late / early:.2f}   peak memory {peak:.2f} GiB")


if __name__ == "__main__":
    main()
