"""The diffusion training loop behind train_diffusion.py: data, model, optimizers, DDP, validation,
checkpoints, resume, metrics and the loss plot. `set_up` builds (or restores) everything, `train_step` is
one optimizer step (what bench/train_throughput.py times), `loop` trains."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from core.files import UserError, load_checkpoint, read_json, remove_stale_temporaries, write_json_atomic
from core.locks import hold
from data.loader import ShardLoader
from data.prepare import PrepareConfig, PreparedData, prepare_dataset
from experiment import (
    CONFIG_FILE,
    METADATA_FILE,
    RunLog,
    checkpoint_name,
    list_checkpoints,
    metadata,
    new_run_folder,
    read_metrics,
    setup_distributed,
    truncate_metrics,
    use_compile,
)
from experiment.packing import micro_batches_per_forward
from experiment.paths import LOSS_PLOT
from experiment.plots import pyplot, save_figure
from experiment.settings import refuse_other_settings
from model.attention import FLEX_BLOCK
from model.diffusion import DiffusionLM, ModelConfig
from model.distributed import Dist
from model.objective import VAL_SEED, count_masked, diffusion_loss, train_noise, unmaskable_ids, val_noise
from model.optim import build_optimizers, lr_factor, set_lr
from model.precision import autocast as autocast_for, describe
from training.config import TrainConfig
from training.loop import Prefetch, finite, open_wandb, run_training_steps

# Flags a resumed run must keep: they fix the model, the data or the order of batches.
RESUME_FIXED = ("dataset", "tokenizer", "synthetic_mb", "num_layers", "num_heads", "model_dim", "mlp_ratio",
                "train_seq_len", "batch_size", "grad_acc_steps", "seed")


class TrainingDiverged(UserError):
    pass


def find_resume(resume: str, experiments_dir: str) -> tuple[Path, Path]:
    """`latest` (the newest run with a checkpoint), a run folder (its newest checkpoint) or a checkpoint file."""
    if resume == "latest":
        runs = sorted(p for p in Path(experiments_dir).glob("*") if (p / CONFIG_FILE).exists() and list_checkpoints(p))
        if not runs:
            raise UserError(f"--resume latest: no run under {experiments_dir}/ has a checkpoint")
        return runs[-1], list_checkpoints(runs[-1])[-1]
    path = Path(resume)
    if path.is_dir():
        if not (path / CONFIG_FILE).exists() or not list_checkpoints(path):
            raise UserError(f"--resume {path}: not a run folder with a checkpoint")
        return path, list_checkpoints(path)[-1]
    if path.is_file() and (path.parent / CONFIG_FILE).exists():
        return path.parent, path
    raise UserError(f"--resume {resume}: no such run folder or checkpoint")


def merge_resume_config(cfg: TrainConfig, saved: dict, given: set[str] | None) -> TrainConfig:
    """The saved run's flags, with the ones typed now on top; fixed flags must not change."""
    given = set(asdict(cfg)) if given is None else given
    current = asdict(cfg)
    refuse_other_settings("--resume: the run was trained", saved, current,
                          "a resumed run keeps its model, data and batch shape",
                          [name for name in RESUME_FIXED if name in given])
    merged = {k: (current[k] if k in given else saved.get(k, current[k])) for k in current}
    merged["resume"] = cfg.resume
    return type(cfg)(**merged)


def plot_losses(folder: Path) -> None:
    """loss.png: training loss and validation NELBO (nats/token) against step."""
    plt = pyplot()
    records = read_metrics(folder)
    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train"]
    val = [(r["step"], r["val_nelbo"]) for r in records if r.get("event") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (NELBO estimate)", alpha=0.6)
    if val:
        ax.plot(*zip(*val), "o-", label="validation NELBO")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_title(folder.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, folder / LOSS_PLOT)


@torch.no_grad()
def evaluate(model: DiffusionLM, loader: ShardLoader, max_tokens: int, device: torch.device, autocast,
             dist: Dist) -> dict:
    """NELBO on fixed validation tokens with a fixed grid of t and fixed masks (low variance)."""
    n_total = loader.n_sequential(max_tokens)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in loader.sequential(max_tokens):
        t, u = val_noise(batch.index, n_total, VAL_SEED, loader.seq_len)
        n_masked = count_masked(batch.tokens, t, u, *unmaskable_ids(model.cfg))  # on the host: no sync
        with autocast:
            terms = diffusion_loss(model, batch.tokens.to(device), t.to(device), u.to(device), n_masked)
        sums += torch.stack([x.double() for x in terms])
    sums = dist.all_sum(sums)
    nelbo = float(sums[0] / sums[2])
    return {"val_nelbo": nelbo, "val_bits_per_token": nelbo / math.log(2), "val_ppl_bound": math.exp(min(nelbo, 700)),
            "val_tokens": int(sums[2])}


# one forward pass's (tokens, t, u) on the host, and its number of masked positions (counted there, so the loss
# has static shapes and never waits for the device)
Forward = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]


def accumulate_gradients(net, forwards: list[Forward], tokens_per_process: int, device: torch.device, autocast,
                         dist: Dist) -> torch.Tensor:
    """Backward over this process's forward passes of one step; DDP synchronises on the last one only.

    The gradient is that of Σ(CE/t) / (positions of the step, all processes together): each process divides
    by its own `tokens_per_process` and DDP averages over processes, so it does not depend on how the step's
    sequences are split over processes, micro-batches and forward passes. Returns the summed (weighted CE,
    masked, maskable) over all processes, on the device."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for i, (tokens, t, u, n_masked) in enumerate(forwards):
        sync = net.no_sync() if dist.world > 1 and i < len(forwards) - 1 else contextlib.nullcontext()
        with sync:
            with autocast:
                terms = diffusion_loss(net, tokens.to(device, non_blocking=True), t.to(device, non_blocking=True),
                                       u.to(device, non_blocking=True), n_masked)
            (terms.weighted_ce / tokens_per_process).backward()
        sums += torch.stack([x.detach().double() for x in terms])
    return dist.all_sum(sums)


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built (or restored from a checkpoint) by `set_up`."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    folder: Path | None  # None on ranks > 0 of a new run
    model: DiffusionLM
    net: Any  # the model, or its DDP wrapper
    optimizers: list
    train_loader: ShardLoader
    val_loader: ShardLoader
    log: RunLog
    start: int
    acc: int  # micro-batches per process per step
    state: dict | None  # the checkpoint resumed from
    group: int = 1  # consecutive micro-batches per forward pass (--forward_batch_size)
    prefetch: Prefetch[list[Forward]] | None = None  # the next step's forward passes, made in the background

    @property
    def per_step(self) -> int:  # sequences per optimizer step, all processes together
        return self.cfg.grad_acc_steps * self.cfg.batch_size

    @property
    def tokens_per_step(self) -> int:
        return self.per_step * self.cfg.train_seq_len

    def forwards(self, index: int) -> list[Forward]:
        """Step `index`'s forward passes (`step_forwards`), made one step ahead in a background thread."""
        if self.prefetch is None:
            self.prefetch = Prefetch(lambda i: step_forwards(self, i), self.cfg.train_steps)
        return self.prefetch.get(index)

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()
            self.prefetch = None


def step_forwards(r: Run, index: int) -> list[Forward]:
    """This process's forward passes of optimizer step `index`: its micro-batches in order, `r.group`
    consecutive ones concatenated into each pass, with their noise (seeded by global slot, so packing changes
    neither the sequences nor their noise). In pinned memory on CUDA, so the copies to the GPU do not wait."""
    cfg, forwards = r.cfg, []
    for first in range(0, r.acc, r.group):
        batches = [r.train_loader.batch(index * r.acc + micro) for micro in range(first, first + r.group)]
        tokens = batches[0].tokens if r.group == 1 else torch.cat([b.tokens for b in batches])
        slots = np.concatenate([b.index for b in batches])
        t, u = train_noise(slots, index, r.per_step, cfg.seed, cfg.train_seq_len)
        n_masked = count_masked(tokens, t, u, *unmaskable_ids(r.model.cfg))
        if r.device.type == "cuda":
            tokens, t, u = tokens.pin_memory(), t.pin_memory(), u.pin_memory()
        forwards.append((tokens, t, u, n_masked))
    return forwards


def train_step(r: Run, index: int) -> torch.Tensor:
    """Optimizer step `index` (from 0): its learning rates, the gradient over its forward passes (made ahead,
    `Run.forwards`), Muon and Adam. Returns the step's (weighted CE, masked, maskable) sums over all
    processes, on the device: the step itself reads nothing back from the device."""
    cfg = r.cfg
    set_lr(r.optimizers, lr_factor(index, cfg.train_steps, cfg.cooldown_frac))
    sums = accumulate_gradients(r.net, r.forwards(index), r.acc * cfg.batch_size * cfg.train_seq_len, r.device,
                                autocast_for(r.device), r.dist)
    for opt in r.optimizers:
        opt.step()
    for opt in r.optimizers:
        opt.zero_grad(set_to_none=True)
    return sums


class LossSums:
    """The (weighted CE, masked, maskable) sums of the steps since the last log line, and the first step whose
    loss was not finite with that loss, all kept on the device: adding a step reads nothing on the host."""

    def __init__(self, device: torch.device, saved: torch.Tensor | None = None) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        if saved is not None:  # a checkpoint's, so a resumed curve equals the uninterrupted one
            self.sums += saved.to(device)
        self._first_bad = torch.zeros(2, dtype=torch.float64, device=device)  # (step, loss); step 0: none yet

    def add(self, done: int, sums: torch.Tensor) -> None:
        """Step number `done`'s sums."""
        self.sums += sums
        loss = sums[0] / sums[2]
        bad = ~torch.isfinite(loss) & (self._first_bad[0] == 0)
        self._first_bad = torch.where(bad, torch.stack([torch.full_like(loss, done), loss]), self._first_bad)

    def first_bad(self) -> tuple[int, float] | None:
        """(step, loss) of the first step whose loss was NaN or infinite, or None (reads the device)."""
        step, loss = self._first_bad.tolist()
        return (int(step), loss) if step else None

    def take(self) -> float:
        """The mean loss since the last call (reads the device), and a fresh start."""
        mean = float(self.sums[0] / self.sums[2])
        self.sums.zero_()
        return mean


def train(cfg: TrainConfig, given: set[str] | None = None) -> Path | None:
    """Run (or resume) a training run; returns its folder (on rank 0)."""
    dist, device = setup_distributed(cfg)
    try:
        with contextlib.ExitStack() as stack:  # the run folder's lock (rank 0) until the run ends
            return loop(set_up(cfg, given, dist, device, stack))
    finally:
        dist.close()


def _prepare_data(cfg: TrainConfig, dist: Dist, tokens_per_step: int) -> PreparedData:
    """Rank 0 prepares (or finds) the shards, the others then open them."""
    shards_needed = max(1, math.ceil(cfg.train_steps * tokens_per_step / 100_000_000))
    prep = PrepareConfig(dataset=cfg.dataset, tokenizer=cfg.tokenizer, data_dir=cfg.data_dir,
                         synthetic_mb=cfg.synthetic_mb,
                         num_shards=shards_needed if cfg.dataset == "fineweb-edu" else None)
    if dist.main:
        data = prepare_dataset(prep)
    dist.barrier()
    if not dist.main:
        data = prepare_dataset(prep)
    return data


def set_up(cfg: TrainConfig, given: set[str] | None, dist: Dist, device: torch.device,
           stack: contextlib.ExitStack) -> Run:
    """Data, model, optimizers and the run folder of a new run, or all of them restored for a resumed one.
    `stack` holds the run folder's lock (rank 0) until the caller's block ends."""
    state, folder = None, None
    if cfg.resume:
        folder, ckpt = find_resume(cfg.resume, cfg.experiments_dir)
        if dist.main:  # a second job resuming the same run would write every line and checkpoint twice
            stack.enter_context(hold(folder))
        cfg = merge_resume_config(cfg, read_json(folder / CONFIG_FILE)["train"], given)
        state = load_checkpoint(ckpt, device)
    if cfg.grad_acc_steps % dist.world:
        raise UserError(f"--grad_acc_steps {cfg.grad_acc_steps} must be divisible by the {dist.world} processes")
    if device.type == "cuda" and (cfg.train_seq_len % FLEX_BLOCK or cfg.val_seq_len % FLEX_BLOCK):
        raise UserError(f"on CUDA the sequence lengths must be multiples of {FLEX_BLOCK} (FlexAttention blocks); "
                        f"got --train_seq_len {cfg.train_seq_len}, --val_seq_len {cfg.val_seq_len}")
    acc = cfg.grad_acc_steps // dist.world
    group = micro_batches_per_forward(cfg.forward_batch_size, cfg.batch_size, acc, cfg.train_seq_len, device)
    tokens_per_step = cfg.grad_acc_steps * cfg.batch_size * cfg.train_seq_len
    data = _prepare_data(cfg, dist, tokens_per_step)
    tok = data.tokenizer
    mcfg = ModelConfig(n_vocab=tok.n_vocab, vocab_size=tok.vocab_size, mask_id=tok.mask_id, pad_id=tok.pad_id,
                       bos_id=tok.bos_id, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                       model_dim=cfg.model_dim, mlp_ratio=cfg.mlp_ratio)
    train_files = [s["file"] for s in data.meta["shards"] if s["split"] == "train"]
    if folder is not None:  # resuming: the shards the run started with, even if more were prepared since
        train_files = read_json(folder / CONFIG_FILE)["data"].get("train_files", train_files)
    train_loader = ShardLoader(data.folder, "train", cfg.train_seq_len, cfg.batch_size, cfg.seed, dist.rank,
                               dist.world, files=train_files)
    val_loader = ShardLoader(data.folder, "val", cfg.val_seq_len, cfg.batch_size, 0, dist.rank, dist.world)

    torch.manual_seed(cfg.seed)
    model = DiffusionLM(mcfg).to(device)
    optimizers = build_optimizers(model, cfg.muon_lr, cfg.embed_lr, cfg.head_lr, fused=device.type == "cuda")
    start = 0
    if state is not None:
        if state.get("model_config") != asdict(mcfg):
            raise UserError(f"the checkpoint in {folder} holds another model shape than this configuration")
        model.load_state_dict(state["model"], strict=True)
        for opt, sd in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(sd)
        start = int(state["step"])

    log = RunLog(None, enabled=dist.main)
    facts = {"world_size": dist.world, "device": str(device), "muon_ns_dtype": str(getattr(optimizers[1], "ns_dtype"))}
    if dist.main:
        if folder is None:
            folder = new_run_folder(cfg.model_name, cfg.experiments_dir)
            stack.enter_context(hold(folder))
            write_json_atomic(folder / CONFIG_FILE, {
                "train": asdict(cfg), "model": asdict(mcfg), "tokenizer": tok.spec(),
                "data": {"folder": str(data.folder), "params": data.meta["params"], "train_files": train_files}})
            write_json_atomic(folder / METADATA_FILE, metadata(facts))
            tok.save(folder)
        else:
            meta = read_json(folder / METADATA_FILE)
            meta.setdefault("resumes", []).append({"from_step": start, **metadata(facts)})
            write_json_atomic(folder / METADATA_FILE, meta)
            truncate_metrics(folder, start)
            remove_stale_temporaries(folder, recursive=False)  # what a killed run was writing (later stages' own below)
        log.folder = folder
    log(f"run folder: {folder}" + (f" (resumed at step {start})" if start else ""))
    log(f"model: {model.n_params():,} parameters ({model.n_params(matmul_only=True):,} in matmuls), "
        f"{cfg.num_layers} layers, d={cfg.model_dim}, {cfg.num_heads} heads; device {device}, "
        f"{dist.world} process(es); Muon's Newton–Schulz in {facts['muon_ns_dtype']} ({describe(device)})")
    log(f"data: {data.folder} ({data.meta['train_tokens']:,} training tokens); {tokens_per_step:,} tokens per step "
        f"= {cfg.grad_acc_steps} micro-batches × {cfg.batch_size} sequences × {cfg.train_seq_len} tokens"
        + (f", {group} micro-batches per forward pass" if group > 1 else ""))

    if use_compile(cfg.compile, device):
        model.compile_blocks()
    net: Any = model
    if dist.world > 1:
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return Run(cfg, dist, device, folder, model, net, optimizers, train_loader, val_loader,
               log, start, acc, state, group)


def loop(r: Run) -> Path | None:
    """Train from `r.start` to --train_steps; validate, log and save on the way. The loss is read on the host
    at log steps only; a NaN or infinite loss stops the run there, or before a validation or a checkpoint."""
    cfg, dist, device, log = r.cfg, r.dist, r.device, r.log
    autocast = autocast_for(device)
    wandb = open_wandb(dist.main and cfg.wandb, r.folder, "train_diffusion", asdict(cfg), cfg.wandb_project)
    losses = LossSums(device, r.state.get("loss_since_log") if r.state is not None else None)
    factor = 1.0

    def diverged(what: str) -> None:
        kept = list_checkpoints(r.folder) if r.folder else []
        raise TrainingDiverged(f"{what}; stopped. Last good checkpoint: {kept[-1] if kept else 'none saved yet'}. "
                               "Try lower learning rates.")

    def check_loss() -> None:
        bad = losses.first_bad()
        if bad is not None:
            diverged(f"the loss became {bad[1]} at step {bad[0]}")

    def check_weights(done: int) -> None:  # before validating or saving: never a checkpoint of NaN weights
        check_loss()
        if not finite(r.model):
            diverged(f"the weights became NaN or infinite at step {done}")

    def step(index: int) -> None:
        nonlocal factor
        factor = lr_factor(index, cfg.train_steps, cfg.cooldown_frac)
        losses.add(index + 1, train_step(r, index))

    def log_train(done: int, tokens_per_s: float) -> dict:
        check_loss()
        mean_loss = losses.take()  # over the steps since the last log line
        record = {"event": "train", "step": done, "loss": mean_loss, "lr_factor": factor,
                  "tokens_per_s": tokens_per_s, "tokens": done * r.tokens_per_step}
        log.metrics(record)
        if wandb:
            wandb.log(record, step=done)
        return {"loss": f"{mean_loss:.3f}", "tok_s": f"{tokens_per_s:,.0f}"}

    def validate(done: int) -> None:
        check_weights(done)
        result = evaluate(r.model, r.val_loader, cfg.val_tokens, device, autocast, dist)
        log(f"step {done}: val NELBO {result['val_nelbo']:.4f} nats/token = {result['val_bits_per_token']:.4f} "
            f"bits/token, perplexity bound {result['val_ppl_bound']:.2f} ({result['val_tokens']:,} tokens)")
        log.metrics({"event": "val", "step": done, **result})
        if wandb:
            wandb.log(result, step=done)
        if dist.main and r.folder is not None:  # (the main process always has its folder)
            plot_losses(r.folder)

    def save(done: int) -> None:
        if cfg.save_model:
            check_weights(done)  # on every process (the weights are the same), so all of them stop
        if dist.main and r.folder is not None and cfg.save_model:  # (the main process always has its folder)
            r.model.save(r.folder / checkpoint_name(done), {
                "step": done, "optimizers": [o.state_dict() for o in r.optimizers], "config": asdict(cfg),
                "data_position": {"micro_batch": done * r.acc, "sequences_consumed": done * r.per_step},
                "rng": {"torch": torch.get_rng_state()}, "loss_since_log": losses.sums.cpu()})

    try:
        run_training_steps(cfg, r.start, r.tokens_per_step, dist.main, step, log_train, validate, save, device)
    finally:
        r.close()
    dist.barrier()  # no process tears the group down while another still writes or validates
    if dist.main:
        log(f"done: {cfg.train_steps} steps; files in {r.folder}")
    return r.folder
