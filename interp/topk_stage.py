"""get_topk_activations.py's work: load the run and its transcoders, scan, write the outputs and pages."""
from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from cli import UserError
from data.loader import ShardLoader
from experiment import CONFIG_FILE, read_json, resolve_device, write_json_atomic
from interp.feature_pages import write_layer_pages, write_root_page
from interp.feature_store import (ARRAYS_FILE, CONTEXTS_FILE, FEATURES_FILE, feature_examples, feature_stats,
                                  layer_name, vocab_pieces, write_arrays, write_jsonl)
from interp.scan import ScanSettings, scan
from model.precision import autocast as autocast_for
from model.transcoder import Transcoder
from model.transcoder_training import TRANSCODERS_DIR, open_base_run, open_data, parse_layers

TOPK_DIR = "topk"
INDEX_FILE = "index.json"
STATE_FILE = "scan_state.pt"


def transcoder_layers(tc_dir: Path, spec: str, num_layers: int) -> list[int]:
    if not tc_dir.is_dir():
        raise UserError(f"no transcoders in {tc_dir}: run train_transcoders.py for this checkpoint first")
    available = sorted(int(p.name.split("_")[1]) for p in tc_dir.glob("layer_*") if (p / "sae.safetensors").exists())
    if not available:
        raise UserError(f"{tc_dir} has no finished transcoder (layer_XX/sae.safetensors); train_transcoders.py "
                        "writes them at its checkpoints and at the end")
    if spec == "all":
        return available
    wanted = parse_layers(spec, num_layers)
    missing = [x for x in wanted if x not in available]
    if missing:
        raise UserError(f"no transcoder for layer(s) {missing} in {tc_dir} (have {available})")
    return wanted


def run_topk(cfg) -> Path:
    device = resolve_device(cfg.cuda, cfg.device)
    folder, run_cfg, ckpt, model = open_base_run(cfg, device)
    tc_dir = folder / TRANSCODERS_DIR / ckpt.stem
    layers = transcoder_layers(tc_dir, cfg.layers, model.cfg.num_layers)
    out_dir = folder / TOPK_DIR / ckpt.stem
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("train_folder", "overwrite", "cuda", "device",
                                                                   "checkpoint_every", "num_layers", "num_heads",
                                                                   "model_dim")}
    settings.update(checkpoint=ckpt.name, layers=layers)
    if cfg.overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    if (out_dir / CONFIG_FILE).exists():
        saved = read_json(out_dir / CONFIG_FILE)
        if saved != settings:
            diff = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
            raise UserError(f"{out_dir} was made with other settings {diff}; use --overwrite True to replace it")
        if (out_dir / INDEX_FILE).exists():
            print(f"{out_dir} is complete; --overwrite True recomputes it. Pages: {out_dir / 'index.html'}")
            return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / CONFIG_FILE, settings)

    transcoders = {layer: Transcoder.load(tc_dir / layer_name(layer), device) for layer in layers}
    for layer, tc in transcoders.items():
        if tc.cfg.d_in != model.cfg.model_dim:
            raise UserError(f"the transcoder of layer {layer} expects width {tc.cfg.d_in}, the model has "
                            f"{model.cfg.model_dim}")
    tok_dir_cfg = read_json(folder / CONFIG_FILE)
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir_cfg["tokenizer"], folder)
    data = open_data(run_cfg)
    loader = ShardLoader(data.folder, "train", cfg.train_seq_len, cfg.batch_size, cfg.seed,
                         files=run_cfg["data"].get("train_files"))
    n_batches = cfg.train_steps * cfg.grad_acc_steps
    print(f"scanning {n_batches:,} batches × {cfg.batch_size} × {cfg.train_seq_len} = "
          f"{n_batches * cfg.batch_size * cfg.train_seq_len:,} tokens through layers {layers} "
          f"({', '.join(str(transcoders[layer].cfg.num_latents) for layer in layers)} features), twice")
    s = ScanSettings(n_batches=n_batches, top_k=cfg.top_k, context_before=cfg.context_before,
                     context_after=cfg.context_after, n_quantile=cfg.n_quantile, n_random=cfg.n_random,
                     mask_ratio=cfg.mask_ratio, seed=cfg.seed, checkpoint_every=cfg.checkpoint_every)
    autocast = autocast_for(device)
    states, n_tokens = scan(model, transcoders, loader, s, device, out_dir / STATE_FILE, autocast)

    pieces = vocab_pieces(tok)
    summary = {}
    for layer in layers:
        st = states[layer]
        ldir = out_dir / layer_name(layer)
        ldir.mkdir(exist_ok=True)
        stats = feature_stats(st, n_tokens, model.cfg.vocab_size, pieces)
        examples = list(feature_examples(st, s, pieces))
        write_jsonl(ldir / FEATURES_FILE, stats)
        write_jsonl(ldir / CONTEXTS_FILE, examples)
        write_arrays(ldir / ARRAYS_FILE, st)
        write_layer_pages(ldir, layer, stats, examples, {"n_tokens": n_tokens, "checkpoint": ckpt.name})
        dead = sum(x["dead"] for x in stats)
        summary[str(layer)] = {"features": len(stats), "dead": dead, "live": len(stats) - dead}
        print(f"layer {layer}: {len(stats) - dead} live, {dead} dead features (never fired in the scan); "
              f"page {ldir / 'index.html'}")
    write_root_page(out_dir, layers, summary)
    write_json_atomic(out_dir / INDEX_FILE, {
        "complete": True, "checkpoint": ckpt.name, "layers": layers, "n_tokens": n_tokens, "n_batches": n_batches,
        "settings": settings, "summary": summary, "files": {"features": FEATURES_FILE, "contexts": CONTEXTS_FILE,
                                                           "arrays": ARRAYS_FILE, "page": "index.html"}})
    (out_dir / STATE_FILE).unlink(missing_ok=True)
    print(f"feature browser: {out_dir / 'index.html'}")
    return out_dir
