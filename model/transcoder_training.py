"""Training a transcoder for every MLP of a frozen diffusion model (behind train_transcoders.py).

One pass of the base model per micro-batch feeds every layer's transcoder (forward hooks capture each
MLP's input and output). Each layer's loss is backpropagated right away, so only one layer's (N, M)
latents are alive at a time. Under torchrun the gradients and dead-latent counters are all-reduced by
hand (the per-layer backward does not fit DDP's one-forward-one-backward model).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from cli import UserError
from data.loader import ShardLoader
from data.prepare import PrepareConfig, prepare_dataset
from experiment import (CONFIG_FILE, due, RunLog, atomic_path, check_shape_flags, checkpoint_name, list_checkpoints,
                        load_checkpoint, read_json, read_metrics, resolve_checkpoint, resolve_run_folder,
                        save_checkpoint, truncate_metrics, write_json_atomic)
from model.diffusion import DiffusionLM, ModelConfig
from model.hooks import capture_mlps, replace_mlps
from model.objective import apply_noise, diffusion_loss, train_noise, val_noise
from model.optim import lr_factor
from model.precision import autocast as autocast_for
from model.training import VAL_SEED, Dist, setup_distributed
from model.transcoder import Transcoder, TranscoderConfig

TRANSCODERS_DIR = "transcoders"
SUMMARY_FILE = "metrics.json"
PLOT_FILE = "transcoders.png"
# Flags that define what is trained: a resumed or rerun job must keep them.
FIXED = ("checkpoint", "layers", "expansion_factor", "k", "skip_connection", "mask_ratio", "train_seq_len",
         "batch_size", "grad_acc_steps", "seed", "auxk_alpha", "lr", "dead_tokens")


def layer_dir(out_dir: Path, layer: int) -> Path:
    return out_dir / f"layer_{layer:02d}"


def parse_layers(spec: str, num_layers: int) -> list[int]:
    if spec == "all":
        return list(range(num_layers))
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--layers {spec!r}: give comma-separated layer indices or 'all'") from None
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad or not layers:
        raise UserError(f"--layers {spec}: the model has layers 0..{num_layers - 1}")
    return layers


def open_base_run(cfg, device):
    """(run folder, run config, checkpoint path, frozen base model)."""
    folder = resolve_run_folder(cfg.train_folder)
    run_cfg = read_json(folder / CONFIG_FILE)
    check_shape_flags(run_cfg["model"], cfg.shape_flags())
    path = resolve_checkpoint(folder, cfg.checkpoint_name)
    model = DiffusionLM.load(path, device, expected=ModelConfig(**run_cfg["model"])).eval()
    model.requires_grad_(False)
    return folder, run_cfg, path, model


def open_data(run_cfg: dict):
    """The base run's prepared dataset (prepared again from its recorded settings if it is gone)."""
    data = run_cfg["data"]
    params = {k: v for k, v in data["params"].items() if k in PrepareConfig.__dataclass_fields__}
    return prepare_dataset(PrepareConfig(**params, data_dir=str(Path(data["folder"]).parent)))


def noise_for(cfg, batch, step: int, per_step: int, seq_len: int):
    """The diffusion noise process (`random`), or a fixed t for every sequence."""
    t, u = train_noise(batch.index, step, per_step, cfg.seed + 1, seq_len)
    if cfg.mask_ratio != "random":
        t = torch.full_like(t, float(cfg.mask_ratio))
    return t, u


class LayerPairs:
    """MLP (input, output) pairs of one noised batch, every position except padding, as (N, D) float."""

    def __init__(self, model: DiffusionLM, layers: list[int], tokens: torch.Tensor, t, u, autocast) -> None:
        mc = model.cfg
        noised = apply_noise(tokens, t, u, mc.mask_id, mc.bos_id, mc.pad_id)
        keep = noised.inputs != mc.pad_id
        with torch.no_grad(), capture_mlps(model, layers) as seen, autocast:
            model(noised.inputs, select=torch.zeros_like(keep))  # the head is not needed: select nothing
        self.pairs = {layer: (x[keep].float(), y[keep].float()) for layer, (x, y) in seen.items()}
        self.n_tokens = int(keep.sum())


def update_dead(tokens_since_fired: torch.Tensor, fired: torch.Tensor, n_tokens) -> None:
    """Count tokens since each latent last fired: +n_tokens for all, then 0 for those that fired."""
    tokens_since_fired += n_tokens
    tokens_since_fired[fired] = 0


def _all_reduce_grads(transcoders: torch.nn.ModuleDict, dist: Dist) -> None:
    if dist.world == 1:
        return
    for p in transcoders.parameters():
        if p.grad is not None:
            torch_dist.all_reduce(p.grad)
            p.grad.div_(dist.world)


def train_step(model, transcoders: torch.nn.ModuleDict, layers: list[int], micro_batches, acc: int,
               scales: dict[int, float], dead: dict[int, torch.Tensor], cfg, optimizer, dist: Dist, autocast,
               device) -> list[float]:
    """One optimizer step of every layer's transcoder over `acc` micro-batches of (tokens, t, u); updates
    the dead-latent counters; returns each layer's training FVU."""
    fired = {layer: torch.zeros(len(dead[layer]), dtype=torch.bool, device=device) for layer in layers}
    sums = torch.zeros(len(layers), 2, dtype=torch.float64, device=device)  # SSE, total variance
    n_tokens = torch.zeros((), dtype=torch.long, device=device)
    for tokens, t, u in micro_batches:
        pairs = LayerPairs(model, layers, tokens.to(device), t.to(device), u.to(device), autocast)
        n_tokens += pairs.n_tokens
        for i, layer in enumerate(layers):
            x, y = pairs.pairs[layer]
            with autocast:
                out = transcoders[str(layer)].loss(x, y / scales[layer], dead[layer] > cfg.dead_tokens)
            ((out.fvu + cfg.auxk_alpha * out.auxk) / acc).backward()
            fired[layer][out.encoded.indices[out.encoded.acts > 0]] = True
            sums[i] += torch.stack([out.sse.detach().double(), out.total_variance.detach().double()])
    _all_reduce_grads(transcoders, dist)
    dist.all_sum(sums)
    dist.all_sum(n_tokens)
    for layer in layers:
        update_dead(dead[layer], dist.all_sum(fired[layer].long()) > 0, n_tokens)
    for tc in transcoders.values():
        tc.remove_parallel_gradient()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for tc in transcoders.values():
        tc.normalize_decoder()
    return (sums[:, 0] / sums[:, 1]).tolist()


@torch.no_grad()
def evaluate(model, transcoders: dict[int, Transcoder], layers, loader: ShardLoader, cfg, device, autocast,
             dist: Dist, dead: dict[int, torch.Tensor]) -> dict:
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
        t, u = val_noise(batch.index, n_total, VAL_SEED, loader.seq_len)
        if cfg.mask_ratio != "random":
            t = torch.full_like(t, float(cfg.mask_ratio))
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
            with replace_mlps(model, {layer: transcoders[layer] for layer in chosen}), autocast:
                terms = diffusion_loss(model, tokens, t, u)
            nelbo[v] += torch.stack([terms.weighted_ce.double(), terms.n_maskable.double()])
    result = {"base_nelbo": None, "all_nelbo": None, "layers": {}}
    for v, sums in nelbo.items():
        nelbo[v] = float(dist.all_sum(sums)[0] / sums[1])
    for layer in layers:
        s = [dist.all_sum(x) for x in stats[layer]]
        total_var = s[2] - s[1].pow(2).sum() / s[3]
        result["layers"][str(layer)] = {"fvu": float(s[0] / total_var), "l0": float(s[4] / s[3]),
                                        "dead_fraction": float((dead[layer] > cfg.dead_tokens).float().mean()),
                                        "spliced_nelbo": nelbo[f"layer_{layer}"]}
    result["base_nelbo"], result["all_nelbo"] = nelbo["base"], nelbo["all"]
    return result


def plot(out_dir: Path) -> None:
    """FVU and dead fraction per layer against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    with atomic_path(out_dir / PLOT_FILE) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def train_transcoders(cfg) -> Path:
    dist, device = setup_distributed(cfg)
    try:
        return _train(cfg, dist, device)
    finally:
        if dist.world > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _settings(cfg, ckpt: Path, layers: list[int], num_latents: int, lr: float) -> dict:
    s = asdict(cfg)
    s.update(checkpoint=ckpt.name, layers=layers, num_latents=num_latents, lr=lr)
    for name in ("train_folder", "checkpoint_name", "resume", "overwrite", "cuda", "device"):
        s.pop(name, None)
    return s


def _train(cfg, dist: Dist, device: torch.device) -> Path:
    folder, run_cfg, ckpt, model = open_base_run(cfg, device)
    mc = model.cfg
    layers = parse_layers(cfg.layers, mc.num_layers)
    num_latents = cfg.expansion_factor * mc.model_dim
    if cfg.k > num_latents:
        raise UserError(f"--k {cfg.k} is larger than the {num_latents} latents (--expansion_factor "
                        f"{cfg.expansion_factor} × d {mc.model_dim})")
    lr = cfg.lr or 2e-4 / math.sqrt(num_latents / 2**14)  # sparsify's scaling with the latent count
    out_dir = folder / TRANSCODERS_DIR / ckpt.stem
    settings = _settings(cfg, ckpt, layers, num_latents, lr)
    if cfg.grad_acc_steps % dist.world:
        raise UserError(f"--grad_acc_steps {cfg.grad_acc_steps} must be divisible by the {dist.world} processes")
    acc = cfg.grad_acc_steps // dist.world
    per_step = cfg.grad_acc_steps * cfg.batch_size

    state = None
    if (out_dir / CONFIG_FILE).exists() and not cfg.overwrite:
        saved = read_json(out_dir / CONFIG_FILE)
        diff = {k: (saved.get(k), settings[k]) for k in FIXED if saved.get(k) != settings[k]}
        if diff:
            raise UserError(f"{out_dir} holds transcoders trained with other settings {diff}; "
                            "use --overwrite True to replace them")
        kept = list_checkpoints(out_dir)
        if kept:
            state = load_checkpoint(kept[-1], device)
            if state["step"] >= cfg.train_steps:
                print(f"{out_dir} is finished ({state['step']} steps); --overwrite True retrains, a larger "
                      "--train_steps continues")
                return out_dir
    elif cfg.resume:
        raise UserError(f"--resume: nothing to resume in {out_dir}")

    data = open_data(run_cfg)
    train_loader = ShardLoader(data.folder, "train", cfg.train_seq_len, cfg.batch_size, cfg.seed, dist.rank, dist.world,
                               files=run_cfg["data"].get("train_files"))
    val_loader = ShardLoader(data.folder, "val", cfg.val_seq_len or cfg.train_seq_len, cfg.batch_size, 0, dist.rank,
                             dist.world)
    torch.manual_seed(cfg.seed)
    tcfg = TranscoderConfig(mc.model_dim, num_latents, cfg.k, cfg.skip_connection)
    transcoders = torch.nn.ModuleDict({str(layer): Transcoder(tcfg) for layer in layers}).to(device)
    optimizer = torch.optim.Adam(transcoders.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    dead = {layer: torch.zeros(num_latents, dtype=torch.long, device=device) for layer in layers}  # tokens since fired
    # Targets are divided by a fixed per-layer scale (their RMS on the first batch), so the transcoders
    # learn at unit scale whatever the MLP's output norm; saved files have the scale folded back in.
    scales: dict[int, float] = {}
    autocast = autocast_for(device)
    start = 0
    log = RunLog(None, enabled=dist.main)
    if state is not None:
        transcoders.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizers"][0])
        for layer in layers:
            dead[layer] = state["dead_tokens"][str(layer)].to(device)
        scales = {int(k): float(v) for k, v in state["scales"].items()}
        start = int(state["step"])
        if dist.main:
            truncate_metrics(out_dir, start)
    if state is None and dist.main:
        if cfg.overwrite and out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / CONFIG_FILE, {**settings, "base_run": str(folder), "d_in": mc.model_dim})
        truncate_metrics(out_dir, -1)  # a start that died before its first checkpoint left stale lines
    if state is None:  # scales and decoder biases from the first step's targets, all processes together
        sums = {layer: torch.zeros(mc.model_dim + 2, dtype=torch.float64, device=device) for layer in layers}
        for micro in range(acc):
            batch = train_loader.batch(micro)
            pairs = LayerPairs(model, layers, batch.tokens.to(device), *(v.to(device) for v in noise_for(
                cfg, batch, 0, per_step, cfg.train_seq_len)), autocast)
            for layer, (x, y) in pairs.pairs.items():  # Σy, Σ‖y‖², count
                sums[layer] += torch.cat([y.double().sum(0), y.double().pow(2).sum().reshape(1),
                                          torch.tensor([len(y)], dtype=torch.float64, device=device)])
        for layer in layers:
            total = dist.all_sum(sums[layer])
            n = float(total[-1])
            scales[layer] = (float(total[-2]) / (n * mc.model_dim)) ** 0.5
            if not scales[layer] > 0:
                raise UserError(f"the MLP of layer {layer} outputs only zeros on the first batch (an untrained "
                                "checkpoint?): there is nothing to transcode")
            with torch.no_grad():  # start the decoder bias at the mean target
                transcoders[str(layer)].b_dec.copy_((total[:-2] / n / scales[layer]).float())
    log.folder = out_dir if dist.main else None
    tokens_per_step = per_step * cfg.train_seq_len
    log(f"transcoders for {ckpt} layers {layers}: {num_latents} latents (×{cfg.expansion_factor}), k={cfg.k}, "
        f"lr {lr:.2e}, inputs noised with t={cfg.mask_ratio}; {tokens_per_step:,} tokens per step; out: {out_dir}"
        + (f" (resuming at step {start})" if start else ""))

    def save(step: int) -> None:
        if not (dist.main and cfg.save_model):
            return
        save_checkpoint(out_dir / checkpoint_name(step), {
            "step": step, "model": transcoders.state_dict(), "optimizers": [optimizer.state_dict()],
            "dead_tokens": {str(k): v.cpu() for k, v in dead.items()}, "scales": {str(k): v for k, v in scales.items()},
            "config": settings})
        for layer in layers:
            transcoders[str(layer)].scaled(scales[layer]).save(layer_dir(out_dir, layer))

    def validate(step: int) -> None:
        result = evaluate(model, {layer: transcoders[str(layer)].scaled(scales[layer]) for layer in layers}, layers,
                          val_loader, cfg, device, autocast, dist, dead)
        per = result["layers"]
        log(f"step {step}: base NELBO {result['base_nelbo']:.4f}, all MLPs replaced {result['all_nelbo']:.4f}; " +
            "; ".join(f"L{layer} FVU {m['fvu']:.3f} L0 {m['l0']:.1f} dead {m['dead_fraction']:.1%} "
                      f"NELBO {m['spliced_nelbo']:.4f}" for layer, m in per.items()))
        log.metrics({"event": "val", "step": step, **result})
        if dist.main:
            write_json_atomic(out_dir / SUMMARY_FILE, {"step": step, "train_steps": cfg.train_steps, **result})
            plot(out_dir)

    if start == 0 and cfg.val_loss_every:
        validate(0)
    bar = tqdm(total=cfg.train_steps, initial=start, unit="step", disable=not dist.main, dynamic_ncols=True)
    seconds, tokens_since = 0.0, 0
    for step in range(start, cfg.train_steps):
        t0 = time.perf_counter()
        optimizer.param_groups[0]["lr"] = lr * lr_factor(step, cfg.train_steps, 0.2)

        def micro_batches():
            for micro in range(acc):
                batch = train_loader.batch(step * acc + micro)
                yield batch.tokens, *noise_for(cfg, batch, step, per_step, cfg.train_seq_len)

        fvu = train_step(model, transcoders, layers, micro_batches(), acc, scales, dead, cfg, optimizer, dist,
                         autocast, device)
        if not all(math.isfinite(v) for v in fvu):
            raise UserError(f"transcoder training diverged at step {step + 1} (FVU {fvu}); lower --lr")
        seconds += time.perf_counter() - t0
        tokens_since += tokens_per_step
        done = step + 1
        bar.update(1)
        if due(done, cfg.log_every, cfg.train_steps):
            tps = tokens_since / seconds
            bar.set_postfix(fvu=f"{sum(fvu) / len(fvu):.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            log.metrics({"event": "train", "step": done, "fvu": dict(zip(map(str, layers), fvu)), "tokens_per_s": tps})
            seconds, tokens_since = 0.0, 0
        if due(done, cfg.val_loss_every, cfg.train_steps):
            validate(done)
        if due(done, cfg.save_every, cfg.train_steps):
            save(done)
    bar.close()
    dist.barrier()  # no process tears the group down while another still writes or validates
    log(f"done: transcoders in {out_dir}")
    return out_dir
