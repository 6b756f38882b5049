"""One denoising step's attribution graph, timed: the graph itself (every feature's input row, in batched
backward passes), pruning, total effects, and the whole step analysis (graph, interventions and scores)
as stage 6 runs it.

    python bench/graph_throughput.py              # the reference shape on every device: 12 layers, d=384,
                                                  # expansion 32, k 32, a 8-token prompt + 32 to generate
    python bench/graph_throughput.py --check      # also: the same graph built on the CPU, compared

Random weights (std 0.02) and tokens, half the continuation committed: the work has the shape of a real
step (every position has k active features per layer). Prints seconds and, on CUDA, peak memory.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CUDA as cuda, DEVICE as device, device_name, random_model  # noqa: E402
from interp.explanations.graph import build_graph, graph_scores, prune, total_effects  # noqa: E402
from interp.explanations.step_analysis import StepSettings, analyse_step  # noqa: E402
from model.sampler import SamplerConfig, generate  # noqa: E402
from model.transcoder import Transcoder, TranscoderConfig  # noqa: E402


def timed(fn, repeats: int):
    """(result, mean seconds) over `repeats` runs after one warm-up run."""
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_layers", type=int, default=12)
    p.add_argument("--model_dim", type=int, default=384)
    p.add_argument("--num_heads", type=int, default=6)
    p.add_argument("--n_vocab", type=int, default=50257)
    p.add_argument("--expansion_factor", type=int, default=32)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--prompt_len", type=int, default=8)
    p.add_argument("--gen_length", type=int, default=32)
    p.add_argument("--committed", type=int, default=1, help="tokens committed at the step (32 steps: 1 each)")
    p.add_argument("--graph_batch_size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3 if cuda else 1)
    p.add_argument("--check", action="store_true", help="build the same graph on the CPU too and compare")
    args = p.parse_args()
    model = random_model(args)  # seeded, std 0.02, on the device, frozen
    tcfg = TranscoderConfig(args.model_dim, args.expansion_factor * args.model_dim, args.k)
    transcoders = {layer: Transcoder(tcfg) for layer in range(args.num_layers)}
    mc = model.cfg
    gen = torch.randint(0, mc.n_vocab - 1, (args.gen_length,))
    gen[args.gen_length // 2:] = mc.mask_id
    tokens = torch.cat([torch.tensor([mc.bos_id]), torch.randint(0, mc.n_vocab - 1, (args.prompt_len,)), gen])
    first = 1 + args.prompt_len + args.gen_length // 2
    positions = list(range(first, first + args.committed))
    targets = torch.randint(0, mc.n_vocab - 1, (args.committed,)).tolist()
    cpu_copy = (copy.deepcopy(model).cpu(), copy.deepcopy(transcoders)) if args.check else None
    for tc in transcoders.values():
        tc.to(device).requires_grad_(False)
    x = tokens.to(device)
    print(f"device {device_name()}; {args.num_layers} layers, d={args.model_dim}, {tcfg.num_latents} latents, "
          f"k={args.k}; {len(tokens)} positions, {args.committed} committed token(s)", flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    (g, fz), t_graph = timed(lambda: build_graph(model, transcoders, x, positions, targets, args.graph_batch_size),
                             args.repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    print(f"graph: {g.adjacency.shape[0]:,} nodes ({g.n_features:,} features): {t_graph:.3f} s   "
          f"peak memory {peak:.2f} GiB", flush=True)
    pr, t_prune = timed(lambda: prune(g), args.repeats)
    _, t_effects = timed(lambda: total_effects(g), args.repeats)
    _, t_scores = timed(lambda: graph_scores(g), args.repeats)
    print(f"prune: {t_prune:.3f} s ({int(pr.node_mask.sum())} nodes, {pr.n_edges} edges kept)   "
          f"total effects: {t_effects:.3f} s   scores: {t_scores:.3f} s", flush=True)
    settings = StepSettings(graph_batch_size=args.graph_batch_size)
    res, t_step = timed(lambda: analyse_step(model, transcoders, x, positions, targets, settings), args.repeats)
    n_checks = len(res.checks)
    print(f"whole step (graph, pruning, {n_checks} single ablations, faithfulness with {settings.random_draws} random "
          f"draws, scores): {t_step:.3f} s; a 32-step generation: {32 * t_step:.0f} s", flush=True)
    prompt = tokens[1:1 + args.prompt_len].tolist()
    out, t_gen = timed(lambda: generate(model, [prompt], SamplerConfig(args.gen_length, args.gen_length)), 1)
    print(f"the generation itself ({args.gen_length} steps, {len(tokens)} positions): {t_gen:.3f} s; "
          f"{int((out.tokens == mc.mask_id).sum())} masks left", flush=True)
    if cpu_copy:  # the same graph on the CPU; nodes matched by (layer, position, feature): TopK's order differs
        cpu_model, cpu_tcs = cpu_copy
        ref, _ = build_graph(cpu_model, cpu_tcs, tokens, positions, targets, args.graph_batch_size)
        keys = lambda graph: {tuple(k): i for i, k in enumerate(graph.feature_nodes.tolist())}  # noqa: E731
        mine, theirs = keys(g), keys(ref)
        common = sorted(set(mine) & set(theirs))
        order_g = torch.tensor([mine[k] for k in common] + list(range(g.n_features, len(g.adjacency))))
        order_r = torch.tensor([theirs[k] for k in common] + list(range(ref.n_features, len(ref.adjacency))))
        a = g.adjacency.cpu()[order_g][:, order_g]
        b = ref.adjacency[order_r][:, order_r]
        scale = b.abs().max()
        print(f"{device.type} vs CPU graph: {len(common):,} feature nodes in both, {len(mine) - len(common)} only "
              f"on {device.type}, "
              f"{len(theirs) - len(common)} only on the CPU (TopK near-ties); on the common nodes max |difference| "
              f"{(a - b).abs().max() / scale:.2e} of the largest edge, target rows "
              f"{(a[-len(targets):] - b[-len(targets):]).abs().max() / scale:.2e}; target values "
              f"{g.target_values.tolist()} vs {ref.target_values.tolist()}")

if __name__ == "__main__":
    main()
