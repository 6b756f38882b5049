"""generate_descriptions.py's work: generate step by step, attribute every committed token to the
transcoder features of every layer, describe each step, score it, print, write JSON and an HTML report."""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from core.files import UserError, write_json_atomic
from core.locks import hold, hold_output
from experiment import StagePaths, load_run, load_transcoders, resolve_device, transcoder_layers
from experiment.paths import EXPLANATIONS_FILE, FEATURES_FILE, GRAPHS_DIR, PAGE_FILE, REPORT_FILE, layer_name
from experiment.runs import run_config, run_seq_len
from interp.contexts.store import read_jsonl
from interp.descriptions.records import TOKENS, read_records
from interp.explanations.config import ExplainConfig
from interp.explanations.graph import FEATURE, MASK, TARGET, TOKEN
from interp.explanations.graph_export import FEATURE_SCAN, cited_features, graph_json, write_feature_files, write_graph
from interp.explanations.interventions import NOISE, check_changes, parse_changes
from interp.explanations.report import write_report
from interp.explanations.step_analysis import EFFECT_FLOOR, MI_FORMULA, StepAnalysis, StepSettings, analyse_step
from interp.explanations.wording import (
    INTERPRETATION_RUBRIC,
    OUTPUT_RUBRIC,
    chance_text,
    compose_layer,
    compose_total,
    layer_prompt,
    parse_rating,
    short,
    total_prompt,
)
from model.explainer import Explainer
from model.precision import autocast
from model.sampler import generate

UNDESCRIBED = "(no description)"
GENERIC_FREQUENCY = 0.2  # a feature active on at least this share of the scanned tokens is labelled generic


def load_descriptions(path: Path, tag: str) -> dict[tuple[int, int], dict]:
    records = [r for r in read_records(path) if r["explainer"] == tag and r["description"]]
    if not records:
        raise UserError(f"no descriptions by {tag!r} in {path}: run get_activation_descriptions.py --explainer "
                        f"{tag} for this checkpoint first")
    return {(r["layer"], r["feature"]): r for r in records}


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def node_name(g, i: int, tok, descriptions: dict, frequency: dict | None = None) -> str:
    kind = g.kind(i)
    layer, pos = g.where(i)
    if kind == FEATURE:
        feature = int(g.feature_nodes[i, 2])
        rec = descriptions.get((layer, feature))
        freq = (frequency or {}).get((layer, feature))
        generic = f" [generic: fires on {freq:.0%} of tokens]" if freq is not None and freq >= GENERIC_FREQUENCY else ""
        return f'L{layer}#{feature} "{short(rec["description"], 40) if rec else UNDESCRIBED}"{generic}'
    if kind == TARGET:
        return repr(tok.decode([g.targets[i - g.target_start]]))
    if kind == TOKEN:
        return f"input {tok.decode([g.tokens[pos]])!r}"
    if kind == MASK:
        return f"[MASK]@{pos}"
    return f"L{layer} error@{pos}"


def cited_entry(res: StepAnalysis, i: int, gross: float, descriptions: dict, frequency: dict, page_of) -> dict:
    g, effects = res.graph, res.effects
    lay, pos, feature = g.feature_nodes[i].tolist()
    rec = descriptions.get((lay, feature)) or {}
    total = float(effects[:, i].mean())
    freq = frequency.get((lay, feature))
    direct = float(g.adjacency[g.target_start:, i].mean())
    return {"feature": feature, "position": pos, "activation": round(float(g.activations[i]), 4),
            "direct": direct, "direct_share": direct / gross, "total_effect": total,
            "negligible": abs(total) < EFFECT_FLOOR, "frequency": freq,
            "generic": freq is not None and freq >= GENERIC_FREQUENCY,
            "description": rec.get("description", UNDESCRIBED),
            "detection_auroc": ((rec.get("scores") or {}).get("detection") or {}).get("auroc"),
            "check": res.checks[i].as_dict(), "page": page_of(lay, feature)}


def graph_record(res: StepAnalysis, tok, descriptions: dict, page_of=lambda layer, feature: None,
                 frequency: dict | None = None) -> dict:
    """The step's graph in numbers (means over the committed tokens, which weigh equally), in logit units:
    `whole` is the targets' value (their demeaned pre-cap logit), which the parts (inputs and layers) add up
    to; shares are parts over the gross flow Σ|parts|, so they stay readable when pushes for and against
    nearly cancel. `target` has the real log-probability (nats) and its lift above uniform beside it."""
    g, parts = res.graph, res.parts
    frequency = frequency or {}
    inputs = {"tokens": mean(parts.tokens), "masks": mean(parts.masks)}
    layer_parts = {str(lay): {k: mean(v) for k, v in asdict(p).items()} for lay, p in parts.layers.items()}
    totals = {lay: sum(p.values()) for lay, p in layer_parts.items()}
    gross = sum(abs(v) for v in inputs.values()) + sum(abs(v) for v in totals.values()) or 1.0
    layers = {}
    for lay, sides in res.cited.items():
        p = layer_parts[str(lay)]
        cited = {side: [cited_entry(res, i, gross, descriptions, frequency, page_of) for i in nodes]
                 for side, nodes in sides.items()}
        shown = sum(c["direct"] for side in cited.values() for c in side)
        layers[str(lay)] = {"part": totals[str(lay)], "share": totals[str(lay)] / gross, **p,
                            "other_features": p["features"] - shown, **cited}
    pr, path = res.pruned, res.path
    scored = res.score.as_dict() if res.score else None
    t_end = path[-1] - g.target_start if path else None
    columns = zip(g.targets, g.target_values.tolist(), g.logprobs.tolist(), g.lift.tolist())
    per_token = [{"token": t, "text": tok.decode([t]), "value": round(v, 5), "logprob": round(lp, 5),
                  "lift": round(h, 5)} for t, v, lp, h in columns]
    return {"whole": mean(parts.whole), "gross": gross, "inputs": inputs,
            "input_shares": {k: v / gross for k, v in inputs.items()}, "layers": layers,
            "target": {"value": mean(parts.whole), "logprob": float(g.logprobs.mean()), "lift": float(g.lift.mean()),
                       "uniform_logprob": -math.log(g.n_choices), "per_token": per_token,
                       "unit": "logit (pre-soft-cap, demeaned over the tokens a step can commit)"},
            "path": [node_name(g, i, tok, descriptions, frequency) for i in path], "path_value": res.path_value,
            "path_share": (res.path_value / float(g.target_values[t_end])
                           if res.path_value is not None and float(g.target_values[t_end]) else None),
            "nodes": int(g.adjacency.shape[0]), "feature_nodes": g.n_features,
            "pruned_nodes": int(pr.node_mask.sum()), "pruned_edges": pr.n_edges,
            "graph_quality": res.graph_quality, "single_ablations": res.single_ablations,
            "noise_floor": res.noise_floor,
            "explanation_score": scored,
            "scores": headline_scores(scored, res.graph_quality),
            "logprobs": [round(x, 5) for x in res.base.logp.tolist()], "intervention": res.intervention}


def headline_scores(d: dict | None, quality: dict) -> dict:
    """The printed scores, from the explanation score's `as_dict` (None: no score at this step)."""
    if d is None:
        return {"mi_score": None, **quality}
    return {"mi_score": d["explanation"]["score"], "carried": d["explanation"]["carried"],
            "carried_measured": d["explanation"]["carried_measured"],
            "agreement": d["explanation"]["agreement"], "random_mean": d["random"]["mean"],
            "random_p95": d["random"]["p95"], "random_draws": d["random"]["draws"], "percentile": d["percentile"],
            "most_active": d["most_active"]["score"], **quality}


def explain_step(model, transcoders, tok, row: list[int], positions: list[int], targets: list[int], probs: list[float],
                 descriptions: dict, explainer, cfg: ExplainConfig, prompt_text: str, settings: StepSettings,
                 page_of=lambda layer, feature: None, frequency: dict | None = None) -> tuple[dict, dict]:
    """Everything about one denoising step (`row` is the model's input before the step), and its graph JSON."""
    committed = tok.decode(targets)
    if not positions:
        return {"committed": [], "per_layer_description": [], "total_description": "no token committed at this step",
                "output_score": None, "interpretation_score": None, "raw_ratings": None, "graph": None}, {}
    x = torch.tensor(row, device=next(model.parameters()).device)
    try:
        res = analyse_step(model, transcoders, x, positions, targets, settings)
    except ValueError as e:  # an --intervene that does not fit this run
        raise UserError(str(e)) from None
    rec = graph_record(res, tok, descriptions, page_of, frequency)
    layers = sorted(rec["layers"], key=int)
    path = " → ".join(rec["path"])
    context = tok.decode(row, mask_text=" _").replace(tok.decode([tok.bos_id]), "").strip()
    result: dict[str, Any] = {"committed": [{"position": p, "token": t, "text": tok.decode([t]),
                                             "prob": round(pr, 4)} for p, t, pr in zip(positions, targets, probs)]}
    parts = [(f"layer {lay}", rec["layers"][lay]["share"]) for lay in layers]
    parts += [("input tokens", rec["input_shares"]["tokens"]), ("[MASK] inputs", rec["input_shares"]["masks"])]
    numbers = compose_total(committed, rec["target"], path, rec["path_value"], rec["path_share"], parts)
    if explainer is None:
        layer_texts = [compose_layer(rec["layers"][lay]) for lay in layers]
        total, out_score, interp_score, raws = numbers, None, None, None
    else:
        gen = lambda ps, n: explainer.generate(ps, n)  # noqa: E731
        layer_texts = [t.strip().splitlines()[0] if t.strip() else "(empty answer)" for t in
                       gen([layer_prompt(int(lay), committed, rec["layers"][lay]) for lay in layers],
                           cfg.max_new_tokens)]
        total_raw = gen([total_prompt(committed, context, layer_texts, path, numbers)], cfg.max_new_tokens)[0]
        total = total_raw.strip().splitlines()[0] if total_raw.strip() else "(empty answer)"
        text = f"{prompt_text}{tok.decode(row[len(row) - cfg.gen_length:], mask_text=' _')}"
        rating_raw = gen([OUTPUT_RUBRIC.format(text=text),
                          INTERPRETATION_RUBRIC.format(text=committed, explanation=total)], 4)
        out_score, interp_score = parse_rating(rating_raw[0]), parse_rating(rating_raw[1])
        raws = {"output_score": rating_raw[0], "interpretation_score": rating_raw[1], "total_description": total_raw}
    result.update({"per_layer_description": layer_texts, "total_description": total, "output_score": out_score,
                   "interpretation_score": interp_score, "raw_ratings": raws, "graph": rec})
    prompt_tokens = [tok.decode([t], mask_text="[MASK]") for t in row]
    export = graph_json(res.graph, res.pruned, "", "", prompt_tokens, tok.decode,
                        lambda lay, f: (descriptions.get((lay, f)) or {}).get("description", ""), probs)
    return result, export


def print_step(state_text: str, prompt: str, step: int, s: dict) -> None:
    def show(v, what):
        return str(v) if v is not None else f"unavailable ({what})"

    why = "no LLM explainer" if s.get("raw_ratings") is None else "unparseable answer"
    g = s["graph"]
    sc = (g or {}).get("scores") or {}
    mi = sc.get("mi_score")
    print(f"iteration: {step}")
    print(f"        continuation={prompt}{state_text}")
    print(f"        per layer description={s['per_layer_description']}")
    print(f"        total description={s['total_description']}")
    print(f"        models output score={show(s['output_score'], why)}"
          + (" (the explainer's rating)" if s["output_score"] is not None else ""))
    if mi is None:
        measured = "unavailable (no committed token above uniform, or no feature pushing for it)"
    else:
        measured = (f"{mi:.1f}/10 measured (carried {sc['carried']:.2f} of the demeaned logit, "
                    f"{sc['carried_measured']:+.2f} unclipped, × agreement {sc['agreement']:.2f}); chance: "
                    f"{chance_text(sc)}; "
                    f"the most active features {sc['most_active']:.1f}")
    print(f"        models mechanistic interpretability score={measured}; the explainer's rating: "
          f"{show(s['interpretation_score'], why)}")
    if g:
        print_graph(g)


def print_graph(g: dict) -> None:
    for t in g["target"]["per_token"]:
        print(f"          target {t['text']!r}: demeaned logit {t['value']:+.2f} (pre-cap logit units); log p "
              f"{t['logprob']:.2f} nats, {t['lift']:+.2f} above uniform ({g['target']['uniform_logprob']:.2f})")
    parts = " + ".join(f"layer {lay} {v['part']:+.2f} (features {v['features']:+.2f}, error {v['error']:+.2f}, "
                       f"bias {v['bias']:+.2f})" for lay, v in g["layers"].items())
    print(f"          value {g['whole']:+.2f} logit = input tokens {g['inputs']['tokens']:+.2f} + "
          f"[MASK] inputs {g['inputs']['masks']:+.2f} + {parts}")
    q = g["graph_quality"]
    carried = ("" if g["path_value"] is None else f", carrying {g['path_value']:+.2f} logit"
               + (f" ({g['path_share']:+.0%} of its target)" if g["path_share"] is not None else ""))
    print(f"          graph quality (not the explanation's): replacement {q['replacement']:.2f}, completeness "
          f"{q['completeness']:.2f}; {g['nodes']} nodes ({g['feature_nodes']} features), pruned to "
          f"{g['pruned_nodes']} nodes and {g['pruned_edges']} edges; strongest path: "
          f"{' → '.join(g['path']) or '(none)'}{carried}")
    a = g["single_ablations"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"          single ablations of the cited features ({a['n']} points): graph vs model Pearson "
          f"{fmt(a['pearson_graph_model'])}, sign agreement {fmt(a['sign_agreement'])} (over the {a['n_signed']} "
          f"points above the noise floor); graph vs replacement "
          f"model {fmt(a['pearson_graph_replacement'])}, replacement model vs model "
          f"{fmt(a['pearson_replacement_model'])}"
          + (f"; the model resolves changes of a value down to {g['noise_floor']:.3g} logit (its own rounding)"
             if g["noise_floor"] > NOISE else ""))
    e = g["explanation_score"]
    if e:
        x, r = e["explanation"], e["random"]
        randoms = ("" if r["logp_drop_mean"] is None else
                   f"; random citations {r['logp_drop_mean']:+.3f}, the most active "
                   f"{e['most_active']['logp_drop']:+.3f}")
        print(f"          ablating the top {x['n_ablated']} cited features together: log p drop {x['logp_drop']:+.3f} "
              f"nats measured{randoms}; value change {mean(x['measured_dvalue']):+.3f} measured, "
              f"{mean(x['predicted_dvalue']):+.3f} predicted")
    iv = g.get("intervention")
    if iv:
        predicted = iv["predicted_dvalue"]
        predicted = "n/a (a feature not in the graph)" if predicted is None else predicted
        print(f"          --intervene {','.join(iv['changes'])}: Δ value measured {iv['measured_dvalue']}, predicted "
              f"{predicted}; Δ log p {iv['measured_dlogp']} nats; top tokens change: {iv['top_token_changes']}")


def score_summary(steps: list[dict]) -> dict | None:
    """The explanation's score over a prompt's steps beside its controls; `saturated` when it lies above every
    random draw at every step (then the percentile says only that it beats chance: random citations carry
    almost nothing, and the score itself and the most active features are what tell steps apart)."""
    scored = [st["graph"]["scores"] for st in steps if (st.get("graph") or {}).get("scores", {}).get("mi_score")
              is not None]
    ranked = [sc for sc in scored if sc["percentile"] is not None]
    if not scored:
        return None
    return {"steps": len(scored), "mean_score": mean(sc["mi_score"] for sc in scored),
            "min_score": min(sc["mi_score"] for sc in scored), "max_score": max(sc["mi_score"] for sc in scored),
            "mean_random": mean(sc["random_mean"] for sc in ranked), "max_random_p95": max(
                (sc["random_p95"] for sc in ranked), default=None),
            "mean_most_active": mean(sc["most_active"] for sc in scored),
            "above_all_draws": sum(sc["percentile"] == 100 for sc in ranked),
            "saturated": bool(ranked) and all(sc["percentile"] == 100 for sc in ranked)}


def print_score_summary(summary: dict | None) -> None:
    if summary is None:
        return
    s = summary
    note = ("; the percentile is saturated (random citations carry almost nothing): it says only that the "
            "explanation beats chance, and the score and the most active features tell the steps apart"
            if s["saturated"] else "")
    p95 = "n/a" if s["max_random_p95"] is None else f"{s['max_random_p95']:.1f}"
    print(f"explanation scores over {s['steps']} steps: {s['min_score']:.1f}–{s['max_score']:.1f} (mean "
          f"{s['mean_score']:.1f}); random citations {s['mean_random']:.1f} on average, 95th percentile at most {p95}; "
          f"the most active features {s['mean_most_active']:.1f}; above every random draw at {s['above_all_draws']} "
          f"of {s['steps']} steps{note}")


def recurring(steps: list[dict]) -> list[dict]:
    """Features cited at more than one step of a prompt, with the steps and their total effects there."""
    seen: dict[tuple[int, int], dict] = {}
    for st in steps:
        for lay, info in ((st.get("graph") or {}).get("layers") or {}).items():
            for c in info["for"] + info["against"]:
                r = seen.setdefault((int(lay), c["feature"]), {"layer": int(lay), "feature": c["feature"],
                                                               "description": c["description"], "steps": {}})
                r["steps"][st["step"]] = max(r["steps"].get(st["step"], 0.0), c["total_effect"], key=abs)
    out = [dict(r, steps=[{"step": k, "total_effect": round(v, 4)} for k, v in sorted(r["steps"].items())])
           for r in seen.values() if len(r["steps"]) > 1]
    return sorted(out, key=lambda r: (-len(r["steps"]), r["layer"], r["feature"]))


def feature_frequencies(topk: Path, layers: list[int]) -> dict[tuple[int, int], float]:
    """(layer, feature) → the share of scanned tokens it is active on, from the top-k scan (empty without one)."""
    out = {}
    for layer in layers:
        path = topk / layer_name(layer) / FEATURES_FILE
        if path.exists():
            out.update({(layer, r["feature"]): r["frequency"] for r in read_jsonl(path)})
    return out


def run_explanations(cfg: ExplainConfig, explainer_factory=None) -> Path:
    if cfg.cfg_scale > 0:
        raise UserError(f"--cfg_scale {cfg.cfg_scale}: a guided step commits by logits mixed from two forward passes, "
                        "and the graphs explain only the model's one forward pass; explain with --cfg_scale 0")
    device = resolve_device(cfg.cuda, cfg.device)
    prompts = cfg.model_prompts(run_config(cfg.train_folder))  # --chat refused before the model loads
    config, model, tok, ckpt = load_run(cfg.train_folder, cfg.checkpoint_name, device, cfg.shape_flags())
    folder = Path(cfg.train_folder)
    paths = StagePaths(folder, ckpt.name)
    layers = transcoder_layers(paths.transcoders, "all", model.cfg.num_layers)
    is_path = cfg.explainer.startswith((".", "/", "~"))
    tag = str(Path(cfg.explainer).expanduser()) if is_path and cfg.explainer != TOKENS else cfg.explainer
    descriptions = load_descriptions(paths.records, tag)
    transcoders = load_transcoders(paths.transcoders, layers, device, model.cfg.model_dim)
    adds_bos = cfg.sampler_config().rule(model.cfg) == "diffusionlm"
    cfg.check_lengths(prompts, tok, run_seq_len(config), adds_bos)
    changes = parse_changes(cfg.intervene)  # every node checked against the run before the explainer loads
    shortest = min(len(tok.encode_prompt(p)) for p in prompts)
    check_changes(changes, transcoders, int(adds_bos) + shortest + cfg.gen_length)
    make = explainer_factory or (lambda name: Explainer(name, device, cfg.dtype, cfg.load_in_8bit,
                                                        cfg.trust_remote_code))
    explainer = None if cfg.explainer == TOKENS else make(cfg.explainer)
    settings = StepSettings(cfg.features_per_layer, cfg.node_threshold, cfg.edge_threshold, cfg.faithfulness_features,
                            cfg.random_draws, cfg.graph_batch_size, cfg.seed, changes)
    with contextlib.ExitStack() as stack:
        if cfg.output:  # a file of the user's choosing: its sibling lock keeps two runs from writing it at once
            json_path = Path(cfg.output)
            stack.enter_context(hold_output(json_path))
        else:  # a new explanations/<stamp> folder of this run's own, locked like every stage's output
            json_path = paths.new_explanations() / EXPLANATIONS_FILE
            stack.enter_context(hold(json_path.parent, remove_empty=True))
        return _explain_all(cfg, paths, layers, descriptions, transcoders, explainer, prompts, settings, model, tok,
                            ckpt, tag, device, json_path)


def _explain_all(cfg: ExplainConfig, paths: StagePaths, layers, descriptions, transcoders, explainer, prompts,
                 settings: StepSettings, model, tok, ckpt, tag, device, json_path: Path) -> Path:
    folder = paths.run
    graphs = json_path.parent / (json_path.stem + "_graphs" if cfg.output else GRAPHS_DIR)
    run_name = f"{folder.name}/{ckpt.stem}"
    features_written: set[tuple[int, int]] = set()

    def page_of(layer: int, feature: int) -> str | None:  # the feature browser's page, relative to the report
        page = paths.topk / layer_name(layer) / PAGE_FILE
        if not page.exists():
            return None
        return Path(os.path.relpath(page.resolve(), json_path.parent.resolve())).as_posix() + f"#{feature}"
    frequency = feature_frequencies(paths.topk, layers)
    results = []
    unexplained = {model.cfg.mask_id, *model.cfg.never_predicted()}
    typed = cfg.prompts()  # as typed (with --chat, `prompts` are their renderings)
    for p, prompt in enumerate(prompts):
        with autocast(device):
            out = generate(model, [tok.encode_prompt(prompt)], cfg.sampler_config())
        prefix = out.tokens[0, :out.prompt_width].tolist()
        states = [s[0].tolist() for s in out.states]
        print(f"input: {prompt}")
        steps = []
        for step in range(1, len(states)):
            new = [i for i, c in enumerate(out.committed_at[0].tolist()) if c == step]
            # a released model's sampler excludes nothing: it may draw its mask id, or an id the model never predicts
            # (BOS, the rows above the tokenizer), whose log p the graph leaves undefined
            skipped = [i for i in new if states[step][i] in unexplained]
            if skipped:
                print(f"step {step}: the sampler committed the mask token or an id the model never predicts at "
                      f"position(s) {[out.prompt_width + i for i in skipped]}; they are no target of this step's graph")
                new = [i for i in new if i not in skipped]
            positions = [out.prompt_width + i for i in new]
            targets = [states[step][i] for i in new]
            probs = [float(out.probs[0, i]) for i in new]
            s, export = explain_step(model, transcoders, tok, prefix + states[step - 1], positions, targets, probs,
                                     descriptions, explainer, cfg, prompt, settings, page_of, frequency)
            s["step"] = step
            s["skipped_commits"] = [out.prompt_width + i for i in skipped]  # positions left out of the graph
            s["input_ids"] = prefix + states[step - 1]  # what the model read at this step
            s["state_ids"] = states[step]
            s["state_text"] = tok.decode(states[step], mask_text=" _")
            if export:
                slug = f"p{p}_step{step:03d}"
                export["metadata"].update(slug=slug, scan=FEATURE_SCAN)  # where the viewer finds the feature files
                s["graph"]["file"] = str(write_graph(graphs, export, cfg.node_threshold).relative_to(json_path.parent))
                cited = cited_features(export) - features_written  # each feature's file once per run
                write_feature_files(graphs, cited, lambda la: paths.topk / layer_name(la),
                                    lambda la: f"{run_name}/{layer_name(la)}")
                features_written |= cited
            steps.append(s)
            print_step(s["state_text"], prompt, step, s)
        completion = tok.decode(states[-1])
        summary = score_summary(steps)
        print_score_summary(summary)
        print(f"final: {prompt}{completion}\n")
        as_typed = {"typed_prompt": typed[p]} if cfg.chat else {}  # the prompt as typed, beside its rendering
        results.append({**as_typed, "prompt": prompt, "completion": completion, "steps": steps,
                        "recurring": recurring(steps), "score_summary": summary})
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_path, {"checkpoint": str(ckpt), "explainer": tag, "layers": layers,
                                  "sampler": cfg.sampler_config().__dict__, "settings": asdict(settings),
                                  "mi_score_formula": MI_FORMULA, "prompts": results})
    report = write_report(json_path.with_name(json_path.stem + "_report.html" if cfg.output else REPORT_FILE),
                          results, tag, str(ckpt))
    print(f"explanations: {json_path}\nreport: {report}\ngraphs (circuit-tracer's viewer): {graphs}")
    return json_path
