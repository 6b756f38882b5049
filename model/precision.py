"""Which precision a device computes natively, and the one autocast helper every stage uses.

bf16 is fast only where the hardware has bf16 arithmetic: CUDA GPUs from Ampere on, and CPUs with
AVX-512-BF16 or AMX that torch's oneDNN kernels use. Elsewhere a bf16 matmul is emulated and far
slower than fp32 (measured on a 2-core AMD EPYC limited to AVX2: a 512×128 @ 128×512 product takes
28 ms in bf16 against 0.5 ms in fp32). The answer is decided once per device and cached.
"""
from __future__ import annotations

import contextlib
import functools

import torch


@functools.cache
def _cpu_native_bf16() -> bool:
    # oneDNN must be willing to run bf16 (it is not when its ISA is capped, e.g. ONEDNN_MAX_CPU_ISA=AVX2,
    # or the CPU lacks AVX-512), and the CPU must have bf16 instructions, not just AVX-512.
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        instructions = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except (AttributeError, RuntimeError):  # a torch without these probes: assume the slow case
        return False
    return onednn and instructions


@functools.cache
def _cuda_native_bf16(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


def native_bf16(device: torch.device | str) -> bool:
    """True where bf16 matmuls run in hardware on `device` (a CUDA GPU from Ampere on, a CPU with
    AVX-512-BF16 or AMX); False where they would be emulated."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_native_bf16(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        return _cpu_native_bf16()
    return False


def matmul_dtype(device: torch.device | str) -> torch.dtype:
    """The cheapest dtype that is still accurate enough for an internal iteration (Muon's Newton–Schulz)."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


def autocast(device: torch.device | str):
    """bf16 autocast on a CUDA GPU with native bf16; nothing elsewhere. The CPU always runs in fp32, so
    that results are the same on every CPU (with and without native bf16) and the tests' reference
    comparisons hold; the models this project trains on a CPU are small enough for fp32."""
    device = torch.device(device)
    if device.type == "cuda" and native_bf16(device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe(device: torch.device | str) -> str:
    """The device in words for a benchmark line: the card's name, or the processor, its cores and
    whether it has native bf16 (a CPU figure means little without that)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, {'native' if native_bf16(device) else 'no native'} bf16"
