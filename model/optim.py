"""Muon for the 2-D weights inside the blocks, Adam for the embedding and the head; the schedule."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Callable

import torch

from model.precision import matmul_dtype

if TYPE_CHECKING:
    from model.diffusion import DiffusionLM


def newton_schulz(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's quintic Newton–Schulz orthogonalisation of a 2-D update, computed in `dtype`.

    The same iteration as torch.optim.Muon (which always uses bf16); in bf16 it gives the same result
    bit for bit (tested). fp32 is for devices without native bf16, where a bf16 matmul is emulated. `Muon` runs
    `batched_newton_schulz` over each shape's stack instead, tested equal to this per matrix."""
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T  # iterate on the wide orientation: the Gram matrix is the smaller one
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1 (not in place: `grad` stays)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b·G + c·G²
        x = torch.addmm(x, poly, x, beta=a)  # a·X + (b·G + c·G²)·X
    return x.T if tall else x


def batched_newton_schulz(x: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                          eps: float) -> torch.Tensor:
    """`newton_schulz` of each matrix of a (n, rows, cols) stack with rows <= cols, in x's dtype, as batched
    matmuls: the same iteration, each matrix normalised by its own Frobenius norm (equal to the per-matrix
    function up to the order of floating-point sums: tested)."""
    a, b, c = coefficients
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·G + c·G²
        x = torch.baddbmm(x, poly, x, beta=a)  # a·X + (b·G + c·G²)·X
    return x


def compiled_newton_schulz(coefficients: tuple[float, float, float], steps: int, eps: float,
                           backend: str | Callable = "inductor") -> Callable[[torch.Tensor], torch.Tensor]:
    """`batched_newton_schulz` with these constants, compiled as one graph whose only input is the stack (the
    constants are part of the graph, not host scalars passed to it at every call)."""
    def orthogonalise(x: torch.Tensor) -> torch.Tensor:
        return batched_newton_schulz(x, coefficients, steps, eps)
    return torch.compile(orthogonalise, fullgraph=True, dynamic=False, backend=backend)


class Muon(torch.optim.Muon):
    """torch.optim.Muon whose Newton–Schulz iteration runs in `ns_dtype` (see model/precision.py), over all
    matrices of one shape at once: the momentum updates are foreach operations, and the matrices of one
    shape go through one batched Newton–Schulz (`batched_newton_schulz`, compiled on CUDA).

    Hyper-parameters, state (one momentum buffer per matrix) and state_dict are torch's, so checkpoints
    written with torch.optim.Muon load unchanged. A step reads nothing on the host."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs) -> None:
        super().__init__(params, **kwargs)
        if kwargs.get("adjust_lr_fn", "original") not in (None, "original"):
            raise ValueError("this Muon implements adjust_lr_fn='original' only")
        self.ns_dtype = ns_dtype
        self._compiled: dict[tuple, Callable[[torch.Tensor], torch.Tensor]] = {}  # by (coefficients, steps, eps)

    def _orthogonalise(self, x: torch.Tensor, group: dict) -> torch.Tensor:
        constants = (tuple(group["ns_coefficients"]), group["ns_steps"], group["eps"])
        if not x.is_cuda:  # on the CPU the compile time outweighs the gain
            return batched_newton_schulz(x, *constants)
        if constants not in self._compiled:
            self._compiled[constants] = compiled_newton_schulz(*constants)
        return self._compiled[constants](x)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            stacks: dict[tuple, list[torch.Tensor]] = defaultdict(list)  # the matrices of one shape, dtype, device
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                stacks[(tuple(p.shape), p.dtype, p.device)].append(p)
            for params in stacks.values():
                grads = [p.grad for p in params]
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - momentum)
                updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
                rows, cols = params[0].shape
                x = torch.stack(updates).to(self.ns_dtype)
                if rows > cols:  # iterate on the wide orientation (a transposed view, as newton_schulz does)
                    x = x.mT
                x = self._orthogonalise(x, group)
                x = (x.mT if rows > cols else x).to(params[0].dtype)
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
                torch._foreach_add_(params, x.unbind(0), alpha=-lr * math.sqrt(max(1, rows / cols)))
        return loss


def build_optimizers(model: DiffusionLM, muon_lr: float, embed_lr: float, head_lr: float,
                     fused: bool | None = None, ns_dtype: torch.dtype | None = None) -> list[torch.optim.Optimizer]:
    """Adam and Muon. Adam is fused (one kernel for all its tensors, nothing read on the host) where `fused`
    says, by default on CUDA. `ns_dtype` is Muon's Newton–Schulz precision; by default bf16 where the model's
    device has native bf16 and fp32 elsewhere (model.precision.matmul_dtype)."""
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    others = [p for p in model.blocks.parameters() if p.ndim != 2]
    groups = [{"params": [model.embed.weight], "lr": embed_lr}, {"params": [model.head.weight], "lr": head_lr}]
    if others:
        groups.append({"params": others, "lr": embed_lr})
    device = model.embed.weight.device
    fused = device.type == "cuda" if fused is None else fused
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
