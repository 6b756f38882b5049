"""The released LLaDA-8B and Dream-7B at full size on one card, random weights: one scan batch, one transcoder
training step and one step graph each, timed, with peak memory.

    python bench/public_models_gpu.py --device cuda                  # full size, T=512, 4 layers, ×8, k 32
    python bench/public_models_gpu.py --device cuda --graph_seq_len 128
    python bench/public_models_gpu.py --device cpu --tiny            # the same code on tiny configs (a dry run)

Per family, the script writes the release's config.json (docs/notes/public-diffusion-lms.md §1; --tiny: the
release's flags at tiny shapes) and builds the ModelConfig from it through model.public_models.public_config,
so the loader's mapping is the one measured. The model is built on the meta device and materialised on the
device (bf16 on CUDA, float32 on the CPU) with random weights scaled by 1/sqrt(fan-in), so activations stay
finite. Random transcoders (fp32, as the stages keep them) sit on --layers (default: 4 layers spread over the
depth), --expansion_factor × d latents, top --k. The parts, each the stage's own code:

    scan        one scan batch of --batch_size × --seq_len tokens: interp.contexts.scan.ScanJob.run (stage 4's
                pass: the noised forward, every layer's codes folded into the top-k, sample, counts and pool)
    transcoder  one optimizer step of every layer's transcoder over --batch_size sequences of --seq_len:
                training.transcoders.train_step (stage 3's step, with its forward packing and fused Adam)
    graph       one denoising step's attribution graph at --graph_seq_len positions (default --seq_len), the
                second half masked, --committed of them committed: interp.explanations.graph.build_graph
                (stage 6's graph, at its default row batch)

The blocks run uncompiled (stages 3 and 4 compile them on CUDA: at this size compiling would take most of a
time limit). --tiny: 4-layer configs, T=32, k at most 8.

The tokens are random ids from the part of the vocabulary a step may predict (no data folder: the scan's and
the step's loader is a stand-in that serves them as data.loader.Batch). Each part is timed between
torch.cuda.synchronize calls, with the peak memory reset before it (the weights included; on the CPU none
is measured), after one untimed 16-token forward pass of each model (the device's lazy set-up). One line per
(family, part) as each part ends, then a markdown table. Parts run in the order scan and transcoder of each
family, then the graphs: a time limit that cuts the run short cuts the graphs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.loader import Batch as LoaderBatch  # noqa: E402
from experiment.packing import micro_batches_per_forward  # noqa: E402
from interp.contexts.scan import ScanJob, ScanSettings  # noqa: E402
from interp.explanations.graph import build_graph  # noqa: E402
from interp.explanations.step_analysis import StepSettings  # noqa: E402
from model.diffusion import DiffusionLM  # noqa: E402
from model.distributed import Dist  # noqa: E402
from model.objective import at_mask_ratio, train_noise  # noqa: E402
from model.precision import autocast as autocast_for  # noqa: E402
from model.public_models import LLADA_BOS, public_config  # noqa: E402
from model.released_configs import DREAM_7B, LLADA_8B, RELEASED  # noqa: E402
from model.transcoder import Transcoder, TranscoderConfig, Transcoders  # noqa: E402
from training.config import TranscoderTrainConfig  # noqa: E402
from training.transcoders import train_step  # noqa: E402

FULL = RELEASED  # the released config.json files
# the release's flags at tiny shapes (LLaDA plain multi-head, Dream 7 query heads per key/value head)
TINY = {
    "llada": {**LLADA_8B, "d_model": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 192,
              "vocab_size": 160, "embedding_size": 160, "mask_token_id": 150, "eos_token_id": 141,
              "pad_token_id": 141, "bos_token_id": 140},
    "dream": {**DREAM_7B, "hidden_size": 112, "num_hidden_layers": 4, "num_attention_heads": 14,
              "num_key_value_heads": 2, "intermediate_size": 296, "vocab_size": 192, "mask_token_id": 178,
              "bos_token_id": 171, "eos_token_id": 171, "pad_token_id": 171},
}
PARTS = ("scan", "transcoder", "graph")


def write_config(folder: Path, family: str, tiny: bool) -> Path:
    """A model folder holding only config.json (and LLaDA's generation_config.json, where its BOS is)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps((TINY if tiny else FULL)[family], indent=2))
    if family == "llada" and not tiny:
        (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": LLADA_BOS}))
    return folder


@torch.no_grad()
def materialise(folder: Path, device: torch.device, dtype: torch.dtype, seed: int = 0) -> DiffusionLM:
    """The folder's model built on the meta device, then allocated on `device` in `dtype` and filled with
    random weights: matrices N(0, 1/fan-in), the embedding N(0, 1), norm gains 1 + N(0, 0.1²), biases
    N(0, 0.02²). Frozen, in eval mode."""
    with torch.device("meta"):
        model = DiffusionLM(public_config(folder))
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "embed.weight":
            p.normal_(0, 1, generator=gen)
        elif name.endswith("norm.weight"):
            p.normal_(1, 0.1, generator=gen)
        elif name.endswith(".bias"):
            p.normal_(0, 0.02, generator=gen)
        else:
            p.normal_(0, p.shape[-1] ** -0.5, generator=gen)
    return model.eval().requires_grad_(False)


def text_ids(model: DiffusionLM) -> torch.Tensor:
    """The ids a step may commit: the tokenizer's, less those never predicted."""
    keep = torch.ones(model.cfg.text_size, dtype=torch.bool)
    keep[[i for i in model.cfg.never_predicted() if i < model.cfg.text_size]] = False
    return keep.nonzero()[:, 0]


class RandomTokens:
    """A stand-in for data.loader.ShardLoader (batch_size, seq_len, batch(i)): batch i is random `ids`,
    seeded by i, with the global slots i·B … i·B + B − 1."""

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int) -> None:
        self.ids, self.batch_size, self.seq_len = ids, batch_size, seq_len

    def batch(self, index: int) -> LoaderBatch:
        gen = torch.Generator().manual_seed(index)
        pick = torch.randint(len(self.ids), (self.batch_size, self.seq_len), generator=gen)
        slots = np.arange(index * self.batch_size, (index + 1) * self.batch_size)
        return LoaderBatch(self.ids[pick], None, slots)


def random_transcoders(model: DiffusionLM, layers: list[int], expansion: int, k: int, device) -> Transcoders:
    torch.manual_seed(0)
    d = model.cfg.model_dim
    return Transcoders({str(layer): Transcoder(TranscoderConfig(d, expansion * d, k)) for layer in layers}).to(device)


def scan_part(model, tcs: Transcoders, args, device, work: Path) -> dict:
    """One batch of stage 4's pass (ScanJob.run over a one-batch scan)."""
    loader = RandomTokens(text_ids(model), args.batch_size, args.seq_len)
    transcoders = {int(layer): tc.requires_grad_(False) for layer, tc in tcs.items()}
    job = ScanJob(model, transcoders, loader, ScanSettings(n_batches=1), device,  # type: ignore[arg-type]
                  work / "scan_state.pt", autocast_for(device), Dist())
    return {"run": lambda: job.run(0), "tokens": args.batch_size * args.seq_len}


def transcoder_part(model, tcs: Transcoders, args, device, work: Path) -> dict:
    """One optimizer step of stage 3 (train_step) over --batch_size sequences, packed as the stage packs them
    (its flags come from a TranscoderTrainConfig over the family's folder: a folder with a config.json)."""
    tcs.requires_grad_(True)
    layers = sorted(int(k) for k in tcs)
    cfg = TranscoderTrainConfig(train_folder=str(work / model.cfg.family), train_seq_len=args.seq_len, batch_size=1,
                                grad_acc_steps=args.batch_size, expansion_factor=args.expansion_factor, k=args.k)
    acc, T = args.batch_size, args.seq_len
    loader = RandomTokens(text_ids(model), 1, T)
    group = micro_batches_per_forward(0, 1, acc, T, device)
    optimizer = torch.optim.Adam(tcs.parameters(), lr=1e-4, fused=device.type == "cuda")
    dead = {layer: torch.zeros(tcs[str(layer)].cfg.num_latents, dtype=torch.long, device=device) for layer in layers}

    def micro_batches():
        for i in range(acc):
            b = loader.batch(i)
            yield b.tokens, *at_mask_ratio(train_noise(b.index, 0, acc, cfg.seed + 1, T), "random")

    def run() -> None:
        fvu = train_step(model, tcs, layers, micro_batches(), acc, dict.fromkeys(layers, 1.0), dead, cfg, optimizer,
                         Dist(), autocast_for(device), device, group=group)
        if not torch.isfinite(fvu).all():
            raise RuntimeError(f"the transcoder step's FVU is not finite: {fvu.tolist()}")
    return {"run": run, "tokens": acc * T}


def graph_part(model, tcs: Transcoders, args, device, work: Path) -> dict:
    """Stage 6's graph of one step: --graph_seq_len positions, the second half masked, --committed committed."""
    T = args.graph_seq_len or args.seq_len
    ids = text_ids(model)
    gen = torch.Generator().manual_seed(1)
    tokens = ids[torch.randint(len(ids), (T,), generator=gen)]
    tokens[T // 2:] = model.cfg.mask_id
    positions = list(range(T // 2, T // 2 + args.committed))
    targets = ids[torch.randint(len(ids), (args.committed,), generator=gen)].tolist()
    transcoders = {int(layer): tc.requires_grad_(False) for layer, tc in tcs.items()}
    out: dict = {"tokens": 0, "T": T}

    def run() -> None:
        g, _ = build_graph(model, transcoders, tokens.to(device), positions, targets, StepSettings().graph_batch_size)
        if not torch.isfinite(g.adjacency).all():
            raise RuntimeError("the graph's adjacency is not finite")
        out["detail"] = f"{g.adjacency.shape[0]:,} nodes ({g.n_features:,} features), {args.committed} committed"
    out["run"] = run
    return out


PART_FNS = {"scan": scan_part, "transcoder": transcoder_part, "graph": graph_part}


def timed(device: torch.device, fn) -> tuple[float, float]:
    """(seconds, peak GiB since the start; nan on the CPU) of `fn()`, the device synchronised around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return seconds, torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def spread_layers(n: int, num_layers: int) -> list[int]:
    """n layers spread evenly from the first to the last (all of them when there are no more than n)."""
    if n >= num_layers:
        return list(range(num_layers))
    return sorted({round(i * (num_layers - 1) / max(1, n - 1)) for i in range(n)})


def row_line(r: dict) -> str:
    peak = f"{r['peak']:.2f} GiB" if math.isfinite(r["peak"]) else "n/a (CPU)"
    speed = f", {r['tokens'] / r['seconds']:,.0f} tokens/s" if r["tokens"] else ""
    return (f"public {r['family']} {r['part']} (T={r['T']}): {r['seconds']:.2f} s, peak memory {peak}{speed}"
            + (f"; {r['detail']}" if r.get("detail") else ""))


def table(rows: list[dict]) -> str:
    out = ["| model | part | T | seconds | peak GiB | tokens per second |", "|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak']:.2f}" if math.isfinite(r["peak"]) else "–"
        speed = f"{r['tokens'] / r['seconds']:,.0f}" if r["tokens"] else "–"
        out.append(f"| {r['family']} | {r['part']} | {r['T']} | {r['seconds']:.2f} | {peak} | {speed} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny configs with the release's flags (a dry run)")
    p.add_argument("--families", default="llada,dream")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default 512; tiny 32)")
    p.add_argument("--graph_seq_len", type=int, default=0, help="the graph's positions (default: --seq_len)")
    p.add_argument("--batch_size", type=int, default=8, help="sequences of the scan batch and the transcoder step")
    p.add_argument("--layers", type=int, default=4, help="transcoders on this many layers, spread over the depth")
    p.add_argument("--expansion_factor", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--committed", type=int, default=4, help="tokens the graphed step commits")
    args = p.parse_args()
    args.seq_len = args.seq_len or (32 if args.tiny else 512)
    if args.tiny:
        args.k = min(args.k, 8)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    families = [f for f in args.families.split(",") if f]
    parts = [x for x in args.parts.split(",") if x]
    if device.type == "cuda":
        print(f"device {torch.cuda.get_device_name(device)}", flush=True)
    rows: list[dict] = []
    order = [(f, x) for f in families for x in ("scan", "transcoder") if x in parts]
    order += [(f, "graph") for f in families if "graph" in parts]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        held: tuple[str, DiffusionLM, Transcoders] | None = None
        for family, part in order:
            if held is None or held[0] != family:
                held = model = tcs = None  # the last family's weights go before the next one's come
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                t0 = time.perf_counter()
                model = materialise(write_config(work / family, family, args.tiny), device, dtype)
                layers = spread_layers(args.layers, model.cfg.num_layers)
                held = (family, model, random_transcoders(model, layers, args.expansion_factor, args.k, device))
                with torch.no_grad(), autocast_for(device):  # untimed: the device's lazy set-up, first kernels
                    model(text_ids(model)[:16].to(device)[None])
                print(f"{family}: {model.n_params():,} parameters in {dtype}, transcoders on layers "
                      f"{layers} (×{args.expansion_factor}, k {args.k}), materialised in "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
            _, model, tcs = held
            spec = PART_FNS[part](model, tcs, args, device, work)
            seconds, peak = timed(device, spec["run"])
            rows.append({"family": family, "part": part, "T": spec.get("T", args.seq_len), "seconds": seconds,
                         "peak": peak, "tokens": spec["tokens"], "detail": spec.get("detail", "")})
            print(row_line(rows[-1]), flush=True)
            spec = None  # the part's state (the scan's buffers, the optimizer's moments) goes before the next part
            tcs.zero_grad(set_to_none=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
