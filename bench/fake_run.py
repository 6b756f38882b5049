"""A run folder for the benchmarks that the stages' own set-up code opens, with no download: a byte-level BPE
of exactly the vocabulary asked for (trained on random words, so a 50,257-token head needs no gpt2 files), the
synthetic corpus prepared with it, and stage 1's own checkpoint of a model at the bench's shape whose weights are
then replaced by random ones (no zero-initialised projection, so the MLPs and the transcoders do real work).
"""
from __future__ import annotations

import os
import random
import string
from pathlib import Path

import torch

from core.files import CHECKSUM_KEY, load_checkpoint, save_checkpoint
from data.tokenizer import BPETokenizer, train_bpe
from experiment.paths import list_checkpoints
from training.config import TrainConfig
from training.diffusion import train


def sized_tokenizer(path: Path, n_vocab: int) -> Path:
    """tokenizer.json of a byte-level BPE with exactly `n_vocab` ids (its end-of-text included), made once."""
    if path.exists() and BPETokenizer.from_file(path).n_vocab == n_vocab:
        return path
    rng = random.Random(0)

    def texts():  # random lowercase words: enough distinct pairs for 50K merges
        for _ in range(max(2_000, n_vocab // 2)):
            yield " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 6)))
                           for _ in range(100))

    tok = train_bpe(texts(), n_vocab)
    if tok.n_vocab != n_vocab:
        raise RuntimeError(f"the random-word BPE reached {tok.n_vocab} ids, not {n_vocab}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path.parent)
    return path


def fake_run(folder: Path, args, seq_len: int | None = None) -> Path:
    """A run folder under `folder` for the bench shape `args` (num_layers, model_dim, num_heads, n_vocab,
    seq_len, batch_size): a prepared synthetic corpus holding enough windows of `seq_len` for both splits, and
    one checkpoint with random weights (std 0.02). Returns the run folder."""
    seq_len = seq_len or args.seq_len
    tokenizer = sized_tokenizer(folder / "tokenizer" / "tokenizer.json", args.n_vocab)
    mb = max(0.3, 150 * args.batch_size * seq_len / 1e6)  # ~2.5 bytes a token, 5% of documents in validation
    cfg = TrainConfig(dataset="synthetic", tokenizer=str(tokenizer), synthetic_mb=round(mb, 1),
                      data_dir=str(folder / "data"), experiments_dir=str(folder / "experiments"),
                      device="cuda" if torch.cuda.is_available() else "cpu", compile=False,
                      num_layers=args.num_layers, num_heads=args.num_heads, model_dim=args.model_dim,
                      train_seq_len=seq_len, val_seq_len=seq_len, batch_size=1, grad_acc_steps=1, train_steps=1,
                      val_loss_every=0, save_every=1, log_every=1)
    run = train(cfg)
    assert run is not None  # one process: the main one
    path = list_checkpoints(run)[-1]
    state = load_checkpoint(path)
    gen = torch.Generator().manual_seed(0)
    state["model"] = {k: torch.randn(v.shape, generator=gen).mul_(0.02).to(v.dtype) for k, v in state["model"].items()}
    save_checkpoint(path, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run
