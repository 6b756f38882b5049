"""Which device a stage runs on: --cuda N / --device, or one per process under torchrun."""
from __future__ import annotations

from typing import Protocol

import torch

from core.checks import device_index
from core.files import UserError
from model.distributed import Dist, from_environment, join_process_group


def resolve_device(cuda: int | None = None, device: str | None = None) -> torch.device:
    """--cuda N or --device cpu|cuda|cuda:N (parsed and checked by `core.checks.device_index`); by default
    the current CUDA device when CUDA exists, else the CPU."""
    if cuda is not None and device not in (None, "", f"cuda:{cuda}"):
        raise UserError(f"--cuda {cuda} and --device {device} disagree; give one of them")
    if cuda is None and not device:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        index = device_index("cuda", cuda) if cuda is not None else device_index("device", device)
    except ValueError as e:
        raise UserError(str(e)) from None
    return torch.device("cpu") if index is None else torch.device("cuda", index)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor's copy on `device`. To a GPU it goes from pinned memory without blocking: a plain copy
    would make the host wait until the GPU has finished all the work queued so far."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def use_compile(flag: bool | None, device: torch.device) -> bool:
    """--compile: as given, or by default on CUDA only (on the CPU the compile time outweighs the gain)."""
    return flag if flag is not None else device.type == "cuda"


class DeviceFlags(Protocol):
    """What `setup_distributed` reads of a stage's config: --cuda and --device."""

    cuda: int | None
    device: str | None


def setup_distributed(cfg: DeviceFlags) -> tuple[Dist, torch.device]:
    """Under torchrun: one process per device, NCCL on CUDA and gloo on the CPU. Otherwise one process
    on the device the flags name."""
    dist = from_environment()
    if dist.world == 1:
        return dist, resolve_device(cfg.cuda, cfg.device)
    return dist, join_process_group(dist, cfg.device == "cpu")
