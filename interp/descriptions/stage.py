"""get_activation_descriptions.py's work: describe every live feature, score every description on
held-out contexts, append one JSON line per feature the moment it is done.

descriptions.jsonl holds the records of every explainer that was run (each line names its
explainer); a rerun skips the (explainer, layer, feature) triples already there, and --overwrite replaces
only the current explainer's lines, once all its new ones are made (they wait in descriptions.new.jsonl).

Under torchrun every process loads its own explainer (one per GPU) and takes every world-th batch of
features (the batches one process would make, so the outputs do not depend on the process count),
appending to its own part file; rank 0 folds the parts into descriptions.jsonl in one process's order
(and folds a killed job's parts at the next start, so nothing finished is lost or redone).
"""
from __future__ import annotations

import contextlib
import statistics
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from core.checks import index_list
from core.files import (
    UserError,
    atomic_path,
    remove_stale_temporaries,
    write_json_atomic,
)
from core.locks import hold
from experiment import StagePaths, layer_name, parse_layers, resolve_checkpoint, resolve_run_folder, setup_distributed
from experiment.paths import (
    CONTEXTS_FILE,
    DESCRIPTIONS_SUMMARY_FILE,
    FEATURES_FILE,
    INDEX_FILE,
    SCORES_PLOT,
)
from interp.contexts.browser import write_page_descriptions
from interp.contexts.store import PROTOCOL, read_index, read_jsonl
from interp.descriptions.prompts import clean, explain_examples, fit_prompt, tokens_description
from interp.descriptions.records import (
    TOKENS,
    append_record,
    clear_records,
    fold_parts,
    part_path,
    read_records,
    rewrite_records,
    staging_records,
)
from interp.descriptions.scoring import TOKEN_MATCH_LABEL, judge_many, score_sets, simulation, token_match
from model.distributed import Dist
from model.explainer import Explainer

SCORERS = ("detection", "fuzzing", "token_match", "simulation")
JUDGED = ("detection", "fuzzing", "simulation")


class BatchSize:
    """Prompts per forward pass: --batch_size, halved for the rest of the run each time the device runs out
    of memory, so that a generous --batch_size settles on the largest batch that fits."""

    def __init__(self, size: int) -> None:
        self.size = size


def batched(fn: Callable[..., list], size: int | BatchSize) -> Callable[..., list]:
    """`fn` over batches of `size`, the prompts sorted by length first (little padding), results in order.
    Lists that go with the prompts item by item (a window's lines) are passed along in the same batches. A
    batch that runs out of memory is retried at half the size (a `BatchSize` keeps the new size)."""
    limit = size if isinstance(size, BatchSize) else BatchSize(size)

    def run(prompts: list[str], *alongside: list) -> list:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list = [None] * len(prompts)
        i = 0
        while i < len(order):
            chunk = order[i:i + limit.size]
            try:
                values = fn(*([items[j] for j in chunk] for items in (prompts, *alongside)))
            except torch.OutOfMemoryError:
                if limit.size == 1:
                    raise
                limit.size = max(1, limit.size // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                print(f"out of memory: batches of {limit.size} prompts from now on", flush=True)
                continue
            for j, value in zip(chunk, values):
                out[j] = value
            i += len(chunk)
        return out
    return run


def parse_features(spec: str) -> set[int] | None:
    """--features: None for every feature, else the indices (whole numbers ≥ 0; UserError otherwise)."""
    try:
        found = index_list("features", spec)  # the syntax --features is checked with when it is parsed
    except ValueError as e:
        raise UserError(str(e)) from None
    return None if found is None else set(found)


def check_features(wanted: set[int] | None, topk_dir: Path, index: dict, layers: list[int]) -> None:
    """Every --features index against each chosen layer's number of features in the top-k output."""
    if wanted is None:
        return
    summary = index.get("summary", {})
    for layer in layers:
        n = summary.get(str(layer), {}).get("features")
        if n is None:  # an index without the count: the layer's feature file has one line per feature
            n = len(read_jsonl(topk_dir / layer_name(layer) / FEATURES_FILE))
        beyond = sorted(f for f in wanted if f >= n)
        if beyond:
            raise UserError(f"--features {','.join(map(str, beyond[:5]))}{'...' if len(beyond) > 5 else ''}: layer "
                            f"{layer} has features 0..{n - 1}")


def describe_batch(items: list[tuple[dict, dict]], explainer, cfg, limit: BatchSize | None = None) -> list[dict]:
    """Descriptions for (stats, contexts) pairs: one batched generation, one batched retry with sampling
    for the empty or echoed answers, failures recorded as such."""
    if explainer is None:  # the tokens baseline
        return [{"description": tokens_description(s, r, cfg.n_examples), "raw": [], "failure": None,
                 "prompt_examples": [e["position"] for e in explain_examples(r, cfg.n_examples)]} for s, r in items]
    prompts, shown = [], []
    budget = explainer.prompt_budget(cfg.max_new_tokens) - 8  # room left for the description it writes
    for stats, record in items:
        prompt, examples = fit_prompt(explain_examples(record, cfg.n_examples), stats, explainer.count_tokens, budget)
        prompts.append(prompt)
        shown.append([e["position"] for e in examples])
    limit = limit or BatchSize(cfg.batch_size)
    gen = batched(lambda ps: explainer.generate(ps, cfg.max_new_tokens), limit)
    raws = gen(prompts)
    results = []
    for prompt, raw, pos in zip(prompts, raws, shown):
        desc, why = clean(raw, prompt)
        results.append({"description": desc, "raw": [raw], "failure": why, "prompt_examples": pos})
    retry = [i for i, r in enumerate(results) if r["failure"]]
    if retry:
        again = batched(lambda ps: explainer.generate(ps, cfg.max_new_tokens, sample=True, seed=cfg.seed),
                        limit)([prompts[i] for i in retry])
        for i, raw in zip(retry, again):
            desc, why = clean(raw, prompts[i])
            results[i].update(description=desc, failure=why, retried=True)
            results[i]["raw"].append(raw)
    return results


OLDER_TOKEN_MATCH = "token_match_all_words"  # the keyword match of older records, which read hidden words too
LABELS = {"token_match": TOKEN_MATCH_LABEL, OLDER_TOKEN_MATCH: "token_match (hidden words too: older records)"}


def _scores(record: dict) -> dict:
    """A record's scores by what they measured. Older records called the keyword match "simulation" (it has
    "words"); before it read the text as the model saw it (it has "reads"), it matched the hidden words
    too, and those are kept apart, as OLDER_TOKEN_MATCH."""
    out = {}
    for k, v in record.get("scores", {}).items():
        k = "token_match" if k == "simulation" and "words" in (v or {}) else k
        out[OLDER_TOKEN_MATCH if k == "token_match" and "reads" not in (v or {}) else k] = v
    return out


def printed(summary_key: str) -> str:
    """A summary entry's name as printed: the keyword match says what it reads."""
    return next((f"{label} correlation" for name, label in LABELS.items() if summary_key == f"{name}_correlation"),
                summary_key)


def summarise(records: list[dict]) -> dict:
    """Per explainer and layer: counts, failures, and each score's mean and median over the features
    where it is defined, with the number where it is undefined (a class missing, a constant series)."""
    out: dict = {}
    for r in records:
        layer = out.setdefault(r["explainer"], {}).setdefault(str(r["layer"]), {"n": 0, "failures": 0, "scores": {}})
        layer["n"] += 1
        layer["failures"] += r["failure"] is not None
        scores = _scores(r)
        for name, key in (("detection", "auroc"), ("fuzzing", "balanced_accuracy"), ("token_match", "correlation"),
                          (OLDER_TOKEN_MATCH, "correlation"), ("simulation", "correlation")):
            score = scores.get(name)
            if score is not None:
                layer["scores"].setdefault(f"{name}_{key}", []).append(score.get(key))
    for per_layer in out.values():
        for layer in per_layer.values():
            layer["scores"] = {k: _stats([x for x in v if x is not None], len(v)) for k, v in layer["scores"].items()}
    return out


def _stats(values: list[float], n_scored: int) -> dict:
    mean = statistics.fmean(values) if values else None
    median = statistics.median(values) if values else None
    return {"mean": mean, "median": median, "n": len(values), "n_undefined": n_scored - len(values)}


def plot_scores(records: list[dict], path: Path) -> None:
    """Box plots of each score per layer, one box per explainer side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    explainers = sorted({r["explainer"] for r in records})
    layers = sorted({r["layer"] for r in records})
    metrics = [("detection", "auroc", "detection AUROC"), ("fuzzing", "balanced_accuracy", "fuzzing balanced acc."),
               ("token_match", "correlation", f"{TOKEN_MATCH_LABEL} correlation"),
               ("simulation", "correlation", "simulation correlation")]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    width = 0.8 / max(1, len(explainers))
    for ax, (name, key, title) in zip(axes, metrics):
        for j, ex in enumerate(explainers):
            data = [[(_scores(r).get(name) or {}).get(key) for r in records
                     if r["explainer"] == ex and r["layer"] == layer] for layer in layers]
            data = [[v for v in d if v is not None] or [float("nan")] for d in data]
            pos = [i + (j - (len(explainers) - 1) / 2) * width for i in range(len(layers))]
            bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False)
            for patch in bp["boxes"]:
                patch.set_facecolor(f"C{j}")
            ax.plot([], [], color=f"C{j}", lw=6, label=ex)
        ax.set_xticks(range(len(layers)), [f"layer {x}" for x in layers])
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run_descriptions(cfg, explainer_factory=None) -> Path:
    """`explainer_factory(name, device)` builds the LLM wrapper (tests pass a scripted one)."""
    folder = resolve_run_folder(cfg.train_folder)
    ckpt = resolve_checkpoint(folder, cfg.checkpoint_name)
    paths = StagePaths(folder, ckpt.name)
    topk_dir = paths.topk
    if not (topk_dir / INDEX_FILE).exists():
        raise UserError(f"no finished top-k output in {topk_dir}: run get_topk_activations.py for this checkpoint "
                        "first")
    index = read_index(topk_dir)
    if index.get("protocol", 1) < PROTOCOL:
        raise UserError(f"{topk_dir} was made by an older protocol (windows without their mask pattern, halves "
                        "that could share positions): rerun get_topk_activations.py with --overwrite True first")
    layers = index["layers"] if cfg.layers == "all" else parse_layers(cfg.layers, max(index["layers"]) + 1)
    missing = [x for x in layers if x not in index["layers"]]
    if missing:
        raise UserError(f"layer(s) {missing} have no top-k output (have {index['layers']})")
    wanted = parse_features(cfg.features)
    check_features(wanted, topk_dir, index, layers)
    scorers = [s.strip() for s in cfg.scorers.split(",") if s.strip()]
    unknown = [s for s in scorers if s not in SCORERS]
    if unknown:
        raise UserError(f"--scorers: unknown {unknown}; choose from {', '.join(SCORERS)}")

    dist, device = setup_distributed(cfg)
    try:
        with contextlib.ExitStack() as stack:
            if dist.main:  # under torchrun, rank 0 holds the lock for the job
                stack.enter_context(hold(paths.descriptions))
            return _describe(cfg, dist, device, explainer_factory, paths, ckpt, index, layers, wanted, scorers, stack)
    finally:
        dist.close()


def _describe(cfg, dist: Dist, device, explainer_factory, paths: StagePaths, ckpt: Path, index: dict,
              layers: list[int], wanted, scorers: list[str], stack: contextlib.ExitStack) -> Path:
    topk_dir = paths.topk
    make = explainer_factory or (lambda name: Explainer(name, device, cfg.dtype, cfg.load_in_8bit,
                                                        cfg.trust_remote_code))
    explainer = None if cfg.explainer == TOKENS else make(cfg.explainer)
    judge_name = cfg.judge or (None if cfg.explainer == TOKENS else cfg.explainer)
    judge = None
    if judge_name and any(s in scorers for s in JUDGED):
        judge = explainer if judge_name == cfg.explainer and explainer is not None else make(judge_name)
    tag = cfg.explainer if explainer is None else explainer.name

    out_dir = paths.descriptions
    path = paths.records
    # --overwrite: the explainer's new records go to a staging file, and replace its old ones in `path` only
    # once every feature is described; until then `path` stays as it was
    target = staging_records(path) if cfg.overwrite else path
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for d in (out_dir, topk_dir):  # a killed run's temporary files (its pages go to the top-k folder)
            remove_stale_temporaries(d)
        fold_parts(path)  # a killed torchrun job's finished records
        read_records(path, rewrite=True)  # drops a line cut short by a kill
        if cfg.overwrite:
            clear_records(target)  # an interrupted overwrite's records: this one starts over
            stack.callback(clear_records, target)  # and leaves none behind if it fails
    dist.barrier()
    records = read_records(path)  # rank 0 has dropped any cut line: nothing left to rewrite
    if cfg.overwrite:
        records = [r for r in records if r["explainer"] != tag]
    if any(r.get("protocol", 1) < PROTOCOL for r in records if r["explainer"] == tag):
        raise UserError(f"{path} holds {tag}'s descriptions made under an older protocol; --overwrite True "
                        "redoes them")
    done = {(r["layer"], r["feature"]) for r in records if r["explainer"] == tag}

    todo = []
    for layer in layers:
        ldir = topk_dir / layer_name(layer)
        stats = read_jsonl(ldir / FEATURES_FILE)
        live = [s for s in stats if not s["dead"] and (wanted is None or s["feature"] in wanted)]
        if cfg.max_features_per_layer:
            live = live[:cfg.max_features_per_layer]
        keep = {s["feature"] for s in live} - {f for (lay, f) in done if lay == layer}
        if keep:
            contexts = {r["feature"]: r for r in read_jsonl(ldir / CONTEXTS_FILE) if r["feature"] in keep}
            todo += [(layer, s, contexts[s["feature"]]) for s in live if s["feature"] in keep]
    judged = judge_name or "none: detection, fuzzing and simulation are not scored"
    if dist.main:
        print(f"describing {len(todo)} features with {tag} (judge: {judged}); {len(done)} already done; writing "
              f"{path}" + (f" (from {dist.world} processes)" if dist.world > 1 else ""))
    # one size per kind of call, kept over the run: a size that ran out of memory is not tried again
    limit, judge_limit, digits_limit = (BatchSize(cfg.batch_size) for _ in range(3))
    judge_fn = batched(judge.yes_probability, judge_limit) if judge is not None else None
    simulate = judge is not None and "simulation" in scorers
    digits_fn = batched(judge.expected_digits_all_at_once, digits_limit) if simulate else None
    # batches of features as one process makes them, dealt out to the processes in turn: every batch
    # reaches the explainer as it would in one process, so the outputs do not depend on the process count
    chunks = [todo[i:i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)][dist.rank::dist.world]
    out_path = target if dist.world == 1 else part_path(target, dist.rank)
    bar = tqdm(total=sum(map(len, chunks)), unit="feature", dynamic_ncols=True, disable=not dist.main)
    for chunk in chunks:
        described = describe_batch([(s, r) for _, s, r in chunk], explainer, cfg, limit)
        judged_here = [i for i, d in enumerate(described) if d["description"] is not None] if judge_fn else []
        judgements = dict(zip(judged_here, judge_many(
            [(described[i]["description"], chunk[i][2], cfg.seed + chunk[i][1]["feature"]) for i in judged_here],
            judge_fn, cfg.n_score))) if judged_here else {}
        for i, ((layer, stats, record), d) in enumerate(zip(chunk, described)):
            pos, neg = score_sets(record, cfg.n_score)
            scores: dict = {}
            if d["description"] is not None:
                if i in judgements:
                    scores.update({k: v for k, v in judgements[i].items() if k in scorers})
                if "token_match" in scorers:
                    scores["token_match"] = token_match(d["description"], pos + neg)
                if "simulation" in scorers and digits_fn is not None:
                    shown = pos[:cfg.n_simulate] + neg[:cfg.n_simulate]
                    scores["simulation"] = simulation(d["description"], shown, digits_fn)
            rec = {"explainer": tag, "protocol": PROTOCOL, "judge": judge_name if judge_fn is not None else None,
                   "layer": layer,
                   "feature": stats["feature"], **d, "scores": scores,
                   "score_contexts": {"activating": [e["position"] for e in pos],
                                      "non_activating": [e["position"] for e in neg]}}
            append_record(out_path, rec)
            records.append(rec)
            bar.update(1)
    bar.close()
    if dist.world > 1:
        dist.barrier()
        if not dist.main:
            return out_dir
        fold_parts(target)
        records = read_records(path)
    if cfg.overwrite:  # complete: the explainer's new records replace its old ones
        rewrite_records(path, [r for r in read_records(path) if r["explainer"] != tag] + read_records(target))
        clear_records(target)
        records = read_records(path)
    summary = summarise(records)
    noise = {layer: s.get("held_out_noise") for layer, s in index.get("summary", {}).items()}
    write_json_atomic(out_dir / DESCRIPTIONS_SUMMARY_FILE, {"checkpoint": ckpt.name, "explainers": summary,
                                                            "held_out_noise": noise})
    plot_scores(records, out_dir / SCORES_PLOT)
    for layer in sorted({r["layer"] for r in records}):  # the feature browser shows them
        if (topk_dir / layer_name(layer)).is_dir():
            write_page_descriptions(topk_dir / layer_name(layer), [r for r in records if r["layer"] == layer])
    for layer, s in sorted(summary.get(tag, {}).items(), key=lambda kv: int(kv[0])):
        parts = [(f"{printed(k)} {v['mean']:.3f}" if v["mean"] is not None else f"{printed(k)} undefined")
                 + (f" ({v['n_undefined']} of {v['n'] + v['n_undefined']} undefined)" if v["n_undefined"] else "")
                 for k, v in s["scores"].items()]
        print(f"layer {layer}: {s['n']} features, {s['failures']} failures; mean " + (", ".join(parts) or "no scores"))
    print(f"descriptions: {path}; summary: {out_dir / DESCRIPTIONS_SUMMARY_FILE}; plot: {out_dir / SCORES_PLOT}")
    return out_dir
