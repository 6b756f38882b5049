"""The masked-diffusion transformer: a bidirectional pre-norm transformer that predicts clean tokens.

RMSNorm (no weights), rotary positions, QK-norm, ReLU² MLP, zero-initialised output projections and
head (so an untrained model predicts the uniform distribution), soft-capped logits. There is no time
conditioning (MDLM shows it is unnecessary), so every MLP is an ordinary function of its input: the
transcoders of later stages rely on that. Logits cover the text vocabulary only: [MASK], [PAD] and the
padding rows of the embedding can never be predicted.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from core.files import UserError, load_checkpoint, save_checkpoint
from model.attention import AttnImpl, DocMask, attend, document_ids
from model.rotary import Rotary, RotaryTables, rotate


def check_shape(num_layers: int, num_heads: int, model_dim: int, mlp_ratio: float) -> None:
    """The one place that says which shapes can be built (ValueError naming the flag)."""
    for name, value in (("num_layers", num_layers), ("num_heads", num_heads), ("model_dim", model_dim)):
        if value <= 0:
            raise ValueError(f"--{name} must be positive, got {value}")
    if model_dim % num_heads:
        raise ValueError(f"--model_dim {model_dim} is not divisible by --num_heads {num_heads}")
    if (model_dim // num_heads) % 2:
        raise ValueError(f"the head dimension {model_dim // num_heads} must be even (rotary embeddings)")
    if mlp_ratio <= 0:
        raise ValueError(f"--mlp_ratio must be positive, got {mlp_ratio}")


@dataclass
class ModelConfig:
    n_vocab: int  # text ids 0..n_vocab-1 (BOS included); the only ids the model predicts
    vocab_size: int  # embedding rows: text ids, [MASK], [PAD], rounded up to a multiple of 64
    mask_id: int
    pad_id: int
    bos_id: int
    num_layers: int = 12
    num_heads: int = 6
    model_dim: int = 384
    mlp_ratio: float = 4.0
    logit_softcap: float = 15.0

    def __post_init__(self) -> None:
        check_shape(self.num_layers, self.num_heads, self.model_dim, self.mlp_ratio)
        if not self.n_vocab <= self.mask_id < self.vocab_size or not self.n_vocab <= self.pad_id < self.vocab_size:
            raise ValueError("[MASK] and [PAD] must lie outside the text vocabulary and inside the embedding")

    @property
    def mlp_dim(self) -> int:
        return int(self.mlp_ratio * self.model_dim)


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def zero_linear(d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=False)
    nn.init.zeros_(layer.weight)
    return layer


class Attention(nn.Module):
    """Multi-head attention inside documents. q, k and v stay three Linear modules (their state-dict keys and
    the readers of their weights are unchanged); the forward runs them as one matmul over their concatenated
    weights."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, self.h = cfg.model_dim, cfg.num_heads
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.out = zero_linear(d, d)
        self.rotary = Rotary(d // self.h)

    def forward(self, x: torch.Tensor, mask: DocMask, rope: RotaryTables | None = None) -> torch.Tensor:
        """x: (B, T, D), already normalised; `rope`: the rotary tables of length T (computed here if None)."""
        B, T, D = x.shape
        qkv = F.linear(x, torch.cat([self.q.weight, self.k.weight, self.v.weight]))  # (B, T, 3D)
        q, k, v = qkv.view(B, T, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, Dh) each
        rope = self.rotary.tables(T, x.device) if rope is None else rope
        q, k = rotate(norm(q), rope), rotate(norm(k), rope)  # QK-norm, then positions
        # q and k come out of `rotate` contiguous; v, a view into qkv (row stride 3D), is made so as well: torch
        # 2.13's compiled CPU FlexAttention computes wrong outputs from that view (tests/test_model_forward.py)
        y = attend(q, k, v.contiguous(), mask)  # (B, H, T, Dh)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """ReLU² MLP. Its input is the normalised residual stream, its output is added back: the pair a
    transcoder learns to imitate (forward hooks on this module see exactly that pair)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.model_dim, cfg.mlp_dim, bias=False)
        self.proj = zero_linear(cfg.mlp_dim, cfg.model_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: DocMask, rope: RotaryTables | None = None) -> torch.Tensor:
        x = x + self.attn(norm(x), mask, rope)
        return x + self.mlp(norm(x))


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, n_vocab), or (N, n_vocab) at the selected positions
    hidden: torch.Tensor  # (B, T, D) final normalised residual stream


class DiffusionLM(nn.Module, PyTorchModelHubMixin, library_name="pytorch", tags=["masked-diffusion", "text-diffusion"]):
    """`save_pretrained` / `from_pretrained` / `push_to_hub` come from huggingface_hub's mixin: config.json
    (the ModelConfig under "cfg") and model.safetensors. The training checkpoints (`save`/`load`) stay
    the resumable format; experiment/hub.py exports a run's checkpoint with its tokenizer and model card."""

    def __init__(self, cfg: ModelConfig | dict) -> None:
        super().__init__()
        cfg = ModelConfig(**cfg) if isinstance(cfg, dict) else cfg  # from_pretrained passes config.json's dict
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = zero_linear(cfg.model_dim, cfg.vocab_size)
        self.attn_impl: AttnImpl | None = None  # None: FlexAttention on CUDA, masked SDPA elsewhere

    def block(self, layer: int) -> Block:
        """Block `layer` (typed: indexing the nn.ModuleList gives a plain Module)."""
        return cast(Block, self.blocks[layer])

    def compile_blocks(self, attn_impl: AttnImpl | None = None) -> None:
        """torch.compile every block (one graph serves them all: same code, same shapes), optionally fixing
        the attention path (e.g. "flex" on the CPU, whose compiled forward torch supports). Shapes are
        static: a stage's batches share one shape, and a second shape compiles a second graph instead of a
        dynamic one (torch 2.13's compiled CPU FlexAttention fails to build with a dynamic batch size).

        Module hooks are guarded: dynamo skips those guards by default, and a block compiled once without hooks would
        then run without them later too (a plain forward pass would silence every later capture or replacement)."""
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        if attn_impl is not None:
            self.attn_impl = attn_impl
        for block in self.blocks:
            block.compile(dynamic=False)

    def forward(self, tokens: torch.Tensor, select: torch.Tensor | None = None,
                attn_impl: AttnImpl | None = None) -> ModelOutput:
        """tokens: (B, T) with [MASK] at noised positions. `select` restricts the (costly) vocabulary projection
        to some positions: a (B, T) bool mask (its True positions, in order: the count depends on the data), or
        (N,) int64 indices into the B·T positions in row-major order (N rows, a static shape; an empty one skips
        the projection)."""
        impl = attn_impl or self.attn_impl or ("flex" if tokens.is_cuda else "sdpa")
        mask = DocMask(document_ids(tokens, self.cfg.bos_id), impl)
        rope = self.block(0).attn.rotary.tables(tokens.shape[1], tokens.device)  # one set for every layer
        x = norm(self.embed(tokens))  # (B, T, D)
        for block in self.blocks:
            x = block(x, mask, rope)
        x = norm(x)
        if select is None:
            rows = x
        elif select.dtype == torch.bool:
            rows = x[select]
        else:
            rows = x.flatten(0, 1)[select]
        return ModelOutput(self.logits(rows), x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) → (..., n_vocab), soft-capped; ids ≥ n_vocab ([MASK], [PAD], padding) are never logits."""
        return self.soft_cap(self.raw_logits(h))

    def raw_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) → (..., n_vocab) before the soft cap: linear in h (the head has no bias)."""
        return self.head(h)[..., :self.cfg.n_vocab].float()

    def soft_cap(self, z: torch.Tensor) -> torch.Tensor:
        c = self.cfg.logit_softcap
        return c * torch.tanh(z / c)

    def n_params(self, matmul_only: bool = False) -> int:
        """Parameter count; `matmul_only` excludes the embedding table (a lookup, not a matmul)."""
        return sum(p.numel() for n, p in self.named_parameters() if not (matmul_only and n.startswith("embed")))

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        save_checkpoint(path, {"model": self.state_dict(), "model_config": asdict(self.cfg), **(extra or {})})

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu",
             expected: ModelConfig | None = None) -> "DiffusionLM":
        """Rebuild from a checkpoint (strictly: every weight present and of the right shape)."""
        state = load_checkpoint(path, device)
        cfg = ModelConfig(**state["model_config"]) if "model_config" in state else expected
        if cfg is None:
            raise UserError(f"{path} does not say which model shape it holds")
        if expected is not None and asdict(cfg) != asdict(expected):
            diff = {k: (v, asdict(cfg)[k]) for k, v in asdict(expected).items() if asdict(cfg)[k] != v}
            raise UserError(f"{path} holds a model of another shape (expected vs found: {diff})")
        model = cls(cfg).to(device)
        try:
            model.load_state_dict(state["model"], strict=True)
        except RuntimeError as e:
            raise UserError(f"{path} does not match the model: {str(e).splitlines()[0][:200]}") from None
        return model
