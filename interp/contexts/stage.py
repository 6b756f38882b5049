"""get_topk_activations.py's work: load the run and its transcoders, scan, write the outputs and pages."""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from core.files import UserError, read_json, remove_stale_temporaries, write_json_atomic
from core.locks import Replacement, has_output, hold, staging_path
from data.tokenizer import load_tokenizer
from experiment import (
    CONFIG_FILE,
    StagePaths,
    layer_name,
    load_transcoders,
    open_base_run,
    setup_distributed,
    transcoder_layers,
    use_compile,
)
from experiment.paths import ARRAYS_FILE, CONTEXTS_FILE, FEATURES_FILE, INDEX_FILE, PAGE_FILE, SCAN_STATE_FILE
from experiment.settings import refuse_other_settings
from interp.contexts.browser import write_layer_pages, write_root_page
from interp.contexts.config import TopKConfig
from interp.contexts.logits import decoder_logits
from interp.contexts.scan import renamed_settings, scan, scan_inputs
from interp.contexts.store import (
    PROTOCOL,
    feature_examples,
    feature_stats,
    noise_levels,
    vocab_pieces,
    write_arrays,
    write_jsonl,
)
from model.distributed import Dist
from model.precision import autocast as autocast_for

# Flags that do not change what the scan produces (the checkpoint counts by its resolved file name, so
# `latest` and the name it stands for are the same output).
NOT_SETTINGS = ("train_folder", "checkpoint_name", "overwrite", "cuda", "device", "compile", "checkpoint_every",
                "checkpoint_minutes", "forward_batch_size", "num_layers", "num_heads", "model_dim", "scan_batches",
                "train_steps", "grad_acc_steps")


def scan_settings(cfg: TopKConfig, checkpoint: str, layers: list[int]) -> dict:
    """What the output depends on; saved as its config.json and compared on a rerun."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_SETTINGS}
    settings.update(scan_batches=cfg.n_batches(), checkpoint=checkpoint, layers=layers)
    return settings


def saved_settings(path: Path) -> dict:
    """An output's settings, in today's names (`renamed_settings`). Outputs made before --scan_batches recorded
    train_steps × grad_acc_steps, and the checkpoint as it was typed besides its file name; some recorded
    --forward_batch_size, which is not a setting of the output."""
    saved = renamed_settings(read_json(path))
    saved.pop("checkpoint_name", None)
    saved.pop("forward_batch_size", None)  # recorded for a while; it changes only how batches are packed
    if "scan_batches" not in saved and "train_steps" in saved:
        saved["scan_batches"] = saved.pop("train_steps") * saved.pop("grad_acc_steps", 1)
    return saved


def check_scan(cfg: TopKConfig, settings: dict, run_cfg: dict) -> None:
    """What the scan is asked to keep against what it reads, before any file is written (UserError): a
    context window fits one sequence, and no feature can have more top, quantile or non-activating
    examples than the scan has tokens. The model itself has no longest sequence (rotary positions are
    computed for any length); the data's is checked by building the loader (a sequence longer than the
    training split, or too few windows for one batch, is its one-line error)."""
    window = cfg.context_before + 1 + cfg.context_after
    if window > cfg.train_seq_len:
        raise UserError(f"--context_before {cfg.context_before} + 1 + --context_after {cfg.context_after} = {window} "
                        f"tokens: a context window must fit in one sequence of --train_seq_len {cfg.train_seq_len}")
    n_tokens = cfg.n_batches() * cfg.batch_size * cfg.train_seq_len
    for name in ("n_top", "n_quantile", "n_random"):
        if getattr(cfg, name) > n_tokens:
            raise UserError(f"--{name} {getattr(cfg, name):,} is more than the {n_tokens:,} tokens the scan reads "
                            f"({cfg.n_batches():,} batches × --batch_size {cfg.batch_size} × --train_seq_len "
                            f"{cfg.train_seq_len})")
    scan_inputs(settings, run_cfg)


def run_topk(cfg: TopKConfig) -> Path:
    """One process, or one per device under torchrun (each scans a share of the batches; rank 0 writes)."""
    dist, device = setup_distributed(cfg)
    try:
        return _run_topk(cfg, dist, device)
    finally:
        dist.close()


def _run_topk(cfg: TopKConfig, dist: Dist, device) -> Path:
    folder, run_cfg, ckpt, model = open_base_run(cfg, device)
    paths = StagePaths(folder, ckpt.name)
    tc_dir, out_dir = paths.transcoders, paths.topk
    layers = transcoder_layers(tc_dir, cfg.layers, model.cfg.num_layers)
    settings = scan_settings(cfg, ckpt.name, layers)
    check_scan(cfg, settings, run_cfg)  # before the output folder is touched
    # --overwrite writes the new output beside the old one and swaps it in only once it is complete
    replace = cfg.overwrite and has_output(out_dir)
    dist.barrier()  # every process has looked before rank 0 creates anything
    with contextlib.ExitStack() as stack:
        replacement = None
        if dist.main:  # under torchrun, rank 0 holds the lock for the job
            stack.enter_context(hold(out_dir))
            if replace:
                replacement = stack.enter_context(Replacement(out_dir))
        dist.barrier()
        work = staging_path(out_dir) if replace else out_dir
        result = _scan_into(cfg, dist, device, folder, run_cfg, ckpt, model, tc_dir, work, layers, settings, out_dir)
        if replacement is not None and result is not None:
            replacement.commit()
        dist.barrier()  # no process returns while rank 0 still swaps
    if dist.main and result is not None:
        print(f"feature browser: {out_dir / PAGE_FILE}")
    return out_dir


def _scan_into(cfg: TopKConfig, dist: Dist, device, folder: Path, run_cfg: dict, ckpt: Path, model, tc_dir: Path,
               out_dir: Path, layers: list[int], settings: dict, final: Path) -> Path | None:
    """Scan and write the outputs into `out_dir` (`final`, or its replacement being written); None when a
    finished output was found there."""
    if (out_dir / CONFIG_FILE).exists():
        refuse_other_settings(f"{out_dir} was made", saved_settings(out_dir / CONFIG_FILE), settings,
                              "use --overwrite True to replace it")
        if (out_dir / INDEX_FILE).exists():
            if read_json(out_dir / INDEX_FILE).get("protocol", 1) < PROTOCOL:
                raise UserError(f"{out_dir} was made by an older protocol (windows without their mask pattern, "
                                "halves that could share positions); rerun with --overwrite True to remake it")
            if dist.main:
                print(f"{out_dir} is complete; --overwrite True recomputes it. Pages: {out_dir / PAGE_FILE}")
            return None
    dist.barrier()  # every process has read the old config before rank 0 writes the new one
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)  # what a killed scan was writing (its layer files, its state)
        write_json_atomic(out_dir / CONFIG_FILE, settings)
    dist.barrier()

    transcoders = load_transcoders(tc_dir, layers, device, model.cfg.model_dim)
    if use_compile(cfg.compile, device):
        model.compile_blocks()
    tok = load_tokenizer(run_cfg["tokenizer"], folder)
    loader, s = scan_inputs(settings, run_cfg, cfg.checkpoint_every, cfg.forward_batch_size, cfg.checkpoint_minutes)
    n_batches = s.n_batches
    if dist.main:
        print(f"scanning {n_batches:,} batches × {cfg.batch_size} × {cfg.train_seq_len} = "
              f"{n_batches * cfg.batch_size * cfg.train_seq_len:,} tokens through layers {layers} "
              f"({', '.join(str(transcoders[layer].cfg.num_latents) for layer in layers)} features), in one pass"
              + (f", over {dist.world} processes" if dist.world > 1 else ""))
    autocast = autocast_for(device)
    started = time.perf_counter()
    states, n_tokens = scan(model, transcoders, loader, s, device, out_dir / SCAN_STATE_FILE, autocast, dist)
    if not dist.main:  # rank 0 holds the merged states and writes them
        return out_dir
    seconds = time.perf_counter() - started  # (the scan ends with results read on the host: the device is done)
    print(f"scan: {seconds:.1f} s, {n_tokens / seconds:,.0f} tokens/s with the first batch's compilation "
          "(of a resumed scan, only the batches scanned now took this time)")

    pieces = vocab_pieces(tok)
    window_of = np.concatenate([loader.window_ids(b) for b in range(n_batches)])  # scan sequence → data window
    summary = {}
    for layer in layers:
        st = states[layer]
        ldir = out_dir / layer_name(layer)
        ldir.mkdir(exist_ok=True)
        stats = [dict(row, **lens) for row, lens in zip(feature_stats(st, n_tokens, pieces),
                                                        decoder_logits(model, transcoders[layer], pieces))]
        examples = list(feature_examples(st, s, pieces, cfg.train_seq_len, window_of))
        write_jsonl(ldir / FEATURES_FILE, stats)
        write_jsonl(ldir / CONTEXTS_FILE, examples)
        write_arrays(ldir / ARRAYS_FILE, st)
        write_layer_pages(ldir, layer, stats, examples, {"n_tokens": n_tokens, "checkpoint": ckpt.name})
        dead = sum(x["dead"] for x in stats)
        summary[str(layer)] = {"features": len(stats), "dead": dead, "live": len(stats) - dead,
                               "held_out_noise": noise_levels(examples)}
        print(f"layer {layer}: {len(stats) - dead} live, {dead} dead features (never fired in the scan); "
              f"page {final / layer_name(layer) / PAGE_FILE}")
    write_root_page(out_dir, layers, summary)
    write_json_atomic(out_dir / INDEX_FILE, {
        "complete": True, "protocol": PROTOCOL, "checkpoint": ckpt.name, "layers": layers, "n_tokens": n_tokens,
        "n_batches": n_batches,
        "settings": settings, "summary": summary, "files": {"features": FEATURES_FILE, "contexts": CONTEXTS_FILE,
                                                           "arrays": ARRAYS_FILE, "page": PAGE_FILE}})
    for f in out_dir.glob(f"{Path(SCAN_STATE_FILE).stem}*{Path(SCAN_STATE_FILE).suffix}"):
        f.unlink(missing_ok=True)  # this run's state files, one per process under torchrun
    return out_dir
