"""What the benchmark scripts share: the shape flags (the reference shape on CUDA, a tiny one on the
CPU), the model config for a vocabulary size, a randomly initialised model."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiment import resolve_device  # noqa: E402
from model.diffusion import DiffusionLM, ModelConfig  # noqa: E402
from model.precision import describe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMPILE_CACHE = ROOT / ".cache" / "compile"  # git-ignored; the device tool can carry it to a bare card
DEVICE = resolve_device()  # the stages' own default: the first GPU when there is one, else the CPU
CUDA = DEVICE.type == "cuda"


def shape_args(p: argparse.ArgumentParser, transcoder: bool = False) -> None:
    p.add_argument("--num_layers", type=int, default=12 if CUDA else 2)
    p.add_argument("--model_dim", type=int, default=384 if CUDA else 64)
    p.add_argument("--num_heads", type=int, default=6 if CUDA else 2)
    p.add_argument("--seq_len", type=int, default=4096 if CUDA else 256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--n_vocab", type=int, default=50257 if CUDA else 1317, help="text vocabulary (gpt2: 50257)")
    if transcoder:
        p.add_argument("--expansion_factor", type=int, default=32 if CUDA else 8)
        p.add_argument("--k", type=int, default=32 if CUDA else 8)


def model_config(args) -> ModelConfig:
    n = args.n_vocab
    return ModelConfig(n_vocab=n, vocab_size=(n + 2 + 63) // 64 * 64, mask_id=n, pad_id=n + 1, bos_id=n - 1,
                       num_layers=args.num_layers, num_heads=args.num_heads, model_dim=args.model_dim)


def random_model(args, frozen: bool = True) -> DiffusionLM:
    """Random weights everywhere (no zero-initialised projections), so the work is not trivially sparse."""
    torch.manual_seed(0)
    model = DiffusionLM(model_config(args)).to(DEVICE)
    if frozen:
        model.eval().requires_grad_(False)
        for prm in model.parameters():
            torch.nn.init.normal_(prm, std=0.02)
    return model


def device_name() -> str:
    return describe(DEVICE)


def measure(step, warmup: int, steps: int) -> tuple[float, float]:
    """Run `step(i)` for warm-up then timed steps; (seconds of the timed steps, peak GiB on CUDA or nan)."""
    for i in range(warmup + steps):
        if i == warmup:
            if CUDA:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        step(i)
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")


def fake_run(folder: Path, args, seq_len: int | None = None) -> Path:
    """A run folder the stages open, at the bench shape `args`, with random weights (bench/fake_run.py)."""
    from bench.fake_run import fake_run as make

    return make(folder, args, seq_len)


def _cache_file(name: str) -> Path:
    return COMPILE_CACHE / f"{name}-torch{torch.__version__}-{DEVICE.type}.bin"


def load_compile_cache(name: str) -> bool:
    """Load torch's compile artifacts saved by an earlier run of benchmark `name` (torch.compiler's portable
    cache: a bare machine then skips the slow part of compiling). Whether there were any."""
    path = _cache_file(name)
    if not path.exists():
        return False
    torch.compiler.load_cache_artifacts(path.read_bytes())
    return True


def save_compile_cache(name: str) -> None:
    """Save what this process compiled, for `load_compile_cache` next time."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is not None:
        _cache_file(name).parent.mkdir(parents=True, exist_ok=True)
        _cache_file(name).write_bytes(artifacts[0])
