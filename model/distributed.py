"""The process group under torchrun: which process this is, and the few collectives the loops need."""
from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as torch_dist


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch_dist.all_reduce(x)
        return x

    def close(self) -> None:
        if self.world > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def from_environment() -> Dist:
    """This process's place in a torchrun job (rank 0 of 1 outside torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def join_process_group(dist: Dist, wants_cpu: bool) -> torch.device:
    """One process per device: NCCL on this process's GPU, or gloo on the CPU."""
    use_cpu = wants_cpu or not torch.cuda.is_available()
    device = torch.device("cpu") if use_cpu else torch.device(f"cuda:{dist.local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # a long timeout: processes wait at barriers while rank 0 alone writes a stage's outputs, which for a
    # large scan takes longer than NCCL's default 10 minutes
    torch_dist.init_process_group("gloo" if use_cpu else "nccl", timeout=datetime.timedelta(hours=3))
    return device
