"""The flags of the two training stages: `TrainConfig` (stage 1, train_diffusion.py, `training.diffusion`)
and `TranscoderTrainConfig` (stage 3, train_transcoders.py, `training.transcoders`), built from the flag
groups of `experiment.flags`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from core import checks as c
from core.cli import arg
from data.prepare import DATASET, SYNTHETIC_MB, TOKENIZER
from experiment import BatchFlags, LayersFlag, LoopFlags, NoiseFlag, RunFlags, ShapeFlags
from experiment.flags import WandbFlags
from model.diffusion import check_shape


@dataclass
class TrainConfig(WandbFlags, BatchFlags, LoopFlags):
    """Train a masked-diffusion LM; writes experiments/<stamp>_<model_name>/."""

    dataset: str = arg("fineweb-edu", "fineweb-edu, synthetic, or a path to .txt/.jsonl/.parquet files",
                       DATASET)
    tokenizer: str = arg("", "gpt2, bpe:<size> or a tokenizer.json; empty: gpt2 for fineweb-edu, bpe:4096 otherwise",
                         TOKENIZER)
    data_dir: str = arg("data_cache", "where prepared datasets live", c.ROOT_FOLDER)
    synthetic_mb: float = arg(4.0, "size of the synthetic corpus (MB of text)", SYNTHETIC_MB)
    val_seq_len: int = arg(4096, "tokens per validation sequence", c.COUNT)
    val_tokens: int = arg(2_097_152, "validation tokens (the same ones every time)", c.COUNT)
    num_layers: int = arg(12, "transformer blocks", c.count(1, 1024))
    num_heads: int = arg(6, "attention heads", c.count(1, 1024))
    model_dim: int = arg(384, "residual stream width", c.count(2, 65_536))
    mlp_ratio: float = arg(4.0, "MLP hidden width / model_dim", c.Range(0.125, 64.0))
    muon_lr: float = arg(0.02, "Muon learning rate (2-D weights inside the blocks)", c.positive(100.0))
    embed_lr: float = arg(0.3, "Adam learning rate of the embedding", c.positive(100.0))
    head_lr: float = arg(0.008, "Adam learning rate of the output head", c.positive(100.0))
    cooldown_frac: float = arg(0.4, "fraction of the steps over which the learning rate decays linearly to 0",
                               c.fraction())
    model_name: str = arg("diffusion", "suffix of the run folder's name", c.NAME)
    experiments_dir: str = arg("experiments", "where run folders are created", c.ROOT_FOLDER)
    cuda: Optional[int] = arg(None, "CUDA device index (same as --device cuda:N)", c.CUDA)
    device: Optional[str] = arg(None, "cpu, cuda or cuda:N (default: cuda:0 if available, else cpu)", c.DEVICE)
    compile: Optional[bool] = arg(None, "torch.compile the blocks (default: on for CUDA, off on the CPU)")
    resume: str = arg("", "continue a run: its folder, a checkpoint file, or 'latest'", c.RESUME)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_shape(self.num_layers, self.num_heads, self.model_dim, self.mlp_ratio)
        if self.val_tokens < self.val_seq_len:
            raise ValueError(f"--val_tokens {self.val_tokens} is less than one --val_seq_len {self.val_seq_len}")


@dataclass
class TranscoderTrainConfig(WandbFlags, BatchFlags, LoopFlags, LayersFlag, NoiseFlag, ShapeFlags, RunFlags):
    """Train one sparse transcoder per MLP of a frozen diffusion model."""

    val_seq_len: Optional[int] = arg(None, "tokens per validation sequence (default: --train_seq_len)", c.COUNT)
    save_model: bool = arg(True, "write checkpoints and the per-layer transcoder files")
    expansion_factor: int = arg(32, "latents per MLP = expansion_factor × model_dim", c.count(1, 4096))
    k: int = arg(32, "active latents per token (TopK)", c.count(runs=("100_000",)))
    lr: Optional[float] = arg(None, "Adam learning rate (default: 2e-4 / sqrt(latents / 16384), as in sparsify)",
                              c.positive(100.0))
    auxk_alpha: float = arg(1 / 32, "weight of the AuxK loss (dead latents predict the residual)", c.Range(0.0, 1000.0))
    dead_tokens: int = arg(10_000_000, "tokens without firing after which a latent counts as dead", c.count(1, 2**62))
    skip_connection: bool = arg(False, "add a linear skip connection from input to output")
    compile: Optional[bool] = arg(None, "torch.compile each transcoder's loss (default: on for CUDA, off on the CPU)")
    resume: str = arg("", "resume (an interrupted job also resumes without it: same folder, same settings)",
                      c.RESUME)
    overwrite: bool = arg(False, "replace existing transcoders for this checkpoint")
