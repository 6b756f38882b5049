"""Training a transcoder for every MLP of a frozen diffusion model (behind train_transcoders.py).

One pass of the base model per micro-batch feeds every layer's transcoder (forward hooks capture each
MLP's input and output). Each layer's loss is backpropagated right away, so only one layer's (N, M)
latents are alive at a time. Under torchrun the gradients and dead-latent counters are all-reduced by
hand (the per-layer backward does not fit DDP's one-forward-one-backward model).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from core.files import (
    UserError,
    load_checkpoint,
    read_json,
    remove_stale_temporaries,
    save_checkpoint,
    write_json_atomic,
)
from core.locks import Replacement, has_output, hold, staging_path
from data.loader import ShardLoader
from experiment import (
    CONFIG_FILE,
    RunLog,
    StagePaths,
    checkpoint_name,
    hookpoint,
    list_checkpoints,
    open_base_run,
    open_data,
    parse_layers,
    read_metrics,
    setup_distributed,
    to_device,
    truncate_metrics,
    use_compile,
)
from experiment.packing import micro_batches_per_forward
from experiment.paths import TRANSCODER_PLOT, TRANSCODER_SUMMARY_FILE
from experiment.plots import pyplot, save_figure
from experiment.settings import refuse_other_settings
from model.diffusion import DiffusionLM
from model.distributed import Dist
from model.hooks import capture_mlps, replace_mlps
from model.objective import VAL_SEED, at_mask_ratio, diffusion_loss, is_padding, noise_for_model, train_noise, val_noise
from model.optim import lr_factor
from model.precision import autocast as autocast_for
from model.transcoder import Transcoder, TranscoderConfig, Transcoders
from training.config import TranscoderTrainConfig
from training.loop import finite, open_wandb, run_training_steps

# Flags that define what is trained: a resumed or rerun job must keep them.
FIXED = ("checkpoint", "layers", "expansion_factor", "k", "skip_connection", "mask_ratio", "train_seq_len",
         "batch_size", "grad_acc_steps", "seed", "auxk_alpha", "lr", "dead_tokens")


def noise_for(cfg: TranscoderTrainConfig, batch, step: int, per_step: int, seq_len: int):
    """A training batch's noise: the diffusion noise process (`random`), or a fixed t for every sequence."""
    return at_mask_ratio(train_noise(batch.index, step, per_step, cfg.seed + 1, seq_len), cfg.mask_ratio)


def in_float32(tc: Transcoder):
    """The transcoder as an MLP replacement for any base model: the MLP's input (bf16 for a bf16 model) cast to
    float32, the transcoder's dtype (replace_mlps casts its output back to the MLP's)."""
    return lambda x: tc(x.float())


class LayerPairs:
    """MLP (input, output) pairs of one noised batch as (N, D) float, every position in order. The noise masks
    what `noise_for_model` masks (for the public models their EOS too). `padded`: drop the padding positions
    (`is_padding`: none for the public models, whose [PAD] is their EOS; a boolean selection, whose size the
    host must read); training windows hold no padding and pass False."""

    def __init__(self, model: DiffusionLM, layers: list[int], tokens: torch.Tensor, t, u, autocast,
                 padded: bool = True) -> None:
        mc = model.cfg
        noised = noise_for_model(tokens, t, u, mc)
        with torch.no_grad(), capture_mlps(model, layers) as seen, autocast:
            model(noised.inputs, select=noised.inputs.new_zeros(0))  # no head needed: select no position
        if padded:
            keep = ~is_padding(tokens, mc)
            self.pairs = {layer: (x[keep].float(), y[keep].float()) for layer, (x, y) in seen.items()}
            self.n_tokens = int(keep.sum())
        else:
            self.pairs = {layer: (x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float())
                          for layer, (x, y) in seen.items()}
            self.n_tokens = tokens.numel()


def update_dead(tokens_since_fired: torch.Tensor, fired: torch.Tensor, n_tokens) -> None:
    """Count tokens since each latent last fired: +n_tokens for all, then 0 for those that fired (`fired` a
    bool mask; no host sync)."""
    tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)


def _all_reduce_grads(transcoders: Transcoders, dist: Dist) -> None:
    if dist.world == 1:
        return
    for p in transcoders.parameters():
        if p.grad is not None:
            torch_dist.all_reduce(p.grad)
            p.grad.div_(dist.world)


def any_dead(dead: dict[int, torch.Tensor], dead_tokens: int) -> bool:
    """Whether any layer has a latent silent for more than `dead_tokens` tokens: one host read for all."""
    return bool(torch.stack([(d > dead_tokens).any() for d in dead.values()]).any())


def packed(micro_batches, group: int):
    """The micro-batches of (tokens, t, u), `group` at a time (fewer at the end if they run out) concatenated
    along the batch for one forward pass: (how many micro-batches, tokens, t, u)."""
    batch: list = []
    for micro in micro_batches:
        batch.append(micro)
        if len(batch) == group:
            yield len(batch), *(torch.cat(parts) for parts in zip(*batch))
            batch = []
    if batch:
        yield len(batch), *(torch.cat(parts) for parts in zip(*batch))


def train_step(model, transcoders: Transcoders, layers: list[int], micro_batches, acc: int,
               scales: dict[int, float], dead: dict[int, torch.Tensor], cfg: TranscoderTrainConfig, optimizer,
               dist: Dist, autocast, device, loss_fns: dict | None = None, group: int = 1) -> torch.Tensor:
    """One optimizer step of every layer's transcoder over `acc` micro-batches of (tokens, t, u), `group` of
    them per base-model forward pass (each micro-batch's loss on its own rows, as unpacked); updates the
    dead-latent counters; returns each layer's training FVU as a device tensor (float64, one per layer).
    `loss_fns` (layer → a transcoder's loss, compiled or not) default to the transcoders' own. AuxK runs on
    every layer while any layer has a dead latent (its value is 0 on a layer with none), else on none: one
    host read per step decides, and each compiled loss has one graph with AuxK and one without. No other
    host sync: no padding selection, fired latents counted by index_add_."""
    loss_fns = loss_fns or {layer: transcoders[str(layer)].loss for layer in layers}
    masks = {layer: dead[layer] > cfg.dead_tokens for layer in layers}
    auxk = any_dead(dead, cfg.dead_tokens)
    fired = {layer: torch.zeros(len(dead[layer]), dtype=torch.int32, device=device) for layer in layers}
    sums = torch.zeros(len(layers), 2, dtype=torch.float64, device=device)  # SSE, total variance
    n_tokens = 0
    for parts, tokens, t, u in packed(micro_batches, group):
        pairs = LayerPairs(model, layers, to_device(tokens, device), to_device(t, device), to_device(u, device),
                           autocast, padded=False)
        n_tokens += pairs.n_tokens
        rows = pairs.n_tokens // parts  # micro-batches share one shape
        for part in range(parts):
            for i, layer in enumerate(layers):
                x, y = (v[part * rows:(part + 1) * rows] for v in pairs.pairs[layer])
                with autocast:
                    out = loss_fns[layer](x, y / scales[layer], masks[layer] if auxk else None)
                ((out.fvu + cfg.auxk_alpha * out.auxk) / acc).backward()
                enc = out.encoded
                fired[layer].index_add_(0, enc.indices.reshape(-1), (enc.acts > 0).reshape(-1).to(torch.int32))
                sums[i] += torch.stack([out.sse.detach().double(), out.total_variance.detach().double()])
    _all_reduce_grads(transcoders, dist)
    dist.all_sum(sums)
    total = dist.all_sum(torch.full((), n_tokens, dtype=torch.long, device=device)) if dist.world > 1 else n_tokens
    for layer in layers:
        update_dead(dead[layer], dist.all_sum(fired[layer]) > 0, total)
    for tc in transcoders.values():
        tc.remove_parallel_gradient()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for tc in transcoders.values():
        tc.normalize_decoder()
    return sums[:, 0] / sums[:, 1]


@torch.no_grad()
def evaluate(model, transcoders: dict[int, Transcoder], layers, loader: ShardLoader,
             cfg: TranscoderTrainConfig, device, autocast, dist: Dist, dead: dict[int, torch.Tensor]) -> dict:
    """Per layer on fixed validation tokens and noise: FVU, L0, dead fraction, and the NELBO with that
    layer's MLP replaced by its transcoder; also with all replaced, and the base NELBO."""
    n_total = loader.n_sequential(cfg.val_tokens)
    # per layer: SSE, Σy, Σ||y||², tokens, Σ L0
    stats = {layer: [torch.zeros((), dtype=torch.float64, device=device),
                     torch.zeros(model.cfg.model_dim, dtype=torch.float64, device=device),
                     torch.zeros((), dtype=torch.float64, device=device),
                     torch.zeros((), dtype=torch.float64, device=device),
                     torch.zeros((), dtype=torch.float64, device=device)] for layer in layers}
    variants = ["base", *[f"layer_{layer}" for layer in layers], "all"]
    nelbo = {v: torch.zeros(2, dtype=torch.float64, device=device) for v in variants}
    for batch in loader.sequential(cfg.val_tokens):
        t, u = at_mask_ratio(val_noise(batch.index, n_total, VAL_SEED, loader.seq_len), cfg.mask_ratio)
        tokens, t, u = batch.tokens.to(device), t.to(device), u.to(device)
        pairs = LayerPairs(model, layers, tokens, t, u, autocast)
        for layer, (x, y) in pairs.pairs.items():
            with autocast:
                enc = transcoders[layer].encode(x)
                y_hat = transcoders[layer].decode(enc.acts, enc.indices, x).float()
            s = stats[layer]
            s[0] += (y - y_hat).double().pow(2).sum()
            s[1] += y.double().sum(0)
            s[2] += y.double().pow(2).sum()
            s[3] += len(y)
            s[4] += (enc.acts > 0).sum()
        for v in variants:
            chosen = [] if v == "base" else layers if v == "all" else [int(v.split("_")[1])]
            with replace_mlps(model, {layer: in_float32(transcoders[layer]) for layer in chosen}), autocast:
                terms = diffusion_loss(model, tokens, t, u)
            nelbo[v] += torch.stack([terms.weighted_ce.double(), terms.n_maskable.double()])
    result: dict[str, Any] = {"base_nelbo": None, "all_nelbo": None, "layers": {}}
    mean_nelbo = {v: float(dist.all_sum(sums)[0] / sums[1]) for v, sums in nelbo.items()}
    for layer in layers:
        s = [dist.all_sum(x) for x in stats[layer]]
        total_var = s[2] - s[1].pow(2).sum() / s[3]
        result["layers"][str(layer)] = {"fvu": float(s[0] / total_var), "l0": float(s[4] / s[3]),
                                        "dead_fraction": float((dead[layer] > cfg.dead_tokens).float().mean()),
                                        "spliced_nelbo": mean_nelbo[f"layer_{layer}"]}
    result["base_nelbo"], result["all_nelbo"] = mean_nelbo["base"], mean_nelbo["all"]
    return result


def plot(out_dir: Path) -> None:
    """FVU and dead fraction per layer against step."""
    plt = pyplot()
    vals = [r for r in read_metrics(out_dir) if r.get("event") == "val"]
    if not vals:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for layer in vals[-1]["layers"]:
        steps = [r["step"] for r in vals]
        a.plot(steps, [r["layers"][layer]["fvu"] for r in vals], marker="o", label=f"layer {layer}")
        b.plot(steps, [r["layers"][layer]["dead_fraction"] for r in vals], marker="o", label=f"layer {layer}")
    a.set(xlabel="step", ylabel="FVU (validation)", yscale="log", title="fraction of variance unexplained")
    b.set(xlabel="step", ylabel="dead fraction", title="latents silent for > dead_tokens", ylim=(-0.02, 1.02))
    for ax in (a, b):
        ax.grid(alpha=0.3)
    a.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    save_figure(fig, out_dir / TRANSCODER_PLOT)


def _settings(cfg: TranscoderTrainConfig, ckpt: Path, layers: list[int], num_latents: int, lr: float) -> dict:
    s = asdict(cfg)
    s.update(checkpoint=ckpt.name, layers=layers, num_latents=num_latents, lr=lr)
    for name in ("train_folder", "checkpoint_name", "resume", "overwrite", "cuda", "device", "compile",
                 "forward_batch_size"):
        s.pop(name, None)
    return s


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built (or restored from a checkpoint) by `set_up`."""

    cfg: TranscoderTrainConfig
    dist: Dist
    device: torch.device
    out_dir: Path
    model: DiffusionLM  # frozen
    layers: list[int]
    transcoders: Transcoders  # layer (as str) → Transcoder, learning at unit target scale
    scales: dict[int, float]  # each layer's target RMS on the first batch; folded back into the saved files
    dead: dict[int, torch.Tensor]  # tokens since each latent last fired
    optimizer: torch.optim.Optimizer
    lr: float
    settings: dict
    train_loader: ShardLoader
    val_loader: ShardLoader
    log: RunLog
    start: int
    acc: int  # micro-batches per process per step
    loss_fns: dict = dataclasses.field(default_factory=dict)  # layer → its transcoder's loss (compiled or not)
    compiled: bool = False  # the losses and the base model's blocks
    group: int = 1  # micro-batches per base-model forward pass (--forward_batch_size)
    final_dir: Path | None = None  # with --overwrite, `out_dir` is its replacement being written (see core.locks)
    replacement: Replacement | None = None  # rank 0's, swapped in for `final_dir` at the end

    @property
    def per_step(self) -> int:
        return self.cfg.grad_acc_steps * self.cfg.batch_size

    def scaled(self) -> dict[int, Transcoder]:
        return {layer: self.transcoders[str(layer)].scaled(self.scales[layer]) for layer in self.layers}


def train_transcoders(cfg: TranscoderTrainConfig) -> Path:
    dist, device = setup_distributed(cfg)
    try:
        with contextlib.ExitStack() as stack:  # the output's lock (rank 0), and its replacement with --overwrite
            run, out_dir = set_up(cfg, dist, device, stack)
            return loop(run) if run is not None else out_dir
    finally:
        dist.close()


def _saved_state(cfg: TranscoderTrainConfig, out_dir: Path, settings: dict, device) -> dict | None:
    """The checkpoint to resume from, after checking it was trained with the same settings."""
    if not (out_dir / CONFIG_FILE).exists() or cfg.overwrite:
        if cfg.resume:
            raise UserError(f"--resume: nothing to resume in {out_dir}")
        return None
    saved = read_json(out_dir / CONFIG_FILE)
    refuse_other_settings(f"{out_dir} holds transcoders trained", saved, settings,
                          "use --overwrite True to replace them", FIXED)
    kept = list_checkpoints(out_dir)
    return load_checkpoint(kept[-1], device) if kept else None


def check_inputs(cfg: TranscoderTrainConfig, folder: Path, run_cfg: dict, out_dir: Path, world: int = 1) -> None:
    """What the flags name against what exists, before the output folder is touched (UserError): --resume
    names this checkpoint's transcoder folder, the run folder or the newest of the transcoders' checkpoints
    ('latest' too; resuming always continues from the newest checkpoint), one validation window fits in
    --val_tokens, and the data holds the training and validation sequences (the loaders' own checks). The
    model has no longest sequence (rotary positions are computed for any length)."""
    if cfg.resume and cfg.resume != "latest":
        given = Path(cfg.resume).expanduser()
        if not given.exists():
            raise UserError(f"--resume {cfg.resume}: no such file or folder")
        kept = list_checkpoints(out_dir) if out_dir.is_dir() else []
        if given.is_file():
            if given.resolve().parent != out_dir.resolve():
                raise UserError(f"--resume {cfg.resume}: not a checkpoint of this run's transcoders ({out_dir})")
            if not kept or given.resolve() != kept[-1].resolve():
                raise UserError(f"--resume {cfg.resume}: transcoder training continues from its newest checkpoint"
                                f"{f' ({kept[-1].name})' if kept else ''}; give that one, the folder or 'latest'")
        elif given.resolve() not in (out_dir.resolve(), folder.resolve()):
            raise UserError(f"--resume {cfg.resume}: neither this run ({folder}) nor its transcoders for this "
                            f"checkpoint ({out_dir})")
    val_seq_len = cfg.val_seq_len or cfg.train_seq_len
    if cfg.val_tokens < val_seq_len:
        raise UserError(f"--val_tokens {cfg.val_tokens} is less than one validation sequence of {val_seq_len} tokens "
                        "(--val_seq_len, default --train_seq_len)")
    data = open_data(run_cfg)
    ShardLoader(data.folder, "train", cfg.train_seq_len, cfg.batch_size, cfg.seed, 0, world,
                files=run_cfg["data"].get("train_files"))
    ShardLoader(data.folder, "val", val_seq_len, cfg.batch_size, 0, 0, world)


def _initial_scales(r: Run, autocast) -> None:
    """Per layer, the targets' RMS and mean on the first step's batches (all processes together): the
    targets are divided by the RMS, so every transcoder learns at unit scale whatever its MLP's output
    norm, and the decoder bias starts at the mean target."""
    d = r.model.cfg.model_dim
    sums = {layer: torch.zeros(d + 2, dtype=torch.float64, device=r.device) for layer in r.layers}
    for micro in range(r.acc):
        batch = r.train_loader.batch(micro)
        t, u = noise_for(r.cfg, batch, 0, r.per_step, r.cfg.train_seq_len)
        pairs = LayerPairs(r.model, r.layers, batch.tokens.to(r.device), t.to(r.device), u.to(r.device), autocast)
        for layer, (x, y) in pairs.pairs.items():  # Σy, Σ‖y‖², count
            sums[layer] += torch.cat([y.double().sum(0), y.double().pow(2).sum().reshape(1),
                                      torch.tensor([len(y)], dtype=torch.float64, device=r.device)])
    for layer in r.layers:
        total = r.dist.all_sum(sums[layer])
        n = float(total[-1])
        r.scales[layer] = (float(total[-2]) / (n * d)) ** 0.5
        if not r.scales[layer] > 0:
            raise UserError(f"the MLP of layer {layer} outputs only zeros on the first batch (an untrained "
                            "checkpoint?): there is nothing to transcode")
        with torch.no_grad():
            r.transcoders[str(layer)].b_dec.copy_((total[:-2] / n / r.scales[layer]).float())


def set_up(cfg: TranscoderTrainConfig, dist: Dist, device: torch.device,
           stack: contextlib.ExitStack) -> tuple[Run | None, Path]:
    """The transcoders, optimizer and output folder, new or restored; (None, folder) when already finished.
    `stack` holds the output's lock (rank 0) until the caller's block ends."""
    folder, run_cfg, ckpt, model = open_base_run(cfg, device)
    mc = model.cfg
    layers = parse_layers(cfg.layers, mc.num_layers)
    num_latents = cfg.expansion_factor * mc.model_dim
    if cfg.k > num_latents:
        raise UserError(f"--k {cfg.k} is larger than the {num_latents} latents (--expansion_factor "
                        f"{cfg.expansion_factor} × d {mc.model_dim})")
    lr = cfg.lr or 2e-4 / math.sqrt(num_latents / 2**14)  # sparsify's scaling with the latent count
    out_dir = StagePaths(folder, ckpt.name).transcoders
    settings = _settings(cfg, ckpt, layers, num_latents, lr)
    if cfg.grad_acc_steps % dist.world:
        raise UserError(f"--grad_acc_steps {cfg.grad_acc_steps} must be divisible by the {dist.world} processes")
    check_inputs(cfg, folder, run_cfg, out_dir, dist.world)
    per_forward = micro_batches_per_forward(cfg.forward_batch_size, cfg.batch_size, cfg.grad_acc_steps // dist.world,
                                            cfg.train_seq_len, device)
    # --overwrite trains beside the old transcoders and swaps the new ones in only once they are finished
    replace = cfg.overwrite and has_output(out_dir)
    dist.barrier()  # every process has looked before rank 0 creates anything
    if dist.main:  # under torchrun, rank 0 holds the lock for the job
        stack.enter_context(hold(out_dir))
    state = _saved_state(cfg, out_dir, settings, device)
    if state is not None and state["step"] >= cfg.train_steps:
        print(f"{out_dir} is finished ({state['step']} steps); --overwrite True retrains, a larger "
              "--train_steps continues")
        return None, out_dir

    data = open_data(run_cfg)
    train_loader = ShardLoader(data.folder, "train", cfg.train_seq_len, cfg.batch_size, cfg.seed, dist.rank,
                               dist.world, files=run_cfg["data"].get("train_files"))
    val_loader = ShardLoader(data.folder, "val", cfg.val_seq_len or cfg.train_seq_len, cfg.batch_size, 0, dist.rank,
                             dist.world)
    torch.manual_seed(cfg.seed)
    tcfg = TranscoderConfig(mc.model_dim, num_latents, cfg.k, cfg.skip_connection)
    transcoders = Transcoders({str(layer): Transcoder(tcfg) for layer in layers}).to(device)
    optimizer = torch.optim.Adam(transcoders.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                 fused=device.type == "cuda")  # one kernel per step, and no host read of its step
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    dead = {layer: torch.zeros(num_latents, dtype=torch.long, device=device) for layer in layers}
    r = Run(cfg, dist, device, out_dir, model, layers, transcoders, {}, dead, optimizer, lr, settings, train_loader,
            val_loader, RunLog(None, enabled=dist.main), 0, cfg.grad_acc_steps // dist.world, group=per_forward)
    if state is not None:
        transcoders.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizers"][0])
        for layer in layers:
            dead[layer] = state["dead_tokens"][str(layer)].to(device)
        r.scales = {int(k): float(v) for k, v in state["scales"].items()}
        r.start = int(state["step"])
        if dist.main:
            truncate_metrics(out_dir, r.start)
    else:
        if replace:
            r.final_dir, r.out_dir = out_dir, staging_path(out_dir)
            if dist.main:
                r.replacement = stack.enter_context(Replacement(out_dir))
        if dist.main:
            r.out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(r.out_dir / CONFIG_FILE, {**settings, "base_run": str(folder), "d_in": mc.model_dim})
            truncate_metrics(r.out_dir, -1)  # a start that died before its first checkpoint left stale lines
        dist.barrier()  # the staging folder exists before any process writes to it
        _initial_scales(r, autocast_for(device))
    r.compiled = use_compile(cfg.compile, device)
    r.loss_fns = {layer: torch.compile(transcoders[str(layer)].loss) if r.compiled else transcoders[str(layer)].loss
                  for layer in layers}
    if r.compiled:
        model.compile_blocks()
    r.log.folder = r.out_dir if dist.main else None
    if dist.main:
        remove_stale_temporaries(r.out_dir)  # what a killed run was writing (checkpoints, transcoder files)
    r.log(f"transcoders for {ckpt} layers {layers}: {num_latents} latents (×{cfg.expansion_factor}), k={cfg.k}, "
          f"lr {lr:.2e}, inputs noised with t={cfg.mask_ratio}; {r.per_step * cfg.train_seq_len:,} tokens per step; "
          f"out: {out_dir}" + (f" (resuming at step {r.start})" if r.start else "")
          + (f" (written in {r.out_dir} until finished, then swapped in)" if r.final_dir else ""))
    return r, out_dir


def optimizer_step(r: Run, index: int, autocast) -> torch.Tensor:
    """Optimizer step number `index` (from 0) of the run: its learning rate, its micro-batches and their noise,
    `train_step`; each layer's training FVU as a device tensor (read by the caller when it needs them)."""
    cfg = r.cfg
    r.optimizer.param_groups[0]["lr"] = r.lr * lr_factor(index, cfg.train_steps, 0.2)

    def micro_batches():
        for micro in range(r.acc):
            batch = r.train_loader.batch(index * r.acc + micro)
            yield batch.tokens, *noise_for(cfg, batch, index, r.per_step, cfg.train_seq_len)

    return train_step(r.model, r.transcoders, r.layers, micro_batches(), r.acc, r.scales, r.dead, cfg, r.optimizer,
                      r.dist, autocast, r.device, r.loss_fns, r.group)


def loop(r: Run) -> Path:
    """Train every layer's transcoder from `r.start` to --train_steps; validate, log and save on the way. The
    steps' FVUs stay on the device until a log step reads them; a non-finite one stops the run there (and
    non-finite weights stop it before any validation or checkpoint)."""
    cfg, dist, device = r.cfg, r.dist, r.device
    autocast = autocast_for(device)
    fvu = torch.zeros(len(r.layers), dtype=torch.float64, device=device)  # the last step's
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # the first step with a non-finite FVU, or 0
    wandb = open_wandb(dist.main and cfg.wandb, r.out_dir, "train_transcoders", asdict(cfg), cfg.wandb_project)

    def step(index: int) -> None:
        nonlocal fvu, first_bad
        fvu = optimizer_step(r, index, autocast)
        first_bad = torch.where((first_bad == 0) & ~torch.isfinite(fvu).all(), index + 1, first_bad)

    def log_train(done: int, tokens_per_s: float) -> dict:
        values, bad = fvu.tolist(), int(first_bad)
        if bad:
            raise UserError(f"transcoder training diverged at step {bad} (FVU at step {done}: {values}); lower --lr")
        record = {"event": "train", "step": done, "fvu": dict(zip(map(str, r.layers), values)),
                  "tokens_per_s": tokens_per_s}
        r.log.metrics(record)
        if wandb:
            wandb.log(record, step=done)
        return {"fvu": f"{sum(values) / len(values):.3f}", "tok_s": f"{tokens_per_s:,.0f}"}

    def check_weights(done: int) -> None:  # before validating or saving: never a checkpoint of NaN weights
        if int(first_bad):  # a step whose FVU was not finite, though the weights may still be
            raise UserError(f"transcoder training diverged at step {int(first_bad)} (its FVU was not finite); "
                            "stopped before validating or saving; lower --lr")
        if not finite(r.transcoders):
            kept = list_checkpoints(r.out_dir) if r.out_dir.is_dir() else []
            raise UserError(f"transcoder training diverged at step {done} (the weights became NaN or infinite); "
                            f"stopped. Last good checkpoint: {kept[-1] if kept else 'none saved yet'}; lower --lr")

    def validate(done: int) -> None:
        check_weights(done)
        result = evaluate(r.model, r.scaled(), r.layers, r.val_loader, cfg, device, autocast, dist, r.dead)
        r.log(f"step {done}: base NELBO {result['base_nelbo']:.4f}, all MLPs replaced {result['all_nelbo']:.4f}; "
              + "; ".join(f"L{layer} FVU {m['fvu']:.3f} L0 {m['l0']:.1f} dead {m['dead_fraction']:.1%} "
                          f"NELBO {m['spliced_nelbo']:.4f}" for layer, m in result["layers"].items()))
        r.log.metrics({"event": "val", "step": done, **result})
        if wandb:
            wandb.log(result, step=done)
        if dist.main:
            write_json_atomic(r.out_dir / TRANSCODER_SUMMARY_FILE, {"step": done, "train_steps": cfg.train_steps,
                                                                    **result})
            plot(r.out_dir)

    def save(done: int) -> None:
        if cfg.save_model:
            check_weights(done)  # on every process (the weights are the same), so all of them stop
        if not (dist.main and cfg.save_model):
            return
        save_checkpoint(r.out_dir / checkpoint_name(done), {
            "step": done, "model": r.transcoders.state_dict(), "optimizers": [r.optimizer.state_dict()],
            "dead_tokens": {str(k): v.cpu() for k, v in r.dead.items()},
            "scales": {str(k): v for k, v in r.scales.items()}, "config": r.settings})
        for layer, tc in r.scaled().items():
            tc.save(r.out_dir / hookpoint(layer))

    run_training_steps(cfg, r.start, r.per_step * cfg.train_seq_len, dist.main, step, log_train, validate, save,
                       device)
    dist.barrier()  # no process tears the group down while another still writes or validates
    final = r.final_dir or r.out_dir
    r.log(f"done: transcoders in {final}")
    if r.replacement is not None:  # complete: the new transcoders replace the old ones
        r.replacement.commit()
    dist.barrier()
    return final
