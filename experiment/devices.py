"""Which device a stage runs on: --cuda N / --device, or one per process under torchrun."""
from __future__ import annotations

import re

import torch

from core.files import UserError
from model.distributed import Dist, from_environment, join_process_group


def resolve_device(cuda: int | None = None, device: str | None = None) -> torch.device:
    """--cuda N or --device cpu|cuda|cuda:N; default cuda:0 when CUDA exists, else the CPU."""
    if cuda is not None and device not in (None, "", f"cuda:{cuda}"):
        raise UserError(f"--cuda {cuda} and --device {device} disagree; give one of them")
    name = f"cuda:{cuda}" if cuda is not None else (device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    if name == "cuda":
        name = "cuda:0"
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda:(\d+)", name)
    if not m:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(m.group(1)) >= count:
        have = ", ".join(f"cuda:{i}" for i in range(count)) or "none (this machine has no usable CUDA GPU)"
        raise UserError(f"device {name} does not exist; CUDA devices here: {have}; use --device cpu to run on the CPU")
    return torch.device(name)


def use_compile(flag: bool | None, device: torch.device) -> bool:
    """--compile: as given, or by default on CUDA only (on the CPU the compile time outweighs the gain)."""
    return flag if flag is not None else device.type == "cuda"


def setup_distributed(cfg) -> tuple[Dist, torch.device]:
    """Under torchrun: one process per device, NCCL on CUDA and gloo on the CPU. Otherwise one process
    on the device the flags name."""
    dist = from_environment()
    if dist.world == 1:
        return dist, resolve_device(cfg.cuda, cfg.device)
    return dist, join_process_group(dist, cfg.device == "cpu")
