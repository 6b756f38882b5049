"""Muon for the 2-D weights inside the blocks, Adam for the embedding and the head; the schedule."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from model.precision import matmul_dtype

if TYPE_CHECKING:
    from model.diffusion import DiffusionLM


def newton_schulz(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's quintic Newton–Schulz orthogonalisation of a 2-D update, computed in `dtype`.

    The same iteration as torch.optim.Muon (which always uses bf16); in bf16 it gives the same result
    bit for bit (tested). fp32 is for devices without native bf16, where a bf16 matmul is emulated."""
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T  # iterate on the wide orientation: the Gram matrix is the smaller one
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b·G + c·G²
        x = torch.addmm(x, poly, x, beta=a)  # a·X + (b·G + c·G²)·X
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon whose Newton–Schulz iteration runs in `ns_dtype` (see model/precision.py).

    Hyper-parameters, state (one momentum buffer per matrix) and state_dict are torch's, so checkpoints
    written with torch.optim.Muon load unchanged."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs) -> None:
        super().__init__(params, **kwargs)
        if kwargs.get("adjust_lr_fn", "original") not in (None, "original"):
            raise ValueError("this Muon implements adjust_lr_fn='original' only")
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * math.sqrt(max(1, p.shape[0] / p.shape[1])))
        return loss


def build_optimizers(model: DiffusionLM, muon_lr: float, embed_lr: float, head_lr: float,
                     fused: bool = False, ns_dtype: torch.dtype | None = None) -> list[torch.optim.Optimizer]:
    """Adam and Muon. `ns_dtype` is Muon's Newton–Schulz precision; by default bf16 where the model's
    device has native bf16 and fp32 elsewhere (model.precision.matmul_dtype)."""
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    others = [p for p in model.blocks.parameters() if p.ndim != 2]
    groups = [{"params": [model.embed.weight], "lr": embed_lr}, {"params": [model.head.weight], "lr": head_lr}]
    if others:
        groups.append({"params": others, "lr": embed_lr})
    adam = torch.optim.Adam(groups, betas=(0.8, 0.95), eps=1e-10, fused=fused)
    ns_dtype = ns_dtype or matmul_dtype(matrices[0].device)
    muon = Muon(matrices, ns_dtype=ns_dtype, lr=muon_lr, momentum=0.95, weight_decay=0.0, adjust_lr_fn="original")
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
