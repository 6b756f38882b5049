"""generate_descriptions.py's work: generate step by step, attribute every committed token to the
transcoder features of every layer, describe each step, score it, print, write JSON and an HTML report."""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch

from core.files import UserError, write_json_atomic
from experiment import StagePaths, load_run, load_transcoders, resolve_device, transcoder_layers
from experiment.paths import EXPLANATIONS_FILE, GRAPHS_DIR, PAGE_FILE, REPORT_FILE, layer_name
from interp.descriptions_stage import TOKENS, read_records
from interp.explain_report import write_report
from interp.explain_step import (
    INTERPRETATION_RUBRIC,
    OUTPUT_RUBRIC,
    compose_layer,
    compose_total,
    layer_prompt,
    parse_rating,
    short,
    total_prompt,
)
from interp.graph import FEATURE, MASK, TARGET, TOKEN
from interp.graph_export import graph_json, write_graph
from interp.interventions import parse_changes
from interp.step_analysis import MI_FORMULA, StepSettings, analyse_step
from model.explainer import Explainer
from model.precision import autocast
from model.sampler import generate

UNDESCRIBED = "(no description)"


def load_descriptions(path: Path, tag: str) -> dict[tuple[int, int], dict]:
    records = [r for r in read_records(path) if r["explainer"] == tag and r["description"]]
    if not records:
        raise UserError(f"no descriptions by {tag!r} in {path}: run get_activation_descriptions.py --explainer "
                        f"{tag} for this checkpoint first")
    return {(r["layer"], r["feature"]): r for r in records}


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def node_name(g, i: int, tok, descriptions: dict) -> str:
    kind = g.kind(i)
    layer, pos = g.where(i)
    if kind == FEATURE:
        feature = int(g.feature_nodes[i, 2])
        rec = descriptions.get((layer, feature))
        return f'L{layer}#{feature} "{short(rec["description"], 40) if rec else UNDESCRIBED}"'
    if kind == TARGET:
        return repr(tok.decode([g.targets[i - g.target_start]]))
    if kind == TOKEN:
        return f"input {tok.decode([g.tokens[pos]])!r}"
    if kind == MASK:
        return f"[MASK]@{pos}"
    return f"L{layer} error@{pos}"


def graph_record(res: dict, tok, descriptions: dict, page_of=lambda layer, feature: None) -> dict:
    """The step's graph in numbers (means over the committed tokens, which weigh equally). `whole` is the
    targets' value, which the parts (inputs and layers) add up to; shares are parts over the gross flow
    Σ|parts|, so they stay readable when pushes for and against nearly cancel."""
    g, parts, effects = res["graph"], res["parts"], res["effects"]
    rows = g.adjacency[g.target_start:]
    inputs = {k: mean(v) for k, v in parts["inputs"].items()}
    layer_parts = {lay: {k: mean(v) for k, v in p.items()} for lay, p in parts["layers"].items()}
    totals = {lay: sum(p.values()) for lay, p in layer_parts.items()}
    gross = sum(abs(v) for v in inputs.values()) + sum(abs(v) for v in totals.values()) or 1.0
    layers = {}
    for lay, nodes in res["cited"].items():
        p = layer_parts[str(lay)]
        cited = []
        for i in nodes:
            _, pos, feature = g.feature_nodes[i].tolist()
            rec = descriptions.get((lay, feature)) or {}
            direct = float(rows[:, i].mean())
            cited.append({"feature": feature, "position": pos, "activation": round(float(g.activations[i]), 4),
                          "direct": direct, "direct_share": direct / gross, "total_effect": float(effects[:, i].mean()),
                          "description": rec.get("description", UNDESCRIBED),
                          "detection_auroc": ((rec.get("scores") or {}).get("detection") or {}).get("auroc"),
                          "check": res["checks"][i].as_dict(), "page": page_of(lay, feature)})
        layers[str(lay)] = {"part": totals[str(lay)], "share": totals[str(lay)] / gross, **p,
                            "other_features": p["features"] - sum(c["direct"] for c in cited), "cited": cited}
    pr = res["pruned"]
    return {"whole": mean(parts["whole"]), "gross": gross, "inputs": inputs,
            "input_shares": {k: v / gross for k, v in inputs.items()}, "layers": layers,
            "path": [node_name(g, i, tok, descriptions) for i in res["path"]],
            "nodes": int(g.adjacency.shape[0]), "feature_nodes": g.n_features,
            "pruned_nodes": int(pr.node_mask.sum()), "pruned_edges": pr.n_edges,
            "faithfulness": res["faith"].as_dict() if res["faith"] else None,
            "scores": res["scores"], "logprobs": [round(x, 5) for x in res["base_logprobs"]],
            "intervention": res["intervention"]}


def explain_step(model, transcoders, tok, row: list[int], positions: list[int], targets: list[int], probs: list[float],
                 descriptions: dict, explainer, cfg, prompt_text: str, settings: StepSettings,
                 page_of=lambda layer, feature: None) -> tuple[dict, dict]:
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
    rec = graph_record(res, tok, descriptions, page_of)
    layers = sorted(rec["layers"], key=int)
    path = " → ".join(rec["path"])
    context = tok.decode(row, mask_text=" _").replace(tok.decode([tok.bos_id]), "").strip()
    result = {"committed": [{"position": p, "token": t, "text": tok.decode([t]), "prob": round(pr, 4)}
                            for p, t, pr in zip(positions, targets, probs)]}
    parts = [(f"layer {lay}", rec["layers"][lay]["share"]) for lay in layers]
    parts += [("input tokens", rec["input_shares"]["tokens"]), ("[MASK] inputs", rec["input_shares"]["masks"])]
    if explainer is None:
        layer_texts = [compose_layer(rec["layers"][lay]) for lay in layers]
        total, out_score, interp_score, raws = compose_total(committed, path, parts), None, None, None
    else:
        gen = lambda ps, n: explainer.generate(ps, n)  # noqa: E731
        layer_texts = [t.strip().splitlines()[0] if t.strip() else "(empty answer)" for t in
                       gen([layer_prompt(int(lay), committed, rec["layers"][lay]) for lay in layers],
                           cfg.max_new_tokens)]
        total_raw = gen([total_prompt(committed, context, layer_texts, path)], cfg.max_new_tokens)[0]
        total = total_raw.strip().splitlines()[0] if total_raw.strip() else "(empty answer)"
        text = f"{prompt_text}{tok.decode(row[len(row) - cfg.gen_length:], mask_text=' _')}"
        rating_raw = gen([OUTPUT_RUBRIC.format(text=text),
                          INTERPRETATION_RUBRIC.format(text=committed, explanation=total)], 4)
        out_score, interp_score = parse_rating(rating_raw[0]), parse_rating(rating_raw[1])
        raws = {"output_score": rating_raw[0], "interpretation_score": rating_raw[1], "total_description": total_raw}
    result.update({"per_layer_description": layer_texts, "total_description": total, "output_score": out_score,
                   "interpretation_score": interp_score, "raw_ratings": raws, "graph": rec})
    prompt_tokens = [tok.decode([t], mask_text="[MASK]") for t in row]
    export = graph_json(res["graph"], res["pruned"], "", "", prompt_tokens, tok.decode,
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
    measured = (f"{mi:.1f}/10 measured (replacement {sc['replacement']:.2f}, completeness {sc['completeness']:.2f}, "
                f"faithfulness {sc['faithfulness']:.2f} = specificity {sc['specificity']:.2f} × agreement "
                f"{sc['agreement']:.2f}; {sc['mi_score_if_random']:.1f} if the cited features were random)"
                if mi is not None else
                "unavailable (no committed token, no cited feature, or no random set to compare with)")
    print(f"        models mechanistic interpretability score={measured}; the explainer's rating: "
          f"{show(s['interpretation_score'], why)}")
    if g:
        parts = ", ".join(f"layer {lay} {v['part']:+.2f}" for lay, v in g["layers"].items())
        print(f"          target value {g['whole']:+.2f} nats = input tokens {g['inputs']['tokens']:+.2f} + "
              f"[MASK] inputs {g['inputs']['masks']:+.2f} + {parts}")
        print(f"          graph: {g['nodes']} nodes ({g['feature_nodes']} features), pruned to {g['pruned_nodes']} "
              f"nodes and {g['pruned_edges']} edges; strongest path: {' → '.join(g['path']) or '(none)'}")
        f = g["faithfulness"]
        if f:
            flips = sum(c for c in f.get("top_token_changes", []))
            randoms = ("no random set of the same size (too few other active features)" if f["random_drop_mean"] is None
                       else f"{f['random_drop_mean']:+.3f} for random features of the same layers "
                            f"({f['random_draws']} draws)")
            print(f"          ablating the top {f['n_ablated']} cited features: log-prob drop {f['cited_drop']:+.3f} "
                  f"measured ({f['cited_predicted_drop']:+.3f} predicted) vs {randoms}; top tokens changed: {flips}")
        iv = g.get("intervention")
        if iv:
            predicted = iv["predicted_dlogp"]
            predicted = "n/a (a feature not in the graph)" if predicted is None else predicted
            print(f"          --intervene {','.join(iv['changes'])}: Δ log p measured {iv['measured_dlogp']}, "
                  f"predicted {predicted}; top tokens change: {iv['top_token_changes']}")


def recurring(steps: list[dict]) -> list[dict]:
    """Features cited at more than one step of a prompt, with the steps and their total effects there."""
    seen: dict[tuple[int, int], dict] = {}
    for st in steps:
        for lay, info in ((st.get("graph") or {}).get("layers") or {}).items():
            for c in info["cited"]:
                r = seen.setdefault((int(lay), c["feature"]), {"layer": int(lay), "feature": c["feature"],
                                                               "description": c["description"], "steps": {}})
                r["steps"][st["step"]] = max(r["steps"].get(st["step"], float("-inf")), c["total_effect"])
    out = [dict(r, steps=[{"step": k, "total_effect": round(v, 4)} for k, v in sorted(r["steps"].items())])
           for r in seen.values() if len(r["steps"]) > 1]
    return sorted(out, key=lambda r: (-len(r["steps"]), r["layer"], r["feature"]))


def run_explanations(cfg, explainer_factory=None) -> Path:
    device = resolve_device(cfg.cuda, cfg.device)
    config, model, tok, ckpt = load_run(cfg.train_folder, cfg.checkpoint_name, device, cfg.shape_flags())
    folder = Path(cfg.train_folder)
    paths = StagePaths(folder, ckpt.name)
    layers = transcoder_layers(paths.transcoders, "all", model.cfg.num_layers)
    is_path = cfg.explainer.startswith((".", "/", "~"))
    tag = str(Path(cfg.explainer).expanduser()) if is_path and cfg.explainer != TOKENS else cfg.explainer
    descriptions = load_descriptions(paths.records, tag)
    transcoders = load_transcoders(paths.transcoders, layers, device, model.cfg.model_dim)
    make = explainer_factory or (lambda name: Explainer(name, device, cfg.dtype, cfg.load_in_8bit,
                                                        cfg.trust_remote_code))
    explainer = None if cfg.explainer == TOKENS else make(cfg.explainer)
    prompts = cfg.prompts()
    cfg.check_lengths(prompts, tok, config["train"]["train_seq_len"])
    settings = StepSettings(cfg.features_per_layer, cfg.node_threshold, cfg.edge_threshold, cfg.faithfulness_features,
                            cfg.random_draws, cfg.graph_batch_size, cfg.seed, parse_changes(cfg.intervene))
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    json_path = Path(cfg.output) if cfg.output else paths.explanations(stamp) / EXPLANATIONS_FILE
    graphs = json_path.parent / (json_path.stem + "_graphs" if cfg.output else GRAPHS_DIR)
    scan = f"{folder.name}/{ckpt.name}"

    def page_of(layer: int, feature: int) -> str | None:  # the feature browser's page, relative to the report
        page = paths.topk / layer_name(layer) / PAGE_FILE
        if not page.exists():
            return None
        return Path(os.path.relpath(page.resolve(), json_path.parent.resolve())).as_posix() + f"#{feature}"
    results = []
    for p, prompt in enumerate(prompts):
        with autocast(device):
            out = generate(model, [tok.encode(prompt)], cfg.sampler())
        prefix = out.tokens[0, :out.prompt_width].tolist()
        states = [s[0].tolist() for s in out.states]
        print(f"input: {prompt}")
        steps = []
        for step in range(1, len(states)):
            new = [i for i, c in enumerate(out.committed_at[0].tolist()) if c == step]
            positions = [out.prompt_width + i for i in new]
            targets = [states[step][i] for i in new]
            probs = [float(out.probs[0, i]) for i in new]
            s, export = explain_step(model, transcoders, tok, prefix + states[step - 1], positions, targets, probs,
                                     descriptions, explainer, cfg, prompt, settings, page_of)
            s["step"] = step
            s["state_ids"] = states[step]
            s["state_text"] = tok.decode(states[step], mask_text=" _")
            if export:
                slug = f"p{p}_step{step:03d}"
                export["metadata"].update(slug=slug, scan=scan)
                s["graph"]["file"] = str(write_graph(graphs, export, cfg.node_threshold).relative_to(json_path.parent))
            steps.append(s)
            print_step(s["state_text"], prompt, step, s)
        completion = tok.decode(states[-1])
        print(f"final: {prompt}{completion}\n")
        results.append({"prompt": prompt, "completion": completion, "steps": steps, "recurring": recurring(steps)})
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_path, {"checkpoint": str(ckpt), "explainer": tag, "layers": layers,
                                  "sampler": cfg.sampler().__dict__, "settings": settings.__dict__,
                                  "mi_score_formula": MI_FORMULA, "prompts": results})
    report = write_report(json_path.with_name(json_path.stem + "_report.html" if cfg.output else REPORT_FILE),
                          results, tag, str(ckpt))
    print(f"explanations: {json_path}\nreport: {report}\ngraphs (circuit-tracer's viewer): {graphs}")
    return json_path
