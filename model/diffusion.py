"""The masked-diffusion transformer: a bidirectional pre-norm transformer that predicts clean tokens.

This project's own models (the defaults of ModelConfig): RMSNorm without weights (the embedding normalised
too), rotary positions, QK-norm, ReLU² MLP, attention inside BOS-delimited documents, zero-initialised output
projections and head (so an untrained model predicts the uniform distribution), soft-capped logits over the
text vocabulary only ([MASK], [PAD] and the padding rows of the embedding can never be predicted).

The same classes are the released LLaDA-8B and Dream-7B by configuration (model/public_models.py builds
those configs and loads their weights): RMSNorm with learned gains and a fixed eps, the raw embedding,
no QK-norm, q/k/v biases (Dream), grouped-query attention (Dream), another rotary base (rotated in float32 for
LLaDA), a SiLU-gated MLP, full-row attention, no soft cap, logits over every embedding row, and Dream's
read-out shift. There is no time conditioning in any of them, so every MLP is an ordinary function of its
input (`blocks[l].mlp`: the normed residual in, what is added back out): the transcoders of later stages
rely on that.
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


def check_shape(num_layers: int, num_heads: int, model_dim: int, mlp_ratio: float,
                num_kv_heads: int | None = None) -> None:
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
    if num_kv_heads is not None and (num_kv_heads <= 0 or num_heads % num_kv_heads):
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")


FAMILIES = ("diffusionlm", "llada", "dream")
MLP_KINDS = ("relu2", "swiglu")
ATTENTIONS = ("documents", "full")


@dataclass
class ModelConfig:
    """The shape and architecture of a model. Every default is this project's own model, so an older
    config.json dict (`ModelConfig(**old_dict)`) builds the same model with the same state-dict keys."""

    n_vocab: int  # ids 0..n_vocab-1 get logits (BOS included); the only ids the model predicts
    vocab_size: int  # embedding rows: text ids, [MASK], [PAD], rounded up to a multiple of 64
    mask_id: int
    pad_id: int
    bos_id: int
    num_layers: int = 12
    num_heads: int = 6
    model_dim: int = 384
    mlp_ratio: float = 4.0
    logit_softcap: float = 15.0  # logits are c·tanh(z/c); 0: no cap
    num_kv_heads: int | None = None  # key/value heads (None: num_heads); each serves num_heads/num_kv_heads
    mlp_width: int | None = None  # the MLP's hidden width (None: int(mlp_ratio · model_dim))
    mlp_kind: str = "relu2"  # "relu2": proj(relu(fc(x))²); "swiglu": proj(silu(gate(x)) · up(x))
    norm_weights: bool = False  # RMSNorms with a learned gain (modules attn_norm, mlp_norm, final_norm)
    norm_eps: float | None = None  # the RMSNorms' eps (None: F.rms_norm's default)
    embed_norm: bool = True  # normalise the embedding before the first block
    qk_norm: bool = True  # normalise every head's q and k (without weights) before the rotation
    qkv_bias: bool = False  # biases on q, k and v (never on the attention output)
    rope_theta: float = 10000.0  # the rotary base
    rope_fp32: bool = False  # rotate q and k in float32 and cast back (matters in bf16 only)
    attention: str = "documents"  # "documents": BOS starts a document; "full": the whole row
    logit_shift: int = 0  # 1: position i is predicted from the hidden state at i − 1 (position 0: its own)
    n_text: int | None = None  # the tokenizer's size: ids ≥ n_text are unused rows (None: n_vocab)
    specials_in_vocab: bool = False  # [MASK] and [PAD] are ids inside n_vocab (the public models)
    family: str = "diffusionlm"  # the architecture: "diffusionlm" (this project), "llada", "dream"

    def __post_init__(self) -> None:
        check_shape(self.num_layers, self.num_heads, self.model_dim, self.mlp_ratio, self.num_kv_heads)
        choices: dict[str, tuple] = {"family": FAMILIES, "mlp_kind": MLP_KINDS, "attention": ATTENTIONS,
                                     "logit_shift": (0, 1)}
        for name, allowed in choices.items():
            if (value := getattr(self, name)) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.mlp_width is not None and self.mlp_width <= 0:
            raise ValueError(f"mlp_width must be positive, got {self.mlp_width}")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap must be positive (or 0: no cap), got {self.logit_softcap}")
        if not 0 < self.n_vocab <= self.vocab_size:
            raise ValueError(f"n_vocab {self.n_vocab} must lie in 1..vocab_size {self.vocab_size}")
        if not 0 < self.text_size <= self.n_vocab:
            raise ValueError(f"n_text {self.n_text} must lie in 1..n_vocab {self.n_vocab}")
        if not 0 <= self.bos_id < self.n_vocab:
            raise ValueError(f"BOS {self.bos_id} must lie inside the vocabulary of {self.n_vocab} ids")
        if self.specials_in_vocab:
            if not (0 <= self.mask_id < self.vocab_size and 0 <= self.pad_id < self.vocab_size):
                raise ValueError("[MASK] and [PAD] must lie inside the embedding")
            if self.mask_id == self.pad_id:
                raise ValueError(f"[MASK] and [PAD] must differ, both are {self.mask_id}")
        elif not self.n_vocab <= self.mask_id < self.vocab_size or not self.n_vocab <= self.pad_id < self.vocab_size:
            raise ValueError("[MASK] and [PAD] must lie outside the text vocabulary and inside the embedding")

    @property
    def mlp_dim(self) -> int:
        return int(self.mlp_ratio * self.model_dim) if self.mlp_width is None else self.mlp_width

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def text_size(self) -> int:
        """The tokenizer's size: n_text, or n_vocab when unset."""
        return self.n_vocab if self.n_text is None else self.n_text

    def never_predicted(self) -> list[int]:
        """The ids inside 0..n_vocab-1 that get logits but that a denoising step can never commit, ascending:
        BOS (unless it is also [PAD], which stays predictable: the public models pad answers with their EOS,
        and Dream's BOS is that same id), [MASK] when it lies inside n_vocab, and the unused embedding rows
        n_text..n_vocab-1. For this project's own models that is BOS alone."""
        ids = set(range(self.text_size, self.n_vocab))
        if self.bos_id != self.pad_id:
            ids.add(self.bos_id)
        if self.mask_id < self.n_vocab:
            ids.add(self.mask_id)
        return sorted(ids)


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension. With `gain` a learned weight, applied as the released LLaDA and Dream
    do: normalise in float32, cast back to the input's dtype, then multiply by the weight. Without, exactly
    `norm` (in the input's dtype; `eps` None is F.rms_norm's default) and no parameters, so no state-dict key."""

    def __init__(self, dim: int, eps: float | None, gain: bool) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if gain else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return F.rms_norm(x, (self.dim,), eps=self.eps)
        return F.rms_norm(x.float(), (self.dim,), eps=self.eps).to(x.dtype) * self.weight


def zero_linear(d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=False)
    nn.init.zeros_(layer.weight)
    return layer


class Attention(nn.Module):
    """Multi-head attention (grouped-query when num_kv_heads < num_heads: each key/value head serves that many
    consecutive query heads). q, k and v stay three Linear modules (their state-dict keys and the readers of
    their weights are unchanged); the forward runs them as one matmul over their concatenated weights."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, self.h, self.h_kv, self.dh = cfg.model_dim, cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.q = nn.Linear(d, self.h * self.dh, bias=cfg.qkv_bias)
        self.k, self.v = (nn.Linear(d, self.h_kv * self.dh, bias=cfg.qkv_bias) for _ in range(2))
        self.out = zero_linear(d, d)
        self.rotary = Rotary(self.dh, cfg.rope_theta, reciprocal=cfg.family != "diffusionlm")
        self.qk_norm, self.rope_fp32 = cfg.qk_norm, cfg.rope_fp32

    def forward(self, x: torch.Tensor, mask: DocMask, rope: RotaryTables | None = None) -> torch.Tensor:
        """x: (B, T, D), already normalised; `rope`: the rotary tables of length T (computed here if None)."""
        B, T, D = x.shape
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight])
        bias = None if self.q.bias is None else torch.cat([self.q.bias, self.k.bias, self.v.bias])
        qkv = F.linear(x, weight, bias)  # (B, T, (H + 2·H_kv)·Dh)
        q, k, v = qkv.split([self.h * self.dh, self.h_kv * self.dh, self.h_kv * self.dh], dim=-1)
        q = q.view(B, T, self.h, self.dh).transpose(1, 2)  # (B, H, T, Dh)
        k, v = (t.view(B, T, self.h_kv, self.dh).transpose(1, 2) for t in (k, v))  # (B, H_kv, T, Dh)
        rope = self.rotary.tables(T, x.device) if rope is None else rope
        if self.qk_norm:
            q, k = norm(q), norm(k)
        q, k = rotate(q, rope, self.rope_fp32), rotate(k, rope, self.rope_fp32)
        # q and k come out of `rotate` contiguous; v, a view into qkv (a row stride of its width), is made so: torch
        # 2.13's compiled CPU FlexAttention computes wrong outputs from that view (tests/test_model_forward.py)
        y = attend(q, k, v.contiguous(), mask)  # (B, H, T, Dh)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """ReLU² MLP (`fc`, `proj`) or SiLU-gated MLP (`gate`, `up`, `proj`). Its input is the normalised residual
    stream, its output is added back: the pair a transcoder learns to imitate (forward hooks on this module see
    exactly that pair)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp_kind
        if self.kind == "swiglu":
            self.gate = nn.Linear(cfg.model_dim, cfg.mlp_dim, bias=False)
            self.up = nn.Linear(cfg.model_dim, cfg.mlp_dim, bias=False)
        else:
            self.fc = nn.Linear(cfg.model_dim, cfg.mlp_dim, bias=False)
        self.proj = zero_linear(cfg.mlp_dim, cfg.model_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.proj(F.silu(self.gate(x)) * self.up(x))
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.model_dim, cfg.norm_eps, cfg.norm_weights)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.model_dim, cfg.norm_eps, cfg.norm_weights)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: DocMask, rope: RotaryTables | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask, rope)
        return x + self.mlp(self.mlp_norm(x))


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, n_vocab), or (N, n_vocab) at the selected positions
    hidden: torch.Tensor  # (B, T, D) final normalised residual stream (not shifted: row t is position t's)


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
        self.final_norm = RMSNorm(cfg.model_dim, cfg.norm_eps, cfg.norm_weights)
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
                attn_impl: AttnImpl | None = None, key_mask: torch.Tensor | None = None) -> ModelOutput:
        """tokens: (B, T) with [MASK] at noised positions. `select` restricts the (costly) vocabulary projection
        to some positions: a (B, T) bool mask (its True positions, in order: the count depends on the data), or
        (N,) int64 indices into the B·T positions in row-major order (N rows, a static shape; an empty one skips
        the projection). `key_mask` (B, T) bool: False positions (padding) are never attended to (their own
        rows are still computed).

        The logits of position i are always the prediction for token i (`select` picks positions in that sense):
        with a logit shift they are read from hidden row `readout_rows(i)`; `hidden` itself is not shifted."""
        impl = attn_impl or self.attn_impl or ("flex" if tokens.is_cuda else "sdpa")
        doc = document_ids(tokens, self.cfg.bos_id) if self.cfg.attention == "documents" else None
        mask = DocMask(doc, impl, key_mask)
        rope = self.block(0).attn.rotary.tables(tokens.shape[1], tokens.device)  # one set for every layer
        x = self.embed(tokens)  # (B, T, D)
        if self.cfg.embed_norm:
            x = norm(x)
        for block in self.blocks:
            x = block(x, mask, rope)
        x = self.final_norm(x)
        read = x if self.cfg.logit_shift == 0 else x[:, self.readout_rows(torch.arange(x.shape[1], device=x.device))]
        if select is None:
            rows = read
        elif select.dtype == torch.bool:
            rows = read[select]
        else:
            rows = read.flatten(0, 1)[select]
        return ModelOutput(self.logits(rows), x)

    def readout_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """The hidden rows the predictions of `positions` (any shape, int) are read from: max(p − shift, 0)
        (Dream's shift of 1: the hidden state at p − 1 predicts token p; position 0 reads its own row)."""
        return (positions - self.cfg.logit_shift).clamp(min=0)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) → (..., n_vocab), soft-capped (unless the cap is 0); ids ≥ n_vocab ([MASK], [PAD], padding
        of this project's models) are never logits."""
        return self.soft_cap(self.raw_logits(h))

    def raw_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) → (..., n_vocab) float32, before the soft cap: linear in h (the head has no bias)."""
        return self.head(h)[..., :self.cfg.n_vocab].float()

    def soft_cap(self, z: torch.Tensor) -> torch.Tensor:
        """c·tanh(z/c) with c the config's logit_softcap; z unchanged when it is 0."""
        c = self.cfg.logit_softcap
        return z if c == 0 else c * torch.tanh(z / c)

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
