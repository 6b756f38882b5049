"""A TopK sparse transcoder: predicts an MLP's output from its input through k active latents.

    pre  = ReLU(W_enc x + b_enc)                 (N, M)
    z    = the k largest entries of pre, the rest 0
    ŷ    = z W_dec + b_dec (+ x W_skipᵀ)         decoder rows unit-norm

Parameters are named as in EleutherAI sparsify's `SparseCoder` (`encoder.weight`, `encoder.bias`,
`W_dec`, `b_dec`, `W_skip`), and `save`/`load` use its on-disk layout (`cfg.json` + `sae.safetensors`),
so `sparsify.SparseCoder.load_from_disk` reads these files and computes the same outputs (tested).

Training's backward is sparse: the dense pre-activations are computed without autograd, and the gradient
reaches the encoder only through the rows of the latents a token uses (its k TopK latents, and AuxK's), so no
(N, M) tensor is built in the backward (`ActiveLatents`).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from core.files import UserError, load_safetensors, save_safetensors, write_json_atomic

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


@dataclass
class TranscoderConfig:
    d_in: int
    num_latents: int
    k: int
    skip_connection: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.k <= self.num_latents:
            raise ValueError(f"--k {self.k} must lie in [1, number of latents = {self.num_latents}]")

    def sparsify_dict(self) -> dict:
        """cfg.json as sparsify writes it (its SparseCoderConfig fields plus d_in)."""
        return {"activation": "topk", "expansion_factor": max(1, self.num_latents // self.d_in),
                "normalize_decoder": True, "num_latents": self.num_latents, "k": self.k, "multi_topk": False,
                "skip_connection": self.skip_connection, "transcode": True, "d_in": self.d_in}


BACKWARD_CHUNK = 2**25  # elements of the (tokens × active latents, d_in) products one backward chunk builds


def _rows_outer_sum(g: torch.Tensor, indices: torch.Tensor, x: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(num_rows, D) fp32: row m holds Σ g[n, j] · x[n] over the (n, j) with indices[n, j] = m, added with
    index_add_ a chunk of tokens at a time (a compiled graph fuses the products into the scatter)."""
    out = torch.zeros(num_rows, x.shape[1], dtype=torch.float32, device=x.device)
    n, k = g.shape
    step = max(1, BACKWARD_CHUNK // max(1, k * x.shape[1]))
    for s in range(0, n, step):
        rows = g[s:s + step, :, None] * x[s:s + step, None, :].float()  # (chunk, k, D)
        out.index_add_(0, indices[s:s + step].reshape(-1), rows.reshape(-1, x.shape[1]))
    return out


class ActiveLatents(torch.autograd.Function):
    """values[n, j] = ReLU(x[n] · W_enc[indices[n, j]] + b_enc[indices[n, j]]), already computed by the caller
    (from the dense pre-activations it chose `indices` from; 0 where it left a slot unused). The forward
    returns them; the backward is that of the formula on the chosen rows only: ReLU passes the gradient where
    the value is > 0, W_enc's gradient is Σ g[n, j] x[n] into row indices[n, j] (no (N, M) tensor), b_enc's is
    Σ g[n, j], x's is Σ_j g[n, j] W_enc[indices[n, j]]. Equal to dense autograd through the TopK (tested)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, indices: torch.Tensor,
                values: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, indices, values)
        return values.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, indices, values = ctx.saved_tensors
        g = torch.where(values > 0, grad.float(), 0.0)  # ReLU's gradient: 0 where the pre-activation is ≤ 0
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=g.to(weight.dtype), mode="sum").to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _rows_outer_sum(g, indices, x, weight.shape[0]).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=g.device)
            grad_b = grad_b.index_add_(0, indices.reshape(-1), g.reshape(-1)).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


class Encoded(NamedTuple):
    acts: torch.Tensor  # (N, k) values of the active latents (≥ 0)
    indices: torch.Tensor  # (N, k) which latents
    pre_acts: torch.Tensor  # (N, M) ReLU pre-activations (for AuxK), without autograd


class TranscoderLoss(NamedTuple):
    output: torch.Tensor  # (N, D) the prediction ŷ
    encoded: Encoded
    sse: torch.Tensor  # Σ ||y − ŷ||²
    total_variance: torch.Tensor  # Σ ||y − mean(y)||² over the batch
    auxk: torch.Tensor  # AuxK loss, already divided by the total variance

    @property
    def fvu(self) -> torch.Tensor:
        return self.sse / self.total_variance


def fraction_of_variance_unexplained(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """Σ||y − ŷ||² / Σ||y − mean(y)||²: 0 for a perfect prediction, 1 for predicting the mean."""
    return (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()


class Transcoder(nn.Module):
    def __init__(self, cfg: TranscoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Linear(cfg.d_in, cfg.num_latents)
        nn.init.zeros_(self.encoder.bias)
        # tied initialisation: encoder rows = decoder rows (unit norm), which keeps early latents alive
        self.W_dec = nn.Parameter(F.normalize(torch.randn(cfg.num_latents, cfg.d_in), dim=1))  # (M, D)
        with torch.no_grad():
            self.encoder.weight.copy_(self.W_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_in)) if cfg.skip_connection else None

    # the encoder's gradient: sparse (`ActiveLatents`, only the chosen latents' rows) or dense autograd through
    # the (N, M) pre-activations; None: sparse on CUDA, where those tensors' bytes are the cost, dense on a CPU,
    # where the small dense matmuls are faster (measured at the demo's shape: 23 against 26 ms, 48 against
    # 76 ms with AuxK). Both are tested equal.
    sparse_backward: bool | None = None

    def _sparse(self, x: torch.Tensor) -> bool:
        return x.is_cuda if self.sparse_backward is None else self.sparse_backward

    def encode(self, x: torch.Tensor) -> Encoded:
        """The k largest ReLU pre-activations of each row of x, with the encoder's gradient (see
        `sparse_backward`)."""
        if not self._sparse(x):
            pre = F.relu(self.encoder(x))  # (N, M)
            acts, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return Encoded(acts, indices, pre)
        with torch.no_grad():
            pre = F.relu(self.encoder(x))  # (N, M)
        acts, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return Encoded(self.with_gradient(x, indices, acts), indices, pre)

    def with_gradient(self, x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`values` (the ReLU pre-activations of x at `indices`) with the encoder's sparse gradient attached,
        where autograd records."""
        w, b = self.encoder.weight, self.encoder.bias
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or b.requires_grad):
            return ActiveLatents.apply(x, w, b, indices, values)
        return values

    def decode(self, acts: torch.Tensor, indices: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_j acts_j · W_dec[indices_j] + b_dec, a gather of k rows per token (no dense (N, M) product)."""
        y = F.embedding_bag(indices, self.W_dec, per_sample_weights=acts.to(self.W_dec.dtype), mode="sum")
        y = y + self.b_dec
        if self.W_skip is not None and x is not None:
            y = y + x @ self.W_skip.T
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encode(x)
        return self.decode(enc.acts, enc.indices, x)

    def dense_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(N, M) latent activations with zeros outside the top k (the reference the fast path is tested on)."""
        enc = self.encode(x)
        return torch.zeros_like(enc.pre_acts).scatter(-1, enc.indices, enc.acts)

    def loss(self, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor | None = None) -> TranscoderLoss:
        """Reconstruction terms, and AuxK where `dead` (a bool mask of latents) is given: the top dead
        latents must predict what the live ones missed. Shapes never depend on the data (no graph break,
        no recompilation under torch.compile)."""
        enc = self.encode(x)
        y_hat = self.decode(enc.acts, enc.indices, x)
        err = y - y_hat
        total_variance = (y - y.mean(0)).pow(2).sum()
        auxk = y.new_zeros(()) if dead is None else self.auxk_loss(enc.pre_acts, err, dead, total_variance,
                                                                   x if self._sparse(x) else None)
        return TranscoderLoss(y_hat, enc, err.pow(2).sum(), total_variance, auxk)

    def auxk_loss(self, pre_acts: torch.Tensor, err: torch.Tensor, dead: torch.Tensor,
                  total_variance: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The d_in/2 largest pre-activations among dead latents reconstruct the error; weaker while few
        latents are dead (× min(dead / (d_in/2), 1), so 0 with none). Where fewer than d_in/2 are dead,
        the rest of the top d_in/2 are live latents at -inf, weighted 0: the same sum as taking only the
        dead ones, at a fixed shape. With the encoder's input `x`, the gradient reaches the encoder through
        the chosen latents' rows (as `encode`'s); without it, through `pre_acts`' own autograd, if any."""
        half = self.cfg.d_in // 2
        scale = (dead.sum() / half).clamp(max=1.0)
        aux_acts, aux_idx = pre_acts.masked_fill(~dead, float("-inf")).topk(half, dim=-1, sorted=False)
        aux_acts = torch.where(torch.isfinite(aux_acts), aux_acts.clamp_min(0), torch.zeros_like(aux_acts))
        if x is not None:
            aux_acts = self.with_gradient(x, aux_idx, aux_acts)
        err_hat = F.embedding_bag(aux_idx, self.W_dec, per_sample_weights=aux_acts.to(self.W_dec.dtype), mode="sum")
        return scale * (err_hat - err.detach()).pow(2).sum() / total_variance

    @torch.no_grad()
    def scaled(self, scale: float) -> "Transcoder":
        """A copy whose outputs are `scale` times larger: encoder, decoder bias and skip scale, decoder rows
        stay unit-norm (TopK picks the same latents, since every pre-activation scales alike)."""
        out = Transcoder(self.cfg).to(self.W_dec.device)
        out.load_state_dict(self.state_dict())
        for p in (out.encoder.weight, out.encoder.bias, out.b_dec, *([out.W_skip] if out.W_skip is not None else [])):
            p.mul_(scale)
        return out

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Project out the part of each decoder row's gradient along the row (the norm is fixed anyway)."""
        if self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            g.sub_((g * w).sum(dim=1, keepdim=True) * w)

    def save(self, folder: str | os.PathLike) -> None:
        """sparsify's layout: cfg.json + sae.safetensors (written atomically, weights first; the SHA-256 of the
        weights in its metadata, which sparsify ignores and `load` checks)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        save_safetensors(folder / WEIGHTS_FILE, tensors)
        write_json_atomic(folder / CFG_FILE, self.cfg.sparsify_dict())

    @classmethod
    def load(cls, folder: str | os.PathLike, device: torch.device | str = "cpu") -> "Transcoder":
        folder = Path(folder)
        try:
            raw = json.loads((folder / CFG_FILE).read_text())
            cfg = TranscoderConfig(raw["d_in"], raw["num_latents"] or raw["d_in"] * raw["expansion_factor"], raw["k"],
                                   raw.get("skip_connection", False))
            tc = cls(cfg)
            tc.load_state_dict(load_safetensors(folder / WEIGHTS_FILE), strict=True)  # checked against its SHA-256
        except UserError:
            raise
        except FileNotFoundError as e:
            raise UserError(f"transcoder files missing in {folder}: {e.filename}") from None
        except Exception as e:  # bad JSON, missing keys, safetensors errors, shape mismatches
            raise UserError(f"{folder} does not hold a valid transcoder: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
        return tc.to(device)

    def config_dict(self) -> dict:
        return asdict(self.cfg)


class Transcoders(nn.ModuleDict):
    """One transcoder per layer, keyed by the layer as text (nn.ModuleDict's keys); its items are typed as
    Transcoder for the type checker (a plain nn.ModuleDict gives Modules)."""

    def __getitem__(self, key: str) -> Transcoder:
        return cast(Transcoder, super().__getitem__(key))

    def values(self) -> list[Transcoder]:  # type: ignore[override]
        return [cast(Transcoder, tc) for tc in super().values()]
