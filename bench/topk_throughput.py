"""Top-k scan throughput: tokens/s through the base model and every layer's transcoder, both passes.

    python bench/topk_throughput.py     # CUDA: 12 layers, d=384, expansion 32, k 32, 8 × 4,096 tokens; CPU: tiny

Random weights and random tokens in a temporary shard folder (no `datasets` needed). Prints tokens/s
(scanned tokens / wall time of the whole two-pass scan) and peak memory.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CUDA as cuda, DEVICE as device, device_name, random_model, shape_args  # noqa: E402
from data.loader import ShardLoader  # noqa: E402
from data.shards import write_shard  # noqa: E402
from interp.contexts.scan import ScanSettings, scan  # noqa: E402
from model.precision import autocast as autocast_for  # noqa: E402
from model.transcoder import Transcoder, TranscoderConfig  # noqa: E402


def fake_dataset(folder: Path, n_tokens: int, n_vocab: int, bos: int, vocab_size: int) -> None:
    rng = np.random.default_rng(0)
    shards = []
    for i, split in enumerate(("val", "train")):
        tokens = rng.integers(0, n_vocab - 1, size=n_tokens)
        tokens[rng.random(n_tokens) < 1e-3] = bos
        name = f"bench_{split}_{i:06d}.bin"
        write_shard(folder / name, tokens, vocab_size, 0, 1)
        shards.append({"file": name, "split": split, "n_tokens": n_tokens})
    (folder / "meta.json").write_text(json.dumps({"complete": True, "shards": shards, "labels": False}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape_args(p, transcoder=True)
    p.add_argument("--batches", type=int, default=20 if cuda else 4)
    args = p.parse_args()
    model = random_model(args)
    mc, n = model.cfg, args.n_vocab
    tcfg = TranscoderConfig(args.model_dim, args.expansion_factor * args.model_dim, args.k)
    transcoders = {i: Transcoder(tcfg).to(device) for i in range(args.num_layers)}
    autocast = autocast_for(device)
    n_tokens = args.batches * args.batch_size * args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        fake_dataset(Path(tmp), n_tokens + args.seq_len * args.batch_size, n, mc.bos_id, mc.vocab_size)
        loader = ShardLoader(tmp, "train", args.seq_len, args.batch_size)
        print(f"device {device_name()}; {args.num_layers} layers, d={args.model_dim}, "
              f"{tcfg.num_latents} features per layer, k={args.k}; {args.batches} batches of "
              f"{args.batch_size}×{args.seq_len}", flush=True)
        s = ScanSettings(n_batches=1, checkpoint_every=10**9)
        scan(model, transcoders, loader, s, device, Path(tmp) / "warm.pt", autocast)  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        s = ScanSettings(n_batches=args.batches, checkpoint_every=10**9)
        scan(model, transcoders, loader, s, device, Path(tmp) / "state.pt", autocast)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    print(f"scanned tokens/s (both passes): {n_tokens / dt:,.0f}   total {dt:.1f} s   peak memory: {peak:.2f} GiB")


if __name__ == "__main__":
    main()
