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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from core.checks import index_list
from core.files import (
    UserError,
    remove_stale_temporaries,
    write_json_atomic,
)
from core.locks import hold
from core.progress import progress
from experiment import StagePaths, layer_name, parse_layers, resolve_checkpoint, resolve_run_folder, setup_distributed
from experiment.paths import (
    CONTEXTS_FILE,
    DESCRIPTIONS_SUMMARY_FILE,
    FEATURES_FILE,
    INDEX_FILE,
    SCORES_PLOT,
)
from experiment.plots import pyplot, save_figure
from interp.contexts.browser import write_page_descriptions
from interp.contexts.store import PROTOCOL, read_index, read_jsonl
from interp.descriptions.config import SCORER_NAMES as SCORERS, DescriptionsConfig
from interp.descriptions.prompts import clean, explain_examples, fit_prompt, tokens_description
from interp.descriptions.records import (
    OLDER_TOKEN_MATCH,
    TOKENS,
    append_record,
    clear_records,
    fold_parts,
    measured_scores,
    part_path,
    read_records,
    rewrite_records,
    staging_records,
)
from interp.descriptions.scoring import TOKEN_MATCH_LABEL, judge_many, score_sets, simulation, token_match
from model.distributed import Dist
from model.explainer import Explainer

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


def describe_batch(items: list[tuple[dict, dict]], explainer, cfg: DescriptionsConfig,
                   limit: BatchSize | None = None) -> list[dict]:
    """Descriptions for (stats, contexts) pairs: one batched generation, one batched retry with sampling
    for the empty or echoed answers, failures recorded as such."""
    if explainer is None:  # the tokens baseline
        return [{"description": tokens_description(stats, contexts, cfg.n_examples), "raw": [], "failure": None,
                 "prompt_examples": [e["position"] for e in explain_examples(contexts, cfg.n_examples)]}
                for stats, contexts in items]
    prompts, shown = [], []
    budget = explainer.prompt_budget(cfg.max_new_tokens) - 8  # room left for the description it writes
    for stats, contexts in items:
        prompt, examples = fit_prompt(explain_examples(contexts, cfg.n_examples), stats, explainer.count_tokens,
                                      budget)
        prompts.append(prompt)
        shown.append([e["position"] for e in examples])
    limit = limit or BatchSize(cfg.batch_size)
    gen = batched(lambda ps: explainer.generate(ps, cfg.max_new_tokens), limit)
    raws = gen(prompts)
    results: list[dict[str, Any]] = []
    for prompt, raw, pos in zip(prompts, raws, shown):
        desc, why = clean(raw, prompt)
        results.append({"description": desc, "raw": [raw], "failure": why, "prompt_examples": pos})
    retry = [i for i, result in enumerate(results) if result["failure"]]
    if retry:
        again = batched(lambda ps: explainer.generate(ps, cfg.max_new_tokens, sample=True, seed=cfg.seed),
                        limit)([prompts[i] for i in retry])
        for i, raw in zip(retry, again):
            desc, why = clean(raw, prompts[i])
            results[i].update(description=desc, failure=why, retried=True)
            results[i]["raw"].append(raw)
    return results


LABELS = {"token_match": TOKEN_MATCH_LABEL, OLDER_TOKEN_MATCH: "token_match (hidden words too: older records)"}


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
        scores = measured_scores(r)
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
    plt = pyplot()
    explainers = sorted({r["explainer"] for r in records})
    layers = sorted({r["layer"] for r in records})
    metrics = [("detection", "auroc", "detection AUROC"), ("fuzzing", "balanced_accuracy", "fuzzing balanced acc."),
               ("token_match", "correlation", f"{TOKEN_MATCH_LABEL} correlation"),
               ("simulation", "correlation", "simulation correlation")]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    width = 0.8 / max(1, len(explainers))
    for ax, (name, key, title) in zip(axes, metrics):
        for j, ex in enumerate(explainers):
            data = [[(measured_scores(r).get(name) or {}).get(key) for r in records
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
    save_figure(fig, path)


@dataclass
class Request:
    """What run_descriptions checked before any process starts: the stage's folders, the checkpoint, the top-k
    output's index, and which layers, features (None: every live one) and scorers."""

    paths: StagePaths
    ckpt: Path
    index: dict
    layers: list[int]
    wanted: set[int] | None
    scorers: list[str]


def run_descriptions(cfg: DescriptionsConfig, explainer_factory=None) -> Path:
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
    scorers = [name.strip() for name in cfg.scorers.split(",") if name.strip()]
    unknown = [name for name in scorers if name not in SCORERS]
    if unknown:
        raise UserError(f"--scorers: unknown {unknown}; choose from {', '.join(SCORERS)}")

    dist, device = setup_distributed(cfg)
    try:
        with contextlib.ExitStack() as stack:
            if dist.main:  # under torchrun, rank 0 holds the lock for the job
                stack.enter_context(hold(paths.descriptions))
            request = Request(paths, ckpt, index, layers, wanted, scorers)
            return _describe(cfg, dist, device, explainer_factory, request, stack)
    finally:
        dist.close()


def _describe(cfg: DescriptionsConfig, dist: Dist, device, explainer_factory, request: Request,
              stack: contextlib.ExitStack) -> Path:
    """The stage's steps, in order, with the lock held: load the models, open the records file, list the features
    still to describe, describe and score them (this process's share), gather every process's records (and swap
    in an --overwrite's), then write the summary, plot and pages."""
    paths = request.paths
    models = load_models(cfg, device, explainer_factory, request.scorers)
    # --overwrite: the explainer's new records go to a staging file, and replace its old ones in paths.records
    # only once every feature is described; until then paths.records stays as it was
    target = staging_records(paths.records) if cfg.overwrite else paths.records
    records = open_records(cfg, dist, paths, target, models.tag, stack)
    done = {(r["layer"], r["feature"]) for r in records if r["explainer"] == models.tag}
    todo = features_to_describe(cfg, paths.topk, request.layers, request.wanted, done)
    judged = models.judge_name or "none: detection, fuzzing and simulation are not scored"
    if dist.main:
        print(f"describing {len(todo)} features with {models.tag} (judge: {judged}); {len(done)} already done; "
              f"writing {paths.records}" + (f" (from {dist.world} processes)" if dist.world > 1 else ""))
    records += describe_features(cfg, dist, todo, models, request.scorers, target)
    if dist.world > 1:
        dist.barrier()
        if not dist.main:
            return paths.descriptions
        fold_parts(target)
        records = read_records(paths.records)
    if cfg.overwrite:  # complete: the explainer's new records replace its old ones
        rewrite_records(paths.records, [r for r in read_records(paths.records) if r["explainer"] != models.tag]
                        + read_records(target))
        clear_records(target)
        records = read_records(paths.records)
    summary = write_outputs(paths, request.ckpt, request.index, records)
    print_summary(paths, summary.get(models.tag, {}))
    return paths.descriptions


@dataclass
class Models:
    """The explainer (None for the tokens baseline) and the judge (None when nothing is judged), with the names
    the records carry: `tag` the explainer's, `judge_name` the judge's (None for none)."""

    explainer: Explainer | None
    judge: Explainer | None
    judge_name: str | None
    tag: str


def load_models(cfg: DescriptionsConfig, device, explainer_factory, scorers: list[str]) -> Models:
    """The explainer, and the judge when a judged scorer is asked for (the explainer itself when they are the
    same model)."""
    make = explainer_factory or (lambda name: Explainer(name, device, cfg.dtype, cfg.load_in_8bit,
                                                        cfg.trust_remote_code))
    explainer = None if cfg.explainer == TOKENS else make(cfg.explainer)
    judge_name = cfg.judge or (None if cfg.explainer == TOKENS else cfg.explainer)
    judge = None
    if judge_name and any(name in scorers for name in JUDGED):
        judge = explainer if judge_name == cfg.explainer and explainer is not None else make(judge_name)
    tag = cfg.explainer if explainer is None else explainer.name
    return Models(explainer, judge, judge_name, tag)


def open_records(cfg: DescriptionsConfig, dist: Dist, paths: StagePaths, target: Path, tag: str,
                 stack: contextlib.ExitStack) -> list[dict]:
    """The records already made (without the explainer's own under --overwrite), once rank 0 has cleaned up after
    a killed run: its temporary files, its processes' parts folded in, a line cut short dropped, an interrupted
    overwrite's records cleared (and this one's cleared if it fails). Refuses the explainer's records of an older
    protocol."""
    if dist.main:
        paths.descriptions.mkdir(parents=True, exist_ok=True)
        for folder in (paths.descriptions, paths.topk):  # a killed run's temporary files (its pages go to top-k)
            remove_stale_temporaries(folder)
        fold_parts(paths.records)  # a killed torchrun job's finished records
        read_records(paths.records, rewrite=True)  # drops a line cut short by a kill
        if cfg.overwrite:
            clear_records(target)  # an interrupted overwrite's records: this one starts over
            stack.callback(clear_records, target)  # and leaves none behind if it fails
    dist.barrier()
    records = read_records(paths.records)  # rank 0 has dropped any cut line: nothing left to rewrite
    if cfg.overwrite:
        records = [r for r in records if r["explainer"] != tag]
    if any(r.get("protocol", 1) < PROTOCOL for r in records if r["explainer"] == tag):
        raise UserError(f"{paths.records} holds {tag}'s descriptions made under an older protocol; --overwrite True "
                        "redoes them")
    return records


def features_to_describe(cfg: DescriptionsConfig, topk_dir: Path, layers: list[int], wanted: set[int] | None,
                         done: set[tuple[int, int]]) -> list[tuple[int, dict, dict]]:
    """(layer, feature stats, feature contexts) of every live feature asked for and not `done`, layer by layer."""
    todo = []
    for layer in layers:
        layer_dir = topk_dir / layer_name(layer)
        live = [stats for stats in read_jsonl(layer_dir / FEATURES_FILE)
                if not stats["dead"] and (wanted is None or stats["feature"] in wanted)]
        if cfg.max_features_per_layer:
            live = live[:cfg.max_features_per_layer]
        keep = {stats["feature"] for stats in live} - {f for (lay, f) in done if lay == layer}
        if keep:
            contexts = {c["feature"]: c for c in read_jsonl(layer_dir / CONTEXTS_FILE) if c["feature"] in keep}
            todo += [(layer, stats, contexts[stats["feature"]]) for stats in live if stats["feature"] in keep]
    return todo


class Scorer:
    """A description's scores on its feature's held-out contexts, by the scorers asked for: the judge's
    (detection, fuzzing: asked for a whole batch of features at once), token match, simulation. One batch size
    per kind of judge call, kept over the run: a size that ran out of memory is not tried again."""

    def __init__(self, cfg: DescriptionsConfig, judge, scorers: list[str]) -> None:
        self.cfg, self.scorers = cfg, scorers
        self.judge_fn = batched(judge.yes_probability, BatchSize(cfg.batch_size)) if judge is not None else None
        simulate = judge is not None and "simulation" in scorers
        self.digits_fn = batched(judge.expected_digits_all_at_once, BatchSize(cfg.batch_size)) if simulate else None

    def judge(self, chunk: list[tuple[int, dict, dict]], answers: list[dict]) -> dict[int, dict]:
        """The judge's scores of each described feature of `chunk` (by its place in the chunk), in one call."""
        judge_fn = self.judge_fn
        judged = [i for i, answer in enumerate(answers) if answer["description"] is not None] if judge_fn else []
        if judge_fn is None or not judged:
            return {}
        return dict(zip(judged, judge_many(
            [(answers[i]["description"], chunk[i][2], self.cfg.seed + chunk[i][1]["feature"]) for i in judged],
            judge_fn, self.cfg.n_score)))

    def score(self, description: str | None, judgement: dict | None, pos: list[dict], neg: list[dict]) -> dict:
        """The scores of `description` (none when it failed) on the held-out activating `pos` and
        non-activating `neg` contexts, with the judge's `judgement` of it."""
        scores: dict = {}
        if description is None:
            return scores
        if judgement is not None:
            scores.update({k: v for k, v in judgement.items() if k in self.scorers})
        if "token_match" in self.scorers:
            scores["token_match"] = token_match(description, pos + neg)
        if "simulation" in self.scorers and self.digits_fn is not None:
            shown = pos[:self.cfg.n_simulate] + neg[:self.cfg.n_simulate]
            scores["simulation"] = simulation(description, shown, self.digits_fn)
        return scores


def describe_features(cfg: DescriptionsConfig, dist: Dist, todo: list[tuple[int, dict, dict]], models: Models,
                      scorers: list[str], target: Path) -> list[dict]:
    """This process's share of `todo` described and scored, each record appended to `target` (this process's part
    of it under torchrun) the moment it is made; returns the new records."""
    limit = BatchSize(cfg.batch_size)  # the explainer's, kept over the run like the judge's
    scorer = Scorer(cfg, models.judge, scorers)
    judge_name = models.judge_name if scorer.judge_fn is not None else None
    # batches of features as one process makes them, dealt out to the processes in turn: every batch
    # reaches the explainer as it would in one process, so the outputs do not depend on the process count
    chunks = [todo[i:i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)][dist.rank::dist.world]
    out_path = target if dist.world == 1 else part_path(target, dist.rank)
    made = []
    bar = progress(total=sum(map(len, chunks)), unit="feature", show=dist.main)
    for chunk in chunks:
        answers = describe_batch([(stats, contexts) for _, stats, contexts in chunk], models.explainer, cfg, limit)
        judgements = scorer.judge(chunk, answers)
        for i, ((layer, stats, contexts), answer) in enumerate(zip(chunk, answers)):
            pos, neg = score_sets(contexts, cfg.n_score)
            record = {"explainer": models.tag, "protocol": PROTOCOL, "judge": judge_name, "layer": layer,
                      "feature": stats["feature"], **answer,
                      "scores": scorer.score(answer["description"], judgements.get(i), pos, neg),
                      "score_contexts": {"activating": [e["position"] for e in pos],
                                         "non_activating": [e["position"] for e in neg]}}
            append_record(out_path, record)
            made.append(record)
            bar.update(1)
    bar.close()
    return made


def write_outputs(paths: StagePaths, ckpt: Path, index: dict, records: list[dict]) -> dict:
    """summary.json, the scores' plot, and the descriptions in the feature browser's pages; returns the summary."""
    summary = summarise(records)
    noise = {layer: layer_summary.get("held_out_noise") for layer, layer_summary in index.get("summary", {}).items()}
    write_json_atomic(paths.descriptions / DESCRIPTIONS_SUMMARY_FILE, {"checkpoint": ckpt.name, "explainers": summary,
                                                                       "held_out_noise": noise})
    plot_scores(records, paths.descriptions / SCORES_PLOT)
    for layer in sorted({r["layer"] for r in records}):  # the feature browser shows them
        if (paths.topk / layer_name(layer)).is_dir():
            write_page_descriptions(paths.topk / layer_name(layer), [r for r in records if r["layer"] == layer])
    return summary


def print_summary(paths: StagePaths, per_layer: dict) -> None:
    """One line per layer of this explainer's summary (`per_layer`), and where the outputs are."""
    for layer, layer_summary in sorted(per_layer.items(), key=lambda kv: int(kv[0])):
        parts = [(f"{printed(k)} {v['mean']:.3f}" if v["mean"] is not None else f"{printed(k)} undefined")
                 + (f" ({v['n_undefined']} of {v['n'] + v['n_undefined']} undefined)" if v["n_undefined"] else "")
                 for k, v in layer_summary["scores"].items()]
        print(f"layer {layer}: {layer_summary['n']} features, {layer_summary['failures']} failures; mean "
              + (", ".join(parts) or "no scores"))
    out_dir = paths.descriptions
    print(f"descriptions: {paths.records}; summary: {out_dir / DESCRIPTIONS_SUMMARY_FILE}; "
          f"plot: {out_dir / SCORES_PLOT}")
