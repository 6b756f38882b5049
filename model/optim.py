"""Muon for the 2-D weights inside the blocks, Adam for the embedding and the head; the schedule."""
from __future__ import annotations

import torch


def build_optimizers(model: torch.nn.Module, muon_lr: float, embed_lr: float, head_lr: float,
                     fused: bool = False) -> list[torch.optim.Optimizer]:
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    others = [p for p in model.blocks.parameters() if p.ndim != 2]
    groups = [{"params": [model.embed.weight], "lr": embed_lr}, {"params": [model.head.weight], "lr": head_lr}]
    if others:
        groups.append({"params": others, "lr": embed_lr})
    adam = torch.optim.Adam(groups, betas=(0.8, 0.95), eps=1e-10, fused=fused)
    muon = torch.optim.Muon(matrices, lr=muon_lr, momentum=0.95, weight_decay=0.0, adjust_lr_fn="original")
    optimizers = [adam, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_factor(step: int, total_steps: int, cooldown_frac: float) -> float:
    """Stable, then a linear decay to zero over the last `cooldown_frac` of the steps; no warm-up."""
    progress = step / total_steps
    if cooldown_frac <= 0 or progress < 1 - cooldown_frac:
        return 1.0
    return max(0.0, (1 - progress) / cooldown_frac)


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor
