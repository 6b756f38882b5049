"""A checkpoint's scan, descriptions and scores in EleutherAI delphi's layout: `python -m interp.exports.delphi`.

    python -m interp.exports.delphi --train_folder experiments/X [--checkpoint_name latest] [--output DIR]
        [--overwrite True]

Writes (default `experiments/X/exports/delphi/<checkpoint stem>/`):

    latents/blocks.N.mlp/0_{M-1}.safetensors   delphi's latent cache: `locations` (n, 3) = (sequence, position,
                                               latent) of every nonzero activation, `activations` (n,), `tokens`
                                               (sequences, seq_len) as the model saw them ([MASK] where masked);
                                               besides (delphi ignores them) `clean_tokens` and each sequence's `t`
    latents/blocks.N.mlp/config.json           delphi's cache config (`model_name`: "tokenizer", the folder below,
                                               relative to the export: delphi run from the export folder finds it)
    tokenizer/                                 the run's tokenizer as a `transformers` fast tokenizer
    <explainer>/explanations/blocks.N.mlp_latent<F>.txt   each description (a JSON string)
    <explainer>/scores/detection|fuzz/blocks.N.mlp_latent<F>.txt   one entry per held-out judgement
    <explainer>/log/hookpoint_firing_counts.pt  firing counts per latent, as delphi's analysis reads them
    <explainer>/latents -> ../latents           so `<explainer>/` is a complete delphi run folder
                                               (<explainer>: its name as one folder, "google--flan-t5-xxl")

The cache is a collection pass of its own over exactly the scan's batches and noise (both depend only on the
scan's seed and batch index), so delphi sees every activation of the tokens the scan saw, not only the
windows the scan kept: its top examples are the scan's (tested), and its non-activating samples are drawn
from sequences where the latent truly never fired. Its size is about (scanned tokens × k × 16 bytes) per
layer.

Scores: each judged record keeps its judge's probabilities in the order of its held-out contexts; they
become delphi's per-example entries (`activating`, `probability`, `prediction` = probability ≥ 0.5,
`correct`, `str_tokens` as the judge saw them, `activations`; `distance` 0 for top examples, i for the
i-th example spread over the activation range, -1 for non-activating ones). "fuzz" holds our fuzzing test
(a correctly marked window is `activating`, a wrongly marked one is not). delphi's own analysis of them
gives this project's balanced accuracy and AUROC (tested). A score left undefined (no activating context in
the score half) is not exported: delphi cannot analyse one class.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from core import checks as c, cli
from core.cli import arg
from core.files import CHECKSUM_KEY, UserError, atomic_path, tensors_sha256, write_json_atomic
from core.locks import hold_output
from core.progress import progress
from data.loader import ShardLoader
from data.tokenizer import load_tokenizer
from experiment import (
    RunFlags,
    ShapeFlags,
    StagePaths,
    hookpoint,
    layer_name,
    load_transcoders,
    open_base_run,
    resolve_checkpoint,
    resolve_device,
    resolve_run_folder,
)
from experiment.paths import CONTEXTS_FILE, INDEX_FILE, export_folder
from interp.contexts.scan import Batch, ScanSettings, active_features, scan_inputs
from interp.contexts.store import REMAKE, read_index, read_jsonl
from interp.descriptions.prompts import MASK_SHOWN
from interp.descriptions.records import all_records
from model.precision import autocast as autocast_for

EXPORT_NAME = "delphi"
LATENTS_DIR, TOKENIZER_DIR = "latents", "tokenizer"
FIRING_COUNTS = "hookpoint_firing_counts.pt"


def collect(model, transcoders: dict, loader: ShardLoader, s: ScanSettings, device, autocast) -> dict:
    """Every nonzero activation of every layer over the scan's batches, with the tokens as seen."""
    layers = sorted(transcoders)
    mc = model.cfg
    locs: dict[int, list] = defaultdict(list)
    acts: dict[int, list] = defaultdict(list)
    seen, clean, ts = [], [], []
    for b in progress(range(s.n_batches), desc="delphi cache", unit="batch"):
        batch = Batch(model, loader, b, s, layers, device, autocast)
        masked = batch.masked.reshape(batch.B, batch.T)
        seen.append(batch.tokens.masked_fill(masked, mc.mask_id).int().cpu())
        clean.append(batch.tokens.int().cpu())
        ts.append(batch.t.float().cpu())
        for layer in layers:
            f, a, pos, _ = active_features(transcoders[layer], batch.x[layer], autocast)
            seq = b * batch.B + pos // batch.T
            locs[layer].append(torch.stack([seq, pos % batch.T, f], dim=1).int().cpu())
            acts[layer].append(a.float().cpu())
    return {"tokens": torch.cat(seen), "clean_tokens": torch.cat(clean), "t": torch.cat(ts),
            "locations": {layer: torch.cat(locs[layer]) for layer in layers},
            "activations": {layer: torch.cat(acts[layer]) for layer in layers}}


def cache_config(settings: dict, run_cfg: dict, n_tokens: int, model_name: str, mask_id: int) -> dict:
    """delphi's CacheConfig fields, and what it cannot say about a diffusion model's inputs."""
    return {"dataset_repo": run_cfg["data"]["params"].get("dataset", "?"), "dataset_split": "train",
            "dataset_name": Path(run_cfg["data"]["folder"]).name, "dataset_column": "text",
            "batch_size": settings["batch_size"], "cache_ctx_len": settings["train_seq_len"],
            "ctx_len": settings["train_seq_len"], "n_tokens": n_tokens, "n_splits": 1, "model_name": model_name,
            "diffusion_interp": {
                "tokens": f"as the model saw them: masked positions hold [MASK] (id {mask_id}); clean_tokens has "
                          "the text, t each sequence's noise level",
                "noise": f"mask_ratio {settings['mask_ratio']}, seed {settings['seed']}: the scan's own batches",
                "scan_batches": settings["scan_batches"], "checkpoint": settings["checkpoint"]}}


def write_cache(out: Path, layers: list[int], data: dict, config: dict, num_latents: dict[int, int]) -> None:
    from safetensors.numpy import save_file

    for layer in layers:
        d = out / LATENTS_DIR / hookpoint(layer)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {"locations": data["locations"][layer].numpy(), "activations": data["activations"][layer].numpy(),
                   "tokens": data["tokens"].numpy(), "clean_tokens": data["clean_tokens"].numpy(),
                   "t": data["t"].numpy()}
        with atomic_path(d / f"0_{num_latents[layer] - 1}.safetensors") as tmp:  # delphi ignores the checksum
            save_file(tensors, str(tmp), metadata={CHECKSUM_KEY: tensors_sha256(tensors)})
        write_json_atomic(d / "config.json", config)


def _examples_by_position(record: dict) -> dict[int, tuple[str, int, dict]]:
    return {e["position"]: (c, i, e) for c in ("top", "quantile", "random") for i, e in enumerate(record[c])}


def run_folder_name(explainer: str) -> str:
    """An explainer's name as one folder name ("google/flan-t5-xxl" → "google--flan-t5-xxl")."""
    return re.sub(r"[^\w.-]+", "--", explainer).strip("-") or "explainer"


def _entry(example: dict, category: str, index: int, activating: bool, p: float) -> dict:
    hidden = set(example.get("masked_at", ()))
    prediction = p >= 0.5
    return {"str_tokens": [f" {MASK_SHOWN}" if i in hidden else piece for i, piece in enumerate(example["pieces"])],
            "activations": example["acts"], "distance": {"top": 0, "quantile": index + 1}.get(category, -1),
            "activating": activating, "prediction": prediction, "probability": p, "correct": prediction == activating}


def score_entries(record: dict, contexts: dict) -> dict[str, list[dict]]:
    """delphi's per-example entries ("detection", "fuzz") of one judged description record."""
    by_pos = _examples_by_position(contexts)
    wanted = record["score_contexts"]["activating"] + record["score_contexts"]["non_activating"]
    if any(p not in by_pos for p in wanted):
        raise UserError(f"the description of layer {record['layer']} feature {record['feature']} was scored on "
                        "contexts the current scan does not have (the scan was redone after stage 5): rerun "
                        "get_activation_descriptions.py with --overwrite True")
    pos = [by_pos[p] for p in record["score_contexts"]["activating"]]
    neg = [by_pos[p] for p in record["score_contexts"]["non_activating"]]
    out = {}
    # a score this project leaves undefined (no activating context in the score half) is not exported: delphi's
    # analysis of one class (its compute_auc) fails, and there is no number of ours to compare with
    scores = {name: s for name, s in record["scores"].items() if not (isinstance(s, dict) and "undefined" in s)}
    det = scores.get("detection", {}).get("probabilities")
    if det:
        out["detection"] = ([_entry(e, c, i, True, p) for (c, i, e), p in zip(pos, det["activating"])]
                            + [_entry(e, c, i, False, p) for (c, i, e), p in zip(neg, det["non_activating"])])
    fuzz = scores.get("fuzzing", {}).get("probabilities")
    if fuzz:
        out["fuzz"] = ([_entry(e, c, i, True, p) for (c, i, e), p in zip(pos, fuzz["right"])]
                       + [_entry(e, c, i, False, p) for (c, i, e), p in zip(pos, fuzz["wrong"])])
    return out


def described_contexts(records: list[dict], topk_dir: Path) -> dict[tuple[int, int], dict]:
    """(layer, feature) → the scan's contexts of each described feature (a damaged contexts.jsonl: one UserError)."""
    contexts: dict[tuple[int, int], dict] = {}
    for layer in sorted({r["layer"] for r in records}):
        path = topk_dir / layer_name(layer) / CONTEXTS_FILE
        wanted = {r["feature"] for r in records if r["layer"] == layer}
        contexts.update({(layer, c["feature"]): c for c in read_jsonl(path) if c["feature"] in wanted})
    return contexts


def write_descriptions(out: Path, records: list[dict], topk_dir: Path, counts: dict[str, torch.Tensor],
                       contexts: dict[tuple[int, int], dict] | None = None) -> dict:
    """Per explainer: explanations, scores and firing counts in a delphi run folder. Returns counts written."""
    contexts = described_contexts(records, topk_dir) if contexts is None else contexts
    written: dict = defaultdict(lambda: defaultdict(int))
    for r in records:
        run = out / run_folder_name(r["explainer"])
        name = f"{hookpoint(r['layer'])}_latent{r['feature']}.txt"
        if r["description"] is None:
            continue
        (run / "explanations").mkdir(parents=True, exist_ok=True)
        (run / "explanations" / name).write_text(json.dumps(r["description"]))
        written[run.name]["explanations"] += 1
        for scorer, entries in score_entries(r, contexts[(r["layer"], r["feature"])]).items():
            (run / "scores" / scorer).mkdir(parents=True, exist_ok=True)
            (run / "scores" / scorer / name).write_text(json.dumps(entries))
            written[run.name][scorer] += 1
    for tag in {run_folder_name(r["explainer"]) for r in records}:
        (out / tag / "log").mkdir(parents=True, exist_ok=True)
        torch.save(counts, out / tag / "log" / FIRING_COUNTS)
        link = out / tag / LATENTS_DIR
        if not link.exists():
            os.symlink(os.path.relpath(out / LATENTS_DIR, out / tag), link)
    return {k: dict(v) for k, v in written.items()}


@dataclass
class DelphiExportConfig(ShapeFlags, RunFlags):
    """Export a checkpoint's scan (as a latent cache), descriptions and scores in delphi's layout."""

    output: str = arg("", "the folder to write (default: experiments/X/exports/delphi/<checkpoint stem>/)",
                      c.OUT_FOLDER)
    overwrite: bool = arg(False, "replace an existing export")


def main(cfg: DelphiExportConfig) -> Path:
    """The export, under its sibling lock `.<name>.lock`: two exports at once would remove each other's
    half-made folder."""
    resolve_device(cfg.cuda, cfg.device)
    folder = resolve_run_folder(cfg.train_folder)
    with hold_output(export_folder(folder, EXPORT_NAME, resolve_checkpoint(folder, cfg.checkpoint_name), cfg.output)):
        return export(cfg)


def export(cfg: DelphiExportConfig) -> Path:
    device = resolve_device(cfg.cuda, cfg.device)
    folder, run_cfg, ckpt, model = open_base_run(cfg, device)
    paths = StagePaths(folder, ckpt.name)
    if not (paths.topk / INDEX_FILE).is_file():
        raise UserError(f"no finished scan in {paths.topk}: run get_topk_activations.py for this checkpoint first")
    index = read_index(paths.topk)
    settings, layers = index.get("settings"), index["layers"]
    if not isinstance(settings, dict):
        raise UserError(f"{paths.topk / INDEX_FILE} is damaged (no settings); {REMAKE}")
    out = export_folder(folder, EXPORT_NAME, ckpt, cfg.output)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out} exists; --overwrite True replaces it")
    transcoders = load_transcoders(paths.transcoders, layers, device, model.cfg.model_dim)
    tok = load_tokenizer(run_cfg["tokenizer"], folder)
    loader, s = scan_inputs(settings, run_cfg)
    records = [r for r in all_records(paths.records) if r["layer"] in layers]  # read (damage found) before writing
    contexts = described_contexts(records, paths.topk)
    tmp = out.with_name(f".{out.name}.partial")  # the export appears whole or not at all
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        try:
            tok.save_for_transformers(tmp / TOKENIZER_DIR)
            model_name = TOKENIZER_DIR  # relative to the export folder, so a moved or shared export still loads
        except (UserError, OSError) as e:
            model_name = run_cfg["tokenizer"]
            print(f"note: no transformers tokenizer written ({e}); pass one to delphi's LatentDataset(tokenizer=...)")
        collected = collect(model, transcoders, loader, s, device, autocast_for(device))
        n_tokens = int(collected["tokens"].numel())
        write_cache(tmp, layers, collected, cache_config(settings, run_cfg, n_tokens, model_name, model.cfg.mask_id),
                    {layer: transcoders[layer].cfg.num_latents for layer in layers})
        counts = {hookpoint(layer): torch.bincount(collected["locations"][layer][:, 2].long(),
                                                   minlength=transcoders[layer].cfg.num_latents) for layer in layers}
        written = write_descriptions(tmp, records, paths.topk, counts, contexts) if records else {}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # an export that failed leaves nothing half-made behind
        raise
    if out.exists():  # --overwrite: the old export goes only once the new one is complete
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    for layer in layers:
        n = len(collected["activations"][layer])
        print(f"{hookpoint(layer)}: {n:,} activations over {n_tokens:,} tokens "
              f"({n / max(n_tokens, 1):.1f} per token)")
    for tag, w in written.items():
        print(f"{tag}: " + ", ".join(f"{v} {k}" for k, v in w.items()))
    if not records:
        print(f"no descriptions in {paths.records} yet: the cache alone was exported")
    print(f"delphi export: {out}")
    return out


if __name__ == "__main__":
    cli.run(main, DelphiExportConfig, description=DelphiExportConfig.__doc__)
